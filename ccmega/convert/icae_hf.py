"""ICAE over Hugging Face `Qwen3ForCausalLM` backbones.

The same computation as `ccmega.models.icae.ICAEModel`, written independently on transformers: it
is the reference the megatron ICAE is tested against, the baseline of benchmarks/icae_train.py, and
the loader for exported compressors (`load_exported`), so a compressor trained with ccmega can
compress text for a Hugging Face decoder.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

EXPORT_WEIGHTS = "icae.safetensors"  # memory_embeddings, ae_embedding, projector.{weight,bias}
EXPORT_CONFIG = "icae_config.json"  # num_memory_slots, end_token_id, encoder/decoder folders


class HFICAE(torch.nn.Module):
    def __init__(self, encoder, decoder, num_memory_slots: int, end_token_id: int):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.num_memory_slots, self.end_token_id = num_memory_slots, end_token_id
        enc_h, dec_h = encoder.config.hidden_size, decoder.config.hidden_size
        self.memory_embeddings = torch.nn.Parameter(torch.zeros(num_memory_slots, enc_h))
        self.ae_embedding = torch.nn.Parameter(torch.zeros(dec_h))
        self.projector = torch.nn.Linear(enc_h, dec_h)
        decoder.requires_grad_(False)

    def compress(self, context: torch.Tensor) -> torch.Tensor:
        """context [b, L] -> memory vectors [b, k, encoder hidden] (the encoder's final-norm states)."""
        embeds = self.encoder.get_input_embeddings()(context)
        memory = self.memory_embeddings.expand(context.shape[0], -1, -1).to(embeds.dtype)
        hidden = self.encoder.model(inputs_embeds=torch.cat([embeds, memory], 1)).last_hidden_state
        return hidden[:, -self.num_memory_slots:]

    def decoder_prefix(self, memory: torch.Tensor) -> torch.Tensor:
        """[projected memory, e([AE])]: [b, k + 1, decoder hidden]."""
        projected = self.projector(memory)
        ae = self.ae_embedding.expand(memory.shape[0], 1, -1).to(projected.dtype)
        return torch.cat([projected, ae], 1)

    def forward(self, context: torch.Tensor):
        """Teacher-forced reconstruction: (per-token loss [b, L + 1], logits [b, L + 1, V])."""
        prefix = self.decoder_prefix(self.compress(context))
        embeds = self.decoder.get_input_embeddings()(context)
        logits = self.decoder(inputs_embeds=torch.cat([prefix, embeds], 1)).logits[:, self.num_memory_slots:]
        targets = torch.cat([context, torch.full_like(context[:, :1], self.end_token_id)], 1)
        loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        return loss, logits

    @torch.no_grad()
    def reconstruct(self, context: torch.Tensor, max_new_tokens: int | None = None) -> torch.Tensor:
        """Greedy decoding from the memory slots alone (HF KV cache), stopping at the end token."""
        prefix = self.decoder_prefix(self.compress(context))
        max_new_tokens = max_new_tokens or context.shape[1]
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        out = self.decoder.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=self.end_token_id, pad_token_id=self.end_token_id)
        return out


def save_export(folder: str, memory_embeddings, ae_embedding, projector_weight, projector_bias,
                num_memory_slots: int, end_token_id: int, encoder_dir: str = "encoder",
                decoder_dir: str | None = None) -> None:
    """Write the ICAE-specific weights and config into `folder` (the encoder HF folder lives beside)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {"memory_embeddings": memory_embeddings, "ae_embedding": ae_embedding,
               "projector.weight": projector_weight, "projector.bias": projector_bias}
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, os.path.join(folder, EXPORT_WEIGHTS))
    with open(os.path.join(folder, EXPORT_CONFIG), "w") as f:
        json.dump({"num_memory_slots": num_memory_slots, "end_token_id": end_token_id,
                   "encoder": encoder_dir, "decoder": decoder_dir}, f, indent=2)


def load_exported(folder: str, decoder=None, torch_dtype=torch.float32) -> HFICAE:
    """Load an exported compressor: `folder/icae_config.json`, `folder/icae.safetensors` and the encoder's
    HF folder; the decoder is a HF model you pass, or the folder named in the config."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    with open(os.path.join(folder, EXPORT_CONFIG)) as f:
        cfg = json.load(f)
    encoder = AutoModelForCausalLM.from_pretrained(os.path.join(folder, cfg["encoder"]), torch_dtype=torch_dtype)
    if decoder is None:
        if not cfg.get("decoder"):
            raise ValueError(f"{folder}/{EXPORT_CONFIG} names no decoder folder: pass decoder=")
        decoder = AutoModelForCausalLM.from_pretrained(os.path.join(folder, cfg["decoder"]), torch_dtype=torch_dtype)
    model = HFICAE(encoder, decoder, cfg["num_memory_slots"], cfg["end_token_id"])
    missing = model.load_state_dict(load_file(os.path.join(folder, EXPORT_WEIGHTS)), strict=False)
    icae_keys = {"memory_embeddings", "ae_embedding", "projector.weight", "projector.bias"}
    if icae_keys & set(missing.missing_keys):
        raise ValueError(f"{folder}/{EXPORT_WEIGHTS} lacks {sorted(icae_keys & set(missing.missing_keys))}")
    return model.eval()
