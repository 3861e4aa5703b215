"""The one place that names this rank's device.

Everything that meets a model or a collective is created on `device()` or moved there once per data
path: NCCL takes tensors on the rank's own GPU only, and a CPU tensor beside CUDA parameters fails at
the first op. On a CPU every tensor shares one device, so the CPU tests cannot see a misplaced one;
the fake-device mode (`ccmega.runtime.fake_device`) swaps in a stand-in accelerator that can.
"""
from __future__ import annotations

import contextlib

import torch

_stand_in: torch.device | None = None


def device() -> torch.device:
    """cuda:LOCAL_RANK on a GPU node (`initialize` selected it), the CPU without CUDA, or the stand-in
    accelerator while a fake device is active."""
    if _stand_in is not None:
        return _stand_in
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of tensors moved to `device()` (the one move of a data path)."""
    target = device()
    return {key: value.to(target, non_blocking=True) for key, value in batch.items()}


@contextlib.contextmanager
def stand_in(accelerator: str | torch.device):
    """`device()` answers `accelerator` inside the block (the fake-device tests and the dry run)."""
    global _stand_in
    previous, _stand_in = _stand_in, torch.device(accelerator)
    try:
        yield _stand_in
    finally:
        _stand_in = previous
