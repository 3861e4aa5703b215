#!/usr/bin/env python
"""Preprocessing speed and memory, ccmega against its anchors, in one run (issue 3, item 8).

    python benchmarks/preprocess.py [--mini-pile ../shared/data/mini_pile] [--megatron-lm PATH] [--workers 2]

Rows (wall clock, start-up included; tokens are Qwen3 tokens written, EOD included):
  ccmega --all-documents    every document, in order, + EOD: the job of Megatron-LM's preprocess_data.py
  ccmega recipes            D1..D6 + random + held-out splits from the same input
  tokenizers encode_batch   raw Hugging Face `tokenizers`, one process per worker, no I/O of outputs
  Megatron-LM ...           tools/preprocess_data.py (and _fast.py) when --megatron-lm is given; otherwise
                            the figures recorded in the issue on this machine are printed, marked "recorded"
Also: the same job on a 4x larger input, peak RSS (whole process tree) with a 50 MB document in the input,
and byte equality of the --all-documents output with megatron-core's IndexedDatasetBuilder fed the
same documents in the same order (and with Megatron-LM's own output when it ran).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parent.parent
RECORDED = {  # issue 3, measured on this 2-core machine on mini_pile/train (7.13M tokens)
    "Megatron-LM preprocess_data.py, 2 workers (recorded)": 31.7,
    "Megatron-LM preprocess_data_fast.py (GigaToken) (recorded)": 14.1,
    "tokenizers encode_batch, 2 processes (recorded)": 16.7,
}


def run_tree(command: list[str], env=None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) summed over the process and its children."""
    import psutil

    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0

    def sample():
        nonlocal peak
        try:
            root = psutil.Process(process.pid)
            while process.poll() is None:
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
                time.sleep(0.02)
        except psutil.Error:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return time.monotonic() - started, peak


def ccmega(*args: str) -> list[str]:
    return [sys.executable, "-m", "ccmega.cli", "preprocess", "--quiet", *args]


def manifest_tokens(out: Path) -> int:
    return json.loads((out / "all" / "pretrain.manifest.json").read_text())["tokens"]


def decompress(shards: list[Path], target: Path) -> Path:
    with open(target, "wb") as out:
        for shard in shards:
            with open(shard, "rb") as f:
                shutil.copyfileobj(zstandard.ZstdDecompressor().stream_reader(f), out)
    return target


def _encode_half(args):
    path, texts = args
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(path)
    return sum(len(e.ids) + 1 for e in tok.encode_batch(texts))


def tokenizers_anchor(jsonl: Path, workers: int) -> tuple[float, int]:
    from ccmega.data.tokenizers import default_tokenizer_dir

    started = time.monotonic()
    texts = [json.loads(line)["text"] for line in open(jsonl, encoding="utf-8")]
    path = str(default_tokenizer_dir() / "tokenizer.json")
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        tokens = sum(pool.map(_encode_half, [(path, texts[i::workers]) for i in range(workers)]))
    return time.monotonic() - started, tokens


def megatron_builder_reference(jsonl: Path, prefix: Path) -> None:
    """What preprocess_data.py --append-eod writes, with megatron-core's builder and `tokenizers`."""
    import tokenizers
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from ccmega.data.tokenizers import default_tokenizer_dir

    tok = tokenizers.Tokenizer.from_file(str(default_tokenizer_dir() / "tokenizer.json"))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tok.get_vocab_size()))
    for line in open(jsonl, encoding="utf-8"):
        ids = tok.encode(json.loads(line)["text"]).ids + [151643]
        builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")


def same_bytes(prefix_a: Path, prefix_b: Path) -> bool:
    return all(Path(f"{prefix_a}{s}").read_bytes() == Path(f"{prefix_b}{s}").read_bytes() for s in (".bin", ".idx"))


def big_document_shard(source: Path, target: Path, megabytes: int = 50) -> Path:
    """One document of `megabytes` MB (mini_pile texts glued together), then the shard's own documents."""
    lines = [line for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(source, "rb")),
                                                encoding="utf-8")]
    texts, size = [], 0
    while size < megabytes * 1_000_000:
        for line in lines:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size >= megabytes * 1_000_000:
                break
    big = json.dumps({"text": "\n".join(texts), "meta": {"pile_set_name": "DM Mathematics"}})
    with open(target, "wb") as f:
        writer = zstandard.ZstdCompressor(level=3).stream_writer(f)
        writer.write(big.encode() + b"\n")
        for line in lines:
            writer.write(line.encode())
        writer.flush(zstandard.FLUSH_FRAME)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mini-pile", default=str(REPO.parent / "shared" / "data" / "mini_pile"))
    parser.add_argument("--megatron-lm", default=None, help="a Megatron-LM checkout (runs its tools/ as anchors)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    shards = sorted((Path(args.mini_pile) / "train").glob("*.jsonl.zst"))
    if not shards:
        sys.exit(f"no shards under {args.mini_pile}/train")
    w = str(args.workers)
    rows: list[tuple[str, float, int | None, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = decompress(shards, tmp / "train.jsonl")

        wall, rss = run_tree(ccmega("--input", *map(str, shards), "--output", str(tmp / "all"),
                                    "--all-documents", "--workers", w))
        tokens = manifest_tokens(tmp / "all")
        rows.append((f"ccmega --all-documents, {w} workers", wall, tokens, f"peak RSS {rss / 2**20:.0f} MiB"))

        one = tmp / "one.jsonl.zst"
        with open(one, "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(open(jsonl, "rb").readline()))
        wall_one, _ = run_tree(ccmega("--input", str(one), "--output", str(tmp / "one"), "--all-documents",
                                      "--workers", w))
        rows.append(("ccmega start-up (one-document input)", wall_one, None, "goal < 2 s"))

        wall, rss = run_tree(ccmega("--input", *map(str, shards), "--output", str(tmp / "recipes"),
                                    "--tokens-per-dataset", "1M", "--finetune-samples", "100",
                                    "--test-samples", "50", "--finetune-fraction", "0.1", "--test-fraction", "0.1",
                                    "--workers", w))
        rows.append((f"ccmega recipes D1..D6+random (1M each), {w} workers", wall, None,
                     f"peak RSS {rss / 2**20:.0f} MiB"))

        wall, tok = tokenizers_anchor(jsonl, args.workers)
        rows.append((f"tokenizers encode_batch, {w} processes", wall, tok, "tokenize only"))

        if args.megatron_lm:
            env = dict(os.environ, PYTHONPATH=args.megatron_lm)
            for script in ("preprocess_data.py", "preprocess_data_fast.py"):
                try:
                    wall, rss = run_tree([sys.executable, f"{args.megatron_lm}/tools/{script}", "--input", str(jsonl),
                                          "--output-prefix", str(tmp / f"mlm-{script}"), "--tokenizer-type",
                                          "HuggingFaceTokenizer", "--tokenizer-model",
                                          str(Path(json.loads((tmp / 'all/all/pretrain.manifest.json').read_text())
                                                   ["tokenizer"]["path"]).parent),
                                          "--append-eod", "--workers", w], env=env)
                    rows.append((f"Megatron-LM {script}, {w} workers", wall, tokens, ""))
                except RuntimeError as exc:
                    print(f"Megatron-LM {script} did not run: {str(exc).splitlines()[-1]}", file=sys.stderr)
        measured_megatron = any(r[0].startswith("Megatron-LM") for r in rows)
        for name, seconds in RECORDED.items():
            if not (measured_megatron and name.startswith("Megatron-LM")):
                rows.append((name, seconds, tokens, "recorded in the issue, same input and tokenizer"))

        big_dir = tmp / "big"
        big_dir.mkdir()
        for copy in range(4):
            for shard in shards:
                shutil.copy(shard, big_dir / f"{copy}-{shard.name}")
        wall, rss = run_tree(ccmega("--input", str(big_dir), "--output", str(tmp / "big-out"), "--all-documents",
                                    "--workers", w))
        rows.append((f"ccmega --all-documents, 4x input, {w} workers", wall, manifest_tokens(tmp / "big-out"),
                     f"peak RSS {rss / 2**20:.0f} MiB"))

        huge = big_document_shard(shards[0], tmp / "huge.jsonl.zst")
        wall, rss = run_tree(ccmega("--input", str(huge), "--output", str(tmp / "huge-out"), "--all-documents",
                                    "--workers", w))
        rows.append((f"ccmega --all-documents, 50 MB document + shard 00, {w} workers", wall,
                     manifest_tokens(tmp / "huge-out"), f"peak RSS {rss / 2**20:.0f} MiB (goal < 2048)"))

        megatron_builder_reference(jsonl, tmp / "reference")
        equal = same_bytes(tmp / "all" / "all" / "pretrain", tmp / "reference")
        equality = [f"bytes equal to megatron-core IndexedDatasetBuilder (+tokenizers) on the same documents: {equal}"]
        mlm = tmp / "mlm-preprocess_data.py_text_document"
        if Path(f"{mlm}.bin").exists():
            equality.append(f"bytes equal to Megatron-LM preprocess_data.py --append-eod: "
                            f"{same_bytes(tmp / 'all' / 'all' / 'pretrain', mlm)}")

    fastest_anchor = min(r[1] for r in rows if "Megatron" in r[0] or "tokenizers" in r[0])
    print(f"\n{'run':<66} {'wall s':>7} {'tokens/s':>10} {'vs fastest anchor':>18}  note")
    for name, wall, tokens, note in rows:
        rate = f"{tokens / wall / 1e3:.0f}k" if tokens else "-"
        print(f"{name:<66} {wall:7.2f} {rate:>10} {fastest_anchor / wall:17.2f}x  {note}")
    print("\n".join(equality))
    return 0


if __name__ == "__main__":
    sys.exit(main())
