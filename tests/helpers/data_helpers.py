"""Shared, cached helpers for the data tests (computed once per session, whichever test asks first).

Not fixtures in conftest.py (owned by the lead): plain functions with a cache, so every
tests/test_data_*.py module reuses the same tokenizer and preprocessed outputs."""
from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import zstandard

REPO = Path(__file__).resolve().parents[2]
MINI_PILE = REPO.parent / "shared" / "data" / "mini_pile"
SCRATCH = Path(tempfile.mkdtemp(prefix="ccmega-data-tests-"))

# Small budgets keep the suite fast; the held-out fractions are large so that a 2-shard corpus
# yields held-out documents of every subset (29 DM Mathematics documents in all).
RUN_ARGS = ["--tokens-per-dataset", "200k", "--finetune-samples", "40", "--test-samples", "20",
            "--finetune-fraction", "0.1", "--test-fraction", "0.1", "--seed", "7", "--quiet"]


def mini_pile() -> Path:
    if not MINI_PILE.exists():
        pytest.skip(f"mini_pile not found at {MINI_PILE} (the shared data folder beside the repo)")
    return MINI_PILE


def read_documents(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f))
        return [json.loads(line) for line in reader]


def write_shard(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = zstandard.ZstdCompressor().stream_writer(f)
        for line in lines:
            writer.write(line + b"\n")
        writer.flush(zstandard.FLUSH_FRAME)
    return path


def run_ccmega(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "ccmega.cli", *args], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"ccmega {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@functools.cache
def small_sentencepiece() -> Path:
    """A 1024-piece SentencePiece model trained on the bundled sample (a few seconds)."""
    model = SCRATCH / "spm" / "tiny.model"
    run_ccmega("train-tokenizer", "--input", "@sample", "--output", str(model), "--vocab-size", "1024",
               "--threads", "1")
    return model


@functools.cache
def qwen_outputs() -> Path:
    """D1..D6 + random with Qwen3 on mini_pile/train, 2 workers."""
    out = SCRATCH / "qwen"
    run_ccmega("preprocess", "--input", str(mini_pile() / "train"), "--output", str(out), "--workers", "2",
               "--part-mb", "3", *RUN_ARGS)
    return out
