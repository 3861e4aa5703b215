"""Stage 1 of preprocessing: tokenize the wanted Pile documents once, into resumable cached parts.

A shard is cut into parts of about `part_bytes` of JSON lines (boundaries depend only on the input),
each tokenized by a pool of worker processes and committed atomically as three files:
`.tokens` (the documents' tokens back to back, no EOD), `.docs.npy` (one row a document: line, subset,
split, text digest, token count) and `.json` (counts, skips, errors), written last as the commit
marker. A rerun re-reads the shards but skips every committed part, so a killed run continues where
it stopped. Reading stops after the first part at which every need of the recipes is covered.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ccmega.data.indexed_writer import temp_path
from ccmega.fileio import atomic_write_bytes
from ccmega.data.pile_reader import InputError, iter_lines, parse_record
from ccmega.data.progress import Progress
from ccmega.data.splits import DIGEST_BYTES, PRETRAIN, split_of, text_digest
from ccmega.data.tokenizers import TEXT_RULE
from ccmega.data.workers import WorkerPool, worker_tokenizer

DOC_DTYPE = np.dtype([("line", "<i8"), ("subset", "u1"), ("split", "u1"),
                      ("digest", f"S{DIGEST_BYTES}"), ("ntokens", "<i8")])
# 2: empty documents are counted ("empty_documents"), not errors; text is tokenized as text (TEXT_RULE).
PART_FORMAT = 2
BATCH_BYTES = 1 << 20  # JSON bytes per task sent to a worker; a bigger line travels alone


@dataclass(frozen=True)
class StageConfig:
    tokenizer_path: str
    tokenizer_backend: str
    subsets: tuple[str, ...] | None  # None: every subset (code 255)
    finetune_fraction: float
    test_fraction: float
    part_bytes: int
    skip_errors: bool
    token_dtype: str

    def cache_key(self, tokenizer_identity: str) -> str:
        """Parts are valid only for the same tokenizer file and rules, splitting settings and part format."""
        fields = dict(self.__dict__, tokenizer_path=None, tokenizer_identity=tokenizer_identity,
                      text_rule=TEXT_RULE, part_format=PART_FORMAT)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Part:
    """A committed part: where its files are and what it holds."""

    stem: Path
    summary: dict
    docs: np.ndarray

    @property
    def tokens_path(self) -> Path:
        return self.stem.with_suffix(".tokens")


@dataclass
class Needs:
    """What the recipes ask of the input, per subset: pretraining tokens (EOD included) and held-out
    windows of `context_tokens` per split. Reading stops once every need is covered."""

    pretrain_tokens: dict[int, int]
    heldout_windows: dict[tuple[int, int], int]  # (split, subset) -> windows
    context_tokens: int
    supply_tokens: dict[int, int] = field(default_factory=dict)
    supply_windows: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, docs: np.ndarray) -> None:
        for subset in np.unique(docs["subset"]):
            mine = docs[docs["subset"] == subset]
            pre = mine[mine["split"] == PRETRAIN]
            self.supply_tokens[subset] = self.supply_tokens.get(subset, 0) + int((pre["ntokens"] + 1).sum())
            for split in np.unique(mine["split"]):
                if split != PRETRAIN:
                    windows = int((mine[mine["split"] == split]["ntokens"] // self.context_tokens).sum())
                    key = (int(split), int(subset))
                    self.supply_windows[key] = self.supply_windows.get(key, 0) + windows

    def fraction_covered(self) -> float:
        ratios = [min(1.0, self.supply_tokens.get(s, 0) / n) for s, n in self.pretrain_tokens.items() if n]
        ratios += [min(1.0, self.supply_windows.get(k, 0) / n) for k, n in self.heldout_windows.items() if n]
        return min(ratios, default=1.0)


# ---- worker side -------------------------------------------------------------------------------
def tokenize_batch(path: str, lines: list[tuple[int, bytes]], config: StageConfig) -> dict:
    """Parse, validate, split-assign and tokenize one batch of raw lines (in a worker)."""
    tokenizer = worker_tokenizer()
    wanted = frozenset(config.subsets) if config.subsets is not None else None
    dtype = np.dtype(config.token_dtype)
    rows, arrays, skipped, empty, errors, nbytes = [], [], {}, {}, [], 0
    for line_no, raw in lines:
        nbytes += len(raw) + 1
        try:
            doc = parse_record(raw, path, line_no, wanted)
        except InputError as exc:
            errors.append(exc.record())
            if not config.skip_errors:
                break
            continue
        if isinstance(doc, str):
            skipped[doc] = skipped.get(doc, 0) + 1
            continue
        if doc.empty:
            empty[doc.subset] = empty.get(doc.subset, 0) + 1
            continue
        digest = text_digest(doc.utf8)
        tokens = tokenizer.encode_array(doc.text).astype(dtype, copy=False)
        code = config.subsets.index(doc.subset) if config.subsets is not None else 255
        rows.append((line_no, code,
                     split_of(digest, config.finetune_fraction, config.test_fraction), digest, tokens.size))
        arrays.append(tokens)
        del doc
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    return {"docs": np.array(rows, dtype=DOC_DTYPE), "tokens": tokens, "skipped": skipped, "empty": empty,
            "errors": errors, "lines": len(lines), "bytes": nbytes}


# ---- main side ---------------------------------------------------------------------------------
def shard_batches(path: Path, position: list[int]) -> Iterator[tuple[list, int]]:
    batch, size = [], 0
    for line_no, raw in iter_lines(path, position):
        batch.append((line_no, raw))
        size += len(raw) + 1
        if size >= BATCH_BYTES:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def _parts(path: Path, part_bytes: int, position: list[int]) -> Iterator[Iterator[tuple[list, int]]]:
    """The shard's batches grouped into parts of about `part_bytes` (each part must be consumed)."""
    batches = shard_batches(path, position)
    pending = next(batches, None)
    while pending is not None:
        def one_part():
            nonlocal pending
            total = 0
            while pending is not None and total < part_bytes:
                batch, size = pending
                total += size
                yield batch, size
                pending = next(batches, None)
        yield one_part()


def _shard_tag(index: int, path: Path) -> str:
    stat = path.stat()
    ident = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{index:04d}-{path.name.removesuffix('.jsonl.zst')}-{ident}"


def load_part(stem: Path) -> Part | None:
    marker = stem.with_suffix(".json")
    if not marker.exists():
        return None
    return Part(stem, json.loads(marker.read_text()), np.load(stem.with_suffix(".docs.npy")))


def _write_part(stem: Path, shard: Path, index: int, results: Iterator[dict], subsets, progress: Progress,
                fraction) -> Part:
    """Consume one part's results, streaming tokens to disk; commit atomically or raise."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tokens_tmp = temp_path(stem.with_suffix(".tokens"))
    docs, skipped, empty, errors, lines, nbytes = [], {}, {}, [], 0, 0
    try:
        with open(tokens_tmp, "wb") as out:
            for result in results:
                docs.append(result["docs"])
                out.write(result["tokens"].tobytes())
                add_counts(skipped, result["skipped"])
                add_counts(empty, result["empty"])
                errors += result["errors"]
                lines += result["lines"]
                nbytes += result["bytes"]
                progress.update(docs=len(result["docs"]), tokens=int(result["tokens"].size),
                                nbytes=result["bytes"], fraction=fraction())
    except BaseException:
        tokens_tmp.unlink(missing_ok=True)
        raise
    table = np.concatenate(docs) if docs else np.zeros(0, dtype=DOC_DTYPE)
    summary = {
        "shard": str(shard), "part": index, "lines": lines, "bytes": nbytes, "documents": int(len(table)),
        "tokens_by_subset": {subsets[s]: int(table["ntokens"][table["subset"] == s].sum())
                             for s in range(len(subsets))},
        "skipped_subsets": skipped, "empty_documents": empty, "errors": errors,
    }
    buffer = _npy_bytes(table)
    atomic_write_bytes(stem.with_suffix(".docs.npy"), buffer)
    os.replace(tokens_tmp, stem.with_suffix(".tokens"))
    atomic_write_bytes(stem.with_suffix(".json"), json.dumps(summary, indent=1).encode())
    return Part(stem, summary, table)


def add_counts(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """Add per-name counts into `total` (and return it)."""
    for name, count in more.items():
        total[name] = total.get(name, 0) + count
    return total


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def tokenize_parts(shards: list[Path], config: StageConfig, cache_dir: Path, needs: Needs, pool: WorkerPool,
                   show_progress: bool = True) -> tuple[list[Part], bool]:
    """Committed parts in input order, and whether the input ran out before the needs were covered."""
    total_compressed = sum(p.stat().st_size for p in shards) or 1
    progress = Progress("tokenize", enabled=show_progress)
    parts: list[Part] = []
    done_compressed = 0
    try:
        for shard_index, shard in enumerate(shards):
            position = [0]  # compressed bytes of this shard read so far

            def fraction():
                return max((done_compressed + position[0]) / total_compressed, needs.fraction_covered())

            for part_index, batches in enumerate(_parts(shard, config.part_bytes, position)):
                stem = cache_dir / _shard_tag(shard_index, shard) / f"part-{part_index:05d}"
                part = load_part(stem)
                if part is not None:
                    for _ in batches:  # committed by an earlier run: skip its lines
                        pass
                else:
                    tasks = (((str(shard), batch, config), size) for batch, size in batches)
                    results = _raise_first_error(pool.map_ordered(tokenize_batch, tasks), config.skip_errors)
                    part = _write_part(stem, shard, part_index, results, config.subsets, progress, fraction)
                parts.append(part)
                needs.add(part.docs)
                if needs.fraction_covered() >= 1.0:
                    return parts, False
            done_compressed += shard.stat().st_size
        return parts, True
    finally:
        progress.close()


def _raise_first_error(results: Iterator[dict], skip_errors: bool) -> Iterator[dict]:
    for result in results:
        if result["errors"] and not skip_errors:
            error = result["errors"][0]
            raise InputError(error["file"], error["line"], error["reason"])
        yield result
