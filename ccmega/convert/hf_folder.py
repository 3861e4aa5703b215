"""Hugging Face model folders on disk: safetensors weights (single file or sharded with an index),
config.json, generation_config.json and tokenizer files. No torch.distributed, no megatron.

Writers build the whole folder in a temporary sibling directory and rename it into place at the
end, so a crash never leaves a half-written folder under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ccmega.presets import ModelPreset

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files of a Hugging Face tokenizer that travel with it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_HF_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers some old exports carry


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r} (use e.g. 5GB, 500MB, 2GiB or a byte count)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * base ** power)


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory beside `final`; rename it to `final` when the block succeeds."""
    final = Path(final).resolve()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# ---- weights -------------------------------------------------------------------------------------

def without_tied_head(state: dict[str, torch.Tensor], preset: ModelPreset) -> dict[str, torch.Tensor]:
    """What a tied model stores: transformers (4.x and 5.x) re-ties lm_head to embed_tokens on load
    and itself saves tied models without `lm_head.weight`."""
    if preset.tie_word_embeddings:
        return {k: v for k, v in state.items() if k != "lm_head.weight"}
    return state


def write_safetensors(state: dict[str, torch.Tensor], folder: str | os.PathLike, max_shard_bytes: int,
                      log=print) -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index when above `max_shard_bytes`.
    Tensors are packed in order; a tensor larger than the limit gets a shard of its own."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, keys in zip(names, shards):
        # clone: safetensors refuses views that share storage (q/k/v are views of one packed tensor)
        save_file({k: state[k].detach().contiguous().clone() for k in keys}, os.path.join(folder, file),
                  metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
        log(f"  wrote {file} ({len(keys)} tensors)")
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json(os.path.join(folder, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder: sharded or single safetensors, else pytorch_model.bin."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        index = json.loads((folder / INDEX_NAME).read_text())
        state = {}
        for file in sorted(set(index["weight_map"].values())):
            state.update(load_file(folder / file))
    elif (folder / WEIGHTS_NAME).is_file():
        state = load_file(folder / WEIGHTS_NAME)
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME}, {INDEX_NAME} or pytorch_model.bin")
    return {k: v for k, v in state.items() if not _IGNORED_HF_KEYS.search(k)}


def expected_hf_names(preset: ModelPreset) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                 "self_attn.k_norm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight"]
    names.update(f"model.layers.{i}.{n}" for i in range(preset.num_layers) for n in per_layer)
    return names


def check_hf_weights(state: dict[str, torch.Tensor], preset: ModelPreset, folder) -> None:
    """Refuse weights the megatron model has no place for (biases, extra layers, ...) or lacks."""
    expected = expected_hf_names(preset)
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if preset.tie_word_embeddings else set()))
    problems = []
    if unexpected:
        problems.append(f"unmappable weights {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if missing:
        problems.append(f"missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if (preset.tie_word_embeddings and "lm_head.weight" in state
            and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])):
        problems.append("config.json says tie_word_embeddings=true but lm_head.weight differs from "
                        "model.embed_tokens.weight")
    if problems:
        raise ValueError(f"{folder}: cannot convert: " + "; ".join(problems))


def read_hf_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {folder} a Hugging Face model folder?")
    cfg = json.loads(path.read_text())
    archs = cfg.get("architectures") or ["Qwen3ForCausalLM"]
    if archs != ["Qwen3ForCausalLM"]:
        raise ValueError(f"{path}: cannot convert architectures={archs} (only Qwen3ForCausalLM)")
    return cfg


# ---- tokenizer -----------------------------------------------------------------------------------

def tokenizer_files_beside(path: Path) -> list[Path]:
    """The tokenizer file itself plus the Hugging Face tokenizer files in its folder."""
    files = [path]
    if path.name == "tokenizer.json":
        files += [path.parent / n for n in TOKENIZER_FILES if n != path.name and (path.parent / n).is_file()]
    return files


def write_tokenizer(tokenizer_path: str, folder: str | os.PathLike, model_max_length: int) -> dict:
    """Copy the pretraining tokenizer into an HF folder so that `AutoTokenizer.from_pretrained` loads it.
    Returns {"eos_token_id": ..., "eos_token": ...} for the model configs."""
    from ccmega.data.tokenizers import load_tokenizer

    path = Path(tokenizer_path)
    tok = load_tokenizer(path)
    folder = Path(folder)
    if path.suffix == ".model":  # SentencePiece: transformers' LlamaTokenizer reads it (no BOS/EOS added)
        shutil.copyfile(path, folder / "tokenizer.model")
        eos = tok._sp.id_to_piece(tok.eod_id)
        unk = tok._sp.id_to_piece(tok._sp.unk_id()) if tok._sp.unk_id() >= 0 else None
        bos = tok._sp.id_to_piece(tok._sp.bos_id()) if tok._sp.bos_id() >= 0 else None
        dummy_prefix = tok._sp.encode("a", out_type=str)[0].startswith("\u2581")  # the model's add_dummy_prefix
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
            "legacy": False, "add_prefix_space": dummy_prefix, "eos_token": eos, "unk_token": unk, "bos_token": bos,
            "pad_token": eos, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False})
        return {"eos_token_id": tok.eod_id, "eos_token": eos}
    for f in tokenizer_files_beside(path):
        shutil.copyfile(f, folder / f.name)
    eos = json.loads(path.read_text())
    eos = next(t["content"] for t in eos.get("added_tokens", []) if t["id"] == tok.eod_id)
    if not (folder / "tokenizer_config.json").is_file():
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
            "model_max_length": model_max_length, "clean_up_tokenization_spaces": False})
    return {"eos_token_id": tok.eod_id, "eos_token": eos}


def find_hf_tokenizer(folder: str | os.PathLike) -> Path | None:
    """The tokenizer file ccmega's data pipeline reads from an HF folder (tokenizer.json or .model)."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None
