"""`ccmega convert to-hf | from-hf`: ccmega (megatron dist-ckpt) checkpoints <-> Hugging Face Qwen3 folders.

Both directions run as ONE process on a CPU (gloo world of one, TP=1, PP=1):
- to-hf loads a checkpoint saved at any TP/PP into a single-stage model (dist_checkpointing reshards),
  maps it with `megatron_to_hf` and writes a folder `AutoModelForCausalLM.from_pretrained` loads.
- from-hf writes a dist checkpoint from a single-stage model. dist_checkpointing stores global
  tensors, so any TP/PP layout loads it; the only layout-dependent part is the vocabulary padding
  (rows padded to a multiple of 16 x TP), so the embedding is padded for `--tensor-parallel`.
  Such a checkpoint loads at that TP, at every TP dividing it, and at any PP.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from ccmega.convert import hf_folder
from ccmega.convert.verify import FP32_TOLERANCE, VerificationError, verify_pair
from ccmega.presets import ModelPreset, padded_vocab_size

EMBEDDING_KEY = "embedding.word_embeddings.weight"
LOSSY_TOLERANCE = 5e-2  # default --verify tolerance when the written dtype rounds the weights


def log(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def world_of_one():
    """torch.distributed + parallel_state for one CPU process; reuses a world of one that exists."""
    from ccmega import runtime

    world = (torch.distributed.get_world_size() if torch.distributed.is_initialized()
             else runtime.dist_env_from_environ().world_size)
    if world != 1:
        raise RuntimeError("`ccmega convert` runs as a single process: do not launch it under torchrun/srun "
                           "with several tasks")
    with runtime.session(1, 1):
        yield


def single_stage_model(preset: ModelPreset, rows: int, dtype: torch.dtype):
    """A TP=1, PP=1 GPTModel whose embedding has exactly `rows` rows (a checkpoint's padded vocabulary)."""
    from ccmega.models.qwen3 import build_model, transformer_config

    if padded_vocab_size(rows, 1) != rows:
        raise ValueError(f"embedding has {rows} rows, not a multiple of the vocabulary padding unit")
    config = transformer_config(preset, 1, 1, params_dtype=dtype)
    return build_model(preset.replace(vocab_size=rows), config, pre_process=True, post_process=True,
                       use_transformer_engine=False)


def resolve_dtype(name: str, source: torch.dtype) -> torch.dtype:
    if name == "auto":
        return source
    if name not in hf_folder.DTYPES:
        raise ValueError(f"--dtype {name!r}: choose auto, {', '.join(hf_folder.DTYPES)}")
    return hf_folder.DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in hf_folder.DTYPES.items() if v == dtype)


def default_tolerance(written: torch.dtype, source: torch.dtype) -> float:
    lossless = written == source or written == torch.float32
    return FP32_TOLERANCE if lossless else LOSSY_TOLERANCE


# ---- to-hf ------------------------------------------------------------------------------------------

def checkpoint_tokenizer(meta: dict, override: str | None, skip: bool) -> str | None:
    """The pretraining tokenizer's path, checked against the identity recorded at pretraining time."""
    if skip:
        return None
    if override:
        return override
    info = meta.get("tokenizer") or {}
    path = info.get("path")
    if not path:
        log("warning: the checkpoint records no tokenizer; writing none (give --tokenizer PATH)")
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{meta['path']}/ccmega.json: tokenizer.path {path} does not exist "
                                "(give --tokenizer PATH, or --no-tokenizer)")
    if info.get("identity") and hf_folder.sha256(path) != info["identity"]:
        raise ValueError(f"{path} changed since pretraining (sha256 differs from ccmega.json's "
                         "tokenizer.identity); give the original with --tokenizer PATH")
    return path


def write_hf_model(model, preset: ModelPreset, folder: Path, tokenizer_path: str | None, dtype: torch.dtype,
                   max_shard_size: str = "5GB") -> list[str]:
    """A TP=1 PP=1 GPTModel -> config.json, generation_config.json, safetensors and tokenizer in `folder`."""
    from ccmega.convert.hf_qwen3 import hf_config_dict, megatron_to_hf

    state = megatron_to_hf(model.state_dict(), preset)
    state = hf_folder.without_tied_head({k: v.to(dtype) for k, v in state.items()}, preset)
    config = hf_config_dict(preset)
    config.update(torch_dtype=dtype_name(dtype), dtype=dtype_name(dtype))
    generation = {"do_sample": False}
    if tokenizer_path:
        special = hf_folder.write_tokenizer(tokenizer_path, folder, preset.max_position_embeddings)
        eod = special["eos_token_id"]
        if eod < preset.vocab_size:
            config.update(bos_token_id=eod, eos_token_id=eod)
            generation.update(bos_token_id=eod, eos_token_id=eod, pad_token_id=eod)
        else:
            log(f"warning: the tokenizer's end-of-document id {eod} is outside the model's vocabulary "
                f"({preset.vocab_size}): is it the pretraining tokenizer? No token ids written to config")
        log(f"  tokenizer: {tokenizer_path} (end of document {special['eos_token']!r} = {special['eos_token_id']})")
    hf_folder.write_json(folder / "config.json", config)
    hf_folder.write_json(folder / "generation_config.json", generation)
    return hf_folder.write_safetensors(state, folder, hf_folder.parse_size(max_shard_size), log=log)


def to_hf(checkpoint: str, output: str, dtype: str = "auto", max_shard_size: str = "5GB",
          tokenizer: str | None = None, no_tokenizer: bool = False, verify: bool = False,
          tolerance: float | None = None, overwrite: bool = False) -> dict:
    from megatron.core import dist_checkpointing

    from ccmega.training.checkpointing import load_model_weights, read_checkpoint_metadata

    start = time.time()
    meta = read_checkpoint_metadata(checkpoint)
    iter_dir = meta["path"]
    preset = ModelPreset(**meta["model_preset"])
    tokenizer_path = checkpoint_tokenizer(meta, tokenizer, no_tokenizer)
    log(f"to-hf: {iter_dir} (iteration {meta.get('iteration')}, saved at TP={meta.get('tensor_parallel')} "
        f"PP={meta.get('pipeline_parallel')}), preset {preset.name}")
    with world_of_one():
        tensors = dist_checkpointing.load_tensors_metadata(iter_dir)
        if EMBEDDING_KEY not in tensors:
            raise ValueError(f"{iter_dir}: no {EMBEDDING_KEY} in the checkpoint: not a ccmega GPT checkpoint")
        rows, source_dtype = tensors[EMBEDDING_KEY].global_shape[0], tensors[EMBEDDING_KEY].dtype
        out_dtype = resolve_dtype(dtype, source_dtype)
        model = single_stage_model(preset, rows, source_dtype)
        load_model_weights(model, iter_dir)
        model.eval()
        log(f"  loaded {sum(p.numel() for p in model.parameters()):,} parameters ({dtype_name(source_dtype)}, "
            f"{rows} embedding rows -> {preset.vocab_size})")
        with hf_folder.atomic_dir(output, overwrite) as tmp:
            files = write_hf_model(model, preset, tmp, tokenizer_path, out_dtype, max_shard_size)
            result = {"output": str(Path(output).resolve()), "files": files, "dtype": dtype_name(out_dtype)}
            if verify:
                tol = tolerance if tolerance is not None else default_tolerance(out_dtype, source_dtype)
                result["verify"] = dataclasses.asdict(verify_pair(model, str(tmp), preset, tokenizer_path, tol, log))
    log(f"to-hf: wrote {result['output']} ({len(files)} safetensors file(s), {result['dtype']}"
        f"{', verified' if verify else ''}) in {time.time() - start:.1f}s")
    return result


# ---- from-hf ----------------------------------------------------------------------------------------

def check_layout(preset: ModelPreset, tp: int, pp: int) -> None:
    problems = [f"{name}={value} is not divisible by {what}={n}" for name, value, what, n in [
        ("num_attention_heads", preset.num_attention_heads, "--tensor-parallel", tp),
        ("num_key_value_heads", preset.num_query_groups, "--tensor-parallel", tp),
        ("intermediate_size", preset.ffn_hidden_size, "--tensor-parallel", tp),
        ("num_hidden_layers", preset.num_layers, "--pipeline-parallel", pp)] if value % n]
    if problems:
        raise ValueError("cannot lay out this model: " + "; ".join(problems))


def from_hf(hf_dir: str, output: str, tensor_parallel: int = 1, pipeline_parallel: int = 1,
            dtype: str = "auto", name: str | None = None, tokenizer: str | None = None,
            verify: bool = False, tolerance: float | None = None, overwrite: bool = False) -> dict:
    import shutil

    from ccmega.convert.hf_qwen3 import hf_to_megatron, load_full_state, preset_from_hf_config
    from ccmega.training.checkpointing import (iter_dir_name, load_model_weights, read_checkpoint_metadata,
                                               save_checkpoint)

    start = time.time()
    hf_dir = str(Path(hf_dir).resolve())
    cfg = hf_folder.read_hf_config(hf_dir)
    try:
        preset = preset_from_hf_config(cfg, name or Path(hf_dir).name)
    except ValueError as e:
        raise ValueError(f"{hf_dir}/config.json: {e}") from None
    if name is None:  # a registered preset of the same architecture lends its name (`ccmega pretrain --preset`)
        from ccmega.presets import MODEL_PRESETS

        preset = next((p for p in MODEL_PRESETS.values() if p == preset.replace(name=p.name)), preset)
    check_layout(preset, tensor_parallel, pipeline_parallel)
    state = hf_folder.read_hf_weights(hf_dir)
    hf_folder.check_hf_weights(state, preset, hf_dir)
    source_dtype = state["model.embed_tokens.weight"].dtype
    out_dtype = resolve_dtype(dtype, source_dtype)
    rows = padded_vocab_size(preset.vocab_size, tensor_parallel)
    log(f"from-hf: {hf_dir} -> preset {preset.name} ({preset.num_layers} layers, hidden {preset.hidden_size}, "
        f"vocab {preset.vocab_size} padded to {rows} for TP={tensor_parallel}), {dtype_name(out_dtype)}")

    final = Path(output).resolve()
    tokenizer_src = Path(tokenizer) if tokenizer else hf_folder.find_hf_tokenizer(hf_dir)
    with world_of_one(), hf_folder.atomic_dir(final, overwrite) as tmp:
        tok_info = {"path": None, "identity": None}
        if tokenizer_src:
            (tmp / "tokenizer").mkdir()
            for f in hf_folder.tokenizer_files_beside(tokenizer_src):
                shutil.copyfile(f, tmp / "tokenizer" / f.name)
            tok_info = {"path": str(final / "tokenizer" / tokenizer_src.name),
                        "identity": hf_folder.sha256(tokenizer_src)}
            log(f"  tokenizer: {tokenizer_src} -> {tok_info['path']}")
        else:
            log("warning: no tokenizer.json/tokenizer.model in the HF folder and no --tokenizer: "
                "the checkpoint records none")

        model = single_stage_model(preset, rows, out_dtype)
        full = hf_to_megatron({k: v.to(out_dtype) for k, v in state.items()}, preset, tensor_parallel)
        load_full_state(model, full)
        del full
        metadata = {
            "model_preset": dataclasses.asdict(preset),
            "tokenizer": tok_info,
            "converted_from": hf_dir,
            "padded_vocab_size": rows,
            "target_layout": {"tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel},
        }
        iter_dir = save_checkpoint(str(tmp), [model], None, None, {"iteration": 0, "consumed_samples": 0},
                                   metadata)
        log(f"  saved dist checkpoint {iter_dir_name(0)} ({sum(p.numel() for p in model.parameters()):,} parameters)")
        result = {"output": str(final), "checkpoint": str(final / "checkpoints" / iter_dir_name(0))}
        if verify:  # reload what is on disk into a fresh model and compare with transformers' model
            fresh = single_stage_model(preset, rows, out_dtype)
            load_model_weights(fresh, iter_dir)
            read_checkpoint_metadata(iter_dir)
            tol = tolerance if tolerance is not None else default_tolerance(out_dtype, source_dtype)
            tok_path = str(tokenizer_src) if tokenizer_src else None
            result["verify"] = dataclasses.asdict(verify_pair(fresh.eval(), hf_dir, preset, tok_path, tol, log))
    log(f"from-hf: wrote {result['checkpoint']} (loads at TP dividing {tensor_parallel}, any PP"
        f"{', verified' if verify else ''}) in {time.time() - start:.1f}s")
    return result


# ---- ICAE export -------------------------------------------------------------------------------------

def icae_export(checkpoint: str, output: str, verify: bool = False, tolerance: float | None = None,
                overwrite: bool = False, with_decoder: bool = True) -> dict:
    """An `icae-train` checkpoint -> OUTPUT/{icae.safetensors, icae_config.json, encoder/, decoder/}: the
    compressor (encoder, memory slots, [AE], projector) for Hugging Face, loaded by
    `ccmega.convert.icae_hf.load_exported`. --verify compares reconstruction losses of both sides."""
    from ccmega.convert.icae_hf import load_exported, save_export
    from ccmega.training.checkpointing import read_checkpoint_metadata
    from ccmega.models.icae_checkpoint import load_icae

    start = time.time()
    meta = read_checkpoint_metadata(checkpoint)
    if "icae" not in meta:
        raise ValueError(f"{meta['path']}/ccmega.json has no 'icae' section: not an `icae-train` checkpoint")
    icae = meta["icae"]
    tokenizer_path = checkpoint_tokenizer(meta, None, False)
    log(f"icae-export: {meta['path']} (k={icae['num_memory_slots']}, decoder {icae['decoder']['checkpoint']})")
    with world_of_one():
        model = load_icae(meta["path"], params_dtype=torch.float32)
        parts = [("encoder", model.encoder)] + ([("decoder", model.decoder)] if with_decoder else [])
        with hf_folder.atomic_dir(output, overwrite) as tmp:
            for role, backbone in parts:
                (tmp / role).mkdir()
                write_hf_model(backbone, ModelPreset(**icae[role]["model_preset"]), tmp / role, tokenizer_path,
                               torch.float32)
            save_export(tmp, model.memory_embeddings, model.ae_embedding, model.projector.weight,
                        model.projector.bias, icae["num_memory_slots"], icae["end_token_id"], "encoder",
                        "decoder" if with_decoder else None)
            result = {"output": str(Path(output).resolve())}
            if verify:
                tol = FP32_TOLERANCE if tolerance is None else tolerance  # 0 is a tolerance (exact match)
                result["max_abs_loss_diff"] = verify_icae(model, load_exported(str(tmp)), tol)
    log(f"icae-export: wrote {result['output']}{' (verified)' if verify else ''} in {time.time() - start:.1f}s")
    return result


def verify_icae(ours, theirs, tolerance: float) -> float:
    """Per-token reconstruction losses of the megatron ICAE and the exported HF ICAE on random contexts."""
    vocab = ours.real_vocab_size
    context = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.eval()(context)[0] - theirs(context)[0]).abs().max().item()
    log(f"  verify: max |Δ per-token loss| = {diff:.2e} (tolerance {tolerance:g})")
    if not diff <= tolerance:
        raise VerificationError(f"exported ICAE disagrees: max |Δ loss| {diff:.3e} > {tolerance:g}")
    return diff


# ---- command line -----------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccmega convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(s):
        s.add_argument("--dtype", default="auto", help="auto (keep the source's), float32, bfloat16, float16")
        s.add_argument("--verify", action="store_true",
                       help="compare logits of both sides; fail beyond --tolerance")
        s.add_argument("--tolerance", type=float, default=None,
                       help=f"max |Δ logits| for --verify (default {FP32_TOLERANCE} when no precision is "
                            f"lost, {LOSSY_TOLERANCE} when --dtype rounds the weights)")
        s.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    s = sub.add_parser("to-hf", help="ccmega checkpoint (any TP/PP) -> Hugging Face Qwen3 folder")
    s.add_argument("checkpoint", help="run dir, its checkpoints/ dir (uses `latest`), or an iter_NNNNNNN dir")
    s.add_argument("output", help="Hugging Face folder to write")
    s.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size (default 5GB)")
    s.add_argument("--tokenizer", help="tokenizer file to ship instead of the one ccmega.json records")
    s.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    common(s)

    s = sub.add_parser("from-hf", help="Hugging Face Qwen3 folder -> ccmega checkpoint")
    s.add_argument("hf_dir", help="folder with config.json and safetensors weights")
    s.add_argument("output", help="run dir to create: OUTPUT/checkpoints/iter_0000000 + latest")
    s.add_argument("--tensor-parallel", type=int, default=1,
                   help="pad the vocabulary for this TP (the checkpoint loads at any TP dividing it)")
    s.add_argument("--pipeline-parallel", type=int, default=1, help="checked for divisibility only")
    s.add_argument("--name", help="preset name recorded in ccmega.json (default: the folder's name)")
    s.add_argument("--tokenizer", help="tokenizer file to record (default: the HF folder's tokenizer.json)")
    common(s)

    s = sub.add_parser("icae-export", help="ICAE checkpoint -> compressor for Hugging Face (safetensors + loader)")
    s.add_argument("checkpoint", help="`ccmega icae-train` run dir, checkpoints/ dir or iter dir")
    s.add_argument("output", help="folder to write: icae.safetensors, icae_config.json, encoder/, decoder/")
    s.add_argument("--no-decoder", action="store_true", help="leave the frozen decoder out (export it yourself)")
    s.add_argument("--verify", action="store_true", help="compare reconstruction losses of both sides")
    s.add_argument("--tolerance", type=float, default=None, help=f"for --verify (default {FP32_TOLERANCE})")
    s.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "icae-export":
            icae_export(args.checkpoint, args.output, args.verify, args.tolerance, args.overwrite, not args.no_decoder)
        elif args.command == "to-hf":
            to_hf(args.checkpoint, args.output, args.dtype, args.max_shard_size, args.tokenizer, args.no_tokenizer,
                  args.verify, args.tolerance, args.overwrite)
        else:
            from_hf(args.hf_dir, args.output, args.tensor_parallel, args.pipeline_parallel, args.dtype, args.name,
                    args.tokenizer, args.verify, args.tolerance, args.overwrite)
    except VerificationError as e:
        log(f"convert {args.command}: FAILED verification: {e}")
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as e:
        log(f"convert {args.command}: error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
