"""Qwen3 preset + parallel layout -> megatron-core GPTModel.

Transformer Engine layer spec (bf16, FP8-ready) where CUDA and TE are present; otherwise megatron's
local spec with core attention swapped for SDPA. That choice is the only platform branch here.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ccmega.presets import ModelPreset, padded_vocab_size
from ccmega.runtime.placement import device


def transformer_engine_available() -> bool:
    """CUDA and a Transformer Engine that imports (a broken one is warned about once and not used)."""
    from ccmega.runtime import transformer_engine

    return transformer_engine.available()


def transformer_config(
    preset: ModelPreset,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
):
    """The megatron TransformerConfig of a Qwen3 preset. `overrides` set any other config field
    (fp8 recipe, recompute, sequence_parallel, ...)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = not torch.cuda.is_available()
    fields = dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        kv_channels=preset.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_epsilon,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        # Fusions need CUDA kernels (apex/TE); harmless to leave on with TE.
        bias_activation_fusion=not on_cpu,
        masked_softmax_fusion=False,
        # apex-only: the local spec's torch RMSNorm refuses it (also on a GPU without TE); TE ignores it
        persist_layer_norm=False,
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # weights are created where they will live: on the rank's GPU (or the fake device's stand-in)
        use_cpu_initialization=device().type == "cpu",
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def layer_spec(use_transformer_engine: bool | None = None):
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    from ccmega.models.attention import SDPAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    attention = spec.submodules.self_attention
    attention.submodules = dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    return spec


def build_model(preset: ModelPreset, config, pre_process: bool | None = None,
                post_process: bool | None = None, use_transformer_engine: bool | None = None):
    """One pipeline stage of the GPTModel for this rank (stage chosen by parallel_state), on `device()`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(use_transformer_engine),
        vocab_size=padded_vocab_size(preset.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=preset.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=preset.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(preset.rope_theta),
        rotary_percent=1.0,
    )
    if any(p.is_meta for p in model.parameters()) and device().type != "meta":
        return model  # built under a meta device context (parameter counting): there is nothing to move
    # As Megatron-LM's get_model (whose Float16Module casts the whole model): the local spec's torch RMSNorms
    # are built in fp32 whatever params_dtype says, and a bf16 model with fp32 norms splits megatron's
    # optimizer into float16 and fp32 groups whose checkpoint mapping drops the fp32 ones.
    return model.to(device=device(), dtype=config.params_dtype)
