"""`ccmega train-tokenizer`: a SentencePiece BPE model trained on Pile shards.

Lossless by construction (identity normalisation, whitespace kept, byte fallback), so that decoding the
tokens of a document gives back exactly its text; `</s>` (id 2) is the end-of-document token.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ccmega.data.pile_reader import InputError, iter_lines, parse_record
from ccmega.presets import PILE_SUBSETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccmega train-tokenizer", description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="Pile shards: folders, globs, files (@sample)")
    p.add_argument("--output", required=True, help="model path (NAME.model; NAME.vocab is written beside it)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--subsets", default=",".join(PILE_SUBSETS), help="comma-separated pile_set_names to learn from")
    p.add_argument("--max-lines", type=int, default=2_000_000, help="text lines fed to the trainer at most")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return p


def training_lines(shards: list[Path], subsets: frozenset[str], max_lines: int) -> Iterator[str]:
    """Non-empty text lines of the wanted documents; bad input lines are skipped (training is sampling)."""
    produced = 0
    for shard in shards:
        for line_no, raw in iter_lines(shard):
            try:
                doc = parse_record(raw, str(shard), line_no, subsets)
            except InputError:
                continue
            if isinstance(doc, str):
                continue
            for text_line in doc.text.split("\n"):
                if text_line.strip():
                    yield text_line
                    produced += 1
                    if produced >= max_lines:
                        return


def main(argv: list[str] | None = None) -> int:
    import sentencepiece

    from ccmega.data.preprocess import resolve_inputs

    args = build_parser().parse_args(argv)
    started = time.monotonic()
    shards = resolve_inputs(args.input)
    output = Path(args.output)
    if output.suffix != ".model":
        output = output.with_name(output.name + ".model")
    output.parent.mkdir(parents=True, exist_ok=True)
    subsets = frozenset(s.strip() for s in args.subsets.split(","))
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        prefix = Path(tmp) / "spm"
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=training_lines(shards, subsets, args.max_lines), model_prefix=str(prefix),
            vocab_size=args.vocab_size, model_type="bpe", byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=args.threads, max_sentence_length=16384, minloglevel=2)
        os.replace(f"{prefix}.vocab", output.with_suffix(".vocab"))
        os.replace(f"{prefix}.model", output)  # last: a .model present is a complete one
    print(f"ccmega train-tokenizer: {args.vocab_size}-piece SentencePiece BPE in "
          f"{time.monotonic() - started:.1f} s -> {output}", file=sys.stderr)
    return 0
