"""Greedy reconstruction from ICAE memory slots: `memory -> [m_1..m_k, e([AE])] -> c_1, c_2, ... <end>`.

Two implementations of the same decoding, which must agree token for token:

* `generate(..., use_cache=True)` runs megatron-core's own static-batching KV cache: the frozen decoder
  (a `GPTModel`) is called with a `StaticInferenceContext`. The first call (prefill) feeds the k + 1
  prefix embeddings; every later call feeds one token embedding per sample, and each attention layer
  appends its keys/values to the context's preallocated buffers and attends over them
  (`Attention._adjust_key_value_for_inference`; run and tested on megatron-core 0.16.1, and the
  `StaticInferenceContext` constructor is unchanged on megatron-core main). Why megatron's cache and
  not our own: it is the code path megatron's own inference engines use with the Transformer Engine
  spec on GPU (not run here: no GPU in this session), and it works -- checked on 0.16.1 -- with the
  local spec + `SDPAttention` on CPU under `cpu_compat` (SDPAttention's end-aligned causal mask is exactly what a query block after cached keys
  needs), so no ccmega attention code is involved. In inference mode megatron gathers the TP logits
  (`runtime_gather_output=True` is required), so every TP rank takes the same argmax over the real
  vocabulary. Samples that have emitted the end token are dropped from the batch and from the cache
  rows, so a finished sample costs nothing more.
* `generate(..., use_cache=False)` is the reference: it recomputes the whole prefix every step through
  `ICAEModel.decoder_logits` (no inference context) and takes the TP-aware
  `vocab_parallel_argmax`. O(L^2) decoder tokens instead of O(L); use it only to check the cache.

Decoding stops per sample at the end token (not included in the output) or after `max_new_tokens`
(default: the context length L). The decoder must not use sequence parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ccmega.models.icae import vocab_parallel_argmax


@dataclass
class Reconstruction:
    tokens: torch.Tensor  # [b, n] greedy tokens; positions at/after a sample's end token hold end_token_id
    lengths: torch.Tensor  # [b] tokens before the end token (n when it never came)
    ended: torch.Tensor  # [b] bool: the sample emitted the end token

    def token_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.lengths.tolist())]


@torch.no_grad()
def reconstruct(icae, context: torch.Tensor, max_new_tokens: int | None = None, use_cache: bool = True,
                stop_at_end: bool = True) -> Reconstruction:
    """context [b, L] token ids -> greedy reconstruction from the compressed memory alone."""
    prefix = icae.decoder_prefix(icae.compress(context))
    return generate(icae, prefix, max_new_tokens or context.shape[1], use_cache=use_cache, stop_at_end=stop_at_end)


@torch.no_grad()
def generate(icae, prefix: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
             stop_at_end: bool = True) -> Reconstruction:
    """Greedy decoding after the decoder input prefix [k + 1, b, h] (`ICAEModel.decoder_prefix`).
    With stop_at_end=False every sample runs for exactly max_new_tokens (latency measurements)."""
    if icae.decoder.training:
        raise RuntimeError("the ICAE decoder is in training mode: megatron ignores the KV cache then")
    step = _cached_steps if use_cache else _uncached_steps
    batch = prefix.shape[1]
    end = icae.end_token_id
    tokens = torch.full((batch, max_new_tokens), end, dtype=torch.long, device=prefix.device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=prefix.device)
    ended = torch.zeros(batch, dtype=torch.bool, device=prefix.device)
    for i, rows, next_tokens in step(icae, prefix, max_new_tokens, stop_at_end):
        tokens[rows, i] = next_tokens
        if stop_at_end:
            hit = next_tokens == end
            lengths[rows[hit]] = i
            ended[rows[hit]] = True
    return Reconstruction(tokens=tokens, lengths=lengths, ended=ended)


def _embed(decoder, next_tokens: torch.Tensor, position: int) -> torch.Tensor:
    """Token ids [b] -> decoder input embeddings [1, b, h]."""
    ids = next_tokens[:, None]
    return decoder.embedding(input_ids=ids, position_ids=torch.full_like(ids, position))


def _cached_steps(icae, prefix, max_new_tokens, stop_at_end):
    """Yields (step, original row indices, next token per row) with megatron's static KV cache."""
    from megatron.core.inference.contexts import StaticInferenceContext

    decoder, end, vocab = icae.decoder, icae.end_token_id, icae.real_vocab_size
    rows = torch.arange(prefix.shape[1], device=prefix.device)
    # The last generated token is never fed back: k + 1 + max_new_tokens - 1 cached positions at most.
    context = StaticInferenceContext(max_batch_size=prefix.shape[1],
                                     max_sequence_length=prefix.shape[0] + max_new_tokens - 1)
    decoder_input = prefix
    for i in range(max_new_tokens):
        logits = decoder(input_ids=None, position_ids=None, attention_mask=None, decoder_input=decoder_input,
                         inference_context=context, runtime_gather_output=True)  # [b, 1, V] (last position)
        next_tokens = logits[:, -1, :vocab].float().argmax(dim=-1)
        yield i, rows, next_tokens
        if i + 1 == max_new_tokens:
            return
        if i == 0:
            context.enable_decode_mode()
        context.increment_sequence_len_offset(decoder_input.shape[0])
        if stop_at_end:
            keep = next_tokens != end
            if not keep.all():
                if not keep.any():
                    return
                rows, next_tokens = rows[keep], next_tokens[keep]
                context.key_value_memory_dict = {layer: (k[:, keep], v[:, keep])
                                                 for layer, (k, v) in context.key_value_memory_dict.items()}
        decoder_input = _embed(decoder, next_tokens, context.sequence_len_offset)


def _uncached_steps(icae, prefix, max_new_tokens, stop_at_end):
    """The reference: the whole sequence through the decoder at every step (all rows until all ended)."""
    decoder, end, vocab = icae.decoder, icae.end_token_id, icae.real_vocab_size
    rows = torch.arange(prefix.shape[1], device=prefix.device)
    running = torch.ones_like(rows, dtype=torch.bool)
    decoder_input = prefix
    for i in range(max_new_tokens):
        next_tokens = vocab_parallel_argmax(icae.decoder_logits(decoder_input)[:, -1], vocab)
        yield i, rows[running], next_tokens[running]
        if i + 1 == max_new_tokens:
            return
        if stop_at_end:
            running &= next_tokens != end
            if not running.any():
                return
        decoder_input = torch.cat([decoder_input, _embed(decoder, next_tokens, decoder_input.shape[0])], dim=0)
