"""`ccmega info --preset P [--tp N --pp M]`: architecture and parameter counts, without building a model.

Counts follow megatron's layout: layers split evenly over pipeline stages, the embedding on the
first stage and (tied) a copy of it as the output layer on the last stage when PP > 1; linear weights
and the embedding sharded over tensor-parallel ranks, norms replicated. The total is the unique
parameter count of Table 2 (vocabulary unpadded, tied embedding counted once).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from ccmega.presets import MODEL_PRESETS, ModelPreset, model_preset, padded_vocab_size


@dataclass(frozen=True)
class StageCount:
    stage: int
    layers: range
    params: int  # on the stage, all TP ranks together, padded vocabulary
    params_per_tp_rank: int


def layer_norm_params(p: ModelPreset) -> int:
    return 2 * p.hidden_size + 2 * p.head_dim


def stage_counts(p: ModelPreset, tp: int = 1, pp: int = 1) -> list[StageCount]:
    if p.num_layers % pp:
        raise ValueError(f"{p.num_layers} layers do not split evenly over {pp} pipeline stages")
    if p.num_attention_heads % tp or p.num_query_groups % tp:
        raise ValueError(f"{p.num_attention_heads} heads / {p.num_query_groups} KV heads do not split over TP={tp}")
    per_stage = p.num_layers // pp
    layer_sharded = p.params_per_layer() - layer_norm_params(p)
    embedding = padded_vocab_size(p.vocab_size, tp) * p.hidden_size
    stages = []
    for s in range(pp):
        sharded = per_stage * layer_sharded
        replicated = per_stage * layer_norm_params(p)
        if s == 0:
            sharded += embedding
        if s == pp - 1:
            replicated += p.hidden_size  # final norm
            if pp > 1 or not p.tie_word_embeddings:
                sharded += embedding  # output layer (a tied copy when PP > 1)
        stages.append(StageCount(s, range(s * per_stage, (s + 1) * per_stage), sharded + replicated,
                                 sharded // tp + replicated))
    return stages


def describe(p: ModelPreset, tp: int = 1, pp: int = 1) -> str:
    rows = [f"{'preset':<25}{p.name}"]
    rows += [f"{k:<25}{v}" for k, v in asdict(p).items() if k != "name"]
    rows += [
        "architecture      Qwen3: GQA, QK-norm (RMSNorm per head), SwiGLU MLP without biases, "
        "RoPE, RMSNorm, tied embeddings",
        f"padded vocab      {padded_vocab_size(p.vocab_size, tp)} (multiple of 16 x TP={tp})",
        "",
        f"total parameters  {p.total_params():,}",
        f"  per layer       {p.params_per_layer():,}",
        f"  embedding       {p.embedding_params():,}",
        "",
        f"layout            TP={tp} PP={pp}",
    ]
    for s in stage_counts(p, tp, pp):
        rows.append(f"  stage {s.stage}: layers {s.layers.start}-{s.layers.stop - 1}  "
                    f"params {s.params:,}  per TP rank {s.params_per_tp_rank:,}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ccmega info", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(MODEL_PRESETS))
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    args = parser.parse_args(argv)
    try:
        print(describe(model_preset(args.preset), args.tp, args.pp))
    except ValueError as err:
        parser.error(str(err))
    return 0
