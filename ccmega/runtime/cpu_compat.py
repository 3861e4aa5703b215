"""Run megatron-core on a CPU-only torch build (gloo, fp32/bf16).

megatron-core assumes CUDA in a handful of places: RNG state handling, `torch.cuda.current_device()`,
tensors created with `device="cuda"` or moved with `.cuda()`, a `'torch.cuda.FloatTensor'` assert in
gradient clipping, `torch.cuda.synchronize/current_stream`. This module is the ONLY place that knows;
`apply()` is called by the runtime when CUDA is absent and is a no-op otherwise. Checked against
megatron-core 0.16.1 and 0.19.x.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_redirect: _CudaRedirect | None = None  # the mode apply() pushed


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # an ordinal, as in device=torch.cuda.current_device()
    return torch.device(device).type == "cuda"


class _CudaRedirect(TorchFunctionMode):
    """Redirects tensor creation/moves aimed at CUDA to `target`: the CPU, or the stand-in accelerator of
    the fake-device mode (`redirect_cuda_to`)."""

    def __init__(self, target: torch.device):
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = self.target
        if func is torch.Tensor.cuda:
            return args[0].to(self.target)
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, int, torch.device)):
            if _is_cuda_device(args[1]):
                args = (args[0], self.target) + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads asserts grad.type() == 'torch.cuda.FloatTensor'; report the CUDA twin.
            name = func(*args)
            return "torch.cuda." + name.split(".")[-1] if args[0].device == self.target else name
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda streams: CPU work is synchronous, so waiting is a no-op."""

    def wait_stream(self, *_):
        pass

    def wait_event(self, *_):  # 0.19: finish_grad_sync waits on CUDA-graph events
        pass

    def synchronize(self):
        pass

    def record_event(self, *_):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


def _cpu_get_rng_state(*_, **__):
    return torch.get_rng_state()


def _cpu_set_rng_state(state, *_, **__):
    torch.set_rng_state(state)


def apply() -> None:
    """Patch torch.cuda and megatron-core for CPU execution. Idempotent; does nothing with CUDA."""
    global _applied, _redirect
    if _applied or torch.cuda.is_available():
        return
    _applied = True

    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 0
    torch.cuda.set_device = lambda *_: None
    torch.cuda.synchronize = lambda *_: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.current_stream = lambda *_: _NullStream()
    torch.cuda.default_stream = lambda *_: _NullStream()
    torch.cuda.stream = lambda *_: contextlib.nullcontext()
    torch.cuda.memory_allocated = lambda *_: 0
    torch.cuda.max_memory_allocated = lambda *_: 0

    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = _cpu_get_rng_state
    tp_random._set_cuda_rng_state = _cpu_set_rng_state

    # The mode stays pushed for the life of the process: megatron creates CUDA tensors lazily
    # (optimizer steps, grad clipping, checkpoint loading), not only while building the model.
    _redirect = _CudaRedirect(torch.device("cpu"))
    _redirect.__enter__()


@contextlib.contextmanager
def redirect_cuda_to(target: str | torch.device):
    """CUDA requests land on `target` instead of the CPU inside the block (the fake-device mode aims
    them at its stand-in accelerator). Needs `apply()` first."""
    if _redirect is None:
        raise RuntimeError("cpu_compat.apply() has not run (CUDA is available?): nothing to redirect")
    previous, _redirect.target = _redirect.target, torch.device(target)
    try:
        yield
    finally:
        _redirect.target = previous


@contextlib.contextmanager
def redirect_suspended():
    """Torch calls inside the block bypass the CUDA redirect (a same-run reference of the benchmarks runs as
    in a process of its own). A no-op where the redirect is not the innermost mode, or was never pushed."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if _redirect is None or not stack or stack[-1] is not _redirect:
        yield
        return
    with _pop_mode_temporarily():
        yield
