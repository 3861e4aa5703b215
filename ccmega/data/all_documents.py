"""`ccmega preprocess --all-documents`: every document, in input order, each followed by EOD, into one
indexed dataset: the same job as Megatron-LM's `tools/preprocess_data.py --append-eod`, with the same
bytes (benchmarks/preprocess.py compares them), at ccmega's speed."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ccmega.data.indexed_writer import IndexedDatasetWriter, token_dtype
from ccmega.fileio import atomic_write_bytes
from ccmega.data.pile_reader import InputError
from ccmega.data.progress import Progress, format_seconds
from ccmega.data.tokenize_stage import StageConfig, add_counts, shard_batches, tokenize_batch
from ccmega.data.workers import WorkerPool


def write_all_documents(shards: list[Path], out: Path, tokenizer: dict, args, started: float,
                        pool: WorkerPool) -> int:
    dtype = np.dtype(token_dtype(tokenizer["vocab_size"]))
    config = StageConfig(tokenizer["path"], args.tokenizer_backend, None, 0.0, 0.0, 0, args.on_error == "skip",
                         dtype.name)
    eod = np.array([tokenizer["eod_id"]], dtype=dtype)
    prefix = out / "all" / "pretrain"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in shards) or 1
    progress = Progress("tokenize", enabled=not args.quiet)
    tokens_written, errors, empty, done = 0, [], {}, 0
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for shard in shards:
            position = [0]
            tasks = (((str(shard), batch, config), size) for batch, size in shard_batches(shard, position))
            for result in pool.map_ordered(tokenize_batch, tasks):
                if result["errors"] and not config.skip_errors:
                    error = result["errors"][0]
                    raise InputError(error["file"], error["line"], error["reason"])
                errors += result["errors"]
                add_counts(empty, result["empty"])
                ends = np.cumsum(result["docs"]["ntokens"])
                for start, end in zip(ends - result["docs"]["ntokens"], ends):
                    writer.add_document(np.concatenate([result["tokens"][start:end], eod]))
                tokens_written += int(result["tokens"].size) + len(ends)
                progress.update(docs=len(ends), tokens=int(result["tokens"].size), nbytes=result["bytes"],
                                fraction=(done + position[0]) / total)
            done += shard.stat().st_size
    progress.close()
    manifest = {"recipe": "all", "split": "pretrain", "documents": writer.num_documents, "tokens": tokens_written,
                "tokenizer": tokenizer, "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in shards],
                "empty_documents": empty, "errors_skipped": errors, "elapsed_seconds": round(time.monotonic() - started, 3)}
    atomic_write_bytes(prefix.with_suffix(".manifest.json"), json.dumps(manifest, indent=1).encode())
    print(f"ccmega preprocess: {writer.num_documents:,} documents, {tokens_written:,} tokens "
          f"in {format_seconds(time.monotonic() - started)} -> {prefix}.bin/.idx", file=sys.stderr)
    return 0
