"""Entropy-vs-quality correlations for Fig. 3: Pearson and Spearman (scipy.stats) with two-sided p-values.

Pairs with a non-finite value on either side are dropped (and counted). A correlation that is
undefined -- fewer than 3 pairs left, or a side that is constant -- is reported as NaN with a `note`
that says why, instead of raising or emitting scipy's ConstantInputWarning.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

MIN_PAIRS = 3


def correlate(x: Sequence[float], y: Sequence[float]) -> dict:
    """{"n", "dropped", "pearson_r", "pearson_p", "spearman_rho", "spearman_p", "note"} for paired data."""
    if len(x) != len(y):
        raise ValueError(f"paired data of different lengths: {len(x)} and {len(y)}")
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if math.isfinite(float(a)) and math.isfinite(float(b))]
    result = {"n": len(pairs), "dropped": len(x) - len(pairs), "pearson_r": math.nan, "pearson_p": math.nan,
              "spearman_rho": math.nan, "spearman_p": math.nan, "note": ""}
    xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
    if len(pairs) < MIN_PAIRS:
        result["note"] = f"undefined: {len(pairs)} finite pairs (need {MIN_PAIRS})"
        return result
    constant = [name for name, v in (("x", xs), ("y", ys)) if min(v) == max(v)]
    if constant:
        result["note"] = f"undefined: constant {' and '.join(constant)}"
        return result

    from scipy import stats

    pearson = stats.pearsonr(xs, ys)
    spearman = stats.spearmanr(xs, ys)
    result.update(pearson_r=float(pearson[0]), pearson_p=float(pearson[1]),
                  spearman_rho=float(spearman[0]), spearman_p=float(spearman[1]))
    return result


def correlate_metrics(entropy: Sequence[float], metrics: Mapping[str, Sequence[float]]) -> dict[str, dict]:
    """correlate(entropy, values) for each metric name, e.g. {"f1": [...], "bleu_sentence": [...], ...}."""
    return {name: correlate(entropy, values) for name, values in metrics.items()}
