"""A recipe whose DM Mathematics cannot fill its share: --scarce-subset repeat (default), shrink, fail, and
`corpus_budget_shortfall`, the check pretraining runs on a corpus's manifest.

The corpus is built here from the bundled sample: its first train shard with the DM Mathematics
documents replaced by two short ones of the pretraining split and one of the test split. Supplies and
quotas are computed independently (tokenizers + the split rule of docs/data.md)."""
import functools
import hashlib
import json
import math

import numpy as np
import pytest
import tokenizers

from ccmega.data import sample_data_dir
from ccmega.data.budget import corpus_budget_shortfall
from ccmega.data.tokenizers import default_tokenizer_dir
from ccmega.presets import PILE_SUBSETS
from data_helpers import SCRATCH, read_documents, run_ccmega, write_shard

DM = "DM Mathematics"
FINETUNE_FRACTION = TEST_FRACTION = 0.1
EOD = 151643


def split_by_hash(text: str) -> str:
    """docs/data.md: the first 8 bytes of the text's SHA-256, against the test then fine-tune fraction."""
    u = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64
    return "test" if u < TEST_FRACTION else "finetune" if u < TEST_FRACTION + FINETUNE_FRACTION else "pretrain"


def landing_in(text: str, split: str) -> str:
    """`text` with as many trailing newlines as it takes for its hash to fall in `split`."""
    while split_by_hash(text) != split:
        text += "\n"
    return text


@functools.cache
def reference_tokenizer():
    return tokenizers.Tokenizer.from_file(str(default_tokenizer_dir() / "tokenizer.json"))


@functools.cache
def scarce_corpus():
    """(shard, pretraining DM texts, held-out DM text, DM supply in tokens with EOD, budget, DM quota)."""
    docs = read_documents(sample_data_dir() / "train" / "00.jsonl.zst")
    dm_texts = [d["text"] for d in docs if d["meta"]["pile_set_name"] == DM]
    cut = [text[:text.index("\n", 6000) + 1] for text in dm_texts[:3]]  # whole question/answer lines
    pretrain_dm = [landing_in(cut[0], "pretrain"), landing_in(cut[1], "pretrain")]
    heldout_dm = landing_in(cut[2], "test")
    lines = [json.dumps(d).encode() for d in docs if d["meta"]["pile_set_name"] != DM]
    for i, text in enumerate([*pretrain_dm, heldout_dm]):
        lines.insert(50 + 100 * i, json.dumps({"text": text, "meta": {"pile_set_name": DM}}).encode())
    shard = write_shard(SCRATCH / "scarce" / "00.jsonl.zst", lines)
    supply = sum(len(reference_tokenizer().encode(t).ids) + 1 for t in pretrain_dm)
    quota = math.ceil(2.5 * supply)  # D6: DM Mathematics is 1/6 of the budget
    return shard, pretrain_dm, heldout_dm, supply, 6 * quota, quota


def preprocess(out, *extra, check=True):
    shard, *_, budget, _ = scarce_corpus()
    return run_ccmega("preprocess", "--input", str(shard), "--output", str(out), "--recipes", "D6",
                      "--tokens-per-dataset", str(budget), "--finetune-samples", "0", "--test-samples", "0",
                      "--finetune-fraction", str(FINETUNE_FRACTION), "--test-fraction", str(TEST_FRACTION),
                      "--workers", "0", "--quiet", *extra, check=check)


def dm_sequences(prefix):
    """The DM Mathematics sequences of a corpus: (text digest, tokens without the EOD)."""
    from ccmega.data.indexed_writer import IndexedDatasetReader

    reader, sources = IndexedDatasetReader(prefix), np.load(f"{prefix}.sources.npy")
    rows = []
    for i in range(len(reader)):
        sequence = np.asarray(reader[i])
        assert sequence[-1] == EOD and EOD not in sequence[:-1]
        if PILE_SUBSETS[sources["subset"][i]] == DM:
            rows.append((bytes(sources["digest"][i]).ljust(16, b"\0"), sequence[:-1]))  # numpy strips NULs
    return rows


def test_repeat_keeps_the_budget_with_whole_pretraining_documents(tmp_path):
    _, pretrain_dm, heldout_dm, supply, budget, quota = scarce_corpus()
    result = preprocess(tmp_path / "out")
    assert "WARNING" in result.stderr and f"'{DM}' has {supply:,} pretraining tokens" in result.stderr
    assert f"{quota:,} needed" in result.stderr and "shrink writes" in result.stderr
    prefix = tmp_path / "out" / "D6" / "pretrain"
    manifest = json.loads(prefix.with_suffix(".manifest.json").read_text())
    assert manifest["tokens"] == budget and manifest["subsets"][DM]["tokens"] == quota
    plan = manifest["plan"]
    assert plan["scarce_subset"] == "repeat" and plan["shortfall_tokens"] == 0
    assert plan["scarce"] == {DM: {"available": supply, "needed": quota}}
    assert plan["epochs"][DM] == pytest.approx(quota / supply, abs=1e-6)
    assert corpus_budget_shortfall(str(prefix)) is None

    by_digest = {hashlib.sha256(t.encode()).digest()[:16]: t for t in pretrain_dm}
    assert hashlib.sha256(heldout_dm.encode()).digest()[:16] not in {d for d, _ in dm_sequences(prefix)}
    cut, uses = 0, dict.fromkeys(by_digest, 0)
    for digest, tokens in dm_sequences(prefix):
        reference = reference_tokenizer().encode(by_digest[digest]).ids  # a pretraining document, nothing else
        uses[digest] += 1
        if len(tokens) == len(reference):
            assert tokens.tolist() == reference
        else:
            assert tokens.tolist() == reference[:len(tokens)]
            cut += 1
    assert cut == 1 and all(n >= quota // supply for n in uses.values()) and sum(uses.values()) >= 5

    # Resume: the corpus rebuilt from the cached parts is the same bytes (the repeat order is seeded).
    before = {p.name: p.read_bytes() for p in prefix.parent.iterdir() if not p.name.endswith(".json")}
    prefix.with_suffix(".manifest.json").unlink()
    preprocess(tmp_path / "out", "--keep-cache")
    assert before == {p.name: p.read_bytes() for p in prefix.parent.iterdir() if not p.name.endswith(".json")}


def test_shrink_records_the_shortfall_that_pretraining_refuses(tmp_path):
    _, _, _, supply, budget, quota = scarce_corpus()
    result = preprocess(tmp_path / "out", "--scarce-subset", "shrink")
    assert f"'{DM}' has {supply:,} pretraining tokens" in result.stderr and f"{quota:,} needed" in result.stderr
    prefix = tmp_path / "out" / "D6" / "pretrain"
    manifest = json.loads(prefix.with_suffix(".manifest.json").read_text())
    written = manifest["tokens"]
    assert written <= 6 * supply < budget and manifest["subsets"][DM]["tokens"] <= supply
    assert written > 6 * supply - 10  # the most the input covers at the shares (to rounding)
    plan = manifest["plan"]
    assert (plan["requested_tokens"], plan["shortfall_tokens"]) == (budget, budget - written)
    message = corpus_budget_shortfall(str(prefix))
    assert message is not None
    for part in (str(prefix), DM, f"{supply:,}", f"{quota:,}", f"{budget:,}", f"{written:,}", "repeat"):
        assert part in message, part

    # `ccmega pretrain` refuses it, and takes it when told to (checked by a dry run: no training needed)
    train = ["pretrain", "--preset", "qwen3-200m", "--data", str(prefix), "--seq-length", "64", "--steps", "2",
             "--global-batch-size", "2", "--micro-batch-size", "1", "--warmup-steps", "0", "--run-dir",
             str(tmp_path / "run")]
    refused = run_ccmega(*train, check=False)
    assert refused.returncode == 2 and message in refused.stderr
    assert "--set data.allow_short_corpus=true" in refused.stderr
    taken = run_ccmega(*train, "--set", "data.allow_short_corpus=true", "--dry-run", "--world-size", "1", check=False)
    assert taken.returncode == 0, taken.stdout[-3000:] + taken.stderr[-3000:]


def test_fail_names_subset_counts_and_choices_and_writes_nothing(tmp_path):
    _, _, _, supply, budget, quota = scarce_corpus()
    result = preprocess(tmp_path / "out", "--scarce-subset", "fail", check=False)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("ccmega preprocess: error: D6/pretrain: ")
    for part in (f"'{DM}' has {supply:,} pretraining tokens", f"{quota:,} needed", f"{budget:,}",
                 "repeat takes further passes", "shrink writes"):
        assert part in error, part
    assert not list((tmp_path / "out").glob("D6/*"))

    # repeat beyond --max-epochs (2.5 epochs needed) stops the same way, saying why.
    capped = preprocess(tmp_path / "capped", "--max-epochs", "2", check=False)
    assert capped.returncode == 1 and not list((tmp_path / "capped").glob("D6/*"))
    assert f"'{DM}' would need {quota / supply:.2f} epochs, over --max-epochs 2" in capped.stderr
    assert f"'{DM}' has {supply:,} pretraining tokens" in capped.stderr


def test_shortfall_check_without_manifest_or_for_heldout_sets(tmp_path):
    assert corpus_budget_shortfall(str(tmp_path / "D6" / "pretrain")) is None
    (tmp_path / "test.manifest.json").write_text(json.dumps(
        {"recipe": "D6", "tokens": 1024, "plan": {"requested_samples": 4, "planned_samples": 2}}))
    assert corpus_budget_shortfall(str(tmp_path / "test")) is None
