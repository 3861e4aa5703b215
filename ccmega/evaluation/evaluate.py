"""`ccmega evaluate`: reconstruction quality, input entropies and latency of a trained ICAE (paper §3.4, §4).

    ccmega evaluate --icae runs/icae_D1_D6_500m --data OUT/D1/test --output-dir eval/D1_D6_500m
    torchrun --nproc-per-node 8 -m ccmega.cli evaluate --icae ... --data ... --output-dir ... --tp 2
    ccmega evaluate --latency --encoder-preset qwen3-500m --decoder-preset qwen3-1b --output-dir eval/latency

Evaluation: every test sample (L tokens, OUT/<recipe>/test) is compressed and reconstructed greedily with
the KV cache (`ccmega.evaluation.generation`), in batches, stopping per sample at the end token or after
L tokens. Original and reconstruction are detokenised with the checkpoint's tokenizer and scored
(`ccmega.evaluation.metrics`); the entropy of each original is measured by the encoder's pretrained LM
and by the decoder LM (`ccmega.evaluation.entropy`), and correlated with the metrics
(`ccmega.evaluation.correlation`). Data-parallel ranks split the samples; rank 0 writes

    OUTPUT_DIR/samples.jsonl   one line per sample: index, reference, reconstruction, f1, bleu_sentence,
                               rougeL, entropy_encoder, entropy_decoder, generated_tokens, ended
    OUTPUT_DIR/summary.json    the summary schema of `ccmega report` (see ccmega/evaluation/report.py)
    OUTPUT_DIR/controls.jsonl  with --controls: each sample under the five memory conditions
                               (ccmega/evaluation/controls.py; their summary is the record "controls")

both atomically (temporary file + rename). With --latency the summary also gets a `latency` record.

Latency (Fig. 6) is timed at --context-tokens (paper: 4096) with k = context / r memory slots in one pass,
r = --compression-ratio (default: the ICAE's own L / k with --icae, else the paper's 4) or k =
--memory-tokens. With --icae the trained ICAE itself is timed when that k is its own; otherwise (the usual
case: k = 128 for L = 512 but 1024 slots for 4096 tokens) an ICAE of the same presets and dtype with
random weights is timed instead (latency does not depend on the weights), and the log says so. The
`latency` record names what was measured: context_tokens (L), memory_tokens (k), compression_ratio (r),
weights ("trained" or "random"). `ccmega report` never averages records of different k or L into a bar.

Latency only (`--latency` without --icae): an ICAE of the given presets with random weights; the record
goes into `--into SUMMARY` (an existing evaluation summary of that pair) or into a summary of its own,
OUTPUT_DIR/latency_<encoder>_<decoder>_ctx<N>.json, whose metrics are null (not measured).

Data labels: the summary records the ICAE's fine-tuning data (`finetune_data`: the recipe of the split
recorded in the checkpoint's ccmega.json icae.data, e.g. .../D1/finetune -> D1) and the test data
(`test_data`, from --data); `ccmega report` prints the paper's numbers only when both agree with a row.
Non-finite numbers (NaN: not measured, or undefined) are written as JSON null.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import time

import torch

from ccmega.fileio import atomic_write_text

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
UNKNOWN = "unknown"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="ccmega evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--icae", help="ICAE checkpoint (`ccmega icae-train` run, checkpoints or iter dir)")
    p.add_argument("--data", help="test split prefix, e.g. OUT/D1/test (no .bin/.idx)")
    p.add_argument("--output-dir", help="where samples.jsonl and summary.json (or the latency summary) go")
    p.add_argument("--batch-size", type=int, default=32, help="samples per generation batch (default %(default)s)")
    p.add_argument("--limit", type=int, help="evaluate only the first N test samples")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default %(default)s)")
    p.add_argument("--tokenizer", help="override the tokenizer recorded in the checkpoint")
    p.add_argument("--decoder-checkpoint", help="override the decoder pretraining checkpoint recorded in the ICAE")
    p.add_argument("--no-verify-decoder", action="store_true", help="skip the decoder checkpoint hash check")
    p.add_argument("--encoder-lm", help="encoder pretraining checkpoint for the encoder entropy "
                                        "(default: the one icae-train --encoder named, which the ICAE encoder started from)")
    p.add_argument("--no-entropy", action="store_true", help="skip the entropies (and correlations)")
    p.add_argument("--controls", action="store_true",
                   help="also reconstruct with shuffled, zeroed and no memory and with the context itself "
                        "(ccmega/evaluation/controls.py; writes controls.jsonl, summary 'controls')")
    p.add_argument("--encoder-recipe", help="encoder pretraining recipe for the summary (default: from the "
                                            "pretraining run's config and data manifest)")
    p.add_argument("--decoder-recipe", help="decoder pretraining recipe for the summary (default: likewise)")
    p.add_argument("--data-recipe", help="test data recipe (default: the split's manifest or folder name)")
    p.add_argument("--finetune-recipe", help="the ICAE's fine-tuning data recipe (default: from the split "
                                             "recorded in its checkpoint, manifest or folder name)")
    p.add_argument("--seed", type=int, default=1234)
    lat = p.add_argument_group("latency (Fig. 6)")
    lat.add_argument("--latency", action="store_true", help="measure compression/generation latency")
    lat.add_argument("--encoder-preset", help="latency without --icae: encoder preset (random weights)")
    lat.add_argument("--decoder-preset", help="latency without --icae: decoder preset (random weights)")
    lat.add_argument("--context-tokens", type=int, default=4096, help="latency context length (default %(default)s)")
    lat.add_argument("--compression-ratio", type=float,
                     help="latency: k = context / ratio memory slots (default: the ICAE's L / k with --icae, "
                          "else the paper's 4)")
    lat.add_argument("--memory-tokens", type=int, help="latency: k, overriding the ratio")
    lat.add_argument("--generate-tokens", type=int,
                     help="greedy steps timed in generation (default: the context length, a full reconstruction)")
    lat.add_argument("--warmup", type=int, default=1, help="untimed runs first (default %(default)s)")
    lat.add_argument("--repeats", type=int, default=3, help="timed runs; the median is kept (default %(default)s)")
    lat.add_argument("--into", help="latency only: add the record to this existing summary JSON")
    lat.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                     help="latency without --icae: parameter dtype (auto: bf16 on GPU, fp32 on CPU)")
    args = p.parse_args(argv)
    if not args.latency or args.icae:
        missing = [f for f, v in (("--icae", args.icae), ("--data", args.data), ("--output-dir", args.output_dir)) if not v]
        if missing:
            p.error(f"evaluation needs {', '.join(missing)} (or --latency with --encoder-preset/--decoder-preset)")
    elif not (args.encoder_preset and args.decoder_preset):
        p.error("--latency without --icae needs --encoder-preset and --decoder-preset")
    elif not (args.output_dir or args.into):
        p.error("--latency needs --output-dir or --into")
    return args


# ---- small helpers ------------------------------------------------------------------------------------

def log(*parts) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print("[ccmega] evaluate:", *parts, flush=True)


def _recipe_of_prefix(prefix: str) -> str | None:
    """The recipe in a split's preprocess manifest, else its folder name if it looks like one."""
    from ccmega.training.icae_data import read_manifest

    manifest = read_manifest(prefix) or {}
    if manifest.get("recipe"):
        return str(manifest["recipe"])
    folder = os.path.basename(os.path.dirname(os.path.abspath(prefix)))
    return folder if re.fullmatch(r"(?i)d\d+|random", folder) else None


def _pretrain_recipe(checkpoint_iter_dir: str) -> str | None:
    """The recipe a pretraining run was trained on: RUN_DIR/config.yaml data.paths -> their manifests."""
    import yaml

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_iter_dir))), "config.yaml")
    try:
        with open(config) as f:
            paths = (yaml.safe_load(f) or {}).get("data", {}).get("paths") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    recipes = {_recipe_of_prefix(p) for p in paths}
    return recipes.pop() if len(recipes) == 1 and None not in recipes else None


def _finite_or_null(obj):
    """NaN/inf -> None, recursively: JSON has no NaN, and null is the summary schema's "not measured"."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(value) for value in obj]
    return obj


def _dump(obj, indent: int | None = 2) -> str:
    """Strict JSON (no bare NaN), one document ending in a newline."""
    return json.dumps(_finite_or_null(obj), indent=indent, ensure_ascii=False, allow_nan=False) + "\n"


def _side(meta: dict, recipe: str) -> dict:
    return {"preset": meta["model_preset"]["name"], "recipe": recipe, "checkpoint": meta.get("checkpoint")}


def _batches(indices: list[int], size: int):
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def gather_by_index(records: dict[int, dict], count: int) -> list[dict] | None:
    """Every rank's {sample index: record} -> the records of samples 0..count-1 in order on rank 0, None on
    the others. Collective (every rank calls it)."""
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, records)
    if torch.distributed.get_rank() != 0:
        return None
    merged = {}
    for part in gathered:
        merged.update(part)  # tensor-parallel peers hold identical records
    return [merged[i] for i in range(count)]


# ---- evaluation ---------------------------------------------------------------------------------------

def evaluate(args) -> dict:
    """The whole evaluation on every rank; rank 0 writes the files. Returns the summary (rank 0) or {}."""
    from megatron.core import parallel_state as ps

    from ccmega.data.tokenizers import load_tokenizer
    from ccmega.evaluation.correlation import correlate_metrics
    from ccmega.evaluation.entropy import load_pretrained_lm, sequence_entropy
    from ccmega.evaluation.generation import reconstruct
    from ccmega.evaluation.metrics import METRIC_KEYS, score_corpus, score_pair
    from ccmega.training.checkpointing import read_checkpoint_metadata
    from ccmega.training.icae_data import ContextSamples
    from ccmega.models.icae_checkpoint import load_icae

    started = time.perf_counter()
    meta = read_checkpoint_metadata(args.icae)
    info = meta["icae"]
    L, k = int(info["context_tokens"]), int(info["num_memory_slots"])
    icae = load_icae(args.icae, decoder_checkpoint=args.decoder_checkpoint, verify_decoder=not args.no_verify_decoder)
    tokenizer = load_tokenizer(args.tokenizer or meta["tokenizer"]["path"])
    samples = ContextSamples(args.data, L)
    count = min(len(samples), args.limit) if args.limit else len(samples)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, count, dp_size))
    log(f"{args.icae}: {info['encoder']['model_preset']['name']} -> {info['decoder']['model_preset']['name']}, "
        f"k={k}, L={L}; {count} samples of {args.data} on {dp_size} data-parallel rank(s), batch {args.batch_size}")

    records: dict[int, dict] = {}
    done, generated, t0 = 0, 0, time.perf_counter()
    for batch in _batches(mine, args.batch_size):
        context = samples.batch(batch)  # on this rank's device
        out = reconstruct(icae, context, max_new_tokens=L)
        entropy_decoder = None if args.no_entropy else sequence_entropy(icae.decoder, context).tolist()
        for j, (i, ids) in enumerate(zip(batch, out.token_lists())):
            reference, reconstruction = tokenizer.decode(context[j].tolist()), tokenizer.decode(ids)
            records[i] = {"index": i, "reference": reference, "reconstruction": reconstruction,
                          **score_pair(reference, reconstruction),
                          "entropy_encoder": None,
                          "entropy_decoder": None if entropy_decoder is None else entropy_decoder[j],
                          "generated_tokens": len(ids) + int(out.ended[j]), "ended": bool(out.ended[j])}
        done += len(batch)
        generated += int((out.lengths + out.ended.long()).sum())
        elapsed = time.perf_counter() - t0
        log(f"reconstructed {done}/{len(mine)} samples (rank 0), {done / elapsed:.2f} samples/s, "
            f"{generated / elapsed:.0f} tokens/s, ETA {(len(mine) - done) * elapsed / done:.0f} s")
    latency = _checkpoint_latency(args, icae, info) if args.latency else None
    controls = None
    if args.controls:  # collective: before the gather below, while the ICAE is loaded
        from ccmega.evaluation.controls import describe, run_controls

        controls = run_controls(icae, samples, mine, count, tokenizer, args.batch_size, seed=args.seed, log=log)
        if controls is not None:
            log(describe(controls.summary))
    del icae

    if not args.no_entropy:
        encoder_lm_path = args.encoder_lm or info["encoder"]["checkpoint"]
        log(f"encoder entropy under the pretrained LM {encoder_lm_path}")
        lm, _, _ = load_pretrained_lm(encoder_lm_path)
        for batch in _batches(mine, args.batch_size):
            values = sequence_entropy(lm, samples.batch(batch)).tolist()
            for i, value in zip(batch, values):
                records[i]["entropy_encoder"] = value
        del lm

    rows = gather_by_index(records, count)
    if rows is None:
        return {}

    metrics = score_corpus([r["reference"] for r in rows], [r["reconstruction"] for r in rows],
                           per_sample=[{key: r[key] for key in METRIC_KEYS} for r in rows])
    correlations, entropy_mean = {}, {}
    if not args.no_entropy:
        for side in ("encoder", "decoder"):
            values = [r[f"entropy_{side}"] for r in rows]
            entropy_mean[side] = math.fsum(values) / len(values) if values else math.nan
            correlations[side] = correlate_metrics(values, {key: [r[key] for r in rows] for key in METRIC_KEYS})

    enc_recipe = args.encoder_recipe or _pretrain_recipe(info["encoder"]["checkpoint"]) or UNKNOWN
    dec_recipe = args.decoder_recipe or _pretrain_recipe(info["decoder"]["checkpoint"]) or UNKNOWN
    for role, recipe in (("encoder", enc_recipe), ("decoder", dec_recipe)):
        if recipe == UNKNOWN:
            log(f"note: {role} recipe unknown (no config.yaml/manifest found); pass --{role}-recipe")
    elapsed = time.perf_counter() - started
    summary = {
        "encoder": _side(info["encoder"], enc_recipe),
        "decoder": _side(info["decoder"], dec_recipe),
        "finetune_data": args.finetune_recipe or (info.get("data") and _recipe_of_prefix(info["data"])) or UNKNOWN,
        "test_data": args.data_recipe or _recipe_of_prefix(args.data) or UNKNOWN,
        "metrics": metrics,
        "memory_tokens": k,
        "context_tokens_mean": float(L),
        "generated_tokens_mean": math.fsum(r["generated_tokens"] for r in rows) / len(rows) if rows else math.nan,
        "per_sample": SAMPLES_FILE,
        "entropy_mean": entropy_mean,
        "correlations": correlations,
        "icae_checkpoint": meta["path"],
        "finetune_split": info.get("data"),
        "test_split": os.path.abspath(args.data),
        "tokenizer": meta["tokenizer"],
        "ended_fraction": sum(r["ended"] for r in rows) / len(rows) if rows else math.nan,
        "elapsed_s": round(elapsed, 3),
        "created_by": args.command_line,
    }
    if latency is not None:
        summary["latency"] = latency
    if controls is not None:
        summary["controls"] = controls.write(args.output_dir)
    atomic_write_text(os.path.join(args.output_dir, SAMPLES_FILE),
                      "".join(_dump(r, indent=None) for r in rows))
    return summary


# ---- latency --------------------------------------------------------------------------------------------

def _latency_slots(args, default_ratio: float) -> int:
    """k of the timed ICAE: --memory-tokens, else context / r with r = --compression-ratio or default_ratio."""
    if args.memory_tokens:
        return args.memory_tokens
    ratio = args.compression_ratio or default_ratio
    k = args.context_tokens / ratio
    if k < 1 or k != int(k):
        raise ValueError(f"--context-tokens {args.context_tokens} / ratio {ratio:g} = {k:g} is not a whole number "
                         "of memory slots; pass --memory-tokens or another --compression-ratio")
    return int(k)


def _random_icae(encoder_preset, decoder_preset, k: int, dtype, seed: int):
    """An ICAE of these presets with k slots and random weights: what latency is measured on."""
    from megatron.core import parallel_state as ps

    from ccmega.models.icae_checkpoint import build_icae
    from ccmega.models.qwen3 import transformer_config

    tp = ps.get_tensor_model_parallel_world_size()
    configs = [transformer_config(p, tp, 1, params_dtype=dtype) for p in (encoder_preset, decoder_preset)]
    torch.manual_seed(seed)
    icae = build_icae(encoder_preset, decoder_preset, *configs, num_memory_slots=k, end_token_id=0, seed=seed)
    return icae.eval()


def _timed_latency(icae, args, weights: str) -> dict:
    """measure_latency plus what was measured, said in the log (loudly when r is not the paper's)."""
    from ccmega.evaluation.latency import measure_latency
    from ccmega.presets import FINETUNE_HPARAMS

    record = measure_latency(icae, args.context_tokens, args.generate_tokens, args.warmup, args.repeats,
                             seed=args.seed)
    record["weights"] = weights
    log(f"latency at context L = {record['context_tokens']}, k = {record['memory_tokens']} memory slots "
        f"(r = {record['compression_ratio']:g}), {weights} weights: compression {record['compression_s']:.4f} s, "
        f"generation {record['generation_s']:.4f} s ({record['generated_tokens']} tokens) on {record['device']}")
    if record["compression_ratio"] != FINETUNE_HPARAMS.compression_ratio:
        log(f"WARNING: latency measured at r = {record['compression_ratio']:g}, not the paper's r = "
            f"{FINETUNE_HPARAMS.compression_ratio} (§4.1); `ccmega report` keeps it in a bar of its own")
    return record


def _checkpoint_latency(args, icae, info: dict) -> dict:
    """Latency of a trained ICAE at --context-tokens and its own ratio (unless told otherwise): the ICAE
    itself when k matches, else one of the same presets and dtype with random weights."""
    from ccmega.presets import ModelPreset

    L, k = int(info["context_tokens"]), int(info["num_memory_slots"])
    k_timed = _latency_slots(args, L / k)
    if k_timed == k:
        return _timed_latency(icae, args, "trained")
    log(f"latency: NOTE this ICAE has k = {k} slots for L = {L} tokens; context {args.context_tokens} needs "
        f"k = {k_timed}, so an ICAE of the same presets with k = {k_timed} and random weights is timed "
        "(latency does not depend on the weights)")
    presets = [ModelPreset(**info[role]["model_preset"]) for role in ("encoder", "decoder")]
    timed = _random_icae(*presets, k_timed, next(icae.parameters()).dtype, args.seed)
    record = _timed_latency(timed, args, "random")
    del timed
    return record


def latency_only(args) -> dict:
    from ccmega.presets import FINETUNE_HPARAMS, model_preset

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    icae = _random_icae(model_preset(args.encoder_preset), model_preset(args.decoder_preset),
                        _latency_slots(args, FINETUNE_HPARAMS.compression_ratio), dtype, args.seed)
    log(f"latency of {args.encoder_preset} -> {args.decoder_preset} (random weights), context "
        f"{args.context_tokens}, k={icae.num_memory_slots}, {args.warmup} warmup + {args.repeats} repeats")
    record = _timed_latency(icae, args, "random")
    if torch.distributed.get_rank() != 0:
        return record
    if args.into:
        with open(args.into, encoding="utf-8") as f:
            summary = json.load(f)
        summary["latency"] = record
        atomic_write_text(args.into, _dump(summary))
        log(f"added the latency record to {args.into}")
        return record
    nan = math.nan
    summary = {
        "encoder": {"preset": args.encoder_preset, "recipe": args.encoder_recipe or UNKNOWN},
        "decoder": {"preset": args.decoder_preset, "recipe": args.decoder_recipe or UNKNOWN},
        "finetune_data": args.finetune_recipe or UNKNOWN,
        "test_data": args.data_recipe or UNKNOWN,
        "metrics": {"n": 0, "f1": nan, "bleu_corpus": nan, "bleu_sentence_mean": nan, "rougeL": nan},
        "memory_tokens": icae.num_memory_slots,
        "latency": record,
        "weights": "random (latency only)",
        "created_by": args.command_line,
    }
    path = os.path.join(args.output_dir, f"latency_{args.encoder_preset}_{args.decoder_preset}_ctx{args.context_tokens}.json")
    atomic_write_text(path, _dump(summary))
    log(f"wrote {path}")
    return record


# ---- entry point ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from ccmega import runtime

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command_line = shlex.join(["ccmega", "evaluate", *argv])  # the summary's created_by
    with runtime.session(args.tp, 1, seed=args.seed):
        if not args.icae:
            latency_only(args)
            return 0
        summary = evaluate(args)
        if summary:
            path = os.path.join(args.output_dir, SUMMARY_FILE)
            atomic_write_text(path, _dump(summary))
            m = summary["metrics"]
            log(f"{m['n']} samples: F1 {m['f1']:.2f}, BLEU {m['bleu_corpus']:.2f} (corpus) / "
                f"{m['bleu_sentence_mean']:.2f} (sentence mean), ROUGE-L {m['rougeL']:.2f}; wrote {path} and "
                f"{os.path.join(args.output_dir, SAMPLES_FILE)} in {summary['elapsed_s']:.1f} s")
        return 0
