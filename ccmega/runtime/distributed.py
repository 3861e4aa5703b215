"""Initialise torch.distributed and megatron-core's parallel_state.

Rank, world size and master address come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or, under `srun`, from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host
of SLURM_JOB_NODELIST). A plain `python script.py` is a world of one.

A GPU job (CCMEGA_DEVICE=cuda, which the SLURM launchers export, or a SLURM GPU allocation) refuses to
start a rank that sees no CUDA: that rank would otherwise fall back to gloo + CPU while the others wait
for it in NCCL. Each rank's GPU is its local rank, or the one GPU SLURM bound it to.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from ccmega.config import ConfigError


class LaunchError(ConfigError):
    """This process cannot take its place in the job (no GPU where the job needs one, no GPU of its own)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    device_index: int | None = None  # this rank's CUDA device; None on a CPU


def on_gpu() -> bool:
    return torch.cuda.is_available()


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM node list such as 'gpu[012-015,020],login1' -> 'gpu012'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_port(job_id: str) -> int:
    # Deterministic per job, so every task agrees without talking; away from common service ports.
    return 20000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def dist_env_from_environ(environ=os.environ, cuda_devices: int | None = None) -> DistEnv:
    """Rank, world size, local rank and rendezvous from torchrun or SLURM variables; with `cuda_devices`
    (the CUDA devices this process sees) also the rank's device index."""
    env = _ranks_from_environ(environ)
    if cuda_devices is None:
        return env
    return dataclasses.replace(env, device_index=gpu_index(env.local_rank, cuda_devices, environ))


def _ranks_from_environ(environ) -> DistEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "localhost"
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(environ.get("MASTER_PORT") or _slurm_port(environ.get("SLURM_JOB_ID", ""))),
        )
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=_free_port())


def gpu_index(local_rank: int, visible: int, environ=os.environ) -> int:
    """The CUDA device of a rank that sees `visible` GPUs: its local rank when the node's GPUs are all
    visible (one task per GPU), 0 when SLURM bound the task to its own GPU. `environ` names the place."""
    if visible > local_rank:
        return local_rank
    if visible == 1:
        return 0
    raise LaunchError(f"local rank {local_rank} on node {node_name(environ)} cannot pick a GPU: it sees {visible} "
                      f"({_visible_devices(environ)}); run at most one task per visible GPU, or bind one GPU "
                      "to each task")


def node_name(environ=os.environ) -> str:
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


def _visible_devices(environ) -> str:
    value = environ.get("CUDA_VISIBLE_DEVICES")
    return "CUDA_VISIBLE_DEVICES unset" if value is None else f"CUDA_VISIBLE_DEVICES={value!r}"


# Set by SLURM when the job or step holds GPUs: counts ("8", "h100:8") and lists of GPU ids ("0,1,2,3")
SLURM_GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS")
SLURM_GPU_IDS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


def gpu_job_reason(environ=os.environ) -> str | None:
    """Why this process must run on a GPU ("CCMEGA_DEVICE=cuda", "SLURM_GPUS_ON_NODE=8"), or None.
    CCMEGA_DEVICE (cuda or cpu) decides when set; else CCMEGA_CPU=1 means CPU; else a SLURM GPU allocation."""
    device = environ.get("CCMEGA_DEVICE", "").strip()
    if device:
        if device not in ("cuda", "cpu"):
            raise LaunchError(f"CCMEGA_DEVICE must be cuda or cpu, not {device!r}")
        return "CCMEGA_DEVICE=cuda" if device == "cuda" else None
    if environ.get("CCMEGA_CPU") == "1":
        return None
    for name in SLURM_GPU_COUNTS:
        if _gpu_count(environ.get(name, "")) > 0:
            return f"{name}={environ[name]}"
    for name in SLURM_GPU_IDS:
        if environ.get(name, "").strip() not in ("", "N/A"):
            return f"{name}={environ[name]}"
    return None


def _gpu_count(value: str) -> int:
    """'8' -> 8, 'h100:8' -> 8, 'h100:4,a100:2' -> 6; an item without a count counts as one."""
    items = [item.rsplit(":", 1)[-1].strip() for item in value.split(",") if item.strip()]
    return sum(int(n) if n.isdigit() else 1 for n in items)


def launch_env(environ=os.environ) -> DistEnv:
    """This process's place in the job: `dist_env_from_environ` with the CUDA devices it sees. A rank of a
    GPU job that sees no CUDA is refused here, before any process group, with the node and its devices."""
    if on_gpu():
        if environ.get("CCMEGA_DEVICE", "").strip() == "cpu":
            raise LaunchError(f"CCMEGA_DEVICE=cpu, but this process on node {node_name(environ)} sees CUDA "
                              f"({_visible_devices(environ)}): hide the GPUs with CUDA_VISIBLE_DEVICES= to run on the CPU")
        return dist_env_from_environ(environ, torch.cuda.device_count())
    env = dist_env_from_environ(environ)
    reason = gpu_job_reason(environ)
    if reason:
        build = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else
                 f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable device")
        raise LaunchError(f"rank {env.rank} (local rank {env.local_rank}) on node {node_name(environ)} sees no CUDA "
                          f"GPU in a GPU job ({reason}): {_visible_devices(environ)}, {build}; fix the node or "
                          "the job's GPU request, or run on the CPU on purpose with CCMEGA_DEVICE=cpu "
                          "(CCMEGA_CPU=1 for the slurm/ launchers)")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch, and megatron's tensor-parallel RNG tracker."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> DistEnv:
    """Start the process group (NCCL on GPU, gloo on CPU) and megatron's model-parallel groups."""
    env = launch_env()
    if not on_gpu():
        from ccmega.runtime import cpu_compat

        cpu_compat.apply()
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        existing = (parallel_state.get_tensor_model_parallel_world_size(),
                    parallel_state.get_pipeline_model_parallel_world_size())
        if existing != (tensor_parallel, pipeline_parallel):
            raise ValueError(f"megatron's parallel groups already exist with TP {existing[0]} x PP {existing[1]}; "
                             f"this command asked for TP {tensor_parallel} x PP {pipeline_parallel} (run it in its "
                             "own process, or destroy the groups first)")
    if env.world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {env.world_size} is not divisible by TP {tensor_parallel} x PP {pipeline_parallel}"
        )
    if not torch.distributed.is_initialized():
        if on_gpu():
            torch.cuda.set_device(env.device_index)
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu() else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            # explicit address: nothing leaks into os.environ for child processes to trip over
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            timeout=timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
        )
    set_seed(seed)
    return env


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def session(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234):
    """`initialize` for the body of a command; tears down only a process group it started itself, so a
    command called inside another (a test, the demo) leaves its caller's group alive."""
    owns = not torch.distributed.is_initialized()
    env = initialize(tensor_parallel, pipeline_parallel, seed)
    try:
        yield env
    finally:
        if owns:
            destroy()
