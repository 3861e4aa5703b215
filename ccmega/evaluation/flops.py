r"""Analytic forward FLOPs of ICAE compression + reconstruction, and of the uncompressed baseline (Figs. 5, 6).

One multiply-add counts 2 FLOPs. Counted: every weight matmul (Q, K, V, O projections, the SwiGLU
gate/up/down), the attention score (QK^T) and value (AV) matmuls, the LM head, and the projector.
Not counted (O(h) per token, under 1% at these sizes): RMSNorms, QK-norm, RoPE, softmax, SiLU, residual
adds, embedding lookups. Attention is counted exactly for causal masking: a query at position i (1-based,
counting cached positions) attends to i keys. A KV cache therefore makes generation cost the same as one
causal forward over the whole sequence, without recomputation.

For a preset with hidden size h, FFN size f, N layers, n_q query heads, n_kv key/value heads, head
dim d and vocabulary V:

    per-token dense matmuls   W = 2 h d (2 n_q + 2 n_kv) + 6 h f      (Q,O: h*n_q*d each; K,V: h*n_kv*d each; gate/up/down: h*f each)
    per (query, key) pair     A = 4 n_q d                            (QK^T and AV, per layer)
    causal forward, T tokens  F(T) = N [ T W + A T (T + 1) / 2 ]
    LM head per logit row     H = 2 h V

ICAE with context L, k memory slots, G generated tokens (encoder E, decoder D):

    encoder      F_E(L + k)                                  no LM head: only the memory hidden states are used
    projector    2 k h_E h_D                                 (bias adds not counted)
    decoder      prefill over [m_1..m_k, AE]:  N_D [(k+1) W_D + A_D (k+1)(k+2)/2] + H_D
                 then G-1 cached steps, step j attending to k+1+j keys:
                             N_D [(G-1) W_D + A_D sum_{j=1}^{G-1} (k+1+j)] + (G-1) H_D
                 together  = F_D(k + G) + G H_D
    total        F_E(L + k) + 2 k h_E h_D + F_D(k + G) + G H_D

No-compression baseline (the decoder reads the L context tokens itself, then generates G tokens):

    prefill L tokens + G-1 cached steps = F_D(L + G - 1) + G H_D

Each generated token needs one LM-head row: the first comes from the last prefill position, and the
G-th token is never fed back. G defaults to L (a perfect reconstruction).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ccmega.presets import ModelPreset, model_preset


def _preset(model: ModelPreset | str) -> ModelPreset:
    return model_preset(model) if isinstance(model, str) else model


def dense_flops_per_token(model: ModelPreset | str) -> int:
    """W: weight-matmul FLOPs of one token through one layer."""
    p = _preset(model)
    h, d = p.hidden_size, p.head_dim
    return 2 * h * d * (2 * p.num_attention_heads + 2 * p.num_query_groups) + 6 * h * p.ffn_hidden_size


def attention_flops_per_pair(model: ModelPreset | str) -> int:
    """A: QK^T + AV FLOPs of one (query, key) pair in one layer."""
    p = _preset(model)
    return 4 * p.num_attention_heads * p.head_dim


def lm_head_flops_per_token(model: ModelPreset | str) -> int:
    p = _preset(model)
    return 2 * p.hidden_size * p.vocab_size


def causal_forward_flops(model: ModelPreset | str, tokens: float, cached: float = 0) -> float:
    """Transformer-stack FLOPs (no LM head) of `tokens` new tokens after `cached` positions already in
    the KV cache: N [T W + A (T C + T (T + 1) / 2)]. Token counts may be fractional (dataset means)."""
    p = _preset(model)
    t, c = tokens, cached
    return p.num_layers * (t * dense_flops_per_token(p) + attention_flops_per_pair(p) * (t * c + t * (t + 1) / 2))


@dataclass(frozen=True)
class IcaeFlops:
    encoder: float
    projector: float
    decoder_prefill: float
    decoder_generation: float

    @property
    def compression(self) -> float:
        """Everything before the decoder starts: encoder + projector."""
        return self.encoder + self.projector

    @property
    def total(self) -> float:
        return self.encoder + self.projector + self.decoder_prefill + self.decoder_generation

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "compression": self.compression, "total": self.total}


@dataclass(frozen=True)
class BaselineFlops:
    prefill: float
    generation: float

    @property
    def total(self) -> float:
        return self.prefill + self.generation

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def icae_flops(encoder: ModelPreset | str, decoder: ModelPreset | str, context_tokens: float,
               memory_tokens: int = 128, generated_tokens: float | None = None) -> IcaeFlops:
    """FLOPs of compressing `context_tokens` into `memory_tokens` slots and generating `generated_tokens`."""
    enc, dec = _preset(encoder), _preset(decoder)
    k = memory_tokens
    g = context_tokens if generated_tokens is None else generated_tokens
    if g < 1:
        raise ValueError(f"generated_tokens must be >= 1, got {g}")
    head = lm_head_flops_per_token(dec)
    return IcaeFlops(
        encoder=causal_forward_flops(enc, context_tokens + k),
        projector=2 * k * enc.hidden_size * dec.hidden_size,
        decoder_prefill=causal_forward_flops(dec, k + 1) + head,
        decoder_generation=causal_forward_flops(dec, g - 1, cached=k + 1) + (g - 1) * head,
    )


def baseline_flops(decoder: ModelPreset | str, context_tokens: float,
                   generated_tokens: float | None = None) -> BaselineFlops:
    """FLOPs of the decoder reading the full context (no compression), then generating."""
    dec = _preset(decoder)
    g = context_tokens if generated_tokens is None else generated_tokens
    if g < 1:
        raise ValueError(f"generated_tokens must be >= 1, got {g}")
    head = lm_head_flops_per_token(dec)
    return BaselineFlops(
        prefill=causal_forward_flops(dec, context_tokens) + head,
        generation=causal_forward_flops(dec, g - 1, cached=context_tokens) + (g - 1) * head,
    )
