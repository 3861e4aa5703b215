"""`ccmega pretrain`: pretrain a Qwen3 preset from scratch on megatron indexed datasets (paper §3.3, Table 6).

    ccmega pretrain --config examples/pretrain_tiny.yaml --set train.steps=20
    torchrun --nproc-per-node 8 -m ccmega.cli pretrain --preset qwen3-1b --data OUT/D6/pretrain \
        --run-dir runs/d6_1b --fp8 hybrid

The task: a GPTModel of the preset (or of the checkpoint `checkpoint.init_from` names), GPTDataset
samples, megatron's LM loss. The loop (ccmega/training/loop.py) does the rest: checkpoints every
`checkpoint.save_interval` steps, at the end, and at the first step boundary after SIGTERM/SIGUSR1
(then exit 0; the SLURM launcher requeues); a run resumes from RUN_DIR/checkpoints/latest and refuses
a checkpoint of another preset, tokenizer, data or schedule unless told. See docs/pretraining.md.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field

from ccmega.config import ConfigError, parse_config
from ccmega.presets import PRETRAIN_HPARAMS as T6
from ccmega.training.sections import (CheckpointSection, LoggingSection, OptimSection, PrecisionSection,
                                      SpeedSection, TrainSection)

DEFAULT_PRESET = "qwen3-200m"


@dataclass
class ModelSection:
    preset: str | None = None  # None: the init_from checkpoint's preset, else qwen3-200m
    tensor_parallel: int = 1
    pipeline_parallel: int = 1


@dataclass
class DataSection:
    paths: list[str] = field(default_factory=list)  # indexed-dataset prefixes (no .bin/.idx)
    weights: list[float] | None = None  # blend weights; None: proportional to size
    split: str = "99,1,0"  # train, valid, test shares of the documents
    tokenizer: str | None = None  # tokenizer.json / folder / SentencePiece .model; None: Qwen3
    seq_length: int = T6.seq_length
    allow_short_corpus: bool = False  # train on a corpus that preprocessing shrank below its token budget


@dataclass
class PretrainCheckpointSection(CheckpointSection):
    init_from: str | None = None  # start a new run from these weights (fresh optimizer and schedule)


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    speed: SpeedSection = field(default_factory=SpeedSection)
    checkpoint: PretrainCheckpointSection = field(default_factory=PretrainCheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


SHORTCUTS = {
    "--run-dir": ("run_dir", "output folder: checkpoints, metrics.jsonl, tensorboard, data cache"),
    "--preset": ("model.preset", "model preset (ccmega info lists them)"),
    "--tp": ("model.tensor_parallel", "tensor-parallel size"),
    "--pp": ("model.pipeline_parallel", "pipeline-parallel size"),
    "--data": ("data.paths", "indexed dataset prefix(es), comma-separated"),
    "--tokenizer": ("data.tokenizer", "tokenizer file or folder"),
    "--seq-length": ("data.seq_length", "tokens per sequence"),
    "--steps": ("train.steps", "optimizer steps"),
    "--global-batch-size": ("train.global_batch_size", "sequences per step"),
    "--micro-batch-size": ("train.micro_batch_size", "sequences per micro-batch"),
    "--lr": ("optim.max_lr", "peak learning rate"),
    "--warmup-steps": ("optim.warmup_steps", "linear warmup steps"),
    "--fp8": ("precision.fp8", "FP8 format through Transformer Engine: hybrid or e4m3"),
    "--fp8-recipe": ("precision.fp8_recipe", "tensorwise, delayed, blockwise or mxfp8"),
    "--fp8-bf16-layers": ("precision.fp8_bf16_layers", "layers kept in bf16 at each end"),
    "--save-interval": ("checkpoint.save_interval", "steps between checkpoints"),
    "--eval-interval": ("logging.eval_interval", "steps between validations"),
}


def resolve_preset(cfg: PretrainConfig, dry=None):
    """The preset to build: model.preset, or the architecture of the checkpoint init_from starts from
    (a Hugging Face conversion matches no registered preset)."""
    from ccmega.presets import ModelPreset, model_preset

    named = model_preset(cfg.model.preset) if cfg.model.preset else None
    if not cfg.checkpoint.init_from or (dry and not dry.available(cfg.checkpoint.init_from, what="init_from")):
        return named or model_preset(DEFAULT_PRESET)
    from ccmega.training.checkpointing import read_checkpoint_metadata

    meta = read_checkpoint_metadata(cfg.checkpoint.init_from)
    saved = ModelPreset(**meta["model_preset"])
    if named and named.replace(name=saved.name) != saved:
        raise ConfigError(f"model.preset={named.name} differs from the architecture of checkpoint.init_from "
                          f"{meta['path']} ({saved.name}); drop --preset to use the checkpoint's")
    return saved


def build_task(env, cfg: PretrainConfig, dry=None):
    """The pretraining Task for this rank. `dry` (a dry run) lets data and checkpoints that are not on this
    machine be stood in for."""
    from megatron.core import parallel_state as ps

    from ccmega.data.tokenizers import load_tokenizer
    from ccmega.models.qwen3 import build_model
    from ccmega.training import checkpointing as ckpt
    from ccmega.training.checkpointer import computed_on_rank0, dataset_fingerprint
    from ccmega.training.data import build_datasets
    from ccmega.training.dry_run import SyntheticSequences
    from ccmega.training.engine import gpt_forward_step
    from ccmega.training.logging_utils import flops_per_token, print_rank0
    from ccmega.training.loop import Task, model_config, schedule_identity

    if not cfg.data.paths:
        raise ConfigError("no data: give --data PREFIX[,PREFIX...] (or data.paths in the config)")
    data_here = dry is None or dry.available(*(p + ext for p in cfg.data.paths for ext in (".bin", ".idx")),
                                             what="data (its length and budget)")
    if data_here:
        _check_corpus_budgets(cfg)
    preset = resolve_preset(cfg, dry)
    tokenizer = load_tokenizer(cfg.data.tokenizer) if dry is None or not cfg.data.tokenizer or dry.available(
        cfg.data.tokenizer, what="tokenizer") else None
    if tokenizer and tokenizer.vocab_size > preset.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but {preset.name} only "
                          f"{preset.vocab_size} embedding rows")
    config, dtype = model_config(cfg.precision, preset, cfg.model.tensor_parallel, cfg.model.pipeline_parallel,
                                 cfg.speed)
    model = build_model(preset, config)

    gbs, mbs, seq = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.data.seq_length
    if gbs is None:
        gbs = mbs * ps.get_data_parallel_world_size()
    eval_batches = cfg.logging.eval_iters if cfg.logging.eval_interval > 0 else 0
    if dry is not None:  # no index is built: megatron's index of a 50B-token corpus takes minutes
        train, valid, eval_batches = SyntheticSequences(seq), None, 0
        steps = _dry_run_steps(cfg, dry, data_here, gbs, seq)
    else:
        data = build_datasets(cfg.data.paths, cfg.data.weights, cfg.data.split, seq, cfg.train.seed, tokenizer,
                              os.path.join(os.path.abspath(cfg.run_dir), "data_cache"),
                              train_samples=cfg.train.steps * gbs if cfg.train.steps else None,
                              valid_samples=eval_batches * gbs)
        train, valid = data.train, data.valid
        if eval_batches and valid is None:
            print_rank0(f"[ccmega] warning: split {cfg.data.split!r} leaves no validation documents: validation off")
            eval_batches = 0
        steps = cfg.train.steps or cfg.train.epochs * len(train) // gbs
        if steps <= 0:
            raise ConfigError(f"the train split has {len(train)} sequences: less than one global batch of {gbs}")

    identity, metadata = {}, {}  # what checkpoints record: a dry run writes none
    if dry is None:
        paths = [os.path.abspath(p) for p in cfg.data.paths]
        identity = {"model.preset": asdict(preset), "data.tokenizer": tokenizer.identity, "data.paths": paths,
                    "data.fingerprint": computed_on_rank0(lambda: [dataset_fingerprint(p) for p in paths]),
                    "data.seq_length": seq, **schedule_identity(cfg, steps, gbs)}
        metadata = {"model_preset": asdict(preset),
                    "tokenizer": {"path": str(tokenizer.path), "identity": tokenizer.identity},
                    "dtype": dtype, "fp8": cfg.precision.fp8, "seq_length": seq, "global_batch_size": gbs}

    def load_initial_weights():
        if cfg.checkpoint.init_from:
            meta = ckpt.load_model_weights(model, cfg.checkpoint.init_from)
            print_rank0(f"[ccmega] initialised weights from {meta['path']}")

    dp = ps.get_data_parallel_world_size()
    banner = (f"[ccmega] pretrain {preset.name} ({preset.total_params() / 1e6:.1f} M params) on {env.world_size} "
              f"rank(s): TP {config.tensor_model_parallel_size} x PP {config.pipeline_model_parallel_size} x DP {dp}; "
              f"{dtype}{' + fp8 ' + cfg.precision.fp8 if cfg.precision.fp8 else ''}; {steps} steps x {gbs} seqs x "
              f"{seq} tokens = {steps * gbs * seq / 1e9:.3f} B tokens"
              + (f" ({len(train)} train sequences)" if dry is None else ""))
    return Task(modules=[model], config=config, forward_step=gpt_forward_step, train_data=train, steps=steps,
                global_batch_size=gbs, micro_batch_size=mbs, seq_length=seq, tokens_per_sample=seq,
                flops_per_sample=flops_per_token(preset, seq) * seq, metadata=metadata, identity=identity,
                banner=banner, valid_data=valid, eval_batches=eval_batches,
                load_initial_weights=load_initial_weights)


def _dry_run_steps(cfg, dry, data_here: bool, gbs: int, seq: int) -> int:
    """The steps a dry run checks: the data, when it is here, is checked by its token count against them."""
    import numpy as np

    from ccmega.data.indexed_writer import read_index

    steps = cfg.train.steps
    if data_here:
        share = float(cfg.data.split.split(",")[0]) / sum(float(x) for x in cfg.data.split.split(","))
        tokens = sum(int(read_index(p)[1].sum(dtype=np.int64)) for p in cfg.data.paths)
        epoch_steps = int(tokens * share) // (gbs * seq)
        steps = steps or cfg.train.epochs * epoch_steps
        if steps > cfg.train.epochs * epoch_steps:
            dry.failures.append(f"data: {tokens:,} tokens ({share:.0%} for training) give {epoch_steps} steps of "
                                f"{gbs} x {seq} tokens per epoch; {steps} steps would take "
                                f"{steps / max(epoch_steps, 1):.2f} epochs (train.epochs={cfg.train.epochs})")
    if not steps:  # one epoch of data that is not here: any length past the warmup builds the schedule
        dry.not_checked.append("the schedule: train.steps defaults to one epoch of the data (give --steps N)")
        steps = max(cfg.optim.warmup_steps, cfg.optim.lr_decay_steps or 0) + 1
    return steps


def _check_corpus_budgets(cfg: PretrainConfig) -> None:
    """Refuse a corpus that preprocessing shrank below its token budget (its recipe's shares are then
    off), unless data.allow_short_corpus says it is wanted."""
    from ccmega.data.budget import corpus_budget_shortfall

    if cfg.data.allow_short_corpus:
        return
    for prefix in cfg.data.paths:
        message = corpus_budget_shortfall(prefix)
        if message:
            raise ConfigError(f"{message}; to pretrain on it anyway: --set data.allow_short_corpus=true")


def main(argv: list[str] | None = None) -> int:
    from ccmega.training.loop import run

    from ccmega.training import dry_run
    from ccmega.training.memory import memory_report

    cfg, args = parse_config(PretrainConfig, sys.argv[1:] if argv is None else argv, SHORTCUTS,
                             description=__doc__, prog="ccmega pretrain", extra_arguments=dry_run.add_arguments)
    if args.dry_run:
        dry = dry_run.DryRun(args)
        return dry_run.run("pretrain", cfg, build_task, dry, lambda cfg, layout, gib: memory_report(
            resolve_preset(cfg, dry), layout, cfg.train.micro_batch_size, cfg.data.seq_length,
            cfg.train.distributed_optimizer, cfg.precision.dtype, gib, cfg.train.global_batch_size))
    return run("pretrain", cfg, build_task)


if __name__ == "__main__":
    sys.exit(main())
