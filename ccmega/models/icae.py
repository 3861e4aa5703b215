"""ICAE context compressor over two megatron-core GPTModels (Ge et al. 2024; the paper's Fig. 2).

    encoder input   [e(c_1) .. e(c_L), m_1 .. m_k]          (k learnable memory embeddings appended)
    memory vectors  encoder final-norm hidden states at the k memory positions
    decoder input   [W m'_1 + b .. W m'_k + b, e([AE]), e(c_1) .. e(c_L)]
    targets         c_1 .. c_L, <end>  predicted from [AE], c_1 .. c_L  (teacher forcing)

Trainable: the encoder, the memory and [AE] embeddings, the linear projector W, b. The decoder is
frozen: no gradients, outside DDP buckets and the optimizer, always in eval mode, and left out of
the ICAE checkpoint (which records the decoder checkpoint it was trained against instead).
Both backbones are sharded over the same tensor-parallel group; the small ICAE parameters are
replicated across it. Pipeline parallelism is not supported.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule


def _replicated_init(shape, std: float, seed: int, like: torch.Tensor) -> torch.Tensor:
    # The same values on every rank whatever the layout: a private CPU generator, not the global one;
    # then onto the backbones' device and dtype (the rank's GPU; bf16 backbones get bf16, as megatron's own).
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std
    return values.to(device=like.device, dtype=like.dtype)


class ICAEModel(MegatronModule):
    def __init__(self, encoder, decoder, num_memory_slots: int, end_token_id: int, real_vocab_size: int,
                 init_std: float = 0.02, seed: int = 1234):
        super().__init__(config=encoder.config)
        self.model_type = encoder.model_type  # read by megatron's schedules
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("ICAE does not support pipeline parallelism (PP > 1); use TP and DP")
        self.encoder, self.decoder = encoder, decoder
        self.num_memory_slots, self.end_token_id, self.real_vocab_size = num_memory_slots, end_token_id, real_vocab_size
        enc_h, dec_h = encoder.config.hidden_size, decoder.config.hidden_size
        like = encoder.embedding.word_embeddings.weight
        self.memory_embeddings = torch.nn.Parameter(_replicated_init((num_memory_slots, enc_h), init_std, seed, like))
        self.ae_embedding = torch.nn.Parameter(_replicated_init((dec_h,), init_std, seed + 1, like))
        self.projector = torch.nn.Linear(enc_h, dec_h, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            self.projector.weight.copy_(_replicated_init((dec_h, enc_h), enc_h ** -0.5, seed + 2, like))
            self.projector.bias.zero_()
        decoder.requires_grad_(False)
        decoder.eval()
        # megatron's schedules tag `model.decoder.layers` with the micro-batch number (set_current_microbatch);
        # here `decoder` is a GPTModel: expose its layers there, unregistered (no duplicate state-dict keys).
        object.__setattr__(decoder, "layers", decoder.decoder.layers)

    @torch.no_grad()
    def match_decoder_scale(self) -> dict:
        """Once both backbones hold their pretrained weights: rescale the projector and [AE] so that they
        start at the RMS of the decoder's token embeddings. The encoder's final-norm states are far larger
        (RMS about its final norm's gain, ~1, against ~0.1 for a trained embedding table), and memory that
        much louder than any token swamps a pre-norm decoder's residual stream at the memory positions.
        Returns the RMS values used."""
        table = self.decoder.embedding.word_embeddings.weight  # [V / TP, h]: vocab-parallel
        sums = torch.tensor([table.float().pow(2).sum(), table.shape[0]], dtype=torch.float64, device=table.device)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(sums, group=parallel_state.get_tensor_model_parallel_group())
        token_rms = float((sums[0] / (sums[1] * table.shape[1])).sqrt())
        gain = self.encoder.decoder.final_layernorm.weight.float()
        memory_rms = float(gain.pow(2).mean().sqrt())  # final-norm output: unit RMS times the gain
        w = self.projector.weight
        projected_rms = float(w.float().pow(2).mean().sqrt()) * w.shape[1] ** 0.5 * memory_rms
        w.mul_(token_rms / projected_rms)
        ae = self.ae_embedding
        ae.mul_(token_rms / float(ae.float().pow(2).mean().sqrt()))
        return {"token_embedding_rms": token_rms, "encoder_output_rms": memory_rms, "projected_rms_before": projected_rms}

    def train(self, mode: bool = True):
        super().train(mode)
        self.decoder.eval()  # frozen: dropout stays off
        return self

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline hook megatron's schedules call; without PP there is no input tensor to take."""
        assert input_tensor is None or input_tensor == [None], "ICAE has no pipeline stages"

    # ---- the two halves ------------------------------------------------------------------------------
    def compress(self, context: torch.Tensor) -> torch.Tensor:
        """context [b, L] token ids -> memory vectors [k, b, encoder hidden] (final-norm states)."""
        enc = self.encoder
        positions = torch.arange(context.shape[1], device=context.device).expand_as(context)
        hidden = enc.embedding(input_ids=context, position_ids=positions)  # [L, b, h]
        memory = self.memory_embeddings[:, None, :].expand(-1, context.shape[0], -1).to(hidden.dtype)
        return final_hidden(enc, torch.cat([hidden, memory], dim=0))[-self.num_memory_slots:]

    def decoder_prefix(self, memory: torch.Tensor) -> torch.Tensor:
        """[projected memory, e([AE])]: [k + 1, b, decoder hidden], what generation starts from."""
        projected = self.projector(memory)
        ae = self.ae_embedding[None, None, :].expand(1, memory.shape[1], -1).to(projected.dtype)
        return torch.cat([projected, ae], dim=0)

    def decoder_logits(self, decoder_input: torch.Tensor) -> torch.Tensor:
        """Decoder input embeddings [s, b, h] -> vocab-parallel logits [b, s, V / TP]."""
        return self.decoder(input_ids=None, position_ids=None, attention_mask=None, decoder_input=decoder_input)

    def forward(self, context: torch.Tensor):
        """Teacher-forced reconstruction. Returns (per-token loss [b, L + 1], correct [b, L + 1])."""
        return self.reconstruction_loss(self.decoder_prefix(self.compress(context)), context)

    def reconstruction_loss(self, prefix: torch.Tensor, context: torch.Tensor):
        """`forward` after any decoder prefix [P, b, h] ending in the [AE] position (the memory controls feed
        other prefixes than the memory)."""
        return teacher_forced_loss(self.decoder, prefix, context, self.end_token_id, self.real_vocab_size)

    # ---- checkpointing: the trainable parts only ----------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        full = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return {key: value for key, value in full.items() if not key.startswith(f"{prefix}decoder.")}

    def load_state_dict(self, state_dict, strict: bool = True):
        """Load the trainable parts (what an ICAE checkpoint holds); the decoder stays as it is (it comes
        from its own pretraining checkpoint). `strict` applies to everything but the decoder."""
        result = super().load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("decoder.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"ICAE state dict: missing {missing}, unexpected {result.unexpected_keys}")
        return result


def final_hidden(gpt, embeddings: torch.Tensor) -> torch.Tensor:
    """A GPTModel's transformer over input embeddings [s, b, h] -> its final-norm hidden states [s, b, h]."""
    return gpt.decoder(hidden_states=embeddings, attention_mask=None,
                       rotary_pos_emb=gpt.rotary_pos_emb(embeddings.shape[0]))


def teacher_forced_loss(decoder, prefix: torch.Tensor, context: torch.Tensor, end_token_id: int,
                        real_vocab_size: int):
    """Decoder input [prefix, e(c_1..c_L)] -> (per-token loss [b, L + 1], correct [b, L + 1]) on the targets
    c_1..c_L, <end>, predicted from the prefix's last position ([AE]) onwards. `decoder` is a GPTModel.

    The vocabulary projection runs only at the L + 1 positions the loss reads, in [s, b, V / TP] order (no
    transposed copy): at the paper's size these logits are the largest tensors of the step."""
    positions = torch.arange(context.shape[1], device=context.device).expand_as(context)
    tokens = decoder.embedding(input_ids=context, position_ids=positions)
    hidden = final_hidden(decoder, torch.cat([prefix, tokens], dim=0))[prefix.shape[0] - 1:]
    logits, _ = decoder.output_layer(hidden, weight=decoder.shared_embedding_or_output_weight()
                                     if decoder.share_embeddings_and_output_weights else None)
    targets = torch.cat([context, torch.full_like(context[:, :1], end_token_id)], dim=1)  # [b, L + 1]
    with torch.no_grad():
        correct = vocab_parallel_argmax(logits, real_vocab_size) == targets.t()
    # the decoder's own loss: megatron's cross entropy (fused where speed.cross_entropy_fusion says), which takes
    # its fp32 copy of the logits itself and keeps it as the softmax
    return decoder.compute_language_model_loss(targets, logits), correct.t()


def vocab_parallel_argmax(logits: torch.Tensor, real_vocab_size: int) -> torch.Tensor:
    """Argmax over a vocabulary sharded across TP ranks, ignoring the padding rows. Works in the logits'
    own dtype (the max of bf16 values is exact): no fp32 copy, and the padding is sliced off, not masked."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = logits.shape[-1]
    start = rank * shard
    logits = logits.detach()
    real = min(max(real_vocab_size - start, 0), shard)
    if real == 0:  # a shard of padding rows only: it never wins
        values = torch.full(logits.shape[:-1], float("-inf"), dtype=logits.dtype, device=logits.device)
        index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    else:
        values, index = logits[..., :real].max(dim=-1)
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return index
    group = parallel_state.get_tensor_model_parallel_group()
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_index = [torch.empty_like(index) for _ in range(world)]
    torch.distributed.all_gather(all_values, values.contiguous(), group=group)
    torch.distributed.all_gather(all_index, (index + start).contiguous(), group=group)
    best = torch.stack(all_values).argmax(dim=0, keepdim=True)
    return torch.stack(all_index).gather(0, best)[0]
