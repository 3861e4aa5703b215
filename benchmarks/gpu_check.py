"""One prepared GPU check: everything ccmega claims for a GPU, on one H100/H200, in under 9 minutes.

Parts, in this order (each in its own process, time-boxed; a part that fails or runs out of time is
recorded and the next one still runs; a part that ran but skipped its tests is recorded as skipped):

    env        torch / CUDA / megatron-core / transformers versions, the GPU, Transformer Engine or not
    gpu_tests  the GPU-marked tests (tests/test_gpu.py and any other file that marks tests `gpu`; they skip
               without Transformer Engine: the table then says skipped, with counts and reasons)
    hf_logits  bf16 logits of megatron's local layer spec (SDPA) against Hugging Face transformers on the
               same random qwen3-200m weights, both judged against transformers in fp32
    mfu        pretraining MFU of qwen3-1b at sequence 8192 in bf16 with the distributed optimizer
               (benchmarks/pretrain_step.py, run in this part's process so that the DDP / optimizer / fusion
               switches it ran with are read off the objects it built and recorded). On one GPU without
               Transformer Engine the figure is a LOWER BOUND of the cluster's: no TE kernels, and at DP=1
               the overlap switches have nothing to overlap
    icae_step  one real-size ICAE training step: random qwen3-1b encoder -> frozen qwen3-500m decoder,
               micro-batch 32, L 512, k 128, bf16, built as icae-train builds it (with the switches its run
               decides here); torch.cuda.max_memory_allocated of the step after a warm-up step beside the
               estimate of ccmega/training/memory.py, and the step's seconds (if micro-batch 32 runs out of
               memory, that is recorded and the largest micro-batch the estimate fits is measured instead)
    cli_steps  one `ccmega pretrain` step and one `ccmega icae-train` step through the CLI (NCCL on a GPU),
               then one `ccmega evaluate` batch (KV-cache generation), on tiny data built here from the
               bundled Pile sample (the demo's own stages: `ccmega.demo.plan`)
    resume     bf16 `ccmega pretrain` with the distributed optimizer on that tiny data: N steps uninterrupted
               (saving at step k), then a new run resumed from the step-k checkpoint to N; the resumed steps'
               losses, LRs and grad norms against the uninterrupted run's (bitwise, else the max difference
               judged against a small tolerance: GPU kernels need not be deterministic), then the resumed
               run's last checkpoint converted to Hugging Face and verified (`ccmega convert to-hf --verify`)
    latency    compression / generation latency at context 4096 (`ccmega evaluate --latency`) for the
               pairs of Fig. 6: encoder 200M/500M/1B with decoder 500M, decoder 200M/1B with encoder 500M
               (last: it takes what is left of the budget and keeps the pairs it measured)

The Markdown ends with what one GPU cannot check: Transformer Engine, FP8, multi-GPU, multi-node.

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
import contextlib
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
                       "--accumulation", "4", "--warmup", "1", "--steps", "3", "--dtype", "bf16",
                       "--distributed-optimizer")
    icae_pair: tuple = ("qwen3-1b", "qwen3-500m")  # encoder, frozen decoder
    icae_micro_batch: int = 32
    icae_context: int = 512  # L
    icae_slots: int = 128  # k
    resume_steps: tuple = (6, 3)  # N steps in all, the checkpoint resumed from at step k
    # Largest |loss difference| accepted when the resumed run is not bitwise equal (GPU kernels such as
    # SDPA's backward accumulate with atomics): far below bf16's resolution at a loss of ~7 (0.03).
    resume_tolerance: float = 1e-2
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
                            "--accumulation", "2", "--warmup", "1", "--steps", "1", "--dtype", "fp32",
                            "--distributed-optimizer"),
                  icae_pair=("qwen3-tiny", "qwen3-tiny"), icae_micro_batch=2, icae_context=32, icae_slots=8,
                  resume_steps=(4, 2), resume_tolerance=0.0,  # a CPU is deterministic: bitwise or fail
                  latency_pairs=(("qwen3-tiny", "qwen3-tiny"),), latency_context=64, latency_generate=4,
                  latency_repeats=1)

# name -> seconds it may take at most on the GPU, in the order they run; the whole run also stops at
# --budget-s (480). Estimates on an H100 (none measured yet): a process that imports torch + megatron and
# initialises CUDA/NCCL pays ~10-20 s, a `ccmega` CLI run ~20-30 s. The boxes before `latency` sum to 410 s,
# so latency keeps at least 70 s (2-3 of its 5 pairs) even when every other part uses its whole box.
PARTS = {
    "env": 20,  # imports only
    "gpu_tests": 30,  # pytest start-up; the tests skip without TE (with TE: 3 tiny models)
    "hf_logits": 45,  # qwen3-200m in transformers and megatron, 3 forwards of 2 x 512 tokens
    "mfu": 70,  # qwen3-1b build (~10 s) + 4 steps x 4 micro-batches of 8192 tokens (~1-2 s a step)
    "icae_step": 60,  # 1.56 B params built (~10 s); micro-batch 32 (~1 s a step, or an OOM), 16 if it does not fit
    "cli_steps": 110,  # 5 commands: tokenizer, data, 1 pretrain step, 1 ICAE step, 1 evaluate batch
    "resume": 75,  # 2 `ccmega pretrain` runs of qwen3-toy (~25 s each) + to-hf --verify in the process (~10 s)
    "latency": 150,  # 5 `ccmega evaluate --latency` runs (~25 s each); gets what is left of the budget
}


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


def _run_stage(argv: list[str], name: str, work: str) -> tuple[dict, str]:
    """One command, its output in WORK/stage_NAME.log: ({stage, rc, seconds, last_line}, the output)."""
    log = os.path.join(work, f"stage_{name.replace(' ', '_')}.log")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=_stage_env(), cwd=REPO)
    text = open(log, errors="replace").read()
    entry = {"stage": name, "rc": proc.returncode, "seconds": round(time.time() - t0, 1),
             "last_line": (text.strip().splitlines() or [""])[-1][-300:]}
    print(f"--- {name}: exit {proc.returncode} in {entry['seconds']} s; last lines of {log}:")
    print("\n".join(text.splitlines()[-15:]), flush=True)
    return entry, text


def _demo_stages(demo: str, **scale) -> dict:
    from ccmega.demo import QUICK, plan

    return {st.name: st for st in plan(demo, dataclasses.replace(QUICK, **scale), quick=True)}


def part_cli_steps(work: str, sizes: Sizes, record) -> None:
    import torch

    wanted = ["tokenizer", "data", "pretrain D1", "icae D1-D1", "evaluate D1-D1"]
    stages = _demo_stages(os.path.join(work, "demo"), pretrain_steps=1, icae_steps=1)
    missing = [name for name in wanted if name not in stages]
    if missing:
        raise RuntimeError(f"ccmega.demo.plan has no stage {missing} (it has {sorted(stages)})")
    done = []
    for name in wanted:
        one_step = ["--warmup-steps", "0"] if name.split()[0] in ("pretrain", "icae") else []
        argv = stages[name].argv + one_step
        entry, text = _run_stage(argv, name, work)
        if torch.cuda.is_available() and name.split()[0] in ("pretrain", "icae", "evaluate"):
            entry["nccl"] = "NCCL version" in text
        done.append(entry)
        record(stages=done)
        if entry["rc"] != 0:
            raise RuntimeError(f"stage {name!r} failed (exit {entry['rc']}): {' '.join(argv)}")
    losses = {}
    for kind in ("lm_D1", "icae_D1_D1"):
        for path in glob.glob(os.path.join(work, "demo", "runs", kind, "**", "metrics.jsonl"), recursive=True):
            rows = [json.loads(line) for line in open(path) if line.strip()]
            losses[kind] = next((r["loss"] for r in reversed(rows) if "loss" in r), None)
    record(losses=losses)


# ---- resume ------------------------------------------------------------------------------------------------

BF16_DISTOPT = ["--set", "precision.dtype=bf16", "--set", "train.distributed_optimizer=true"]


def _tiny_data(work: str) -> str:
    """A demo folder holding the tokenizer and D1's pretraining data: cli_steps' when it built them (the
    manifest is written last), else built here by the same two stages."""
    own = os.path.join(work, "demo")
    for demo in (os.path.join(os.path.dirname(work), "cli_steps", "demo"), own):
        if all(os.path.exists(os.path.join(demo, *parts)) for parts in
               (("tokenizer", "spm.model"), ("data", "D1", "pretrain.manifest.json"))):
            return demo
    stages = _demo_stages(own)
    for name in ("tokenizer", "data"):
        entry, _ = _run_stage(stages[name].argv, name, work)
        if entry["rc"] != 0:
            raise RuntimeError(f"stage {name!r} failed (exit {entry['rc']})")
    return own


def _with(argv: list[str], flag: str, value) -> list[str]:
    """`argv` with `flag`'s value replaced."""
    i = argv.index(flag)
    return argv[: i + 1] + [str(value)] + argv[i + 2:]


def train_records(run_dir: str) -> dict:
    """{step: the last train record of that step} of RUN_DIR/metrics.jsonl (a resumed run repeats steps)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # half a line from a killed run
                continue
            if r.get("kind") == "train":
                out[r["step"]] = r
    return out


def resume_verdict(resumed: dict, reference: dict, steps: list[int], tolerance: float) -> dict:
    """The resumed run's steps against the uninterrupted run's: bitwise, else within `tolerance` on the loss.
    The LR schedule is arithmetic on the step: it must be equal either way."""
    missing = [s for s in steps if s not in resumed or s not in reference]
    if missing:
        return {"ok": False, "verdict": f"steps {missing} missing from metrics.jsonl", "steps": steps}

    def diff(key):
        return max(abs(resumed[s][key] - reference[s][key]) for s in steps)

    bitwise = all(resumed[s][k] == reference[s][k] for s in steps for k in ("loss", "lr", "grad_norm"))
    lr_equal = all(resumed[s]["lr"] == reference[s]["lr"] for s in steps)
    loss_diff = diff("loss")
    if bitwise:
        verdict = "bitwise equal (loss, lr, grad norm)"
    elif lr_equal and loss_diff <= tolerance:
        verdict = f"not bitwise; max |loss diff| {loss_diff:.3g} within tolerance {tolerance:g}"
    else:
        verdict = f"DIFFERS: max |loss diff| {loss_diff:.3g} (tolerance {tolerance:g}), lr equal: {lr_equal}"
    return {"ok": bitwise or (lr_equal and loss_diff <= tolerance), "verdict": verdict, "bitwise": bitwise,
            "first_step_loss_bitwise": resumed[steps[0]]["loss"] == reference[steps[0]]["loss"],
            "lr_equal": lr_equal, "max_abs_loss_diff": loss_diff, "max_abs_grad_norm_diff": diff("grad_norm"),
            "tolerance": tolerance, "steps": steps}


def _copy_checkpoint(source_run: str, iteration: int, run_dir: str) -> str:
    """A new run dir whose `latest` is a copy of `source_run`'s checkpoint at `iteration`: the resume of a
    run stopped there, without timing a kill."""
    import shutil

    name = f"iter_{iteration:07d}"
    target = os.path.join(run_dir, "checkpoints", name)
    shutil.copytree(os.path.join(source_run, "checkpoints", name), target)
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write(name + "\n")
    return target


def part_resume(work: str, sizes: Sizes, record) -> None:
    from ccmega.training.checkpointing import read_checkpoint_metadata

    steps, save_at = sizes.resume_steps
    stage = _demo_stages(_tiny_data(work), pretrain_steps=steps)["pretrain D1"]
    reference, resumed = os.path.join(work, "uninterrupted"), os.path.join(work, "resumed")
    runs = []

    def pretrain(run_dir: str) -> str:
        argv = _with(_with(_with(stage.argv, "--run-dir", run_dir), "--steps", steps), "--save-interval", save_at)
        entry, text = _run_stage(argv + BF16_DISTOPT, os.path.basename(run_dir), work)
        entry["switch_lines"] = [line[:200] for line in text.splitlines()  # whatever the run says of them
                                 if re.search(r"\bswitch\b|overlap|distributed.optimizer", line, re.I)][:10]
        runs.append(entry)
        record(runs=runs, steps=steps, resumed_from_step=save_at)
        if entry["rc"] != 0:
            raise RuntimeError(f"`ccmega pretrain` ({os.path.basename(run_dir)}) exited {entry['rc']}")
        return text

    pretrain(reference)
    checkpoint = _copy_checkpoint(reference, save_at, resumed)
    if f"resumed from {checkpoint}" not in pretrain(resumed):
        raise RuntimeError(f"the second run did not say it resumed from {checkpoint}")
    meta = read_checkpoint_metadata(resumed)
    record(dtype=meta["dtype"], optimizer_format=meta["optimizer_format"], data_parallel=meta["data_parallel"],
           **resume_verdict(train_records(resumed), train_records(reference), list(range(save_at + 1, steps + 1)),
                            sizes.resume_tolerance))
    record(to_hf=_reload_as_hf(resumed, os.path.join(work, "hf")))
    if (meta["dtype"], meta["optimizer_format"]) != ("bf16", "dp_reshardable"):
        record(ok=False, verdict=f"the run was {meta['dtype']} with the {meta['optimizer_format']} optimizer "
                                 "format, not bf16 with the distributed optimizer")


def _reload_as_hf(run_dir: str, output: str) -> dict:
    """`ccmega convert to-hf --verify` of the run's last checkpoint, in this process (no second start-up)."""
    from ccmega.convert.cli import to_hf

    t0 = time.time()
    result = to_hf(run_dir, output, verify=True, overwrite=True)  # raises beyond its tolerance
    return {"seconds": round(time.time() - t0, 1), "dtype": result["dtype"], **result["verify"]}


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
PYTEST_SKIP = re.compile(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$")


def pytest_outcome(stdout: str, rc: int) -> dict:
    """Counts, skip reasons ({reason: tests}) and a status from `pytest -q -rs` output: "skipped" when
    nothing passed or failed but something skipped (a skip is no pass)."""
    summary = (stdout.strip().splitlines() or [""])[-1]
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
              for n, kind in PYTEST_SUMMARY.findall(summary)}
    reasons: dict = {}
    for line in stdout.splitlines():
        m = PYTEST_SKIP.match(line.strip())
        if m:
            reasons[m.group(2)] = reasons.get(m.group(2), 0) + int(m.group(1))
    ran = sum(counts.get(k, 0) for k in ("passed", "failed", "error", "xfailed", "xpassed"))
    status = "skipped" if rc == 0 and not ran and counts.get("skipped") else ("ok" if rc == 0 else "failed")
    return {"ok": rc == 0, "status": status, "summary": summary, "counts": counts, "skip_reasons": reasons}


def gpu_test_files() -> list[str]:
    """Every test module that marks tests `gpu` (tests/test_gpu.py, and any other that does)."""
    return sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "tests", "test_*.py"))
                  if "mark.gpu" in open(path, errors="replace").read())


def part_gpu_tests(work: str, sizes: Sizes, record) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", *gpu_test_files(),
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, env=_child_env())
    print(proc.stdout[-6000:] + proc.stderr[-3000:], flush=True)
    record(**pytest_outcome(proc.stdout, proc.returncode))


# ---- what a run ran with --------------------------------------------------------------------------------

FUSIONS = ("cross_entropy_loss_fusion", "apply_rope_fusion", "gradient_accumulation_fusion", "bias_activation_fusion",
           "bias_dropout_fusion", "masked_softmax_fusion")
DDP_SWITCHES = ("use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather", "grad_reduce_in_fp32")


def switches(setup) -> dict:
    """The DDP, optimizer and fusion switches of a built TrainingSetup, read off the objects (whatever
    config keys or defaults turned them on)."""
    ddp = setup.model[0].ddp_config
    optimizers = getattr(setup.optimizer, "chained_optimizers", None) or [setup.optimizer]
    return {**{k: getattr(ddp, k, None) for k in DDP_SWITCHES},
            **{k: getattr(setup.config, k, None) for k in FUSIONS},
            "optimizer": sorted({type(o).__name__ for o in optimizers})}


@contextlib.contextmanager
def recording_setups(seen: list):
    """Within it, every engine.build_training_setup call appends `switches(setup)` to `seen`."""
    from ccmega.training import engine

    original = engine.build_training_setup

    def build_training_setup(*args, **kwargs):
        setup = original(*args, **kwargs)
        seen.append(switches(setup))
        return setup

    engine.build_training_setup = build_training_setup
    try:
        yield seen
    finally:
        engine.build_training_setup = original


def _load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_mfu(work: str, sizes: Sizes, record) -> None:
    from ccmega.models.qwen3 import transformer_engine_available

    out, seen = os.path.join(work, "mfu.json"), []
    with recording_setups(seen):  # in this process: the switches are read off the setup it builds
        rc = _load_benchmark("pretrain_step").main([*sizes.mfu_args, "--json", out])
    if rc != 0:
        raise RuntimeError(f"benchmarks/pretrain_step.py returned {rc}")
    with open(out) as f:
        record(**json.load(f))
    te = transformer_engine_available()
    record(switches=seen[0] if seen else None, transformer_engine=te,
           lower_bound=None if te else "one GPU without Transformer Engine's kernels; at DP=1 the overlap "
                                       "switches have nothing to overlap")


# ---- one real-size ICAE step --------------------------------------------------------------------------------

def _icae_estimate(enc, dec, micro_batch: int, L: int, k: int, switches_: dict, gpu_gib: float, kernels: str) -> dict:
    """memory.py's figures for the step as it ran (its optimizer and, where fused, its cross entropy)."""
    from ccmega.training.memory import GIB, Layout, icae_memory_report, icae_step_bytes

    fused = bool(switches_["cross_entropy_loss_fusion"])
    report, _ = icae_memory_report(enc, dec, Layout(1), micro_batch, L, k, bool(switches_["use_distributed_optimizer"]),
                                   "bf16", gpu_gib, kernels=kernels, fused_cross_entropy=fused)
    step = icae_step_bytes(enc, dec, Layout(1), micro_batch, L, k, "bf16", kernels, fused_cross_entropy=fused)
    return {"estimated_gib": report.peak.total / GIB, "estimated_step_gib": step / GIB,
            "estimate_fits": report.ok, "estimate_problems": list(report.problems)}


def _measure_icae_step(step, micro_batch: int) -> dict:
    """One warm-up step (the optimizer state appears), then one timed step whose peak is read. On a GPU
    that runs out of memory: the error, with the memory freed for a smaller try."""
    import gc

    import torch

    cuda = torch.cuda.is_available()
    try:
        step(micro_batch)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else None
        t0 = time.perf_counter()
        step(micro_batch)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    except RuntimeError as e:  # torch's OutOfMemoryError, or cuBLAS failing to allocate its workspace
        if not re.search(r"out of memory|ALLOC_FAILED", str(e)):
            raise
        oom = str(e).splitlines()[0][:300]
    else:
        row = {"micro_batch": micro_batch, "step_s": seconds}
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            row.update(measured_gib=peak / 2**30, measured_step_gib=(peak - before) / 2**30)
        return row
    gc.collect()  # the exception's frames held the activations
    torch.cuda.empty_cache()
    return {"micro_batch": micro_batch, "oom": oom}


def part_icae_step(work: str, sizes: Sizes, record) -> None:
    import types

    import torch

    from ccmega import runtime
    from ccmega.config import set_dotted
    from ccmega.models.icae_checkpoint import build_icae
    from ccmega.models.qwen3 import transformer_engine_available
    from ccmega.presets import model_preset
    from ccmega.training.engine import train_step
    from ccmega.training.icae_train import ICAEForwardStep, ICAETrainConfig
    from ccmega.training.loop import build_setup, model_config, resolve_speed
    from ccmega.training.memory import DEFAULT_GPU_MEMORY_GIB, GIB

    enc, dec = (model_preset(name) for name in sizes.icae_pair)
    L, k = sizes.icae_context, sizes.icae_slots
    cuda = torch.cuda.is_available()
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else DEFAULT_GPU_MEMORY_GIB
    kernels = "te" if transformer_engine_available() else "local"
    with runtime.session(seed=ICAETrainConfig().train.seed):
        t0 = time.time()
        # icae-train's defaults in bf16, with the switches its run decides for this platform
        cfg = resolve_speed(set_dotted(ICAETrainConfig(), "precision.dtype", "bf16"), 1, log=print)
        configs = [model_config(cfg.precision, p, 1, 1, cfg.speed)[0] for p in (enc, dec)]
        model = build_icae(enc, dec, *configs, k, end_token_id=1, seed=cfg.train.seed)
        # as icae-train builds it (loop.build_setup); the schedule is not used
        task = types.SimpleNamespace(modules=[model], config=configs[0], steps=cfg.optim.warmup_steps + 1)
        setup, _ = build_setup(task, cfg)
        ran_with = switches(setup)
        record(encoder=enc.name, decoder=dec.name, context_tokens=L, memory_slots=k, kernels=kernels,
               gpu_memory_gib=gpu_gib if cuda else None, build_s=time.time() - t0, switches=ran_with)
        forward = ICAEForwardStep()
        generator = torch.Generator().manual_seed(0)
        vocab = min(enc.vocab_size, dec.vocab_size)

        def step(b: int):
            tokens = torch.randint(0, vocab, (b, L), generator=generator).to(runtime.device())
            train_step(setup, iter([{"tokens": tokens}]), 1, L + 1, b, forward_step=forward)

        def estimate(b: int) -> dict:
            return _icae_estimate(enc, dec, b, L, k, ran_with, gpu_gib, kernels)

        attempts = [{**_measure_icae_step(step, sizes.icae_micro_batch), **estimate(sizes.icae_micro_batch)}]
        record(attempts=attempts)
        # out of memory: the largest micro-batches the estimate fits (two at most, each a few seconds), so that
        # a measured figure stands beside the estimate
        fits = [b for b in range(sizes.icae_micro_batch - 1, 0, -1)
                if sizes.icae_micro_batch % b == 0 and estimate(b)["estimate_fits"]]
        for b in fits[:2]:
            if "oom" not in attempts[-1]:
                break
            attempts.append({**_measure_icae_step(step, b), **estimate(b)})
            record(attempts=attempts)
        for a in attempts:
            if "measured_gib" in a:
                a["measured_over_estimated"] = a["measured_gib"] / a["estimated_gib"]
        record(attempts=attempts, ok=any("step_s" in a for a in attempts))


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
        if status == "ok" and entry["result"].get("status") == "skipped":  # it ran, and skipped its tests
            entry["status"] = "skipped"
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
    icae = report["parts"].get("icae_step", {}).get("result", {})
    if icae.get("attempts"):
        lines += ["", f"ICAE {icae['encoder']} -> frozen {icae['decoder']}, L {icae['context_tokens']}, "
                      f"k {icae['memory_slots']}, bf16, {icae['kernels']} kernels: one training step",
                  "", "| micro-batch | measured GiB | estimated GiB | measured / estimated | step growth measured / "
                      "estimated GiB | step s |", "|---:|---:|---:|---:|---:|---:|"]
        for a in icae["attempts"]:
            measured = "OOM" if "oom" in a else _f(a.get("measured_gib"), ".2f")
            lines.append(f"| {a['micro_batch']} | {measured} | {_f(a.get('estimated_gib'), '.2f')} | "
                         f"{_f(a.get('measured_over_estimated'), '.3f')} | {_f(a.get('measured_step_gib'), '.2f')} / "
                         f"{_f(a.get('estimated_step_gib'), '.2f')} | {_f(a.get('step_s'), '.3f')} |")
    lat = report["parts"].get("latency", {}).get("result", {}).get("pairs", [])
    if lat:
        lines += ["", "| encoder | decoder | context | memory slots | compression s | generation s (tokens) |",
                  "|---|---|---:|---:|---:|---:|"]
        for p in lat:
            lines.append(f"| {p['encoder']} | {p['decoder']} | {p.get('context_tokens', '-')} | "
                         f"{p.get('memory_tokens', '-')} | {_f(p.get('compression_s'), '.4f')} | "
                         f"{_f(p.get('generation_s'), '.4f')} ({p.get('generated_tokens', '-')}) |")
    lines += ["", "What this check cannot check (one GPU, one process):"] + [f"- {x}" for x in not_checked(env)]
    return "\n".join(lines) + "\n"


def not_checked(env: dict) -> list[str]:
    out = []
    if not env.get("transformer_engine"):
        out += ["Transformer Engine: its layer spec, fused kernels (RoPE, gradient-accumulation fusion) and "
                "attention; the MFU here is without them", "FP8 (needs Transformer Engine >= 2.2)"]
    return out + ["multi-GPU: NCCL across GPUs, data-parallel reduce-scatter / all-gather (and their overlap), "
                  "TP / PP > 1 on GPUs", "multi-node: NCCL across nodes, SLURM launch and GPU binding"]


SHOWN_SWITCHES = ("use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather",
                  "cross_entropy_loss_fusion", "apply_rope_fusion", "gradient_accumulation_fusion")


def _switch_text(sw: dict | None) -> str:
    if not sw:
        return "switches not recorded"
    on, off = [k for k in SHOWN_SWITCHES if sw.get(k)], [k for k in SHOWN_SWITCHES if not sw.get(k)]
    return f"on: {', '.join(on) or 'none'}; off: {', '.join(off) or 'none'}"


def _attempt_text(a: dict) -> str:
    head = f"micro-batch {a['micro_batch']}: "
    if "oom" in a:  # an estimate that said it fits was wrong
        return head + f"out of memory (estimated {a['estimated_gib']:.1f} GiB" + (
            ", which the estimate said fits)" if a.get("estimate_fits") else ")")
    if "measured_gib" in a:
        return head + (f"{a['measured_gib']:.2f} GiB measured / {a['estimated_gib']:.2f} estimated, "
                       f"step {a['step_s']:.3g} s")
    return head + f"ran, step {a['step_s']:.3g} s (no GPU: not measured; estimated {a['estimated_gib']:.3g} GiB)"


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
    if name == "gpu_tests":  # a skip is no pass: counts and why
        counts = ", ".join(f"{n} {kind}" for kind, n in r.get("counts", {}).items()) or r.get("summary", "")
        reasons = "; ".join(f"{n} x {why}" for why, n in (r.get("skip_reasons") or {}).items())
        return counts + (f" (skipped: {reasons})" if reasons else "")
    if name == "mfu" and "mfu" in r:
        return (f"{r['preset']} seq {r['seq_length']} {r['dtype']}: {r['tokens_per_s']:,.0f} tok/s, "
                f"{r['tflops_per_gpu']:.3g} TFLOP/s, MFU {100 * r['mfu']:.3g}% of {r['peak_tflops']:g}"
                + (f" (a LOWER BOUND of the cluster's: {r['lower_bound']})" if r.get("lower_bound") else "")
                + f", peak memory {_f(r.get('max_memory_gib'))} GiB; {_switch_text(r.get('switches'))}")
    if name == "icae_step" and r.get("attempts"):
        return "; ".join(map(_attempt_text, r["attempts"])) + f"; {_switch_text(r.get('switches'))}"
    if name == "resume" and "verdict" in r:
        reload = r.get("to_hf") or {}
        return (f"{r.get('dtype')}, {r.get('optimizer_format')}: steps {r['steps'][0]}-{r['steps'][-1]} resumed from "
                f"step {r['resumed_from_step']}: {r['verdict']}"
                + (f"; to-hf --verify max abs diff {reload['max_abs_diff']:.3g}" if "max_abs_diff" in reload else ""))
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
    failed = [n for n, p in report["parts"].items() if not passed(p)]
    skipped = [n for n, p in report["parts"].items() if p["status"] == "skipped" and passed(p)]
    print(markdown(report))
    print(f"gpu_check: {len(names) - len(failed)}/{len(names)} parts ok"
          + (f" (skipped their tests: {', '.join(skipped)})" if skipped else "")
          + (f"; not ok: {', '.join(failed)}" if failed else "") + f"; {os.path.join(args.out, 'gpu_check.json')}")
    return 1 if failed else 0


def passed(part: dict) -> bool:
    """Ran to its end: ok, or skipped by its own tests (no TE, no CUDA); a part the budget skipped did not."""
    return part["status"] == "ok" or (part["status"] == "skipped" and "result" in part)


if __name__ == "__main__":
    raise SystemExit(main())
