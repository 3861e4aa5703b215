"""Distributed start-up (torch.distributed + megatron parallel_state from torchrun or SLURM variables) and
`device()`, the one name of this rank's device."""
from ccmega.runtime.distributed import (  # noqa: F401
    DistEnv,
    destroy,
    dist_env_from_environ,
    initialize,
    on_gpu,
    session,
    set_seed,
)
from ccmega.runtime.placement import device, stand_in, to_device  # noqa: F401
