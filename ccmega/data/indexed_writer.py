"""Writes megatron-core indexed datasets (`.bin` + `.idx`) without importing torch or megatron.

The on-disk format is megatron.core.datasets.indexed_dataset's (version 1, "MMIDIDX"): the `.bin` holds
the tokens of every sequence back to back; the `.idx` holds a header, the dtype code, the sequence and
document counts, then int32 sequence lengths, int64 byte pointers and int64 document indices.
Each document is one sequence, as in Megatron-LM's preprocess_data.py without sentence splitting.
tests/test_data_indexed.py asserts byte equality with megatron's own IndexedDatasetBuilder.

Both files are written under temporary names and renamed into place only when complete, `.bin` first:
an `.idx` beside a `.bin` therefore always describes a whole `.bin`.
"""
from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

from ccmega.fileio import atomic_write_bytes

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                np.float64: 6, np.float32: 7, np.uint16: 8}


def token_dtype(vocab_size: int) -> type:
    """megatron's DType.optimal_dtype: uint16 below 65,500 entries, else int32 (Qwen3).

    megatron-core's format has no uint32 code, so int32 is what its readers accept for Qwen3's
    151,669 ids (identical bytes to uint32 for every id below 2**31)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def temp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


class IndexedDatasetWriter:
    """Append documents, then `finalize()`; `prefix` + .bin/.idx appear only then."""

    def __init__(self, prefix: str | Path, dtype: type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.bin_path, self.idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        self._bin = open(temp_path(self.bin_path), "wb")
        self._lengths = array("q")  # 8 bytes a document: fine for hundreds of millions

    def add_document(self, tokens) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(array.tobytes())
        self._lengths.append(array.size)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.array(self._lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        count = len(lengths)
        index = b"".join([
            _INDEX_HEADER, struct.pack("<Q", 1), struct.pack("<B", _DTYPE_CODES[self.dtype.type]),
            struct.pack("<Q", count), struct.pack("<Q", count + 1),
            lengths.astype(np.int32).tobytes(), pointers.tobytes(),
            np.arange(count + 1, dtype=np.int64).tobytes(),
        ])
        os.replace(temp_path(self.bin_path), self.bin_path)
        atomic_write_bytes(self.idx_path, index)

    def abandon(self) -> None:
        self._bin.close()
        temp_path(self.bin_path).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.finalize()
        else:
            self.abandon()


def read_index(prefix: str | Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths, byte pointers) of an indexed dataset, read without megatron."""
    with open(f"{prefix}.idx", "rb") as f:
        if f.read(9) != _INDEX_HEADER:
            raise ValueError(f"{prefix}.idx: not a megatron indexed dataset index")
        f.read(8)
        code = struct.unpack("<B", f.read(1))[0]
        count, _documents = struct.unpack("<QQ", f.read(16))
        lengths = np.frombuffer(f.read(4 * count), dtype=np.int32)
        pointers = np.frombuffer(f.read(8 * count), dtype=np.int64)
    dtype = np.dtype(next(t for t, c in _DTYPE_CODES.items() if c == code))
    return dtype, lengths, pointers


class IndexedDatasetReader:
    """Sequence access to a `.bin`/`.idx` pair by memory map (verify and tests; no torch)."""

    def __init__(self, prefix: str | Path):
        self.dtype, self.lengths, self.pointers = read_index(prefix)
        size = os.path.getsize(f"{prefix}.bin")
        self.tokens = (np.memmap(f"{prefix}.bin", dtype=self.dtype, mode="r") if size
                       else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = self.pointers[i] // self.dtype.itemsize
        return self.tokens[start:start + self.lengths[i]]
