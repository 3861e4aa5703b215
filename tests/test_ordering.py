"""Paired comparisons of encoder/decoder pairs (ccmega/evaluation/ordering.py) on hand-made samples.jsonl."""
import json

import numpy as np
import pytest

from ccmega.evaluation.ordering import check_ordering, compare, per_sample_scores


def eval_folder(tmp_path, name, f1, bleu):
    folder = tmp_path / name
    folder.mkdir()
    rows = [{"index": i, "f1": a, "bleu_sentence": b} for i, (a, b) in enumerate(zip(f1, bleu))]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # any order
    return str(folder)


def test_seeds_are_averaged_per_sample_in_index_order(tmp_path):
    a = eval_folder(tmp_path, "a", [0, 10, 20], [0, 0, 0])
    b = eval_folder(tmp_path, "b", [10, 20, 30], [0, 0, 0])
    assert per_sample_scores([a, b], "f1").tolist() == [5, 15, 25]


def test_verdicts_follow_the_interval():
    rng = np.random.default_rng(0)
    base = rng.normal(10, 3, 200)
    assert compare(base + 2, base)["verdict"] == "holds"
    assert compare(base + 2, base)["mean"] == pytest.approx(2)
    assert compare(base, base + 2)["verdict"] == "reversed"
    noisy = compare(base + rng.normal(0, 5, 200), base)
    assert noisy["ci95"][0] < 0 < noisy["ci95"][1] and noisy["verdict"] == "not resolved"


def test_ordering_checks_each_adjacent_pair_on_f1_and_bleu(tmp_path):
    pairs = {"D1/D1": [eval_folder(tmp_path, "x1", [9, 8, 9, 8], [5, 6, 5, 6]), eval_folder(tmp_path, "x2", [9, 8, 9, 8], [5, 6, 5, 6])],
             "D6/D1": [eval_folder(tmp_path, "y", [5, 4, 5, 4], [7, 8, 7, 8])],
             "D1/D6": [eval_folder(tmp_path, "z", [1, 0, 1, 0], [1, 2, 1, 2])]}
    records = check_ordering(pairs, ["D1/D1", "D6/D1", "D1/D6"])
    assert [(r["claim"], r["metric"], r["verdict"], r["mean"]) for r in records] == [
        ("D1/D1 > D6/D1", "F1", "holds", 4.0), ("D1/D1 > D6/D1", "BLEU (sentence)", "reversed", -2.0),
        ("D6/D1 > D1/D6", "F1", "holds", 4.0), ("D6/D1 > D1/D6", "BLEU (sentence)", "holds", 6.0)]


def test_different_sample_counts_are_refused(tmp_path):
    a = eval_folder(tmp_path, "a", [1, 2, 3], [0, 0, 0])
    b = eval_folder(tmp_path, "b", [1, 2], [0, 0])
    with pytest.raises(ValueError, match="different numbers of samples"):
        per_sample_scores([a, b], "f1")
