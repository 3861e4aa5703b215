"""End to end on mini_pile with Qwen3: shares, round trip, held-out samples, zero overlap, resume.

Outputs are read back with megatron-core's IndexedDataset and checked against `tokenizers` directly."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tokenizers

from ccmega.data.indexed_writer import IndexedDatasetReader, IndexedDatasetWriter
from ccmega.data.tokenizers import default_tokenizer_dir
from ccmega.presets import DATASET_RECIPES, PILE_SUBSETS
from data_helpers import RUN_ARGS, SCRATCH, mini_pile, qwen_outputs, read_documents, run_ccmega

EOD = 151643
BUDGET = 200_000


@pytest.fixture(scope="module")
def reference_tokenizer():
    return tokenizers.Tokenizer.from_file(str(default_tokenizer_dir() / "tokenizer.json"))


@pytest.fixture(scope="module")
def source_texts():
    """sha256 prefix of each mini_pile train document -> (text, subset), computed independently."""
    texts = {}
    for shard in sorted((mini_pile() / "train").glob("*.jsonl.zst")):
        for doc in read_documents(shard):
            digest = hashlib.sha256(doc["text"].encode()).digest()[:16]
            texts[digest] = (doc["text"], doc["meta"]["pile_set_name"])
    return texts


def megatron_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


@pytest.mark.parametrize("recipe", [f"D{k}" for k in range(1, 7)])
def test_pretrain_shares_match_the_recipe(recipe, source_texts):
    prefix = qwen_outputs() / recipe / "pretrain"
    dataset = megatron_dataset(prefix)
    sources = np.load(f"{prefix}.sources.npy")
    lengths = dataset.sequence_lengths
    assert int(lengths.sum()) == BUDGET
    tokens_by_subset = dict.fromkeys(PILE_SUBSETS, 0)
    for i in range(len(dataset)):
        assert dataset[i][-1] == EOD and EOD not in dataset[i][:-1].tolist()
        _, subset = source_texts[bytes(sources["digest"][i]).ljust(16, b"\0")]  # numpy strips trailing NULs
        tokens_by_subset[subset] += int(lengths[i])
    for subset, share in DATASET_RECIPES[recipe].shares().items():
        assert abs(tokens_by_subset[subset] - share * BUDGET) <= 0.005 * BUDGET
    expected_absent = set(PILE_SUBSETS) - set(DATASET_RECIPES[recipe].shares())
    assert all(tokens_by_subset[s] == 0 for s in expected_absent)
    manifest = json.loads(prefix.with_suffix(".manifest.json").read_text())
    assert manifest["tokens"] == BUDGET
    assert manifest["tokenizer"]["identity"] == hashlib.sha256(
        (default_tokenizer_dir() / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["tokenize"]["skipped_subsets"].keys() <= {"Wikipedia (en)", "FreeLaw"}
    assert manifest["created_by"].startswith("ccmega preprocess --")  # the command as typed, named once


def test_round_trip_detokenised_documents_equal_sources(source_texts, reference_tokenizer):
    prefix = qwen_outputs() / "D6" / "pretrain"
    dataset = megatron_dataset(prefix)
    sources = np.load(f"{prefix}.sources.npy")
    whole = 0
    for i in range(len(dataset)):
        text, _ = source_texts[bytes(sources["digest"][i]).ljust(16, b"\0")]  # numpy strips trailing NULs
        ids = dataset[i][:-1].tolist()
        reference = reference_tokenizer.encode(text).ids
        if len(ids) == len(reference):
            assert ids == reference
            assert reference_tokenizer.decode(ids, skip_special_tokens=False) == text
            whole += 1
        else:  # the one document per subset cut to meet its quota: a prefix of the source's tokens
            assert ids == reference[:len(ids)]
    assert whole >= len(dataset) - len(PILE_SUBSETS)


@pytest.mark.parametrize("split,count", [("finetune", 40), ("test", 20)])
def test_heldout_samples_are_windows_of_heldout_documents(split, count, source_texts, reference_tokenizer):
    for recipe in ("D1", "D6"):
        prefix = qwen_outputs() / recipe / split
        dataset = megatron_dataset(prefix)
        sources = np.load(f"{prefix}.sources.npy")
        assert len(dataset) == count and set(dataset.sequence_lengths.tolist()) == {512}
        subsets = []
        for i in range(len(dataset)):
            text, subset = source_texts[bytes(sources["digest"][i]).ljust(16, b"\0")]  # numpy strips trailing NULs
            start = int(sources["start"][i])
            assert start % 512 == 0
            assert dataset[i].tolist() == reference_tokenizer.encode(text).ids[start:start + 512]
            subsets.append(subset)
        if recipe == "D1":
            assert set(subsets) == {"Pile-CC"}
        else:  # D6: 1/6 Pile-CC, 1/3 ArXiv, 1/3 Github, 1/6 DM Mathematics, by largest remainder
            want = {"Pile-CC": count / 6, "ArXiv": count / 3, "Github": count / 3, "DM Mathematics": count / 6}
            assert all(abs(subsets.count(s) - n) < 1 for s, n in want.items())


def test_random_corpus(reference_tokenizer):
    prefix = qwen_outputs() / "random" / "pretrain"
    dataset = megatron_dataset(prefix)
    assert int(dataset.sequence_lengths.sum()) == BUDGET
    text = reference_tokenizer.decode(dataset[0][:-1].tolist())
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                  "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")  # the default alphabet: §4.6's, digits included
    assert len(text) >= 1024 and set(text) == allowed


def test_verify_proves_zero_overlap_and_catches_a_planted_one(tmp_path):
    ok = run_ccmega("verify-splits", str(qwen_outputs()))
    assert "ZERO overlap" in ok.stdout and "pretrain ∩ test: 0 documents" in ok.stdout
    planted = tmp_path / "planted"
    shutil.copytree(qwen_outputs(), planted, ignore=shutil.ignore_patterns(".cache"))
    sample = IndexedDatasetReader(planted / "D1" / "test")[3].copy()
    pretrain = IndexedDatasetReader(planted / "D3" / "pretrain")
    docs = [np.asarray(pretrain[i]) for i in range(len(pretrain))]
    docs[5] = np.concatenate([docs[5][:7], sample, docs[5][7:]])  # a test sample inside a D3 document
    with IndexedDatasetWriter(planted / "D3" / "pretrain", np.int32) as writer:
        for doc in docs:
            writer.add_document(doc)
    caught = run_ccmega("verify-splits", str(planted), check=False)
    assert caught.returncode == 1
    assert "D1/test (20 samples): D1 0, D2 0, D3 1," in caught.stdout


def test_killed_then_rerun_ends_with_the_same_bytes(tmp_path):
    args = ["preprocess", "--input", str(mini_pile() / "train"), "--recipes", "D1,D5", "--workers", "1",
            "--part-mb", "1.5", *RUN_ARGS]
    reference = tmp_path / "uninterrupted"
    run_ccmega(*args, "--output", str(reference))

    resumed = tmp_path / "resumed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "ccmega.cli", *args, "--output", str(resumed)],
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(resumed.glob(".cache/*/*/part-00001.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # our own child's session: it and its pool workers
    process.wait()
    assert list(resumed.glob(".cache/*/*/part-00001.json")), "no part committed before the kill"
    assert not list(resumed.glob("D*/*.manifest.json"))
    run_ccmega(*args, "--output", str(resumed))
    files = sorted(p.relative_to(reference) for p in reference.glob("D*/*") if not p.name.endswith(".json"))
    assert len(files) == 2 * 3 * 3  # 2 recipes x 3 splits x (.bin, .idx, .sources.npy)
    for name in files:
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
