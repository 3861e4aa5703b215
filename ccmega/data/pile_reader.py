"""Streams The Pile's `*.jsonl.zst` shards line by line, never holding a shard (or more than one line).

Parsing and validation (`parse_record`) are separate from streaming so workers can parse in parallel;
every problem is an `InputError` naming the file, the line and the field.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import zstandard

_READ_BLOCK = 1 << 20


class InputError(ValueError):
    """A bad input line; `where` is 'file:line'."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason

    def record(self) -> dict:
        return {"file": self.path, "line": self.line, "reason": self.reason}


def list_shards(inputs: list[str]) -> list[Path]:
    """Shards from folders (their *.jsonl.zst, recursively, sorted), globs (sorted) or files (as given)."""
    shards: list[Path] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(Path(item).rglob("*.jsonl.zst"))
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True))
        else:
            found = [Path(item)]
        if not found:
            raise FileNotFoundError(f"no *.jsonl.zst shard found for input {item!r}")
        for path in found:
            if not path.is_file():
                raise FileNotFoundError(f"input shard not found: {path}")
        shards += found
    return list(dict.fromkeys(shards))  # a shard named twice is read once


def iter_lines(path: str | Path, position: list[int] | None = None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without the newline). Raises InputError on a truncated stream.
    `position[0]`, when given, follows the compressed bytes read so far (for progress and ETA).

    Decompresses through `decompressobj` rather than `stream_reader` because the latter ends silently
    at a cut-off frame; here an unfinished frame at end of file is reported with the line it cut.
    """
    path = str(path)
    line_no, pending = 0, []  # `pending`: pieces of a line not yet terminated (a line may be 50 MB+)
    decompressor, frame_open = zstandard.ZstdDecompressor(), False
    stream = decompressor.decompressobj()
    with open(path, "rb") as f:
        while True:
            block = f.read(_READ_BLOCK)
            if not block:
                break
            if position is not None:
                position[0] = f.tell()
            while block:
                try:
                    out = stream.decompress(block)
                except zstandard.ZstdError as exc:
                    raise InputError(path, line_no + 1, f"corrupt zstd stream ({exc})") from None
                frame_open = not stream.eof
                block = stream.unused_data if stream.eof else b""
                if stream.eof:  # next concatenated frame, if any
                    stream = decompressor.decompressobj()
                start = 0
                while (end := out.find(b"\n", start)) >= 0:
                    line_no += 1
                    if pending:
                        pending.append(out[start:end])
                        yield line_no, b"".join(pending)
                        pending = []
                    else:
                        yield line_no, out[start:end]
                    start = end + 1
                if start < len(out):
                    pending.append(out[start:])
    if frame_open:
        raise InputError(path, line_no + 1, "truncated zstd stream (file ends inside a frame)")
    if pending:
        line_no += 1
        yield line_no, b"".join(pending)


@dataclass(frozen=True)
class Document:
    text: str
    subset: str
    utf8: bytes  # the text's UTF-8 bytes: what the split hash is taken over
    empty: bool = False  # no non-whitespace character: The Pile has such records; callers skip and count them


def parse_record(raw: bytes, path: str, line: int, wanted: frozenset[str] | None) -> Document | str:
    """A Document (possibly `empty`), or the subset name (str) of a well-formed record that is not wanted.
    Corrupt input raises InputError; an empty text is valid input, not an error."""
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise InputError(path, line, f"undecodable bytes: not UTF-8 at byte {exc.start} of the line") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, line, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(record, dict):
        raise InputError(path, line, f"expected a JSON object, got {type(record).__name__}")
    meta = record.get("meta")
    if meta is None:
        raise InputError(path, line, "missing field 'meta'")
    if not isinstance(meta, dict) or not isinstance(meta.get("pile_set_name"), str):
        raise InputError(path, line, "missing or non-string field 'meta.pile_set_name'")
    subset = meta["pile_set_name"]
    if wanted is not None and subset not in wanted:
        return subset
    text = record.get("text")
    if text is None:
        raise InputError(path, line, "missing field 'text'")
    if not isinstance(text, str):
        raise InputError(path, line, f"field 'text' is {type(text).__name__}, not a string")
    if not text.strip():
        return Document("", subset, b"", empty=True)
    try:
        utf8 = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(path, line, f"undecodable text: lone surrogate {text[exc.start]!r} "
                                     f"at character {exc.start} of field 'text'") from None
    return Document(text, subset, utf8)
