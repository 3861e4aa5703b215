"""Which split a document belongs to, and the seeded order in which documents are taken.

A document's split follows from the SHA-256 of its UTF-8 text alone (no seed, no recipe, no position),
so identical documents land in the same split in every recipe and every run: the held-out sets are
disjoint from every pretraining corpus by construction. The first 8 digest bytes pick the split; the
next 8, mixed with the seed, give the order in which documents are drawn (independent of the split);
a further pass over a scarce subset re-mixes those keys with the pass number.
"""
from __future__ import annotations

import hashlib

import numpy as np

PRETRAIN, FINETUNE, TEST = 0, 1, 2
SPLIT_NAMES = ("pretrain", "finetune", "test")
DIGEST_BYTES = 16


def text_digest(utf8: bytes) -> bytes:
    return hashlib.sha256(utf8).digest()[:DIGEST_BYTES]


def split_of(digest: bytes, finetune_fraction: float, test_fraction: float) -> int:
    """TEST for the lowest `test_fraction` of the hash range, FINETUNE for the next, else PRETRAIN."""
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return TEST
    if u < test_fraction + finetune_fraction:
        return FINETUNE
    return PRETRAIN


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def order_keys(digests: np.ndarray, seed: int, salt: np.ndarray | int = 0) -> np.ndarray:
    """uint64 sort keys: a seeded pseudo-random permutation of documents (salt: e.g. a chunk index)."""
    if len(digests) == 0:
        return np.zeros(0, dtype=np.uint64)
    low = np.frombuffer(np.ascontiguousarray(digests).tobytes(), dtype=">u8").reshape(-1, 2)[:, 1]
    seed_mix = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    salt = _splitmix64(np.asarray(salt, dtype=np.uint64) ^ np.uint64(0x632BE59BD9B4E019))
    return _splitmix64(low.astype(np.uint64) ^ seed_mix ^ salt)


def epoch_keys(keys: np.ndarray, epoch: int) -> np.ndarray:
    """Draw keys for a further pass (`epoch` >= 1) over documents whose first-pass keys are `keys`: a new
    seeded order each pass, so that the repeats of a scarce subset spread over the corpus."""
    return _splitmix64(np.asarray(keys, dtype=np.uint64) ^ _splitmix64(np.array([epoch], dtype=np.uint64))[0])
