"""The random-text corpus of the paper's §4.6: documents of random upper/lowercase letters and punctuation.

Document i of stream s is a pure function of (seed, s, i), so any worker can make any document and the
corpus is the same for any number of workers. Streams 0, 1, 2 feed pretrain, finetune and test.
"""
from __future__ import annotations

import string

import numpy as np

ALPHABET = np.frombuffer((string.ascii_letters + string.punctuation).encode("ascii"), dtype=np.uint8)
MIN_CHARS, MAX_CHARS = 1024, 8192


def random_document(seed: int, stream: int, index: int) -> str:
    rng = np.random.default_rng([seed, stream, index])
    length = int(rng.integers(MIN_CHARS, MAX_CHARS + 1))
    return ALPHABET[rng.integers(0, len(ALPHABET), size=length)].tobytes().decode("ascii")
