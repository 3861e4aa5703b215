"""Checkpoints as megatron dist_checkpointing (torch_dist): one format, resharded to any TP/PP/DP on load.

Layout (other commands rely on it):

    RUN_DIR/checkpoints/latest                  text: the name of the newest COMPLETE iter dir
    RUN_DIR/checkpoints/iter_0000100/           dist checkpoint of {"model", "optimizer",
                                                "scheduler", "progress", "rng"}
    RUN_DIR/checkpoints/iter_0000100/ccmega.json  preset, tokenizer, iteration, consumed samples,
                                                layout, "format": "ccmega-gpt-v1"

`latest` is replaced atomically (temp file + os.replace) only after every rank finished writing, and
`ccmega.json` is written last inside the iter dir: a directory without it is an incomplete save.
Tools read checkpoints through `read_checkpoint_metadata` and `load_model_weights`, which accept a
run dir, its checkpoints dir or an iter dir.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from ccmega.fileio import atomic_write_text

FORMAT = "ccmega-gpt-v1"
METADATA_FILE = "ccmega.json"
LATEST_FILE = "latest"


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


def _sharded_state_dict(model_chunks, optimizer, scheduler, progress: dict, is_loading: bool,
                        with_rng: bool = True) -> dict:
    if len(model_chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported")
    state = {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    if optimizer is not None:
        # 'fully_reshardable': megatron 0.16's default distributed-optimizer format uses flattened
        # ShardedTensors that torch_dist cannot save; this one saves, and reloads at any TP/PP/DP.
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["progress"] = dict(progress)
    if with_rng:
        state["rng"] = _rng_sharded_object()
    return state


# ---- save / load -------------------------------------------------------------------------------------

def save_checkpoint(run_dir: str, model_chunks, optimizer, scheduler, progress: dict, metadata: dict) -> str:
    """Collective: every rank writes its shards of iteration `progress["iteration"]`; then rank 0
    writes ccmega.json and moves `latest`. Returns the iter dir."""
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
    state = _sharded_state_dict(model_chunks, optimizer, scheduler, progress, is_loading=False)
    state["layout"] = _layout()
    dist_checkpointing.save(state, iter_dir, sharded_strategy=("torch_dist", 1))
    torch.distributed.barrier()  # every rank's shards are on disk
    if rank == 0:
        meta = dict(metadata, iteration=iteration, consumed_samples=int(progress["consumed_samples"]),
                    format=FORMAT, **_layout())
        atomic_write_text(os.path.join(iter_dir, METADATA_FILE), json.dumps(meta, indent=2) + "\n")
        atomic_write_text(os.path.join(ckpt_dir, LATEST_FILE), iter_dir_name(iteration) + "\n")
    torch.distributed.barrier()
    return iter_dir


def load_checkpoint(path: str, model_chunks, optimizer, scheduler) -> dict:
    """Restore model, optimizer and scheduler (and RNG when the layout is unchanged) from `path`;
    return the saved progress dict. Any TP/PP/DP layout: dist_checkpointing reshards."""
    from megatron.core import dist_checkpointing

    iter_dir = resolve_iter_dir(path)
    saved_layout = dist_checkpointing.load_common_state_dict(iter_dir)["layout"]
    same_layout = saved_layout == _layout()
    request = _sharded_state_dict(model_chunks, optimizer, scheduler, {}, is_loading=True, with_rng=same_layout)
    loaded = dist_checkpointing.load(request, iter_dir)
    _unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
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
