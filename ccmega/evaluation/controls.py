"""Memory-dependence controls (`ccmega evaluate --controls`): does a trained ICAE use its memory?

Every test sample is reconstructed under five decoder prefixes, each ending in the learned [AE] position:

    own         [W m + b, e([AE])]            its own compressed memory (what `evaluate` scores)
    shuffled    [W m' + b, e([AE])]           the memory of another test sample (a fixed derangement)
    zeroed      [0 .. 0, e([AE])]             k zero vectors in the decoder's input space
    no_memory   [e([AE])]                     the decoder alone after [AE]
    context     [e(c_1) .. e(c_L), e([AE])]   the original tokens in place of the memory (an upper bound)

For each: greedy reconstruction (`ccmega.evaluation.generation`) scored with `ccmega.evaluation.metrics`
(the same F1 / BLEU / ROUGE-L as the main evaluation), and the teacher-forced reconstruction loss (nats)
and token accuracy (%) on c_1..c_L, <end> (the training objective, `ICAEModel.reconstruction_loss`). An ICAE
that ignores its memory scores the same with own and shuffled memory, and its loss sits at no_memory's.

The summary gives every condition plus the paired gap own − shuffled per metric with a 95% percentile
bootstrap interval over test samples (numpy, fixed seed). "Memory is used" means the F1 gap's interval
lies above 0 (and the loss gap's below 0). The per-sample rows go to OUTPUT_DIR/controls.jsonl.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from ccmega.fileio import atomic_write_text

CONDITIONS = ("own", "shuffled", "zeroed", "no_memory", "context")
CONDITION_LABELS = {"own": "own memory", "shuffled": "shuffled memory", "zeroed": "zeroed memory",
                    "no_memory": "no memory", "context": "context tokens"}
GAP_METRICS = ("f1", "bleu_sentence", "rougeL", "accuracy", "loss")  # per-sample values, so bootstrappable
CONTROLS_FILE = "controls.jsonl"
BOOTSTRAP_RESAMPLES = 10_000


# ---- pure helpers (numpy) ---------------------------------------------------------------------------------

def derangement(n: int, seed: int) -> np.ndarray:
    """partner[i] != i for every i: one random n-cycle (seeded), so no sample is its own control."""
    if n < 2:
        raise ValueError(f"the shuffled-memory control needs at least 2 test samples, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def bootstrap_mean_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 1234,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 22) // values.size)  # bounded memory: 10k resamples of 10k samples would be 800 MB
    means = np.concatenate([values[rng.integers(0, values.size, size=(min(chunk, resamples - done), values.size))]
                            .mean(axis=1) for done in range(0, resamples, chunk)])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarise(rows: list[dict], seed: int) -> dict:
    """The `controls` record of an evaluation summary from the per-sample rows (all test samples)."""
    from ccmega.evaluation.metrics import METRIC_KEYS, score_corpus

    references = [r["reference"] for r in rows]
    conditions = {}
    for name in CONDITIONS:
        scores = [r["conditions"][name] for r in rows]
        metrics = score_corpus(references, [s["reconstruction"] for s in scores],
                               per_sample=[{key: s[key] for key in METRIC_KEYS} for s in scores])
        for key in ("loss", "accuracy"):
            metrics[key] = math.fsum(s[key] for s in scores) / len(scores) if scores else math.nan
        conditions[name] = metrics
    gaps = {}
    for key in GAP_METRICS:
        diff = [r["conditions"]["own"][key] - r["conditions"]["shuffled"][key] for r in rows]
        low, high = bootstrap_mean_ci(diff, seed=seed)
        gaps[key] = {"mean": math.fsum(diff) / len(diff) if diff else math.nan, "ci95": [low, high]}
    return {"conditions": conditions, "gap_own_minus_shuffled": gaps,
            "memory_used": gaps["f1"]["ci95"][0] > 0,
            "bootstrap": {"method": "percentile", "resamples": BOOTSTRAP_RESAMPLES, "seed": seed, "level": 0.95},
            "derangement_seed": seed, "per_sample": CONTROLS_FILE}


# ---- the five prefixes, and running them --------------------------------------------------------------

def condition_prefixes(icae, context, partner_context) -> dict:
    """{condition: decoder prefix [P, b, h]} for a batch; `partner_context` gives the shuffled memory."""
    import torch

    own = icae.decoder_prefix(icae.compress(context))
    ae = own[-1:]
    positions = torch.arange(context.shape[1], device=context.device).expand_as(context)
    tokens = icae.decoder.embedding(input_ids=context, position_ids=positions)
    return {
        "own": own,
        "shuffled": icae.decoder_prefix(icae.compress(partner_context)),
        "zeroed": torch.cat([torch.zeros_like(own[:-1]), ae], dim=0),
        "no_memory": ae,
        "context": torch.cat([tokens.to(ae.dtype), ae], dim=0),
    }


@dataclass
class ControlsResult:
    rows: list[dict]  # one per test sample, in index order
    summary: dict

    def write(self, output_dir: str) -> dict:
        """Writes OUTPUT_DIR/controls.jsonl (atomically); returns the summary record."""
        atomic_write_text(os.path.join(output_dir, CONTROLS_FILE),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows))
        return self.summary


def run_controls(icae, samples, indices: list[int], count: int, tokenizer, batch_size: int,
                 seed: int = 1234, log=print) -> ControlsResult | None:
    """All five conditions for this rank's `indices` of `samples` (of `count` test samples in all; the
    shuffled partner of sample i is derangement(count, seed)[i]). Collective: every rank calls it; rank 0
    gets the result over all samples, the others None."""
    import torch

    from ccmega.evaluation.evaluate import gather_by_index
    from ccmega.evaluation.generation import generate
    from ccmega.evaluation.metrics import score_pair

    partner = derangement(count, seed)
    device = next(icae.parameters()).device
    rows = {}
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            context = torch.stack([samples[i] for i in batch]).to(device)
            partner_context = torch.stack([samples[int(partner[i])] for i in batch]).to(device)
            references = [tokenizer.decode(row.tolist()) for row in context]
            rows.update({i: {"index": i, "partner": int(partner[i]), "reference": ref, "conditions": {}}
                         for i, ref in zip(batch, references)})
            for name, prefix in condition_prefixes(icae, context, partner_context).items():
                loss, correct = icae.reconstruction_loss(prefix, context)
                out = generate(icae, prefix, context.shape[1])
                for j, (i, ids) in enumerate(zip(batch, out.token_lists())):
                    text = tokenizer.decode(ids)
                    rows[i]["conditions"][name] = {"reconstruction": text, **score_pair(references[j], text),
                                                   "loss": float(loss[j].mean()),
                                                   "accuracy": 100.0 * float(correct[j].float().mean())}
            log(f"controls: {min(start + batch_size, len(indices))}/{len(indices)} samples (rank 0)")
    ordered = gather_by_index(rows, count)
    return None if ordered is None else ControlsResult(ordered, summarise(ordered, seed))


def describe(summary: dict) -> str:
    """One log line: F1 and loss per condition and the F1 gap with its interval."""
    c, gap = summary["conditions"], summary["gap_own_minus_shuffled"]["f1"]
    parts = [f"{CONDITION_LABELS[n]} F1 {c[n]['f1']:.2f} loss {c[n]['loss']:.3f}" for n in CONDITIONS]
    low, high = gap["ci95"]
    return (f"controls: {'; '.join(parts)}; F1 gap own - shuffled {gap['mean']:+.2f} [{low:+.2f}, {high:+.2f}] "
            f"-> memory {'used' if summary['memory_used'] else 'NOT shown to be used'}")


# ---- the report's section ----------------------------------------------------------------------------

# (summary key of a condition, key of its gap, row label)
REPORT_ROWS = (("f1", "f1", "F1"), ("bleu_sentence_mean", "bleu_sentence", "BLEU (sent. mean)"),
               ("rougeL", "rougeL", "ROUGE-L"), ("accuracy", "accuracy", "token accuracy (teacher-forced)"),
               ("loss", "loss", "loss (teacher-forced, nats)"))
REPORT_HEADERS = ["Encoder", "Decoder", "Data", "metric"] + [CONDITION_LABELS[n] for n in CONDITIONS] + \
                 ["own − shuffled [95% CI]"]


def controls_section(runs) -> str:
    """Markdown for `ccmega report`: the controls of every run (`report.Run`) that has them."""
    from ccmega.evaluation.report import _table

    runs = [r for r in runs if r.controls]
    if not runs:
        return "_No summary has controls (`ccmega evaluate --controls`)._"
    rows, verdicts = [], []
    for run in runs:
        c = run.controls
        for key, gap_key, name in REPORT_ROWS:
            gap = c["gap_own_minus_shuffled"][gap_key]
            low, high = gap["ci95"]
            rows.append([run.encoder.name, run.decoder.name, run.data, name]
                        + [_number(c["conditions"][n].get(key)) for n in CONDITIONS]
                        + [f"{gap['mean']:+.2f} [{low:+.2f}, {high:+.2f}]"])
        f1 = c["gap_own_minus_shuffled"]["f1"]
        verdicts.append(f"- {run.label}: memory {'used' if c['memory_used'] else '**not shown to be used**'} "
                        f"(F1 gap {f1['mean']:+.2f}, 95% CI [{f1['ci95'][0]:+.2f}, {f1['ci95'][1]:+.2f}], "
                        f"n = {c['conditions']['own']['n']})")
    intro = ("Each pair reconstructs every test sample from its own memory, another sample's memory "
             "(shuffled: a fixed derangement), k zero vectors, no memory (the decoder alone after [AE]) and "
             "the context tokens themselves in place of the memory (an upper bound). The gap is own − "
             "shuffled, paired over samples, with a 95% percentile bootstrap interval; the memory counts as "
             "used when the F1 gap's interval lies above 0. Losses are the teacher-forced ICAE objective.")
    return "\n".join([intro, "", _table(REPORT_HEADERS, rows), ""] + verdicts)


def _number(value) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):.2f}"
