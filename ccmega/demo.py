"""`ccmega demo`: the paper's study at toy scale on a CPU, from the bundled Pile-format sample to Table 3.

    sample Pile shards -> SentencePiece tokenizer -> D1 and D6 (+ held-out fine-tune/test splits)
      -> tiny LMs pretrained on D1 and on D6 -> ICAE fine-tuned for Table 3's triples
         (encoder/decoder D1/D1, D1/D6, D6/D1, all on D1 data) -> evaluation -> report (tables, figures)
      -> the D1 model converted to Hugging Face and verified.

Every stage runs the real command (`ccmega preprocess`, `pretrain`, `icae-train`, `evaluate`, `report`,
`convert`) in its own process, writes under one folder, and leaves a marker when it finishes, so a
rerun skips finished stages. `--quick` is the same path at a smaller scale (used by the tests);
`--scale small` trains longer, fine-tunes each pair with two ICAE seeds on more test windows, and checks
Table 3's ordering with paired bootstrap intervals (`ccmega.evaluation.ordering`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from ccmega.fileio import atomic_write_text

# Table 3's triples (encoder recipe, decoder recipe); the data is always D1.
TABLE3_PAIRS = [("D1", "D1"), ("D1", "D6"), ("D6", "D1")]


@dataclass(frozen=True)
class DemoScale:
    """Toy-scale knobs. The paper: 50B tokens, 200M-1B models, k = 128, L = 512, r = 4."""

    preset: str = "qwen3-toy"
    vocab_size: int = 2048  # SentencePiece vocabulary trained on the sample
    tokens_per_dataset: str = "400k"  # pretraining tokens of D1 and of D6
    seq_length: int = 128
    pretrain_steps: int = 1000  # 5 passes over the 400k tokens: 400 steps give a decoder no prefix can drive
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    context_tokens: int = 64  # L
    memory_slots: int = 16  # k = L / r with r = 4, the paper's ratio
    finetune_samples: int = 3000
    test_samples: int = 400  # the controls' bootstrap interval narrows as 1 / sqrt(samples)
    icae_steps: int = 600
    icae_batch: int = 16  # 600 x 16 beat 300 x 32 and 1200 x 8 at the same cost (docs/icae_study.md)
    icae_lr: float = 3e-3
    icae_seeds: tuple = (1234,)  # one ICAE per pair and seed; the first seed's is the one reported


FULL = DemoScale()
SMALL = DemoScale(pretrain_steps=1500, test_samples=800, icae_steps=1200, icae_seeds=(1234, 1235))
QUICK = DemoScale(tokens_per_dataset="60k", pretrain_steps=8, pretrain_batch=8, finetune_samples=64,
                  test_samples=8, icae_steps=4, icae_batch=8, context_tokens=32, memory_slots=8)
SCALES = {"toy": FULL, "small": SMALL}
# Table 3 of the paper, best first (F1 81.57 > 75.86 > 69.44 at 500M).
TABLE3_ORDER = ["D1/D1", "D6/D1", "D1/D6"]


def icae_name(enc: str, dec: str, seed: int, s: DemoScale) -> str:
    """Run and evaluation folder name of one pair and seed (the first seed keeps the plain name)."""
    return f"{enc}_{dec}" + ("" if seed == s.icae_seeds[0] else f"_seed{seed}")


def eval_dir(out: str, enc: str, dec: str, seed: int, s: DemoScale) -> str:
    # later seeds outside eval/: `ccmega report` reads eval/ and shows one row per pair
    parent = "eval" if seed == s.icae_seeds[0] else "eval_seeds"
    return os.path.join(out, parent, icae_name(enc, dec, seed, s))


class Stage:
    """One step of the demo: a command line, the seconds it is expected to take, a done-marker, and for a
    training stage its run dir (whose status.json must say finished: a run stopped by a signal exits 0;
    a run that died says failed, with its error)."""

    def __init__(self, name: str, argv: list[str], estimate_s: float, run_dir: str | None = None):
        self.name, self.argv, self.estimate_s, self.run_dir = name, argv, estimate_s, run_dir

    def marker(self, out: str) -> str:
        return os.path.join(out, ".stages", self.name.replace(" ", "_").replace("/", "-") + ".done")


def plan(out: str, s: DemoScale, quick: bool) -> list[Stage]:
    data, runs = os.path.join(out, "data"), os.path.join(out, "runs")
    tok = os.path.join(out, "tokenizer", "spm.model")
    ccmega = [sys.executable, "-m", "ccmega.cli"]
    scale = 0.1 if quick else 1.0
    stages = [
        Stage("tokenizer", ccmega + ["train-tokenizer", "--input", "@sample", "--output", tok,
                                     "--vocab-size", str(s.vocab_size)], 15),
        Stage("data", ccmega + ["preprocess", "--input", "@sample", "--output", data, "--recipes", "D1,D6",
                                "--tokenizer", tok, "--tokens-per-dataset", s.tokens_per_dataset,
                                "--context-tokens", str(s.context_tokens),
                                "--finetune-samples", str(s.finetune_samples), "--test-samples", str(s.test_samples),
                                "--finetune-fraction", "0.3", "--test-fraction", "0.1", "--workers", "2"], 20),
    ]
    for recipe in ("D1", "D6"):
        run_dir = os.path.join(runs, f"lm_{recipe}")
        stages.append(Stage(f"pretrain {recipe}", ccmega + [
            "pretrain", "--run-dir", run_dir, "--preset", s.preset,
            "--data", os.path.join(data, recipe, "pretrain"), "--tokenizer", tok,
            "--seq-length", str(s.seq_length), "--steps", str(s.pretrain_steps),
            "--global-batch-size", str(s.pretrain_batch), "--micro-batch-size", str(s.pretrain_batch),
            "--lr", str(s.pretrain_lr), "--warmup-steps", str(max(1, s.pretrain_steps // 20)),
            "--save-interval", "0", "--eval-interval", "0", "--set", "optim.min_lr=" + str(s.pretrain_lr / 10),
            "--set", "logging.tensorboard=false", "--set", f"logging.log_interval={max(1, s.pretrain_steps // 10)}"],
            0.2 * s.pretrain_steps * scale + 10, run_dir))
    for (enc, dec), seed in [(pair, seed) for seed in s.icae_seeds for pair in TABLE3_PAIRS]:
        name = icae_name(enc, dec, seed, s)
        tag = f"{enc}-{dec}" + ("" if seed == s.icae_seeds[0] else f" seed {seed}")
        stages.append(Stage(f"icae {tag}", ccmega + [
            "icae-train", "--run-dir", os.path.join(runs, f"icae_{name}"), "--set", f"train.seed={seed}",
            "--encoder", os.path.join(runs, f"lm_{enc}"), "--decoder", os.path.join(runs, f"lm_{dec}"),
            "--data", os.path.join(data, "D1", "finetune"), "--memory-slots", str(s.memory_slots),
            "--context-tokens", str(s.context_tokens), "--steps", str(s.icae_steps),
            "--micro-batch-size", str(s.icae_batch), "--lr", str(s.icae_lr),
            "--warmup-steps", str(max(1, s.icae_steps // 20)), "--save-interval", "0", "--eval-interval", "0",
            "--set", "logging.tensorboard=false", "--set", f"logging.log_interval={max(1, s.icae_steps // 10)}"],
            0.22 * s.icae_steps * scale + 10, os.path.join(runs, f"icae_{name}")))
        stages.append(Stage(f"evaluate {tag}", ccmega + [
            "evaluate", "--icae", os.path.join(runs, f"icae_{name}"), "--data", os.path.join(data, "D1", "test"),
            "--output-dir", eval_dir(out, enc, dec, seed, s), "--batch-size", "50",
            "--encoder-recipe", enc, "--decoder-recipe", dec, "--data-recipe", "D1", "--controls"],
            0.18 * s.test_samples * scale + 10))
    stages += [
        Stage("report", ccmega + ["report", os.path.join(out, "eval"), "--out", os.path.join(out, "report")], 10),
        Stage("convert", ccmega + ["convert", "to-hf", os.path.join(runs, "lm_D1"), os.path.join(out, "hf", "lm_D1"),
                                   "--verify", "--overwrite"], 20),
    ]
    return stages


def _fmt(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_stages(out: str, stages: list[Stage], log_dir: str) -> float:
    os.makedirs(os.path.join(out, ".stages"), exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    remaining = sum(st.estimate_s for st in stages if not os.path.exists(st.marker(out)))
    print(f"ccmega demo: {len(stages)} stages into {out} (about {_fmt(remaining)} of work left)", flush=True)
    start = time.time()
    for i, st in enumerate(stages, 1):
        tag = f"[{i}/{len(stages)}] {st.name}"
        if os.path.exists(st.marker(out)):
            print(f"{tag}: done earlier, reused", flush=True)
            continue
        log = os.path.join(log_dir, os.path.basename(st.marker(out))[: -len(".done")] + ".log")
        print(f"{tag}: running (about {_fmt(st.estimate_s)}; log {log})", flush=True)
        t0 = time.time()
        with open(log, "w") as f:
            proc = subprocess.run(st.argv, stdout=f, stderr=subprocess.STDOUT, env=_child_env())
        took = time.time() - t0
        error = _failure(st.run_dir, since=t0)
        if proc.returncode != 0 or error:
            with open(log) as f:
                tail = "".join(f.readlines()[-25:])
            raise SystemExit(f"{tag} failed (exit {proc.returncode}) after {_fmt(took)}"
                             + (f": {error}" if error else "")
                             + f"; last lines of {log}:\n{tail}\ncommand: {' '.join(st.argv)}")
        unfinished = _unfinished(st.run_dir)
        if unfinished:
            raise SystemExit(f"{tag} stopped before finishing ({unfinished}); run the same `ccmega demo` again to "
                             "resume it from its last checkpoint")
        with open(st.marker(out), "w") as f:
            json.dump({"seconds": took, "argv": st.argv}, f)
        remaining -= st.estimate_s
        print(f"{tag}: done in {_fmt(took)} (total {_fmt(time.time() - start)}, about {_fmt(max(remaining, 0))} left)",
              flush=True)
    return time.time() - start


def _failure(run_dir: str | None, since: float) -> str | None:
    """The error a training stage's status.json recorded (state failed) in the attempt begun at `since`."""
    path = os.path.join(run_dir, "status.json") if run_dir else None
    try:
        if path is None or os.path.getmtime(path) < since - 1:  # none, or an earlier attempt's
            return None
        with open(path) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("state") != "failed":
        return None
    return f"{status.get('error') or 'no error recorded'} ({path})"


def _unfinished(run_dir: str | None) -> str | None:
    """Why a training stage that exited 0 did not finish (its status.json), or None."""
    if run_dir is None:
        return None
    try:
        with open(os.path.join(run_dir, "status.json")) as f:
            status = json.load(f)
    except (OSError, ValueError) as e:
        return f"no readable {os.path.join(run_dir, 'status.json')}: {e}"
    if status.get("state") == "finished":
        return None
    return f"{run_dir}/status.json: {status.get('state')} at step {status.get('iteration')}/{status.get('steps')}"


# Everything the stages write under --out: --fresh removes it all, so no stage resumes an old checkpoint.
STAGE_OUTPUTS = ("tokenizer", "data", "runs", "eval", "eval_seeds", "report", "hf", "logs", ".stages",
                 "table3.md", "table3.json")


def clear_outputs(out: str) -> None:
    for name in STAGE_OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.remove(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _child_env() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)  # each child is its own world of one
    return env


def table3(out: str, s: DemoScale) -> tuple[str, dict]:
    """Our Table 3 (mean over ICAE seeds) beside the paper's, each pair's memory control, and the paired
    comparisons of Table 3's ordering. Returns (Markdown, the same as a record)."""
    from ccmega.evaluation.ordering import check_ordering, describe
    from ccmega.evaluation.paper_results import lookup

    seeds = s.icae_seeds
    rows = [f"| Encoder | Decoder | Data | F1 | BLEU | ROUGE-L | own − shuffled F1 [95% CI] per seed | paper F1 / BLEU / "
            "ROUGE-L |", "|---|---|---|---:|---:|---:|---|---|"]
    record, pairs = {"seeds": list(seeds), "pairs": {}}, {}
    for enc, dec in TABLE3_PAIRS:
        folders = [eval_dir(out, enc, dec, seed, s) for seed in seeds]
        summaries = []
        for folder in folders:
            with open(os.path.join(folder, "summary.json")) as f:
                summaries.append(json.load(f))
        mean = {key: sum(x["metrics"][key] for x in summaries) / len(summaries) for key in ("f1", "bleu_corpus", "rougeL")}
        gaps = [x["controls"]["gap_own_minus_shuffled"]["f1"] for x in summaries if "controls" in x]
        gap_text = "; ".join(f"{g['mean']:+.2f} [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]" for g in gaps) or "-"
        paper = lookup(enc, "500M", dec, "500M", "D1")
        ref = f"{paper.f1:.2f} / {paper.bleu:.2f} / {paper.rougeL:.2f}" if paper else "-"
        rows.append(f"| LLM_{enc} | LLM_{dec} | D1 | {mean['f1']:.2f} | {mean['bleu_corpus']:.2f} | {mean['rougeL']:.2f} | "
                    f"{gap_text} | {ref} |")
        pairs[f"{enc}/{dec}"] = folders
        record["pairs"][f"{enc}/{dec}"] = {"mean": mean, "f1_gap_own_minus_shuffled": gaps,
                                           "memory_used_every_seed": bool(gaps) and all(g["ci95"][0] > 0 for g in gaps)}
    record["ordering"] = check_ordering(pairs, TABLE3_ORDER)
    lines = "\n".join(rows) + (f"\n\nTable 3's ordering {' > '.join(TABLE3_ORDER)}, paired over the same test "
                               f"windows (per-sample scores averaged over {len(seeds)} seed(s); 95% bootstrap "
                               "intervals):\n" + "\n".join(f"- {describe(r)}" for r in record["ordering"]))
    return lines, record


def check_scale(out: str, scale: DemoScale) -> None:
    """Finished stages are reused by name: refuse to mix the stages of two scales in one folder."""
    path = os.path.join(out, "demo_scale.json")
    if not os.path.exists(path) or not os.path.isdir(os.path.join(out, ".stages")):
        return
    with open(path) as f:
        earlier = json.load(f)
    if earlier != json.loads(json.dumps(asdict(scale))):
        raise SystemExit(f"ccmega demo: {out} holds stages of another scale ({path}); pass --fresh to redo them at "
                         "this one, or give another --out")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ccmega demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for every output (default runs/demo, runs/demo_small at --scale small)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="toy",
                        help="toy (default, ~20 min on 2 cores) or small (~1 h: two ICAE seeds, Table 3's ordering)")
    parser.add_argument("--quick", action="store_true", help="the same path at a much smaller scale (tests)")
    parser.add_argument("--fresh", action="store_true", help="delete every earlier output under --out and redo all")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else SCALES[args.scale]
    out = args.out or ("runs/demo" if args.scale == "toy" else f"runs/demo_{args.scale}")
    if args.fresh:
        clear_outputs(out)
    else:
        check_scale(out, scale)
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "demo_scale.json"), json.dumps(asdict(scale), indent=2) + "\n")
    took = run_stages(out, plan(out, scale, args.quick), os.path.join(out, "logs"))
    table, record = table3(out, scale)
    atomic_write_text(os.path.join(out, "table3.md"), table + "\n")
    atomic_write_text(os.path.join(out, "table3.json"), json.dumps(record, indent=2) + "\n")
    print(f"\nTable 3 at {'quick' if args.quick else args.scale} scale (reconstruction of D1 test contexts, %):\n"
          + table)
    print(f"\nreport: {os.path.join(out, 'report', 'report.md')}; Table 3: {os.path.join(out, 'table3.md')}; "
          f"Hugging Face model: {os.path.join(out, 'hf', 'lm_D1')}; finished in {_fmt(took)}")
    return 0
