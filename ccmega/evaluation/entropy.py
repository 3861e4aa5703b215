"""Input entropy as an LM measures it (paper §4.2, Fig. 3).

Definition. For a test sample c_1..c_L and a pretrained LM p, the entropy is the mean next-token
negative log-likelihood in nats over the L - 1 predicted positions:

    H_p(c) = -1/(L-1) * sum_{t=2..L} log p(c_t | c_1..c_{t-1})

No BOS/EOD is prepended: test samples are consecutive L-token windows of documents (most start
mid-document), and pretraining sequences are packed windows without a BOS, so the LM is evaluated
exactly as it was trained. It is therefore identical to the pretraining LM loss of the same text:
`gpt_forward_step` on {tokens: c_1..c_{L-1}, labels: c_2..c_L, loss_mask: ones} (megatron's
vocab-parallel cross entropy over the whole padded vocabulary, as in training; Qwen3's 151,936 rows
need no padding at TP <= 8, nor do the tiny presets, so there it is also the NLL over the real vocabulary).

The encoder-side entropy uses the encoder's PRETRAINED LM (the checkpoint `icae-train --encoder` named,
whose weights the ICAE encoder starts from; not the fine-tuned encoder), the decoder-side entropy the
(frozen) decoder LM.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


@torch.no_grad()
def token_nll(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [b, L] -> per-token NLL [b, L - 1] (nats, fp32) of tokens[:, 1:] given their prefixes.
    `model` is a GPTModel (all TP ranks call together; megatron returns the loss unsharded)."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1], device=tokens.device).expand_as(inputs)
    return model(inputs, positions, None, labels=labels).float()


def sequence_entropy(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [b, L] -> entropy per sample [b] (mean NLL over the L - 1 predicted positions, nats)."""
    if tokens.shape[1] < 2:
        raise ValueError("entropy needs at least 2 tokens per sample")
    return token_nll(model, tokens).mean(dim=-1)


def entropies(model, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """sequence_entropy for each batch [b, L]: the model is put in eval mode (no dropout)."""
    model.eval()
    for tokens in batches:
        yield sequence_entropy(model, tokens)


def load_pretrained_lm(checkpoint: str, device: torch.device | str | None = None):
    """A standalone GPTModel with the weights of a `ccmega pretrain` checkpoint (run, checkpoints or
    iter dir), in eval mode, for this rank's TP shard. Returns (model, preset, metadata)."""
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import ModelPreset
    from ccmega.training.checkpointing import load_model_weights, read_checkpoint_metadata

    meta = read_checkpoint_metadata(checkpoint)
    preset = ModelPreset(**meta["model_preset"])
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}.get(str(meta.get("dtype")), torch.float32)
    from megatron.core import parallel_state

    config = transformer_config(preset, tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
                                params_dtype=dtype)
    model = build_model(preset, config, pre_process=True, post_process=True)
    if device is not None:
        model.to(device)
    load_model_weights(model, checkpoint)
    return model.eval(), preset, meta
