"""Tokenized random-text corpora (paper §4.6): pretraining documents, and held-out windows."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ccmega.data.random_text import random_document
from ccmega.data.workers import WorkerPool, worker_tokenizer

DOCS_PER_TASK = 64


def tokenize_random_documents(seed: int, alphabet: str, stream: int, first: int, count: int,
                              dtype: str) -> list[np.ndarray]:
    tokenizer = worker_tokenizer()
    return [tokenizer.encode_array(random_document(seed, stream, i, alphabet)).astype(dtype, copy=False)
            for i in range(first, first + count)]


def random_documents(pool: WorkerPool, seed: int, alphabet: str, stream: int, dtype: str) -> Iterator[np.ndarray]:
    """Tokenized documents 0, 1, 2, ... of a stream (endless; the caller stops)."""
    def tasks():
        first = 0
        while True:
            yield (seed, alphabet, stream, first, DOCS_PER_TASK, dtype), DOCS_PER_TASK * 4096
            first += DOCS_PER_TASK

    for batch in pool.map_ordered(tokenize_random_documents, tasks()):
        yield from batch


def random_pretrain(pool: WorkerPool, seed: int, alphabet: str, budget: int, eod: int,
                    dtype: str) -> Iterator[np.ndarray]:
    """Documents + EOD until exactly `budget` tokens (the last one cut to fit)."""
    remaining = budget
    for tokens in random_documents(pool, seed, alphabet, 0, dtype):
        if remaining <= 1:
            return
        tokens = tokens[:remaining - 1]
        remaining -= tokens.size + 1
        yield np.concatenate([tokens, np.array([eod], dtype=dtype)])


def random_windows(pool: WorkerPool, seed: int, alphabet: str, stream: int, samples: int, context: int,
                   dtype: str) -> Iterator[np.ndarray]:
    """`samples` windows of `context` tokens cut from consecutive documents of a held-out stream."""
    produced = 0
    for tokens in random_documents(pool, seed, alphabet, stream, dtype):
        for start in range(0, tokens.size - context + 1, context):
            if produced == samples:
                return
            produced += 1
            yield tokens[start:start + context]
        if produced == samples:
            return
