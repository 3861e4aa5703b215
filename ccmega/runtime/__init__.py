"""Distributed start-up: torch.distributed + megatron parallel_state from torchrun or SLURM variables."""
from ccmega.runtime.distributed import (  # noqa: F401
    DistEnv,
    destroy,
    dist_env_from_environ,
    initialize,
    on_gpu,
    session,
    set_seed,
)
