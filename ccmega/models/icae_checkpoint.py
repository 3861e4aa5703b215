"""Building an ICAE for this rank and rebuilding a trained one from disk (next to ccmega/models/icae.py).

    build_icae(...)              backbones wrapped in an ICAEModel (random weights: `ccmega icae-train` then
                                 loads both from their pretraining checkpoints)
    load_icae(icae_checkpoint)   a trained ICAE for evaluation and export

An ICAE checkpoint holds the trainable parts only; the decoder is recorded by path and by a SHA-256 of
its checkpoint files (`hash_checkpoint_files`), checked again whenever the ICAE is loaded.
"""
from __future__ import annotations

import hashlib
import os


def hash_checkpoint_files(iter_dir: str) -> str:
    """SHA-256 over every file of a checkpoint dir (relative names and bytes, sorted by name)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(iter_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, iter_dir).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()


def decoder_params_sha256(decoder) -> list[str]:
    """SHA-256 of the decoder's parameters, one per TP rank (gathered): proof the frozen decoder is untouched."""
    import torch
    from megatron.core import parallel_state as ps

    digest = hashlib.sha256()
    for name, param in sorted(decoder.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    hashes = [None] * ps.get_tensor_model_parallel_world_size()
    torch.distributed.all_gather_object(hashes, digest.hexdigest(), group=ps.get_tensor_model_parallel_group())
    return hashes


def build_icae(encoder_preset, decoder_preset, encoder_config, decoder_config, num_memory_slots: int,
               end_token_id: int, seed: int):
    """Encoder and decoder GPTModels for this rank (TP shards) wrapped in an ICAEModel (random weights)."""
    from ccmega.models.icae import ICAEModel
    from ccmega.models.qwen3 import build_model

    encoder = build_model(encoder_preset, encoder_config)
    decoder = build_model(decoder_preset, decoder_config)
    return ICAEModel(encoder, decoder, num_memory_slots=num_memory_slots, end_token_id=end_token_id,
                     real_vocab_size=decoder_preset.vocab_size, seed=seed)


def load_icae(icae_checkpoint: str, decoder_checkpoint: str | None = None, verify_decoder: bool = True,
              params_dtype=None):
    """Rebuild a trained ICAE for evaluation: encoder + trainable parts from the ICAE checkpoint, the frozen
    decoder from the pretraining checkpoint it was trained against (or `decoder_checkpoint`).

    Needs torch.distributed and megatron parallel_state initialised (e.g. `ccmega.runtime.initialize(tp)`);
    works at any TP (dist_checkpointing reshards). `verify_decoder` re-hashes the decoder checkpoint's files
    and refuses a decoder that differs from the one trained against. params_dtype: None = bf16 on GPU,
    fp32 on CPU. Returns the ICAEModel in eval mode, on this rank's device."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from ccmega.models.qwen3 import transformer_config
    from ccmega.presets import ModelPreset
    from ccmega.training.checkpointer import computed_on_rank0
    from ccmega.training.checkpointing import load_model_weights, read_checkpoint_metadata

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("load_icae needs megatron parallel_state: call ccmega.runtime.initialize(tp) first")
    meta = read_checkpoint_metadata(icae_checkpoint)
    if "icae" not in meta:
        raise ValueError(f"{meta['path']} is not an ICAE checkpoint (no 'icae' metadata): a pretraining checkpoint?")
    icae = meta["icae"]
    decoder_path = decoder_checkpoint or icae["decoder"]["checkpoint"]
    decoder_meta = read_checkpoint_metadata(decoder_path)
    if verify_decoder:
        found = computed_on_rank0(lambda: hash_checkpoint_files(decoder_meta["path"]))
        if found != icae["decoder"]["files_sha256"]:
            raise ValueError(f"decoder checkpoint {decoder_meta['path']} differs from the one this ICAE was trained "
                             f"against ({icae['decoder']['checkpoint']}, sha256 {icae['decoder']['files_sha256'][:16]}"
                             f"...; now {found[:16]}...); pass verify_decoder=False to use it anyway")
    if params_dtype is None:
        params_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tp = ps.get_tensor_model_parallel_world_size()
    presets = [ModelPreset(**icae[role]["model_preset"]) for role in ("encoder", "decoder")]
    configs = [transformer_config(p, tp, 1, params_dtype=params_dtype) for p in presets]
    model = build_icae(*presets, *configs, icae["num_memory_slots"], icae["end_token_id"], seed=0)
    load_model_weights(model.decoder, decoder_meta["path"])
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, meta["path"])
    model.load_state_dict(loaded["model"])
    return model.eval()
