"""`--dry-run`: one rank of a cluster job, built at its real size and layout and stepped once, on a laptop.

    ccmega pretrain --preset qwen3-1b --data /data/ccmega/D6/pretrain --tp 2 --pp 2 --dry-run --world-size 128
    DRY_RUN=1 sbatch slurm/pretrain_d6_1b.sh        # the same from the SLURM launcher (no GPU needed)

The task is built by the command's own `build_task` inside a fake world (`ccmega.runtime.fake_device`):
`meta` tensors stand in for the GPU, so the real preset allocates nothing; collectives go through
torch's fake process group behind NCCL's device rule. One training step then runs through the real
schedule, DDP and optimizer. What a laptop cannot see (data or checkpoints that live on the cluster) is
listed as not checked; everything else that would stop the job is listed as a failure.
"""
from __future__ import annotations

import dataclasses

import os
import sys
import time
from dataclasses import dataclass, field

import torch

from ccmega.config import ConfigError

H800_GIB = 80.0


def add_arguments(parser, icae: bool = False) -> None:
    group = parser.add_argument_group("dry run (no GPU needed)")
    group.add_argument("--dry-run", action="store_true",
                       help="build this job's model for one rank of --world-size at its real size, run one step on "
                            "fake tensors, print the layout, memory per GPU and every check that would fail")
    group.add_argument("--world-size", type=int, default=None,
                       help="GPUs of the job (default: SLURM_NTASKS, or SLURM_JOB_NUM_NODES x SLURM_GPUS_PER_NODE)")
    group.add_argument("--rank", type=int, default=0, help="which rank to build (default 0)")
    group.add_argument("--gpu-memory", type=float, default=H800_GIB, help="GiB per GPU (default 80: H800)")
    if icae:
        group.add_argument("--encoder-preset", default=None, help="preset when the encoder checkpoint is not here")
        group.add_argument("--decoder-preset", default=None, help="preset when the decoder checkpoint is not here")


def world_size_of(args, environ=os.environ) -> int:
    if args.world_size:
        return args.world_size
    if environ.get("SLURM_NTASKS"):
        return int(environ["SLURM_NTASKS"])
    nodes, gpus = environ.get("SLURM_JOB_NUM_NODES"), environ.get("SLURM_GPUS_PER_NODE")
    if nodes and gpus:
        return int(nodes) * int(gpus.split(":")[-1])
    raise ConfigError("a dry run needs the job's size: --world-size N (or the SLURM variables of the job)")


@dataclass
class DryRun:
    """What a dry run passes to `build_task`: the flags, and the notes of what cannot be checked here."""

    args: object
    not_checked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def available(self, *paths: str, what: str) -> bool:
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            self.not_checked.append(f"{what}: {', '.join(missing)} not found here")
        return not missing


class SyntheticSequences:
    """Stand-in pretraining samples ({tokens, labels, loss_mask} of `length`) when the data is not here."""

    def __init__(self, length: int, count: int = 1 << 62):
        self.length, self.count, self.prefix = length, count, "<synthetic>"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        zeros = torch.zeros(self.length, dtype=torch.int64)
        return {"tokens": zeros, "labels": zeros, "loss_mask": torch.ones(self.length)}


class SyntheticContexts(SyntheticSequences):
    """Stand-in ICAE samples (L token ids each)."""

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.zeros(self.length, dtype=torch.int64)


def cluster_dtype(precision) -> str:
    """The dtype the job will have on its GPUs (a dry run on a CPU must not read "auto" as fp32)."""
    return "bf16" if precision.dtype == "auto" else precision.dtype


def run(command: str, cfg, build_task, dry: DryRun, memory) -> int:
    """`memory(cfg, layout, gpu_memory_gib) -> (MemoryReport, text)` is the command's analytic estimate; the
    layout checks in it run first, so a layout megatron would refuse is reported instead of crashing."""
    from ccmega.runtime.fake_device import fake_world
    from ccmega.training.engine import train_step
    from ccmega.training.loop import build_setup, fp8_unavailable_reason, resolve_speed
    from ccmega.training.memory import Layout

    t0 = time.perf_counter()
    args = dry.args
    try:
        world_size = world_size_of(args)
    except ConfigError as e:
        print(f"ccmega {command} --dry-run: error: {e}", file=sys.stderr)
        return 2
    tp, pp = cfg.model.tensor_parallel, cfg.model.pipeline_parallel
    failures = dry.failures
    reason = fp8_unavailable_reason(cfg.precision)
    if reason:
        dry.not_checked.append(f"FP8: {reason}")
    # build what the GPUs will hold: "auto" is bf16 there, whatever this CPU would pick for itself
    cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype=cluster_dtype(cfg.precision)))
    dry.not_checked.append(f"FP8 is not simulated: the model is built in {cfg.precision.dtype}"
                           + (f" where the GPU job runs FP8 {cfg.precision.fp8} (Transformer Engine)"
                              if cfg.precision.fp8 else ""))
    print(f"[ccmega] dry run of `ccmega {command}`: rank {args.rank} of {world_size} (TP {tp} x PP {pp} x DP "
          f"{world_size // max(tp * pp, 1)}), fake devices", flush=True)
    try:
        cfg = resolve_speed(cfg, world_size // max(tp * pp, 1), log=print, cuda=True)  # what the GPU job decides
        if not (cfg.speed.rope_fusion and cfg.speed.gradient_accumulation_fusion):
            dry.not_checked.append("speed.rope_fusion and speed.gradient_accumulation_fusion: decided at the job's "
                                   "start by whether Transformer Engine and APEX import on its GPU nodes")
        report, text = memory(cfg, Layout(world_size, tp, pp), args.gpu_memory)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        report, text = None, ""
        failures.append(f"{type(e).__name__}: {e}")
    if report is not None and not [p for p in report.problems if "GiB budget" not in p]:
        try:
            with fake_world(args.rank, world_size, tp, pp, seed=cfg.train.seed) as env:
                from megatron.core import parallel_state as ps

                from ccmega.training.data import global_batch

                task = build_task(env, cfg, dry)
                built = sum(p.numel() for m in task.modules for p in m.parameters())
                dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for m in task.modules
                                          for p in m.parameters()}))
                setup, scheduler = build_setup(task, cfg)
                batches = global_batch(task.train_data, 0, task.global_batch_size, task.micro_batch_size,
                                       ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
                train_step(setup, iter(batches), len(batches), task.seq_length, task.micro_batch_size,
                           task.forward_step)
                stage = ps.get_pipeline_model_parallel_rank()
            print(f"[ccmega] rank {args.rank} (stage {stage}) built {built:,} parameters ({dtypes}) and ran one step of "
                  f"{len(batches)} micro-batch(es) x {task.micro_batch_size} x {task.seq_length} positions", flush=True)
            expected = next((s.params for s in report.stages if s.stage == stage), None)
            if expected is not None and expected != built:
                failures.append(f"the built model holds {built:,} parameters on this rank, the estimate {expected:,}")
        except (ConfigError, FileNotFoundError, ValueError, AssertionError, RuntimeError) as e:
            failures.append(f"{type(e).__name__}: {e}")
    print(text, flush=True)
    failures += list(report.problems) if report else []
    for note in dry.not_checked:
        print(f"[ccmega] not checked here: {note}")
    for failure in failures:
        print(f"[ccmega] WOULD FAIL: {failure}")
    print(f"[ccmega] dry run {'FAILED' if failures else 'passed'}: {len(failures)} failing check(s), "
          f"{len(dry.not_checked)} not checked, in {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if failures else 0
