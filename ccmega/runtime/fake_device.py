"""A fake accelerator and a fake world: run the CUDA path's device logic on a CPU, as rank r of N.

On a CPU every tensor shares one device, so a batch left on the CPU or a CPU tensor handed to an
all-reduce passes every CPU test and crashes on the cluster. Here `meta` stands in for the GPU:

* cpu_compat's CUDA redirection is aimed at `meta`, so whatever megatron creates "on CUDA" (weights,
  grad buffers, optimizer state, KV caches) lands there and allocates nothing;
* `ccmega.runtime.device()` answers `meta`, so ccmega's own placements go there too;
* `StrictDevices` refuses any op whose tensors sit on two devices (0-dim CPU scalars aside), as CUDA
  does; meta tensors hold no values, so reading one (`item`, `bool`, `tolist`) yields ones: every
  data-dependent branch takes its "all present / all finite" side, and every step runs;
* collectives go through torch's `fake` process group (one process acts as rank r of N with no
  communication) behind a checker that refuses tensors off the stand-in device, as NCCL does. Object
  collectives mirror this rank: every rank seems to hold what this one holds.

`fake_world(rank, world_size, tp, pp)` does all of it and starts megatron's parallel_state: enough to
build any layout of a 128-GPU job (the real presets included) on a laptop, and to run a step on it.
It needs a CPU-only process: with CUDA visible the redirection is off (run with CUDA_VISIBLE_DEVICES=).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from ccmega.runtime.placement import device, stand_in

STAND_IN = torch.device("meta")
NCCL_STAND_IN, GLOO_STAND_IN = "ccmega_fake_nccl", "ccmega_fake_gloo"  # backend names


# ---- ops: one device per op ----------------------------------------------------------------------------

# ops CUDA lets take two devices: moves and copies (`t[i] = x` copies), and Module.to's bookkeeping
_TRANSFERS = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.__setitem__,
              torch._has_compatible_shallow_copy_type, torch.Tensor.data.__set__}
_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__index__, torch.Tensor.tolist}


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)
        elif isinstance(v, dict):
            yield from _tensors(v.values())


def _ones_like_value(t: torch.Tensor, func):
    """What reading a meta tensor gives: ones of its dtype (`tolist` keeps the shape)."""
    one = True if t.dtype == torch.bool else (1.0 if t.dtype.is_floating_point else 1)
    if func is torch.Tensor.tolist:
        out = one
        for size in reversed(t.shape):
            out = [out] * size
        return out
    return {torch.Tensor.__float__: float, torch.Tensor.__bool__: bool}.get(func, lambda x: x)(one)


def _read_stand_ins(data):
    if isinstance(data, torch.Tensor) and data.device == STAND_IN:
        return _ones_like_value(data, torch.Tensor.tolist)
    if isinstance(data, (list, tuple)):
        return [_read_stand_ins(d) for d in data]
    return data


def _copies_to_cpu(func, args, kwargs) -> bool:
    if not (args and isinstance(args[0], torch.Tensor) and args[0].device == STAND_IN):
        return False
    if func is torch.Tensor.cpu:
        return True
    target = kwargs.get("device", args[1] if func is torch.Tensor.to and len(args) > 1 else None)
    return func is torch.Tensor.to and isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


class StrictDevices(TorchFunctionMode):
    """Raises "device mix in OP: cpu, meta" for an op whose tensors sit on two devices (CUDA refuses
    them; a CPU refuses nothing). Explicit transfers (`to`, `copy_`, `cpu`, `t[i] = x`) and 0-dim CPU
    tensors (Python-scalar-like, CUDA accepts them) are allowed; reading a meta tensor on the host
    (`item`, `tolist`, a copy to the CPU) gives ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS and isinstance(args[0], torch.Tensor) and args[0].device == STAND_IN:
            return _ones_like_value(args[0], func)
        if func is torch.tensor and args:  # torch.tensor([t, ...]) reads its tensors' values
            args = (_read_stand_ins(args[0]),) + tuple(args[1:])
        if _copies_to_cpu(func, args, kwargs):  # a device-to-host copy reads the values too
            return torch.ones(args[0].shape, dtype=kwargs.get("dtype", args[0].dtype))
        if func in (torch.Tensor.copy_, torch.Tensor.__setitem__) and args[0].device.type == "cpu":
            source = args[-1]  # copy_(dst, src) / dst[index] = src into host memory: the same read
            if isinstance(source, torch.Tensor) and source.device == STAND_IN:
                args = tuple(args[:-1]) + (torch.ones(source.shape, dtype=source.dtype),)
        if func not in _TRANSFERS:
            devices = {t.device for t in _tensors(args) if not (t.dim() == 0 and t.device.type == "cpu")}
            devices |= {t.device for t in _tensors(kwargs.values()) if not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                name = getattr(func, "__name__", str(func))
                raise RuntimeError(f"device mix in {name}: {', '.join(sorted(str(d) for d in devices))}")
        return func(*args, **kwargs)


# ---- collectives: NCCL's device rule over torch's fake process group -------------------------------------

class DeviceCheckedFakeGroup(dist.ProcessGroup):
    """torch's FakeProcessGroup behind a backend's device rule: NCCL takes tensors on this rank's device
    only; gloo (megatron's side groups for CPU state) takes CPU tensors only."""

    def __init__(self, inner, rank: int, size: int, backend: str):
        super().__init__(rank, size)
        self._inner, self._backend = inner, backend

    def getBackendName(self):
        return self._backend

    @property
    def group_name(self):  # torch names Python groups in its registry only (and forgets first on destroy)
        self._name = dist.distributed_c10d._world.pg_names.get(self, getattr(self, "_name", None))
        return self._name

    def _check(self, collective: str, args) -> None:
        want = device() if self._backend == NCCL_STAND_IN else torch.device("cpu")
        for t in _tensors(args):
            if t.device != want:
                rule = "gloo takes CPU tensors" if want.type == "cpu" else "NCCL takes tensors on this rank's device"
                raise RuntimeError(f"{collective} got a tensor on {t.device} ({tuple(t.shape)}, {t.dtype}); "
                                   f"{rule} ({want}) only")

    def _forward(name, inner_name):  # noqa: N805 -- builds the methods below
        def method(self, *args):
            self._check(name, args)
            return getattr(self._inner, inner_name)(*args)
        method.__name__ = name
        return method

    # the names torch calls on a Python group -> FakeProcessGroup's own
    for _name, _inner_name in {**{n: n for n in (
            "allreduce", "allreduce_coalesced", "reduce", "broadcast", "allgather", "allgather_coalesced", "gather",
            "scatter", "reduce_scatter", "alltoall", "alltoall_base", "send", "recv", "recv_anysource", "barrier",
            "_allgather_base", "_reduce_scatter_base")},
            "all_gather_single": "_allgather_base", "reduce_scatter_single": "_reduce_scatter_base"}.items():
        locals()[_name] = _forward(_name, _inner_name)
    del _name, _inner_name, _forward

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        self._check("all_gather_single_coalesced", (outputs, inputs))
        return [self._inner._allgather_base(o, i) for o, i in zip(outputs, inputs)][-1]

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        self._check("reduce_scatter_single_coalesced", (outputs, inputs))
        return [self._inner._reduce_scatter_base(o, i) for o, i in zip(outputs, inputs)][-1]


def _register_backends() -> None:
    from torch._C._distributed_c10d import FakeProcessGroup

    for name in (NCCL_STAND_IN, GLOO_STAND_IN):
        if hasattr(dist.Backend, name.upper()):
            continue  # once per process

        def create(common_opts, backend_opts, name=name):
            inner = FakeProcessGroup._create_internal(common_opts.group_rank, common_opts.group_size, backend_opts)
            return DeviceCheckedFakeGroup(inner, common_opts.group_rank, common_opts.group_size, name)

        dist.Backend.register_backend(name, create, extended_api=True, devices=["cpu", "cuda"])


@contextlib.contextmanager
def _megatron_groups_faked():
    """megatron also creates gloo groups (distributed-optimizer state on the CPU): fake those too. Each
    group's name is read while torch still knows it (destroy asks for it after forgetting it)."""
    real = dist.new_group

    def new_group(*args, backend=None, **kwargs):
        group = real(*args, backend=GLOO_STAND_IN if backend == "gloo" else backend, **kwargs)
        if isinstance(group, DeviceCheckedFakeGroup):
            group.group_name
        return group

    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = real


@contextlib.contextmanager
def _mirrored_object_collectives():
    """Object collectives of a world of one acting as N: every rank seems to hold this rank's objects (a
    broadcast leaves each rank what it had: a value computed on rank 0 only stays unknown elsewhere)."""
    saved = {name: getattr(dist, name) for name in ("all_gather_object", "broadcast_object_list", "gather_object")}

    def all_gather_object(object_list, obj, group=None):
        object_list[:] = [obj] * len(object_list)

    def broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
        pass  # the list is what this rank holds

    def gather_object(obj, object_gather_list=None, dst=None, group=None, group_dst=None):
        if object_gather_list is not None:
            object_gather_list[:] = [obj] * len(object_gather_list)

    dist.all_gather_object, dist.broadcast_object_list, dist.gather_object = (
        all_gather_object, broadcast_object_list, gather_object)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


# ---- the whole fake world -------------------------------------------------------------------------------

@contextlib.contextmanager
def fake_device():
    """The stand-in accelerator without a process group: CUDA requests and `device()` go to meta, and
    ops mixing devices are refused. For model-level checks in a process that has its own group."""
    from ccmega.runtime import cpu_compat

    if torch.cuda.is_available():
        raise RuntimeError("the fake device needs a CPU-only process (CUDA is visible): "
                           "run it with CUDA_VISIBLE_DEVICES= (empty)")
    from torch.fx.experimental import _config as fx_config

    cpu_compat.apply()
    # boolean masks on meta select every element, in line with "reading a meta tensor gives ones"
    with stand_in(STAND_IN), cpu_compat.redirect_cuda_to(STAND_IN), StrictDevices(), \
            fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield STAND_IN


@contextlib.contextmanager
def fake_world(rank: int, world_size: int, tensor_parallel: int = 1, pipeline_parallel: int = 1,
               seed: int = 1234, gpus_per_node: int = 8):
    """This process as rank `rank` of a `world_size`-GPU job at TP x PP (x DP = the rest): the fake device,
    a fake NCCL-rule process group, and megatron's parallel_state. Yields the DistEnv of that rank."""
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ccmega.runtime.distributed import DistEnv, set_seed

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(f"world size {world_size} is not divisible by TP {tensor_parallel} x PP {pipeline_parallel}")
    if dist.is_initialized():
        raise RuntimeError("a process group is already running: the fake world needs a process of its own")
    _register_backends()
    with fake_device(), _mirrored_object_collectives():
        dist.init_process_group(NCCL_STAND_IN, store=FakeStore(), rank=rank, world_size=world_size)
        dist.distributed_c10d._get_default_group().group_name
        try:
            with _megatron_groups_faked():
                parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                         pipeline_model_parallel_size=pipeline_parallel)
            set_seed(seed)
            yield DistEnv(rank=rank, world_size=world_size, local_rank=rank % gpus_per_node,
                          master_addr="fake", master_port=0)
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
