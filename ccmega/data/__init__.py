"""Data: Pile reading, dataset recipes, tokenizers, preprocessing into megatron indexed datasets."""
from __future__ import annotations

from pathlib import Path


def sample_data_dir() -> Path:
    """The small Pile-format sample bundled with ccmega (train/*.jsonl.zst, val.jsonl.zst, test.jsonl.zst)."""
    return Path(__file__).resolve().parent.parent / "resources" / "sample_pile"
