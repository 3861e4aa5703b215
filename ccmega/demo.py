"""`ccmega demo`: the paper's study at toy scale on a CPU, from the bundled Pile-format sample to Table 3.

    sample Pile shards -> SentencePiece tokenizer -> D1 and D6 (+ held-out fine-tune/test splits)
      -> tiny LMs pretrained on D1 and on D6 -> ICAE fine-tuned for Table 3's triples
         (encoder/decoder D1/D1, D1/D6, D6/D1, all on D1 data) -> evaluation -> report (tables, figures)
      -> the D1 model converted to Hugging Face and verified.

Every stage runs the real command (`ccmega preprocess`, `pretrain`, `icae-train`, `evaluate`, `report`,
`convert`) in its own process, writes under one folder, and leaves a marker when it finishes, so a
rerun skips finished stages. `--quick` is the same path at a smaller scale (used by the tests).
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

# Table 3's triples (encoder recipe, decoder recipe); the data is always D1.
TABLE3_PAIRS = [("D1", "D1"), ("D1", "D6"), ("D6", "D1")]


@dataclass(frozen=True)
class DemoScale:
    """Toy-scale knobs. The paper: 50B tokens, 200M-1B models, k = 128, L = 512, r = 4."""

    preset: str = "qwen3-toy"
    vocab_size: int = 2048  # SentencePiece vocabulary trained on the sample
    tokens_per_dataset: str = "400k"  # pretraining tokens of D1 and of D6
    seq_length: int = 128
    pretrain_steps: int = 400
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    context_tokens: int = 64  # L
    memory_slots: int = 16  # k = L / r with r = 4, the paper's ratio
    finetune_samples: int = 3000
    test_samples: int = 100
    icae_steps: int = 300
    icae_batch: int = 32
    icae_lr: float = 1e-3


FULL = DemoScale()
QUICK = DemoScale(tokens_per_dataset="60k", pretrain_steps=8, pretrain_batch=8, finetune_samples=64,
                  test_samples=8, icae_steps=4, icae_batch=8, context_tokens=32, memory_slots=8)


class Stage:
    """One step of the demo: a command line, the seconds it is expected to take, a done-marker."""

    def __init__(self, name: str, argv: list[str], estimate_s: float):
        self.name, self.argv, self.estimate_s = name, argv, estimate_s

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
        stages.append(Stage(f"pretrain {recipe}", ccmega + [
            "pretrain", "--run-dir", os.path.join(runs, f"lm_{recipe}"), "--preset", s.preset,
            "--data", os.path.join(data, recipe, "pretrain"), "--tokenizer", tok,
            "--seq-length", str(s.seq_length), "--steps", str(s.pretrain_steps),
            "--global-batch-size", str(s.pretrain_batch), "--micro-batch-size", str(s.pretrain_batch),
            "--lr", str(s.pretrain_lr), "--warmup-steps", str(max(1, s.pretrain_steps // 20)),
            "--save-interval", "0", "--eval-interval", "0", "--set", "optim.min_lr=" + str(s.pretrain_lr / 10),
            "--set", "logging.tensorboard=false", "--set", f"logging.log_interval={max(1, s.pretrain_steps // 10)}"],
            150 * scale + 10))
    for enc, dec in TABLE3_PAIRS:
        stages.append(Stage(f"icae {enc}-{dec}", ccmega + [
            "icae-train", "--run-dir", os.path.join(runs, f"icae_{enc}_{dec}"),
            "--encoder", os.path.join(runs, f"lm_{enc}"), "--decoder", os.path.join(runs, f"lm_{dec}"),
            "--data", os.path.join(data, "D1", "finetune"), "--memory-slots", str(s.memory_slots),
            "--context-tokens", str(s.context_tokens), "--steps", str(s.icae_steps),
            "--micro-batch-size", str(s.icae_batch), "--lr", str(s.icae_lr),
            "--warmup-steps", str(max(1, s.icae_steps // 20)), "--save-interval", "0", "--eval-interval", "0",
            "--set", "logging.tensorboard=false", "--set", f"logging.log_interval={max(1, s.icae_steps // 10)}"],
            120 * scale + 10))
        stages.append(Stage(f"evaluate {enc}-{dec}", ccmega + [
            "evaluate", "--icae", os.path.join(runs, f"icae_{enc}_{dec}"), "--data", os.path.join(data, "D1", "test"),
            "--output-dir", os.path.join(out, "eval", f"{enc}_{dec}"), "--batch-size", "50",
            "--encoder-recipe", enc, "--decoder-recipe", dec, "--data-recipe", "D1", "--controls"], 30 * scale + 10))
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
        if proc.returncode != 0:
            with open(log) as f:
                tail = "".join(f.readlines()[-25:])
            raise SystemExit(f"{tag} failed (exit {proc.returncode}) after {_fmt(took)}; last lines of {log}:\n{tail}"
                             f"\ncommand: {' '.join(st.argv)}")
        with open(st.marker(out), "w") as f:
            json.dump({"seconds": took, "argv": st.argv}, f)
        remaining -= st.estimate_s
        print(f"{tag}: done in {_fmt(took)} (total {_fmt(time.time() - start)}, about {_fmt(max(remaining, 0))} left)",
              flush=True)
    return time.time() - start


# Everything the stages write under --out: --fresh removes it all, so no stage resumes an old checkpoint.
STAGE_OUTPUTS = ("tokenizer", "data", "runs", "eval", "report", "hf", "logs", ".stages")


def clear_outputs(out: str) -> None:
    for name in STAGE_OUTPUTS:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def _child_env() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)  # each child is its own world of one
    return env


def table3(out: str) -> str:
    """Our Table 3 rows (from the evaluation summaries) beside the paper's."""
    from ccmega.evaluation.paper_results import lookup

    rows = ["| Encoder | Decoder | Data | F1 | BLEU | ROUGE-L | paper F1 / BLEU / ROUGE-L |", "|---|---|---|---:|---:|---:|---|"]
    for enc, dec in TABLE3_PAIRS:
        with open(os.path.join(out, "eval", f"{enc}_{dec}", "summary.json")) as f:
            m = json.load(f)["metrics"]
        paper = lookup(enc, "500M", dec, "500M", "D1")
        ref = f"{paper.f1:.2f} / {paper.bleu:.2f} / {paper.rougeL:.2f}" if paper else "-"
        rows.append(f"| LLM_{enc} | LLM_{dec} | D1 | {m['f1']:.2f} | {m['bleu_corpus']:.2f} | {m['rougeL']:.2f} | {ref} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ccmega demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder for every output (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the same path at a much smaller scale (tests)")
    parser.add_argument("--fresh", action="store_true", help="delete every earlier output under --out and redo all")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    if args.fresh:
        clear_outputs(args.out)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo_scale.json"), "w") as f:
        json.dump(asdict(scale), f, indent=2)
    took = run_stages(args.out, plan(args.out, scale, args.quick), os.path.join(args.out, "logs"))
    table = table3(args.out)
    print("\nTable 3 at toy scale (reconstruction of D1 test contexts, %):\n" + table)
    print(f"\nreport: {os.path.join(args.out, 'report', 'report.md')}; Hugging Face model: "
          f"{os.path.join(args.out, 'hf', 'lm_D1')}; finished in {_fmt(took)}")
    return 0
