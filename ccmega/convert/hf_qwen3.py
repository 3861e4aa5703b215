"""Hugging Face `Qwen3ForCausalLM` <-> megatron-core GPTModel weights.

Three layers of mapping, each a pure function on tensors:
- names and packing: HF q/k/v projections <-> megatron `linear_qkv`, which packs per query group
  [q heads of the group, k, v]; HF gate/up <-> `linear_fc1` = [gate; up]; vocabulary padding rows.
- tensor-parallel slicing: how one TP rank's shard is cut from a full tensor (and glued back).
- pipeline stages: local layer numbers on a stage <-> global layer numbers.
"Full" megatron state dicts use local-spec names, global layer numbers and padded vocabularies.
"""
from __future__ import annotations

import re

import torch

from ccmega.presets import ModelPreset, padded_vocab_size

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron suffix within a layer -> HF suffix within `model.layers.N.`
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# Transformer Engine's spec fuses the pre-attention / pre-MLP norms into the following linear.
TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: ModelPreset) -> torch.Tensor:
    g, d, h = p.num_query_groups, p.head_dim, p.hidden_size
    per_group = p.num_attention_heads // g
    return torch.cat([q.reshape(g, per_group * d, h), k.reshape(g, d, h), v.reshape(g, d, h)], 1).reshape(-1, h)


def unpack_qkv(qkv: torch.Tensor, p: ModelPreset):
    g, d, h = p.num_query_groups, p.head_dim, p.hidden_size
    per_group = p.num_attention_heads // g
    q, k, v = qkv.reshape(g, (per_group + 2) * d, h).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])]) if rows > w.shape[0] else w


def hf_to_megatron(hf: dict[str, torch.Tensor], p: ModelPreset, tensor_parallel: int = 1) -> dict[str, torch.Tensor]:
    """Full megatron state dict (vocabulary padded for `tensor_parallel`) from a HF Qwen3 state dict."""
    vocab = padded_vocab_size(p.vocab_size, tensor_parallel)
    out = {"embedding.word_embeddings.weight": _pad_rows(hf["model.embed_tokens.weight"], vocab),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not p.tie_word_embeddings:
        out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], vocab)
    for i in range(p.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for mg, name in _LAYER_NAMES.items():
            out[dst + mg] = hf[src + name]
        out[dst + "self_attention.linear_qkv.weight"] = pack_qkv(
            *(hf[src + f"self_attn.{x}_proj.weight"] for x in "qkv"), p)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
    return out


def megatron_to_hf(mg: dict[str, torch.Tensor], p: ModelPreset) -> dict[str, torch.Tensor]:
    """HF Qwen3 state dict from a full megatron state dict; padding rows stripped, lm_head tied."""
    mg = {canonical_name(k): v for k, v in mg.items()}
    hf = {"model.embed_tokens.weight": mg["embedding.word_embeddings.weight"][: p.vocab_size],
          "model.norm.weight": mg["decoder.final_layernorm.weight"]}
    hf["lm_head.weight"] = (hf["model.embed_tokens.weight"] if p.tie_word_embeddings
                            else mg["output_layer.weight"][: p.vocab_size])
    for i in range(p.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for mg_name, name in _LAYER_NAMES.items():
            hf[dst + name] = mg[src + mg_name]
        q, k, v = unpack_qkv(mg[src + "self_attention.linear_qkv.weight"], p)
        hf[dst + "self_attn.q_proj.weight"], hf[dst + "self_attn.k_proj.weight"], hf[dst + "self_attn.v_proj.weight"] = q, k, v
        gate, up = mg[src + "mlp.linear_fc1.weight"].chunk(2)
        hf[dst + "mlp.gate_proj.weight"], hf[dst + "mlp.up_proj.weight"] = gate, up
    return hf


def canonical_name(name: str) -> str:
    """Local-spec name of a parameter (TE's fused norm weights renamed)."""
    m = _LAYER.match(name)
    if m and m.group(2) in TE_NORM_NAMES:
        return f"decoder.layers.{m.group(1)}.{TE_NORM_NAMES[m.group(2)]}"
    return name


# ---- tensor-parallel slicing -------------------------------------------------------------------

def tp_split_dim(name: str) -> int | None:
    """The dimension megatron shards a parameter on over TP ranks; None for replicated ones."""
    if name.endswith(("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")):
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def tp_shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    dim = tp_split_dim(name)
    if dim is None or size == 1:
        return full
    if name.endswith("linear_fc1.weight"):  # each rank holds [gate shard; up shard]
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return full.chunk(size, dim)[rank]  # qkv is laid out by query group, so groups split evenly


def tp_unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    dim = tp_split_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(s.chunk(2) for s in shards))
        return torch.cat([*gates, *ups])
    return torch.cat(shards, dim)


# ---- pipeline stages -----------------------------------------------------------------------------

def global_name(local: str, layer_offset: int) -> str:
    m = _LAYER.match(local)
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}" if m else local


def load_full_state(model: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int = 0,
                    tp_size: int = 1, layer_offset: int = 0) -> None:
    """Copy this rank's shard of a full megatron state dict into one pipeline stage of a GPTModel.
    The tied output layer of a last stage (PP > 1) takes the embedding's rows."""
    with torch.no_grad():
        for local, param in model.named_parameters():
            name = canonical_name(global_name(local, layer_offset))
            if name == "output_layer.weight" and name not in full:
                name = "embedding.word_embeddings.weight"
            if name not in full:
                raise KeyError(f"no weights for parameter {local!r} (looked for {name!r})")
            shard = tp_shard(name, full[name], tp_rank, tp_size)
            if shard.shape != param.shape:
                raise ValueError(f"{local}: checkpoint shard {tuple(shard.shape)} != parameter {tuple(param.shape)}")
            param.copy_(shard)


# ---- configs ---------------------------------------------------------------------------------------

def hf_config_dict(p: ModelPreset) -> dict:
    """A `config.json` for transformers' Qwen3ForCausalLM (both the 4.x and 5.x RoPE fields)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.ffn_hidden_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_query_groups,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": p.norm_epsilon,
        "rope_theta": p.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": p.rope_theta},
        "tie_word_embeddings": p.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "torch_dtype": "float32",
    }


def preset_from_hf_config(cfg: dict, name: str = "hf") -> ModelPreset:
    """A ModelPreset from a Qwen3 `config.json`; refuses what the megatron model cannot express."""
    problems = []
    if cfg.get("model_type") != "qwen3":
        problems.append(f"model_type={cfg.get('model_type')!r} (only 'qwen3' is supported)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only 'silu')")
    if cfg.get("attention_bias"):
        problems.append("attention_bias=true (Qwen3 has no QKV bias)")
    if cfg.get("use_sliding_window"):
        problems.append("use_sliding_window=true")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {rope!r} (only default RoPE)")
    if problems:
        raise ValueError("cannot map this Hugging Face config: " + "; ".join(problems))
    return ModelPreset(
        name=name,
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1e6))),
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
    )
