"""One prepared GPU check: everything ccmega claims for a GPU, on one H100/H200, in under 9 minutes.

Parts, in this order (each in its own process, time-boxed; a part that fails or runs out of time is
recorded and the next one still runs):

    env        torch / CUDA / megatron-core / transformers versions, the GPU, Transformer Engine or not
    cli_steps  one `ccmega pretrain` step and one `ccmega icae-train` step through the CLI (NCCL on a GPU),
               then one `ccmega evaluate` batch (KV-cache generation), on tiny data built here from the
               bundled Pile sample (the demo's own stages: `ccmega.demo.plan`)
    hf_logits  bf16 logits of megatron's local layer spec (SDPA) against Hugging Face transformers on the
               same random qwen3-200m weights, both judged against transformers in fp32
    gpu_tests  the CUDA-marked tests (tests/test_gpu.py; they skip without Transformer Engine)
    mfu        pretraining MFU of qwen3-1b at sequence 8192 in bf16 (benchmarks/pretrain_step.py)
    latency    compression / generation latency at context 4096 (`ccmega evaluate --latency`) for the
               pairs of Fig. 6: encoder 200M/500M/1B with decoder 500M, decoder 200M/1B with encoder 500M

Writes OUT/gpu_check.json (everything), OUT/gpu_check.md (the tables) and OUT/gpu_check.log (every
part's output). On the device machine (Python 3.12 with its own CUDA torch, no megatron-core):

    python benchmarks/gpu_check.py --download-wheels .whl       # here, once: megatron-core & co. for cp312
    # device run, carry [".whl"], timeout_s 540:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl || exit; PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --out $OUT

`--cpu-smoke` runs every part at toy sizes on a CPU (fp32/bf16, gloo): it proves the script, not the GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from anywhere: ccmega is this checkout's

# What the device image lacks (its list: /work/.library/device/KINDS.md), as cp312 wheels.
DEVICE_WHEELS = ["megatron-core==0.19.2", "zstandard==0.25.0", "nltk==3.10.4", "defusedxml==0.7.1"]
SDIST_ONLY = ["rouge-score==0.1.2"]  # no wheel on PyPI: built here (pure Python)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part measures; GPU sizes are the issue's, CPU_SMOKE the same path at toy scale."""

    hf_preset: str = "qwen3-200m"
    hf_tokens: tuple = (2, 512)  # batch, sequence
    mfu_args: tuple = ("--preset", "qwen3-1b", "--seq-length", "8192", "--micro-batch-size", "1",
                       "--accumulation", "4", "--warmup", "1", "--steps", "3", "--dtype", "bf16")
    latency_pairs: tuple = (("qwen3-200m", "qwen3-500m"), ("qwen3-500m", "qwen3-500m"), ("qwen3-1b", "qwen3-500m"),
                            ("qwen3-500m", "qwen3-200m"), ("qwen3-500m", "qwen3-1b"))
    latency_context: int = 4096
    # Greedy steps timed per run: the whole context (4096) would take minutes per pair; the per-token
    # cost is what Fig. 6 scales, and the JSON records the number.
    latency_generate: int = 128
    latency_repeats: int = 3


GPU = Sizes()
CPU_SMOKE = Sizes(hf_preset="qwen3-tiny", hf_tokens=(2, 32),
                  mfu_args=("--preset", "qwen3-tiny", "--seq-length", "64", "--micro-batch-size", "1",
                            "--accumulation", "2", "--warmup", "1", "--steps", "1", "--dtype", "fp32"),
                  latency_pairs=(("qwen3-tiny", "qwen3-tiny"),), latency_context=64, latency_generate=4,
                  latency_repeats=1)

# name -> seconds it may take at most on the GPU; the whole run also stops at --budget-s.
PARTS = {"env": 30, "cli_steps": 150, "hf_logits": 60, "gpu_tests": 45, "mfu": 120, "latency": 150}


# ---- the parts (each runs in a child process: `--run-part NAME`) -------------------------------------

def part_env(work: str, sizes: Sizes, record) -> None:
    import torch

    record(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
           cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
               capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
    import megatron.core
    import transformers

    from ccmega.models.qwen3 import transformer_engine_available

    record(megatron_core=megatron.core.__version__, transformers=transformers.__version__,
           transformer_engine=transformer_engine_available())


def _child_env(**extra) -> dict:
    """The environment of every child: this checkout importable (benchmarks/*.py run as scripts), output
    unbuffered (a killed part keeps its log), each command its own world of one."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", **extra)
    env.pop("MASTER_PORT", None)
    return env


def _stage_env() -> dict:
    return _child_env(PYTHONWARNINGS="ignore", NCCL_DEBUG="VERSION")  # NCCL names itself on first use


def part_cli_steps(work: str, sizes: Sizes, record) -> None:
    import torch

    from ccmega.demo import QUICK, plan

    scale = dataclasses.replace(QUICK, pretrain_steps=1, icae_steps=1)
    wanted = ["tokenizer", "data", "pretrain D1", "icae D1-D1", "evaluate D1-D1"]
    stages = {st.name: st for st in plan(os.path.join(work, "demo"), scale, quick=True)}
    missing = [name for name in wanted if name not in stages]
    if missing:
        raise RuntimeError(f"ccmega.demo.plan has no stage {missing} (it has {sorted(stages)})")
    done = []
    for name in wanted:
        st = stages[name]
        argv = st.argv + (["--warmup-steps", "0"] if name.split()[0] in ("pretrain", "icae") else [])  # 1 step
        log = os.path.join(work, f"stage_{name.replace(' ', '_')}.log")
        t0 = time.time()
        with open(log, "w") as f:
            proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=_stage_env(), cwd=REPO)
        text = open(log, errors="replace").read()
        entry = {"stage": name, "rc": proc.returncode, "seconds": round(time.time() - t0, 1),
                 "last_line": (text.strip().splitlines() or [""])[-1][-300:]}
        if torch.cuda.is_available() and name.split()[0] in ("pretrain", "icae", "evaluate"):
            entry["nccl"] = "NCCL version" in text
        done.append(entry)
        record(stages=done)
        print(f"--- {name}: exit {proc.returncode} in {entry['seconds']} s; last lines of {log}:")
        print("\n".join(text.splitlines()[-15:]), flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"stage {name!r} failed (exit {proc.returncode}): {' '.join(argv)}")
    losses = {}
    for kind in ("lm_D1", "icae_D1_D1"):
        for path in glob.glob(os.path.join(work, "demo", "runs", kind, "**", "metrics.jsonl"), recursive=True):
            rows = [json.loads(line) for line in open(path) if line.strip()]
            losses[kind] = next((r["loss"] for r in reversed(rows) if "loss" in r), None)
    record(losses=losses)


def part_hf_logits(work: str, sizes: Sizes, record) -> None:
    import torch
    import transformers

    from ccmega import runtime
    from ccmega.convert.hf_qwen3 import hf_config_dict, hf_to_megatron, load_full_state
    from ccmega.convert.verify import compare
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset

    runtime.initialize(1, 1, seed=1234)
    dev = runtime.device()
    preset = model_preset(sizes.hf_preset)
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_config_dict(preset))).eval()
    with torch.no_grad():  # HF starts every norm at 1: perturb them so a swapped norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    state = hf_to_megatron(hf.state_dict(), preset)
    hf = hf.to(dev)
    model = build_model(preset, transformer_config(preset, params_dtype=torch.bfloat16)).to(dev).eval()
    load_full_state(model, state)
    batch, seq = sizes.hf_tokens
    tokens = torch.randint(0, preset.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)).to(dev)
    positions = torch.arange(seq, device=dev).expand_as(tokens)
    with torch.no_grad():
        reference = hf(tokens).logits.float()  # fp32
        ours = model(tokens, positions, None)[..., : preset.vocab_size].float()
        theirs = hf.to(torch.bfloat16)(tokens).logits.float()
    source = f"{batch} random sequences of {seq} ids, {preset.name}"
    ours_vs_fp32, theirs_vs_fp32 = compare([ours], [reference], source), compare([theirs], [reference], source)
    ours_vs_theirs = compare([ours], [theirs], source)
    # Pass: ccmega in bf16 is no further from fp32 than transformers in bf16 is (2x slack, bf16 noise).
    ok = (ours_vs_fp32.max_abs_diff <= 2 * theirs_vs_fp32.max_abs_diff + 1e-3
          and ours_vs_fp32.greedy_agreement >= theirs_vs_fp32.greedy_agreement - 0.02)
    record(ok=ok, preset=preset.name, device=str(dev), mean_abs_logit=float(reference.abs().mean()),
           megatron_bf16_vs_hf_fp32=dataclasses.asdict(ours_vs_fp32),
           hf_bf16_vs_hf_fp32=dataclasses.asdict(theirs_vs_fp32),
           megatron_bf16_vs_hf_bf16=dataclasses.asdict(ours_vs_theirs))
    for label, a in (("megatron bf16 vs HF fp32", ours_vs_fp32), ("HF bf16 vs HF fp32", theirs_vs_fp32),
                     ("megatron bf16 vs HF bf16", ours_vs_theirs)):
        print(f"{label}: {a.line()}", flush=True)
    runtime.destroy()


PYTEST_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def part_gpu_tests(work: str, sizes: Sizes, record) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/test_gpu.py",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, env=_child_env())
    print(proc.stdout[-6000:] + proc.stderr[-3000:], flush=True)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {kind: int(n) for n, kind in PYTEST_SUMMARY.findall(summary)}
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    record(ok=proc.returncode == 0, summary=summary, counts=counts, skip_reasons=skips[:10])


def part_mfu(work: str, sizes: Sizes, record) -> None:
    out = os.path.join(work, "mfu.json")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "pretrain_step.py"), *sizes.mfu_args,
                           "--json", out], cwd=REPO, env=_stage_env())
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks/pretrain_step.py exited {proc.returncode}")
    with open(out) as f:
        record(**json.load(f))


def part_latency(work: str, sizes: Sizes, record) -> None:
    pairs = []
    for enc, dec in sizes.latency_pairs:
        out = os.path.join(work, "latency")
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "ccmega.cli", "evaluate", "--latency", "--encoder-preset", enc,
                               "--decoder-preset", dec, "--context-tokens", str(sizes.latency_context),
                               "--generate-tokens", str(sizes.latency_generate), "--warmup", "1",
                               "--repeats", str(sizes.latency_repeats), "--output-dir", out],
                              cwd=REPO, env=_stage_env())
        entry = {"encoder": enc, "decoder": dec, "rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
        path = os.path.join(out, f"latency_{enc}_{dec}_ctx{sizes.latency_context}.json")
        if proc.returncode == 0 and os.path.exists(path):
            with open(path) as f:
                entry.update(json.load(f).get("latency") or {})
        pairs.append(entry)
        record(pairs=pairs, ok=all(p["rc"] == 0 for p in pairs))


# ---- the orchestrator --------------------------------------------------------------------------------

def run_part_here(name: str, work: str, result_path: str, cpu_smoke: bool) -> int:
    """Child side: run one part, writing its result after every update (a timeout keeps what was done)."""
    from ccmega.fileio import atomic_write_text

    result: dict = {}

    def record(**values):
        result.update(values)
        atomic_write_text(result_path, json.dumps(result, indent=2, default=str))

    os.makedirs(work, exist_ok=True)
    globals()[f"part_{name}"](work, CPU_SMOKE if cpu_smoke else GPU, record)
    record(ok=result.get("ok", True))
    return 0 if result["ok"] else 1


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_boxed(cmd: list[str], timeout: float, log_path: str) -> tuple[int | None, str]:
    """Run `cmd` in its own process group, output to `log_path`; at `timeout` seconds the whole group
    (torchrun, stage commands, ...) is killed. Returns (exit code or None, "ok" | "failed" | "timeout")."""
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                                env=_child_env())
        try:
            rc = proc.wait(timeout)
            return rc, "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None, "timeout"


def run_part(name: str, box_s: float, deadline: float, work: str, cpu_smoke: bool, log) -> dict:
    """Parent side: one part in its own process, within its box and the run's deadline."""
    timeout = min(box_s, deadline - time.time())
    if timeout < 5:
        return {"status": "skipped", "reason": "out of time (--budget-s)", "seconds": 0}
    result_path = os.path.join(work, f"{name}.result.json")
    part_log = os.path.join(work, f"{name}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--run-part", name, "--work", os.path.join(work, name),
           "--result", result_path] + (["--cpu-smoke"] if cpu_smoke else [])
    if os.path.exists(result_path):
        os.remove(result_path)  # a rerun in the same --work must not read the last run's result
    t0 = time.time()
    rc, status = run_boxed(cmd, timeout, part_log)
    entry = {"status": status, "rc": rc, "seconds": round(time.time() - t0, 1), "timeout_s": round(timeout)}
    if os.path.exists(result_path):
        with open(result_path) as f:
            entry["result"] = json.load(f)
    text = open(part_log, errors="replace").read()
    entry["log_tail"] = text.splitlines()[-12:]
    log.write(f"\n===== {name}: {status} (exit {rc}) in {entry['seconds']} s =====\n{text[-200_000:]}\n")
    log.flush()
    print(f"gpu_check: {name}: {status} in {entry['seconds']} s (box {entry['timeout_s']} s)", flush=True)
    return entry


def _f(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env = report["parts"].get("env", {}).get("result", {})
    lines = [f"# ccmega GPU check ({'CPU SMOKE: no GPU figures' if report['cpu_smoke'] else env.get('gpu', '?')})",
             "", f"torch {env.get('torch')}, CUDA {env.get('cuda')}, megatron-core {env.get('megatron_core')}, "
             f"transformers {env.get('transformers')}, Transformer Engine: {env.get('transformer_engine')}; "
             f"{report['seconds']} s in all.", "", "| part | status | seconds | result |", "|---|---|---:|---|"]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', 0)} | {_summary(name, part.get('result', {}))} |")
    lat = report["parts"].get("latency", {}).get("result", {}).get("pairs", [])
    if lat:
        lines += ["", "| encoder | decoder | context | memory slots | compression s | generation s (tokens) |",
                  "|---|---|---:|---:|---:|---:|"]
        for p in lat:
            lines.append(f"| {p['encoder']} | {p['decoder']} | {p.get('context_tokens', '-')} | "
                         f"{p.get('memory_tokens', '-')} | {_f(p.get('compression_s'), '.4f')} | "
                         f"{_f(p.get('generation_s'), '.4f')} ({p.get('generated_tokens', '-')}) |")
    return "\n".join(lines) + "\n"


def _summary(name: str, r: dict) -> str:
    if name == "cli_steps":
        stages = ", ".join(f"{s['stage']} {'ok' if s['rc'] == 0 else 'exit ' + str(s['rc'])}"
                           + (" (NCCL)" if s.get("nccl") else "") for s in r.get("stages", []))
        return f"{stages}; losses {r.get('losses', {})}"
    if name == "hf_logits" and "megatron_bf16_vs_hf_fp32" in r:
        ours, theirs = r["megatron_bf16_vs_hf_fp32"], r["hf_bf16_vs_hf_fp32"]
        return (f"{r['preset']} vs HF fp32: max abs diff megatron bf16 {ours['max_abs_diff']:.3g} / HF bf16 "
                f"{theirs['max_abs_diff']:.3g}; greedy agreement {ours['greedy_agreement']:.2%} / "
                f"{theirs['greedy_agreement']:.2%}")
    if name == "gpu_tests":  # a skip is no pass: say why
        reasons = r.get("skip_reasons") or []
        return r.get("summary", "") + (f" ({reasons[0]})" if reasons else "")
    if name == "mfu" and "mfu" in r:
        return (f"{r['preset']} seq {r['seq_length']} {r['dtype']}: {r['tokens_per_s']:,.0f} tok/s, "
                f"{r['tflops_per_gpu']:.3g} TFLOP/s, MFU {100 * r['mfu']:.3g}% of {r['peak_tflops']:g}, "
                f"peak memory {_f(r.get('max_memory_gib'))} GiB")
    if name == "latency":
        return f"{sum(p['rc'] == 0 for p in r.get('pairs', []))}/{len(r.get('pairs', []))} pairs measured"
    if name == "env":
        return f"{r.get('gpu', 'no GPU')}, python {r.get('python')}"
    return ""


def download_wheels(folder: str) -> int:
    """The packages the device image lacks, as Python 3.12 x86-64 wheels (run where pip reaches PyPI)."""
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64"]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                          "--implementation", "cp", *sum((["--platform", p] for p in platforms), []),
                          "-d", folder, *DEVICE_WHEELS], check=True)
    subprocess.run(pip + ["wheel", "--no-deps", "-w", folder, *SDIST_ONLY], check=True)
    print(f"gpu_check: wheels in {folder}: {', '.join(sorted(os.listdir(folder)))}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"), help="JSON, Markdown and log go here")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--budget-s", type=float, help="no part runs past this many seconds from the start "
                        "(default 480; 1800 with --cpu-smoke)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset (default: all)")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on a CPU: checks the script only")
    parser.add_argument("--download-wheels", metavar="DIR", help="fetch the wheels the device image lacks, then exit")
    parser.add_argument("--run-part", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    if args.run_part:
        return run_part_here(args.run_part, args.work, args.result, args.cpu_smoke)

    import tempfile

    from ccmega.fileio import atomic_write_text

    names = [n for n in args.parts.split(",") if n]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; parts: {', '.join(PARTS)}")
    work = args.work or tempfile.mkdtemp(prefix="ccmega_gpu_check_")
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    budget = args.budget_s or (1800 if args.cpu_smoke else 480)
    box_scale = 6 if args.cpu_smoke else 1  # the boxes are sized for the GPU; 2 CPU cores are slower
    deadline = start + budget
    report = {"cpu_smoke": args.cpu_smoke, "work": work, "budget_s": budget, "parts": {}}
    with open(os.path.join(args.out, "gpu_check.log"), "w") as log:
        for name in names:
            report["parts"][name] = run_part(name, PARTS[name] * box_scale, deadline, work, args.cpu_smoke, log)
            report["seconds"] = round(time.time() - start, 1)
            atomic_write_text(os.path.join(args.out, "gpu_check.json"), json.dumps(report, indent=2, default=str))
            atomic_write_text(os.path.join(args.out, "gpu_check.md"), markdown(report))
    failed = [n for n, p in report["parts"].items() if p["status"] != "ok"]
    print(markdown(report))
    print(f"gpu_check: {len(names) - len(failed)}/{len(names)} parts ok"
          + (f"; not ok: {', '.join(failed)}" if failed else "") + f"; {os.path.join(args.out, 'gpu_check.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
