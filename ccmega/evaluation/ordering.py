"""Is one encoder/decoder pair better than another? Paired comparisons over the same test samples.

Table 3 orders its pairs D1/D1 > D6/D1 > D1/D6. To test such an ordering on our own runs, every pair is
evaluated on the same test windows (OUTPUT_DIR/samples.jsonl, one row per window, in order), possibly for
several ICAE seeds. A pair's per-sample score is the mean over its seeds; the difference A − B is taken
per sample and its mean gets a 95% percentile bootstrap interval over samples (the same resampler as the
memory controls, `ccmega.evaluation.controls.bootstrap_mean_ci`). BLEU is compared on sentence BLEU:
corpus BLEU is one number per corpus, which a per-sample bootstrap cannot resample cheaply.

Verdicts: "holds" (interval above 0), "reversed" (below 0), "not resolved" (it contains 0).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from ccmega.evaluation.controls import bootstrap_mean_ci

COMPARED_METRICS = {"f1": "F1", "bleu_sentence": "BLEU (sentence)"}


def per_sample_scores(eval_dirs: list[str], metric: str) -> np.ndarray:
    """[samples] mean over the given evaluation folders (the seeds of one pair) of a per-sample metric."""
    runs = []
    for folder in eval_dirs:
        with open(os.path.join(folder, "samples.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        runs.append([row[metric] for row in sorted(rows, key=lambda r: r["index"])])
    lengths = {len(r) for r in runs}
    if len(lengths) != 1:
        raise ValueError(f"{eval_dirs}: the seeds were evaluated on different numbers of samples ({sorted(lengths)})")
    return np.asarray(runs, dtype=np.float64).mean(axis=0)


def compare(a: np.ndarray, b: np.ndarray, seed: int = 1234) -> dict:
    """Mean of the paired difference a − b, its 95% bootstrap interval and the verdict."""
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same samples: {a.shape} vs {b.shape}")
    diff = a - b
    low, high = bootstrap_mean_ci(diff, seed=seed)
    verdict = "holds" if low > 0 else "reversed" if high < 0 else "not resolved"
    return {"mean": math.fsum(diff) / diff.size, "ci95": [low, high], "verdict": verdict}


def check_ordering(pairs: dict[str, list[str]], order: list[str], seed: int = 1234) -> list[dict]:
    """`pairs`: name -> evaluation folders (one per seed); `order`: names, best first. One record per
    adjacent comparison and metric."""
    records = []
    for better, worse in zip(order, order[1:]):
        for metric, label in COMPARED_METRICS.items():
            result = compare(per_sample_scores(pairs[better], metric), per_sample_scores(pairs[worse], metric), seed)
            records.append({"claim": f"{better} > {worse}", "metric": label, **result})
    return records


def describe(record: dict) -> str:
    low, high = record["ci95"]
    return (f"{record['claim']} on {record['metric']}: difference {record['mean']:+.2f} [{low:+.2f}, {high:+.2f}] "
            f"-> {record['verdict']}")
