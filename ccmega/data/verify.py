"""`ccmega verify-splits OUT`: prove that no held-out sample is in any pretraining corpus, by hashing.

Two independent checks over what `ccmega preprocess` wrote:
1. documents: the SHA-256 text digests of the source documents (`<split>.sources.npy`) of every
   fine-tune/test set against those of every pretraining corpus, and fine-tune against test;
2. content: every held-out sample (its exact token sequence, read from the .bin) is searched for in
   every pretraining token stream at every offset (rolling polynomial hash of each window of the
   sample's length, hits confirmed token by token), and fine-tune samples against test samples.
Prints the counts and exits 1 when anything overlaps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ccmega.data.indexed_writer import IndexedDatasetReader
from ccmega.data.splits import SPLIT_NAMES

_BASE = 0x100000001B3  # odd, so invertible modulo 2**64
_CHUNK = 1 << 22


def _powers(count: int, base: int) -> np.ndarray:
    powers = np.full(count, base, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)


def window_hashes(tokens: np.ndarray, width: int) -> np.ndarray:
    """Polynomial hash (mod 2**64) of every window of `width` tokens: sum x[i+j] * B**(width-1-j)."""
    n = len(tokens) - width + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    x = tokens.astype(np.uint64) + np.uint64(1)
    inverse = pow(_BASE, -1, 2**64)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(x) + 1, dtype=np.uint64)
        np.cumsum(x * _powers(len(x), inverse), dtype=np.uint64, out=prefix[1:])
        return (prefix[width:width + n] - prefix[:n]) * _powers(n + width - 1, _BASE)[width - 1:]


def sample_hashes(reader: IndexedDatasetReader) -> np.ndarray:
    return np.array([window_hashes(np.asarray(reader[i]), len(reader[i]))[0] for i in range(len(reader))],
                    dtype=np.uint64)


def find_in_stream(stream: np.ndarray, samples: list[np.ndarray], width: int) -> int:
    """How many of `samples` (all `width` tokens long) occur verbatim anywhere in `stream`."""
    hashes = np.array([window_hashes(s, width)[0] for s in samples], dtype=np.uint64)
    order = np.argsort(hashes)
    hashes = hashes[order]
    found = np.zeros(len(samples), dtype=bool)
    for start in range(0, max(len(stream) - width + 1, 0), _CHUNK):
        chunk = np.asarray(stream[start:start + _CHUNK + width - 1])
        windows = window_hashes(chunk, width)
        hits = np.flatnonzero(np.isin(windows, hashes))
        for offset in hits:
            for k in range(np.searchsorted(hashes, windows[offset]), len(hashes)):
                if hashes[k] != windows[offset]:
                    break
                if np.array_equal(chunk[offset:offset + width], samples[order[k]]):
                    found[order[k]] = True
    return int(found.sum())


def _outputs(root: Path) -> dict[str, dict[str, Path]]:
    found: dict[str, dict[str, Path]] = {}
    for manifest in sorted(root.glob("*/*.manifest.json")):
        split = manifest.name.removesuffix(".manifest.json")
        if split in SPLIT_NAMES:
            found.setdefault(manifest.parent.name, {})[split] = manifest.parent / split
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ccmega verify-splits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the folder `ccmega preprocess --output` wrote")
    args = parser.parse_args(argv)
    outputs = _outputs(Path(args.output))
    if not outputs:
        print(f"ccmega verify-splits: error: no <recipe>/<split>.manifest.json under {args.output}", file=sys.stderr)
        return 1
    problems = 0

    # 1. documents, by text digest
    digests = {(r, s): np.load(f"{p}.sources.npy")["digest"] for r, splits in outputs.items()
               for s, p in splits.items() if Path(f"{p}.sources.npy").exists()}
    pretrain = np.unique(np.concatenate([d for (r, s), d in digests.items() if s == "pretrain"] or [np.zeros(0, "S16")]))
    held = {s: np.unique(np.concatenate([d for (r, t), d in digests.items() if t == s] or [np.zeros(0, "S16")]))
            for s in ("finetune", "test")}
    print(f"documents: {len(pretrain):,} distinct in pretraining corpora, {len(held['finetune']):,} behind "
          f"fine-tune samples, {len(held['test']):,} behind test samples")
    for name, a, b in (("pretrain ∩ finetune", pretrain, held["finetune"]), ("pretrain ∩ test", pretrain, held["test"]),
                       ("finetune ∩ test", held["finetune"], held["test"])):
        shared = len(np.intersect1d(a, b))
        problems += shared
        print(f"  {name}: {shared} documents")

    # 2. content, by rolling hash over the token streams
    readers = {(r, s): IndexedDatasetReader(p) for r, splits in outputs.items() for s, p in splits.items()}
    heldout = {key: [np.asarray(reader[i]) for i in range(len(reader))]
               for key, reader in readers.items() if key[1] != "pretrain"}
    print("held-out samples found verbatim in pretraining token streams:")
    for (recipe, split), samples in heldout.items():
        widths = {len(s) for s in samples}
        counts = []
        for pre_recipe, splits in outputs.items():
            if "pretrain" not in splits or not samples:
                continue
            stream = readers[(pre_recipe, "pretrain")].tokens
            found = sum(find_in_stream(stream, [s for s in samples if len(s) == w], w) for w in widths)
            problems += found
            counts.append(f"{pre_recipe} {found}")
        print(f"  {recipe}/{split} ({len(samples):,} samples): " + ", ".join(counts))
    fine = {bytes(s.tobytes()) for (r, s_), samples in heldout.items() if s_ == "finetune" for s in samples}
    test = {bytes(s.tobytes()) for (r, s_), samples in heldout.items() if s_ == "test" for s in samples}
    shared = len(fine & test)
    problems += shared
    print(f"  fine-tune samples equal to test samples: {shared}")
    verdict = "ZERO overlap" if problems == 0 else f"{problems} OVERLAPS"
    print(f"ccmega verify-splits: {verdict} across {len(outputs)} recipes in {args.output}")
    return 0 if problems == 0 else 1
