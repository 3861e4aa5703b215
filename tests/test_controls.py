"""Memory-dependence controls: each condition's loss and greedy reconstruction against decoder inputs built
by hand for the independent transformers twin of the ICAE; the derangement and the bootstrap interval
against their definitions and scipy; `ccmega evaluate --controls` end to end and its report section."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icae_fixtures import make_tokenizer
from test_evaluate import trained  # noqa: F401  (the module fixture: a 2-step `ccmega icae-train` run)
from test_icae_model import ENCODER, K

L, N = 10, 5


# ---- pure parts -------------------------------------------------------------------------------------------

def test_derangement_has_no_fixed_point_and_is_seeded():
    from ccmega.evaluation.controls import derangement

    for n in (2, 3, 7, 100):
        partner = derangement(n, seed=3)
        assert sorted(partner.tolist()) == list(range(n))  # a permutation
        assert (partner != np.arange(n)).all()
    assert derangement(50, seed=3).tolist() == derangement(50, seed=3).tolist()
    assert derangement(50, seed=3).tolist() != derangement(50, seed=4).tolist()
    with pytest.raises(ValueError, match="at least 2 test samples"):
        derangement(1, seed=0)


def test_bootstrap_interval_matches_scipy_percentile_bootstrap():
    from scipy.stats import bootstrap

    from ccmega.evaluation.controls import bootstrap_mean_ci

    values = np.random.default_rng(0).normal(2.0, 3.0, size=200)
    ours = bootstrap_mean_ci(values, seed=1)
    ref = bootstrap((values,), np.mean, n_resamples=10_000, method="percentile", confidence_level=0.95,
                    random_state=np.random.default_rng(2)).confidence_interval
    width = ref.high - ref.low  # about 2 * 1.96 * 3 / sqrt(200) = 0.83
    assert abs(ours[0] - ref.low) < 0.05 * width and abs(ours[1] - ref.high) < 0.05 * width
    assert ours[0] < values.mean() < ours[1]
    assert bootstrap_mean_ci(np.full(30, 1.5)) == (1.5, 1.5)
    assert bootstrap_mean_ci(values, seed=1) == ours  # fixed seed, same interval
    # chunked resampling (many samples) gives the normal-theory width
    many = np.random.default_rng(5).normal(0.0, 1.0, size=50_000)
    low, high = bootstrap_mean_ci(many, resamples=2_000)
    assert (high - low) == pytest.approx(2 * 1.96 / np.sqrt(many.size), rel=0.1)


# ---- the five conditions against the transformers twin ----------------------------------------------------

def _hf_condition_prefix(theirs, name, context, partner_context):
    """The decoder prefix [b, P, h] of each condition, built from the transformers ICAE's parts."""
    ae = theirs.ae_embedding.expand(context.shape[0], 1, -1)
    if name == "own":
        return theirs.decoder_prefix(theirs.compress(context))
    if name == "shuffled":
        return theirs.decoder_prefix(theirs.compress(partner_context))
    if name == "zeroed":
        return torch.cat([torch.zeros(context.shape[0], K, ae.shape[-1]), ae], 1)
    if name == "no_memory":
        return ae
    assert name == "context"
    return torch.cat([theirs.decoder.get_input_embeddings()(context), ae], 1)


def _hf_loss_and_greedy(theirs, prefix, context, end):
    embeds = theirs.decoder.get_input_embeddings()(context)
    logits = theirs.decoder(inputs_embeds=torch.cat([prefix, embeds], 1)).logits[:, prefix.shape[1] - 1:]
    targets = torch.cat([context, torch.full_like(context[:, :1], end)], 1)
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").mean(1)
    accuracy = 100.0 * (logits.argmax(-1) == targets).float().mean(1)
    out = theirs.decoder.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                                  max_new_tokens=context.shape[1], do_sample=False, eos_token_id=end,
                                  pad_token_id=end, min_new_tokens=0)
    greedy = []
    for row in out.tolist():
        greedy.append(row[:row.index(end)] if end in row else row)
    return loss, accuracy, greedy


def test_each_condition_equals_hand_built_decoder_input(megatron_world_of_one, tmp_path):
    from ccmega.data.tokenizers import load_tokenizer
    from ccmega.evaluation.controls import CONDITIONS, derangement, run_controls
    from ccmega.evaluation.metrics import token_f1
    from test_generation import build_pair

    ours, theirs = build_pair(end_token=5)  # decoder weights scaled up: greedy decoding does not degenerate
    with torch.no_grad():  # a projector bias: "zeroed" must zero the decoder inputs, not the encoder states
        ours.projector.bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
        theirs.projector.bias.copy_(ours.projector.bias)
    tokenizer = load_tokenizer(make_tokenizer(tmp_path / "tokenizer.json", vocab_size=ENCODER.vocab_size))
    samples = list(torch.randint(0, ENCODER.vocab_size, (N, L), generator=torch.Generator().manual_seed(7)))
    result = run_controls(ours, samples, list(range(N)), N, tokenizer, batch_size=2, seed=11, log=lambda *_: None)

    partner = derangement(N, seed=11)
    assert [r["index"] for r in result.rows] == list(range(N))
    assert [r["partner"] for r in result.rows] == partner.tolist()
    context = torch.stack(samples)
    with torch.no_grad():
        for name in CONDITIONS:
            prefix = _hf_condition_prefix(theirs, name, context, context[partner])
            loss, accuracy, greedy = _hf_loss_and_greedy(theirs, prefix, context, end=5)
            got = [r["conditions"][name] for r in result.rows]
            torch.testing.assert_close(torch.tensor([g["loss"] for g in got]), loss, atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor([g["accuracy"] for g in got]), accuracy, atol=1e-4, rtol=0)
            for row, g, ids in zip(result.rows, got, greedy):
                assert g["reconstruction"] == tokenizer.decode(ids), name
                assert g["f1"] == pytest.approx(token_f1(row["reference"], tokenizer.decode(ids)))
    losses = {name: result.summary["conditions"][name]["loss"] for name in CONDITIONS}
    assert len({round(v, 4) for v in losses.values()}) == len(CONDITIONS)  # five genuinely different inputs

    # the summary: means over samples, and the paired gap
    summary = result.summary
    for name in CONDITIONS:
        assert summary["conditions"][name]["n"] == N
        f1s = [r["conditions"][name]["f1"] for r in result.rows]
        assert summary["conditions"][name]["f1"] == pytest.approx(np.mean(f1s))
    diff = [r["conditions"]["own"]["loss"] - r["conditions"]["shuffled"]["loss"] for r in result.rows]
    gap = summary["gap_own_minus_shuffled"]["loss"]
    assert gap["mean"] == pytest.approx(np.mean(diff))
    assert min(diff) - 1e-9 <= gap["ci95"][0] <= gap["mean"] <= gap["ci95"][1] <= max(diff) + 1e-9
    assert summary["memory_used"] == (summary["gap_own_minus_shuffled"]["f1"]["ci95"][0] > 0)


# ---- ccmega evaluate --controls, ccmega report ------------------------------------------------------------

def test_evaluate_controls_end_to_end_and_report(trained, tmp_path):
    from ccmega.evaluation import report
    from ccmega.evaluation.controls import CONDITIONS
    from ccmega.evaluation.evaluate import main

    out = tmp_path / "eval"
    assert main(["--icae", str(trained["icae"]), "--data", trained["test"], "--output-dir", str(out),
                 "--batch-size", "4", "--no-entropy", "--controls", "--decoder-recipe", "D1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["controls.jsonl", "samples.jsonl", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    controls = [json.loads(line) for line in (out / "controls.jsonl").read_text().splitlines()]
    assert len(controls) == len(samples) == summary["metrics"]["n"]
    for sample, row in zip(samples, controls):  # "own" is exactly the main evaluation
        assert row["reference"] == sample["reference"]
        assert row["conditions"]["own"]["reconstruction"] == sample["reconstruction"]
        assert row["conditions"]["own"]["f1"] == sample["f1"]
        assert row["partner"] != row["index"]
    record = summary["controls"]
    assert set(record["conditions"]) == set(CONDITIONS)
    assert record["conditions"]["own"]["f1"] == pytest.approx(summary["metrics"]["f1"])
    assert record["conditions"]["own"]["bleu_corpus"] == pytest.approx(summary["metrics"]["bleu_corpus"])
    assert record["per_sample"] == "controls.jsonl"

    report_dir = tmp_path / "report"
    assert report.main([str(out / "summary.json"), "--out", str(report_dir)]) == 0
    text = (report_dir / "report.md").read_text()
    section = text.split("## Memory-dependence controls")[1].split("\n## ")[0]
    assert "| metric | own memory | shuffled memory | zeroed memory | no memory | context tokens |" in section
    f1_row = next(line for line in section.splitlines() if "| F1 |" in line)
    assert f"{record['conditions']['shuffled']['f1']:.2f}" in f1_row
    assert "memory used" in section or "not shown to be used" in section
