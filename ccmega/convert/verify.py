"""`--verify`: the megatron model and the Hugging Face model must predict the same logits.

Both sides run in fp32 on the CPU, one text at a time (no padding). Reported: the largest absolute
logit difference, the smallest per-position cosine similarity of the logit vectors, and the share
of positions whose greedy (argmax) token agrees.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ccmega.presets import ModelPreset

VERIFY_TEXTS = (
    "The Pile is an 825 GiB diverse, open source language modelling data set that consists of 22 smaller, "
    "high-quality datasets combined together.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Let f(x) = 3*x**2 - 7*x + 2. What is the derivative of f at x = 4? Solve 2*y + 5 = 17 for y.",
)
FP32_TOLERANCE = 1e-4


@dataclass
class Agreement:
    max_abs_diff: float
    min_cosine: float
    greedy_agreement: float
    positions: int
    source: str  # what the token ids came from

    def line(self) -> str:
        return (f"max |Δ logits| {self.max_abs_diff:.3e}, min cosine {self.min_cosine:.8f}, greedy agreement "
                f"{self.greedy_agreement:.2%} over {self.positions} positions ({self.source})")


def verification_inputs(preset: ModelPreset, tokenizer_path: str | None, length: int = 48,
                        seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """Token ids of VERIFY_TEXTS with the model's tokenizer; random ids when there is no tokenizer or it
    does not fit the model's vocabulary (the toy presets)."""
    if tokenizer_path:
        from ccmega.data.tokenizers import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        ids = [tok.encode(t) for t in VERIFY_TEXTS]
        if all(ids) and max(max(i) for i in ids) < preset.vocab_size:
            return [torch.tensor([i]) for i in ids], f"{len(ids)} texts tokenized with {tokenizer_path}"
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randint(0, preset.vocab_size, (1, length), generator=gen) for _ in VERIFY_TEXTS],
            f"{len(VERIFY_TEXTS)} random sequences of {length} ids")


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[b, s, vocab] logits of a single-stage (TP=1, PP=1) GPTModel, padding columns dropped."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, None)[..., :vocab_size].float()


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits.float()


def compare(ours: list[torch.Tensor], theirs: list[torch.Tensor], source: str) -> Agreement:
    a = torch.cat([x.reshape(-1, x.shape[-1]) for x in ours])
    b = torch.cat([x.reshape(-1, x.shape[-1]) for x in theirs])
    return Agreement(
        max_abs_diff=float((a - b).abs().max()),
        min_cosine=float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min()),
        greedy_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        positions=a.shape[0],
        source=source,
    )


def fp32_copy(model, preset: ModelPreset):
    """A float32 TP=1 GPTModel with `model`'s weights (bf16 checkpoints are verified in fp32)."""
    from ccmega.models.qwen3 import build_model, transformer_config

    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model.eval()
    rows = model.embedding.word_embeddings.weight.shape[0]
    copy = build_model(preset.replace(vocab_size=rows), transformer_config(preset), True, True, False)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def verify_pair(megatron_model, hf_folder: str, preset: ModelPreset, tokenizer_path: str | None,
                tolerance: float, log=print) -> Agreement:
    """Load `hf_folder` with transformers and compare it with `megatron_model`; raise beyond tolerance."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    ours_model = fp32_copy(megatron_model, preset)
    inputs, source = verification_inputs(preset, tokenizer_path)
    result = compare([megatron_logits(ours_model, t, preset.vocab_size) for t in inputs],
                     [hf_logits(hf, t) for t in inputs], source)
    log(f"verify: {result.line()}")
    if not result.max_abs_diff <= tolerance:  # also catches NaN
        raise VerificationError(f"logits disagree: max |Δ| {result.max_abs_diff:.3e} > tolerance {tolerance:.1e}")
    return result


class VerificationError(RuntimeError):
    pass
