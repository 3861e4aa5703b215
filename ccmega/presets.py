"""Named, typed presets: Qwen3 model sizes (paper Table 2) and training hyperparameters (Tables 6, 7).

Everything selectable by name from the CLI, YAML configs and SLURM scripts lives here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

QWEN3_VOCAB_SIZE = 151_936  # embedding rows of every Qwen3 model (tokenizer has 151,669 entries)
QWEN3_EOD_TOKEN = 151_643  # <|endoftext|>, the document separator
VOCAB_DIVISOR = 16  # embedding rows padded to a multiple of 16 x TP: 151,936 stays unpadded for TP <= 8


def padded_vocab_size(vocab_size: int, tensor_parallel: int = 1) -> int:
    multiple = VOCAB_DIVISOR * tensor_parallel
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ModelPreset:
    """A Qwen3-architecture decoder: GQA, QK-norm, SwiGLU without biases, RoPE, RMSNorm, tied embeddings."""

    name: str
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads
    head_dim: int = 128  # kv_channels: fixed at 128 in Qwen3, independent of hidden size
    vocab_size: int = QWEN3_VOCAB_SIZE
    max_position_embeddings: int = 8192
    rope_theta: float = 1_000_000.0
    norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True

    def replace(self, **changes) -> "ModelPreset":
        return dataclasses.replace(self, **changes)

    # ---- parameter counts (unpadded vocabulary, as Table 2 counts them) ----
    def params_per_layer(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q = h * self.num_attention_heads * d
        kv = 2 * h * self.num_query_groups * d
        out = self.num_attention_heads * d * h
        mlp = 3 * h * self.ffn_hidden_size  # gate, up, down
        norms = 2 * h + 2 * d  # input + pre-MLP RMSNorm, q_norm + k_norm
        return q + kv + out + mlp + norms

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params()
        return self.num_layers * self.params_per_layer() + self.embedding_params() + lm_head + self.hidden_size


MODEL_PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        # Table 2 of the paper; the totals are asserted by tests/test_presets.py.
        ModelPreset("qwen3-200m", hidden_size=768, ffn_hidden_size=2048, num_layers=12,
                    num_attention_heads=8, num_query_groups=4),
        ModelPreset("qwen3-500m", hidden_size=1024, ffn_hidden_size=3072, num_layers=24,
                    num_attention_heads=16, num_query_groups=8),
        ModelPreset("qwen3-800m", hidden_size=1536, ffn_hidden_size=3072, num_layers=24,
                    num_attention_heads=16, num_query_groups=8),
        ModelPreset("qwen3-1b", hidden_size=1536, ffn_hidden_size=4096, num_layers=28,
                    num_attention_heads=16, num_query_groups=8),
        # Toy sizes for tests and the CPU quickstart: same architecture, small head_dim and vocabulary
        # (the quickstart trains a small SentencePiece tokenizer; the vocabulary follows the tokenizer).
        ModelPreset("qwen3-tiny", hidden_size=64, ffn_hidden_size=128, num_layers=4,
                    num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=1024,
                    max_position_embeddings=1024),
        ModelPreset("qwen3-toy", hidden_size=128, ffn_hidden_size=384, num_layers=4,
                    num_attention_heads=4, num_query_groups=2, head_dim=32, vocab_size=2048,
                    max_position_embeddings=1024),
        ModelPreset("qwen3-mini", hidden_size=256, ffn_hidden_size=768, num_layers=4,
                    num_attention_heads=4, num_query_groups=2, head_dim=64, vocab_size=4096,
                    max_position_embeddings=2048),
    ]
}


def model_preset(name: str) -> ModelPreset:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; choose one of: {', '.join(MODEL_PRESETS)}") from None


@dataclass(frozen=True)
class PretrainHParams:
    """Paper Table 6. 'Train batch size per device 512' with accumulation 4 on 128 GPUs is read as a
    global batch of 512 sequences of 8192 tokens: micro-batch 1 x 4 accumulation x 128 DP ranks."""

    warmup_steps: int = 2000
    epochs: int = 1
    global_batch_size: int = 512
    micro_batch_size: int = 1
    seq_length: int = 8192
    lr_schedule: str = "cosine"
    max_lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    num_gpus: int = 128


@dataclass(frozen=True)
class FinetuneHParams:
    """Paper Table 7 (ICAE fine-tuning): 32 sequences per device, no accumulation. On 80 GB GPUs the
    paper's pairs need them as 2 micro-batches of 16 (slurm/icae_finetune.sh's default; same global batch)."""

    warmup_steps: int = 100
    epochs: int = 3
    micro_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.1
    lr_schedule: str = "linear"
    max_lr: float = 1e-4
    min_lr: float = 1e-5
    num_memory_slots: int = 128
    compression_ratio: int = 4  # context length L = k * r = 512


PRETRAIN_HPARAMS = PretrainHParams()
FINETUNE_HPARAMS = FinetuneHParams()


# ---------------------------------------------------------------------------------------------
# Dataset recipes (paper §3.2, Appendix A, §4.6)
# ---------------------------------------------------------------------------------------------
PILE_CC, ARXIV, GITHUB, DM_MATHEMATICS = "Pile-CC", "ArXiv", "Github", "DM Mathematics"
PILE_SUBSETS = (PILE_CC, ARXIV, GITHUB, DM_MATHEMATICS)  # exact `meta.pile_set_name` values
SPECIALIZED_MIX = {ARXIV: 2, GITHUB: 2, DM_MATHEMATICS: 1}  # ArXiv : Github : DM Mathematics


@dataclass(frozen=True)
class DatasetRecipe:
    """A pretraining corpus: token shares per Pile subset, or the synthetic random-text corpus."""

    name: str
    alpha: float | None  # share of the specialised mixture; None for the random-text corpus
    description: str

    @property
    def is_random_text(self) -> bool:
        return self.alpha is None

    def shares(self) -> dict[str, float]:
        """Token share of each Pile subset: (1 - alpha) Pile-CC + alpha (ArXiv : Github : DM = 2 : 2 : 1)."""
        if self.alpha is None:
            return {}
        weight = sum(SPECIALIZED_MIX.values())
        shares = {PILE_CC: 1.0 - self.alpha}
        shares.update({name: self.alpha * w / weight for name, w in SPECIALIZED_MIX.items()})
        return {name: share for name, share in shares.items() if share > 0}


DATASET_RECIPES: dict[str, DatasetRecipe] = {
    r.name: r
    for r in [DatasetRecipe("D1", 0.0, "100% Pile-CC")]
    + [DatasetRecipe(f"D{k + 1}", k / 6, f"{6 - k}/6 Pile-CC + {k}/6 (ArXiv:Github:DM Mathematics = 2:2:1)")
       for k in range(1, 6)]
    + [DatasetRecipe("random", None, "random characters of the --random-alphabet (paper §4.2, §4.6)")]
}


def dataset_recipe(name: str) -> DatasetRecipe:
    try:
        return DATASET_RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown dataset recipe {name!r}; choose from: {', '.join(DATASET_RECIPES)}") from None
