"""A process pool whose workers each load the tokenizer once, with ordered results and bounded
in-flight work (multiprocessing's imap reads its input ahead without limit, which a shard of 50 MB
documents would turn into gigabytes)."""
from __future__ import annotations

import multiprocessing
from collections import deque
from typing import Callable, Iterator

MAX_PENDING_BYTES = 64 << 20  # in-flight input bound, whatever the number of workers

_tokenizer = None


def worker_tokenizer():
    """The tokenizer loaded in this worker process."""
    return _tokenizer


def _load(tokenizer_path: str, backend: str) -> None:
    global _tokenizer
    from ccmega.data.tokenizers import load_tokenizer

    _tokenizer = load_tokenizer(tokenizer_path, backend=backend)


class WorkerPool:
    """workers=0 runs tasks in this process (debugging, tiny inputs)."""

    def __init__(self, workers: int, tokenizer_path: str, backend: str):
        self.workers = workers
        if workers:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(
                workers, initializer=_load, initargs=(tokenizer_path, backend))
        else:
            _load(tokenizer_path, backend)
            self.pool = None

    def map_ordered(self, function: Callable, tasks: Iterator[tuple[tuple, int]]) -> Iterator:
        """`function(*task)` for each (task, input size in bytes), results in task order."""
        if self.pool is None:
            yield from (function(*task) for task, _ in tasks)
            return
        pending: deque = deque()
        in_flight = 0
        for task, size in tasks:
            while pending and (len(pending) >= 2 * self.workers or in_flight + size > MAX_PENDING_BYTES):
                result, done = pending.popleft()
                in_flight -= done
                yield result.get()
            pending.append((self.pool.apply_async(function, task), size))
            in_flight += size
        while pending:
            yield pending.popleft()[0].get()

    def close(self, abort: bool = False) -> None:
        if self.pool is not None:
            (self.pool.terminate if abort else self.pool.close)()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(abort=exc_type is not None)
