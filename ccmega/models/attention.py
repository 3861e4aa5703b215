"""Core attention through `torch.nn.functional.scaled_dot_product_attention` for the local layer spec.

megatron's local `DotProductAttention` materialises the [b, heads, s, s] score matrix; SDPA uses the
flash/memory-efficient kernels torch has for the device, and handles GQA without repeating K/V.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPAttention(DotProductAttention):
    """Drop-in for DotProductAttention (same constructor, same [s, b, heads, d] in, [s, b, h] out).

    `attention_mask` follows megatron's convention: True marks a position that must NOT be attended.
    Without a mask the attention is causal, aligned to the end when queries are fewer than keys
    (incremental decoding with a KV cache).
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None, "not supported by SDPAttention"
        sq, b, heads, _ = query.shape
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [b, heads, s, d]
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask
        elif sq == sk:
            causal = True
        else:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        p = self.attention_dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * out.shape[-1])
