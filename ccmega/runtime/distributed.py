"""Initialise torch.distributed and megatron-core's parallel_state.

Rank, world size and master address come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or, under `srun`, from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host
of SLURM_JOB_NODELIST). A plain `python script.py` is a world of one.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


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


def dist_env_from_environ(environ=os.environ) -> DistEnv:
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
    env = dist_env_from_environ()
    if env.world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {env.world_size} is not divisible by TP {tensor_parallel} x PP {pipeline_parallel}"
        )
    if not torch.distributed.is_initialized():
        if on_gpu():
            torch.cuda.set_device(env.local_rank)
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
