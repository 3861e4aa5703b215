"""Checkpoints as megatron dist_checkpointing (torch_dist): one format, resharded to any TP/PP/DP on load.

Layout (other commands rely on it):

    RUN_DIR/checkpoints/latest                  text: the name of the newest COMPLETE iter dir
    RUN_DIR/checkpoints/iter_0000100/           dist checkpoint of {"model", "optimizer",
                                                "scheduler", "progress", "rng"}
    RUN_DIR/checkpoints/iter_0000100/ccmega.json  preset, tokenizer, iteration, consumed samples,
                                                layout, optimizer_format, "format": "ccmega-gpt-v1"

`latest` is replaced atomically (temp file + os.replace) only after every rank finished writing, and
`ccmega.json` is written last inside the iter dir: a directory without it is an incomplete save.
Tools read checkpoints through `read_checkpoint_metadata` and `load_model_weights`, which accept a
run dir, its checkpoints dir or an iter dir.

The distributed optimizer's state is saved in one of megatron's two formats (`optimizer_format`,
recorded in ccmega.json; Megatron-LM's default is the first):

- "dp_reshardable" (default): each DP rank writes and reads only its own shard of the fp32 main
  parameters and Adam moments, as the flat buckets it holds: no gather at save, no full copy at load.
  It reloads under another DP size, but not under another TP/PP layout (the buckets follow the
  model-parallel partition); such a resume is refused with the fix (see `check_layout`).
- "fully_reshardable": every DP rank gathers the whole state of its model-parallel group at save
  (host RAM: the full fp32 parameters and Adam state) and reads all of it at load; reloads at any
  TP/PP/DP layout. Write one when a run must move to another TP/PP layout.

The plain (non-distributed) optimizer's state is sharded like the parameters ("plain"): it reloads
at any layout. Saves and loads run megatron's fully parallel strategy wrappers over the DP group
(each DP replica writes/reads a share of the replicated tensors), as Megatron-LM does.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from ccmega.config import ConfigError
from ccmega.fileio import atomic_write_text

FORMAT = "ccmega-gpt-v1"
METADATA_FILE = "ccmega.json"
LATEST_FILE = "latest"
# the distributed optimizer's checkpoint formats (megatron's `distrib_optim_sharding_type`); the first is the default
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
PLAIN_OPTIMIZER = "plain"  # ccmega.json's optimizer_format of a non-distributed optimizer


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_iter_dir(ckpt_dir: str) -> str | None:
    """The iter dir `latest` names inside a checkpoints dir, or None when there is none yet."""
    pointer = os.path.join(ckpt_dir, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(os.path.join(path, METADATA_FILE)):
        raise FileNotFoundError(f"{pointer} names {name}, which is not a complete checkpoint")
    return path


def resolve_iter_dir(path: str) -> str:
    """An iter dir from a run dir, a checkpoints dir or an iter dir (via `latest` for the first two)."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, METADATA_FILE)):
        return path
    for ckpt_dir in (path, checkpoints_dir(path)):
        found = latest_iter_dir(ckpt_dir)
        if found:
            return found
    raise FileNotFoundError(f"no ccmega checkpoint at {path} (expected an iter dir with {METADATA_FILE}, or a "
                            f"run/checkpoints dir with a '{LATEST_FILE}' file)")


def read_checkpoint_metadata(path: str) -> dict:
    """ccmega.json of the checkpoint at `path` (run, checkpoints or iter dir), plus its "path"."""
    iter_dir = resolve_iter_dir(path)
    with open(os.path.join(iter_dir, METADATA_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{iter_dir}: format {meta.get('format')!r}, expected {FORMAT!r}")
    meta["path"] = iter_dir
    return meta


# ---- state dicts -------------------------------------------------------------------------------------

def _unwrap(model):
    """The GPTModel inside megatron DDP (or Float16Module) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _rng_sharded_object():
    """This rank's RNG states as a ShardedObject indexed by (pp, tp, dp) rank."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "data_parallel": ps.get_data_parallel_world_size()}


def _is_distributed(optimizer) -> bool:
    """Whether `optimizer` (megatron's, possibly a ChainedOptimizer) is the distributed optimizer."""
    from megatron.core.optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_format(optimizer, requested: str) -> str | None:
    """What ccmega.json records: the distributed optimizer's format, "plain", or None (no optimizer)."""
    if optimizer is None:
        return None
    return requested if _is_distributed(optimizer) else PLAIN_OPTIMIZER


def _allocate_fresh_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer over torch's Adam/AdamW its state before a load.

    megatron's DistributedOptimizer.state_dict() reads the step from the inner optimizer's per-parameter
    state when torch's Adam stands in for TE/Apex FusedAdam (0.16.1 and 0.19.2), and asserts on an empty
    one; building the state dict a load fills calls it. So allocate what torch's Adam would at its first
    step: megatron's own init_state_fn (zero moments) and step 0. The load then overwrites all of it.
    FusedAdam (TE/Apex) keeps its step in the param groups and is left alone."""
    from megatron.core.optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if (not isinstance(opt, DistributedOptimizer) or not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
                or len(inner.state) or opt.init_state_fn is None):
            continue
        opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.tensor(0.0))


def _load_optimizer(optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state) under no_grad, around three gaps of megatron's distributed
    optimizer over torch's Adam/AdamW (the CPU path; 0.16.1 and 0.19.2). Its load_state_dict gives the
    inner optimizer's per-parameter state ONE step tensor, shared by every parameter (torch's Adam then
    increments it once per parameter at each step: bias corrections drift after a resume); then its
    parameter-state load copies every inner state key from the checkpoint: dp_reshardable overwrites the
    step with the value before the load, fully_reshardable stores none (KeyError 'step'). So the
    non-parameter state (param groups, step, grad scaler) loads first, the parameter state with the step
    set aside, and each parameter gets its own copy of the step back. FusedAdam (TE/Apex, the GPU)
    keeps no step there and loads as megatron does. no_grad: the dp_reshardable load copies into the
    main parameters without it, and in fp32 those are views of the model's parameters."""
    from megatron.core.optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is None:
        pairs = [(optimizer, state)]
    elif len(chained) == 1:
        pairs = [(chained[0], state)]
    else:
        pairs = list(zip(chained, (v for _, v in sorted(state.items()))))
    with torch.no_grad():
        for opt, opt_state in pairs:
            inner = getattr(opt, "optimizer", None)
            if not (isinstance(opt, DistributedOptimizer) and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
                    and "param_state" in opt_state):
                opt.load_state_dict(opt_state)
                continue
            load_param_state = {"dp_reshardable": opt.load_parameter_state_from_dp_reshardable,
                                "fully_reshardable": opt.load_parameter_state_from_fully_reshardable,
                                }[opt_state["param_state_sharding_type"]]
            opt.load_state_dict({k: v for k, v in opt_state.items() if k != "param_state"})
            steps = {param: st.pop("step") for param, st in inner.state.items() if "step" in st}
            load_param_state(opt_state["param_state"])
            for param, step in steps.items():
                inner.state[param]["step"] = step.clone()
        if chained is not None and len(chained) > 1:
            optimizer._synchronize_steps()


def _sharded_state_dict(model_chunks, optimizer, scheduler, progress: dict, is_loading: bool,
                        with_rng: bool = True, optimizer_format: str = OPTIMIZER_FORMATS[0]) -> dict:
    if len(model_chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported")
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer format {optimizer_format!r}: expected one of {', '.join(OPTIMIZER_FORMATS)}")
    state = {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    if optimizer is not None:
        # The distributed optimizer's format (the plain optimizer ignores it): "dp_reshardable" by default,
        # as Megatron-LM, so that no rank gathers the whole optimizer state (each DP rank saves and loads
        # its own buckets); "fully_reshardable" on request, to move to another TP/PP layout. Never
        # megatron's own default, "fully_sharded_model_space" (deprecated): in megatron-core 0.16.1 and
        # 0.19.2 its flattened ShardedTensors are refused as they are built ("ShardedTensor.flattened_range
        # is not supported"), whatever the backend.
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_format})
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["progress"] = dict(progress)
    if with_rng:
        state["rng"] = _rng_sharded_object()
    return state


def _save_strategy():
    """torch_dist, with the writes of DP-replicated tensors spread over the DP group (Megatron-LM's
    --ckpt-fully-parallel-save)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"),
                                            ps.get_data_parallel_group(with_context_parallel=True))


def _load_strategy(iter_dir: str):
    """torch_dist, each DP rank reading a share of the DP-replicated tensors and exchanging them
    (Megatron-LM's --ckpt-fully-parallel-load); DP-sharded tensors are read by their owner only."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(iter_dir),
                                            ps.get_data_parallel_group(with_context_parallel=True))


def _layout_text(layout: dict) -> str:
    return (f"TP={layout.get('tensor_parallel')}, PP={layout.get('pipeline_parallel')}, "
            f"DP={layout.get('data_parallel')}")


def check_layout(meta: dict) -> None:
    """ConfigError when the checkpoint of `meta` (ccmega.json, with "path") holds a dp_reshardable
    distributed-optimizer state saved at another TP/PP layout than this run's: megatron reshards that
    format across DP only (Megatron-LM refuses it too). Cheap: call it before building the model."""
    if meta.get("optimizer_format") != "dp_reshardable":
        return
    now = _layout()
    old = {key: meta.get(key) for key in now}
    if (old["tensor_parallel"], old["pipeline_parallel"]) != (now["tensor_parallel"], now["pipeline_parallel"]):
        raise ConfigError(
            f"cannot resume {meta['path']} at {_layout_text(now)}: it was saved at {_layout_text(old)} with the "
            "distributed optimizer's dp_reshardable format (checkpoint.optimizer_format), whose state reloads "
            "under another DP size only, not another TP/PP. To change the layout, resume once at the old "
            f"TP={old['tensor_parallel']}, PP={old['pipeline_parallel']} with --set "
            "checkpoint.optimizer_format=fully_reshardable until it writes its next checkpoint (the next save "
            "interval, the end of the run, or a SIGTERM); that checkpoint resumes under any layout")


def _format_to_load(meta: dict, optimizer) -> str:
    """The distributed-optimizer format to request when loading the checkpoint of `meta` into
    `optimizer`, after refusing what cannot be read (see check_layout)."""
    saved = meta.get("optimizer_format")
    if saved not in OPTIMIZER_FORMATS:
        # "plain", no optimizer state, or a checkpoint older than the option (always fully_reshardable)
        return "fully_reshardable"
    if optimizer is None:
        return saved
    if saved == "dp_reshardable" and not _is_distributed(optimizer):
        raise ConfigError(
            f"cannot resume {meta['path']} with the plain optimizer: its optimizer state was saved by the "
            "distributed optimizer in the dp_reshardable format, which only the distributed optimizer reads. "
            "Resume with --set train.distributed_optimizer=true")
    check_layout(meta)
    return saved


# ---- save / load -------------------------------------------------------------------------------------

def save_checkpoint(run_dir: str, model_chunks, optimizer, scheduler, progress: dict, metadata: dict,
                    optimizer_format: str = OPTIMIZER_FORMATS[0]) -> str:
    """Collective: every rank writes its shards of iteration `progress["iteration"]`; then rank 0
    writes ccmega.json and moves `latest`. Returns the iter dir. `optimizer_format`: the distributed
    optimizer's (see the module doc); the plain optimizer's state is saved as always."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    iteration = int(progress["iteration"])
    ckpt_dir = checkpoints_dir(run_dir)
    iter_dir = os.path.join(ckpt_dir, iter_dir_name(iteration))
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.isdir(iter_dir):  # a leftover of a save that never completed (or an older run)
            shutil.rmtree(iter_dir)
        os.makedirs(iter_dir)
    torch.distributed.barrier()
    state = _sharded_state_dict(model_chunks, optimizer, scheduler, progress, is_loading=False,
                                optimizer_format=optimizer_format)
    state["layout"] = _layout()
    recorded = _optimizer_format(optimizer, optimizer_format)
    dist_checkpointing.save(state, iter_dir, sharded_strategy=_save_strategy(),
                            content_metadata={"distrib_optim_sharding_type": recorded} if recorded in
                            OPTIMIZER_FORMATS else None)
    del state  # the fully_reshardable gather's buffers
    torch.distributed.barrier()  # every rank's shards are on disk
    if rank == 0:
        meta = dict(metadata, iteration=iteration, consumed_samples=int(progress["consumed_samples"]),
                    format=FORMAT, optimizer_format=recorded, **_layout())
        atomic_write_text(os.path.join(iter_dir, METADATA_FILE), json.dumps(meta, indent=2) + "\n")
        atomic_write_text(os.path.join(ckpt_dir, LATEST_FILE), iter_dir_name(iteration) + "\n")
    torch.distributed.barrier()
    return iter_dir


def load_checkpoint(path: str, model_chunks, optimizer, scheduler) -> dict:
    """Restore model, optimizer and scheduler (and RNG when the layout is unchanged) from `path`;
    return the saved progress dict. Any TP/PP/DP layout (dist_checkpointing reshards), except a
    dp_reshardable distributed-optimizer state under another TP/PP: a ConfigError says what to do."""
    from megatron.core import dist_checkpointing

    iter_dir = resolve_iter_dir(path)
    optimizer_format = _format_to_load(read_checkpoint_metadata(iter_dir), optimizer)
    saved_layout = dist_checkpointing.load_common_state_dict(iter_dir)["layout"]
    same_layout = saved_layout == _layout()
    if optimizer is not None:
        _allocate_fresh_state(optimizer)
    request = _sharded_state_dict(model_chunks, optimizer, scheduler, {}, is_loading=True, with_rng=same_layout,
                                  optimizer_format=optimizer_format)
    loaded = dist_checkpointing.load(request, iter_dir, sharded_strategy=_load_strategy(iter_dir))
    _unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    if optimizer is not None:
        _load_optimizer(optimizer, loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _restore_rng(loaded["rng"])
    progress = dict(loaded["progress"])
    progress["path"] = iter_dir
    progress["layout_changed"] = not same_layout
    return progress


def load_model_weights(model, checkpoint_dir: str) -> dict:
    """Load only the model weights of a checkpoint into `model` (a GPTModel stage, possibly wrapped),
    whatever layout saved it. Returns the checkpoint's metadata (ccmega.json)."""
    from megatron.core import dist_checkpointing

    meta = read_checkpoint_metadata(checkpoint_dir)
    module = _unwrap(model)
    loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, meta["path"])
    module.load_state_dict(loaded["model"])
    return meta
