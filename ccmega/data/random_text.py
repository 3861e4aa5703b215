"""The random-text corpus of the paper's §4.6: documents of characters drawn uniformly from an alphabet.

The paper is not consistent about the alphabet: §4.2 and Table 5's caption say upper/lowercase letters
and punctuation, §4.6 says punctuation and alphanumeric characters, and Table 5's reconstruction by the
random-text decoder is full of digits. A frozen decoder can only emit digits it met in pretraining, so
the default is §4.6's reading, letters + digits + punctuation (docs/data.md).

Document i of stream s is a pure function of (seed, alphabet, s, i), so any worker can make any document
and the corpus is the same for any number of workers. Streams 0, 1, 2 feed pretrain, finetune and test.
"""
from __future__ import annotations

import string

import numpy as np

ALPHABETS = {
    "letters-punctuation": string.ascii_letters + string.punctuation,               # §4.2, Table 5 caption
    "alphanumeric": string.ascii_letters + string.digits,
    "alphanumeric-punctuation": string.ascii_letters + string.digits + string.punctuation,  # §4.6, Table 5
}
DEFAULT_ALPHABET = "alphanumeric-punctuation"
MIN_CHARS, MAX_CHARS = 1024, 8192


def random_document(seed: int, stream: int, index: int, alphabet: str = DEFAULT_ALPHABET) -> str:
    characters = np.frombuffer(ALPHABETS[alphabet].encode("ascii"), dtype=np.uint8)
    rng = np.random.default_rng([seed, stream, index])
    length = int(rng.integers(MIN_CHARS, MAX_CHARS + 1))
    return characters[rng.integers(0, len(characters), size=length)].tobytes().decode("ascii")
