"""`ccmega icae-train`: fine-tune an ICAE compressor (paper §3.3, Fig. 2, Table 7) on megatron-core.

    ccmega icae-train --encoder runs/pretrain_D1_500m --decoder runs/pretrain_D6_500m \
        --data data/D1/finetune --run-dir runs/icae_D1_D6_500m
    torchrun --nproc-per-node 8 -m ccmega.cli icae-train --config my.yaml --tp 2 --distributed-optimizer true

Encoder LLM_Di and decoder LLM_Dj come from two independent pretraining checkpoints (any sizes and
recipes; their presets are read from the checkpoints' metadata; their tokenizers must be the same).
Both start from their checkpoints' weights. Trainable: the encoder, k memory embeddings, the [AE]
embedding and the projector. The decoder is frozen (no gradients, not in DDP buckets or the optimizer,
dropout off) and never saved: an ICAE checkpoint holds the trainable parts, the optimizer and
scheduler, plus the decoder checkpoint's path and a SHA-256 of its files, checked again on resume and
by `load_icae`. TP and DP (optionally with the distributed optimizer); PP > 1 is refused. Defaults are
Table 7's: 3 epochs, 32 samples per device and no accumulation, linear LR 1e-4 -> 1e-5 after 100 warmup
steps, weight decay 0.1, k = 128, r = 4 (L = 512). The loop (ccmega/training/loop.py) is pretraining's:
checkpoints, resume checks, signals and logging are the same; the log adds the reconstruction token
accuracy (teacher-forced argmax == target, over the L context tokens and the end token).
See docs/icae.md.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field

from ccmega.config import ConfigError, parse_config
from ccmega.presets import FINETUNE_HPARAMS as T7
from ccmega.training.icae_monitor import MonitorSection
from ccmega.training.sections import (CheckpointSection, LoggingSection, OptimSection, PrecisionSection,
                                      SpeedSection, TrainSection)


@dataclass
class ModelSection:
    encoder: str | None = None  # pretraining checkpoint: run dir, its checkpoints dir or an iter dir
    decoder: str | None = None  # the same for the frozen decoder
    num_memory_slots: int = T7.num_memory_slots  # k
    compression_ratio: int = T7.compression_ratio  # r: L = k * r unless data.context_tokens is set
    end_token_id: int | None = None  # None: the tokenizer's end-of-document token
    match_decoder_scale: bool = True  # start projected memory and [AE] at the decoder's token-embedding RMS
    tensor_parallel: int = 1
    pipeline_parallel: int = 1  # must stay 1: ICAE refuses pipeline parallelism


@dataclass
class DataSection:
    path: str | None = None  # fine-tune split prefix, e.g. OUT/D1/finetune (no .bin/.idx)
    valid_path: str | None = None  # optional validation split, e.g. OUT/D1/test
    context_tokens: int | None = None  # L; None: num_memory_slots x compression_ratio


@dataclass
class ICAETrainConfig:
    run_dir: str = "runs/icae"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(
        epochs=T7.epochs, global_batch_size=None, micro_batch_size=T7.micro_batch_size))
    optim: OptimSection = field(default_factory=lambda: OptimSection(
        max_lr=T7.max_lr, min_lr=T7.min_lr, warmup_steps=T7.warmup_steps, lr_decay_style=T7.lr_schedule,
        weight_decay=T7.weight_decay))
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    speed: SpeedSection = field(default_factory=SpeedSection)
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(save_interval=500))
    logging: LoggingSection = field(default_factory=lambda: LoggingSection(eval_interval=0))
    monitor: MonitorSection = field(default_factory=MonitorSection)


SHORTCUTS = {
    "--run-dir": ("run_dir", "output folder: checkpoints, metrics.jsonl, tensorboard"),
    "--encoder": ("model.encoder", "encoder pretraining checkpoint (run, checkpoints or iter dir)"),
    "--decoder": ("model.decoder", "frozen decoder pretraining checkpoint"),
    "--data": ("data.path", "fine-tune split prefix (OUT/<recipe>/finetune)"),
    "--valid-data": ("data.valid_path", "validation split prefix (OUT/<recipe>/test)"),
    "--memory-slots": ("model.num_memory_slots", "k memory slots (default 128)"),
    "--ratio": ("model.compression_ratio", "compression ratio r; L = k * r (default 4)"),
    "--context-tokens": ("data.context_tokens", "L tokens per sample (default k * r)"),
    "--tp": ("model.tensor_parallel", "tensor-parallel size"),
    "--pp": ("model.pipeline_parallel", "pipeline-parallel size (ICAE supports 1 only)"),
    "--epochs": ("train.epochs", "epochs over the fine-tune split"),
    "--steps": ("train.steps", "optimizer steps (overrides epochs)"),
    "--micro-batch-size": ("train.micro_batch_size", "samples per device and micro-batch"),
    "--global-batch-size": ("train.global_batch_size", "samples per step (default micro x DP)"),
    "--distributed-optimizer": ("train.distributed_optimizer", "shard optimizer state over DP (true/false)"),
    "--lr": ("optim.max_lr", "peak learning rate"),
    "--warmup-steps": ("optim.warmup_steps", "linear warmup steps"),
    "--fp8": ("precision.fp8", "FP8 format through Transformer Engine: hybrid or e4m3"),
    "--save-interval": ("checkpoint.save_interval", "steps between checkpoints"),
    "--eval-interval": ("logging.eval_interval", "steps between validations (needs --valid-data)"),
}


# ---- checks that need no model (run before the slow start-up) ---------------------------------------

@dataclass
class Plan:
    encoder: dict  # pretraining checkpoint metadata (+ "path": the iter dir)
    decoder: dict
    context_tokens: int
    tokenizer: dict  # {"path", "identity"} shared by encoder, decoder (and data)


def context_length(cfg: ICAETrainConfig) -> int:
    return cfg.data.context_tokens or cfg.model.num_memory_slots * cfg.model.compression_ratio


def check_pair(encoder_meta: dict, decoder_meta: dict) -> None:
    """Refuse an encoder/decoder pair whose tokenizers differ (memory slots would speak another language)."""
    for role, meta in (("encoder", encoder_meta), ("decoder", decoder_meta)):
        if "icae" in meta:
            raise ConfigError(f"{role} checkpoint {meta['path']} is an ICAE checkpoint; give a pretraining "
                              "checkpoint (ccmega pretrain's run dir)")
        if "tokenizer" not in meta or "model_preset" not in meta:
            raise ConfigError(f"{role} checkpoint {meta['path']} lacks the tokenizer or model preset metadata")
    enc_tok, dec_tok = encoder_meta["tokenizer"], decoder_meta["tokenizer"]
    if enc_tok["identity"] != dec_tok["identity"]:
        raise ConfigError(
            "tokenizer mismatch between encoder and decoder:\n"
            f"  encoder {encoder_meta['path']}: tokenizer {enc_tok['path']} (sha256 {enc_tok['identity'][:16]}...)\n"
            f"  decoder {decoder_meta['path']}: tokenizer {dec_tok['path']} (sha256 {dec_tok['identity'][:16]}...)\n"
            "an ICAE needs both LMs trained with the same tokenizer")


def plan(cfg: ICAETrainConfig) -> Plan:
    from ccmega.training.checkpointing import read_checkpoint_metadata
    from ccmega.training.icae_data import read_manifest

    if cfg.model.pipeline_parallel != 1:
        raise ConfigError(f"ICAE does not support pipeline parallelism (model.pipeline_parallel="
                          f"{cfg.model.pipeline_parallel}); use tensor and data parallelism")
    missing = [flag for flag, value in (("--encoder", cfg.model.encoder), ("--decoder", cfg.model.decoder),
                                        ("--data", cfg.data.path)) if not value]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (or model.encoder / model.decoder / data.path in the config)")
    encoder, decoder = read_checkpoint_metadata(cfg.model.encoder), read_checkpoint_metadata(cfg.model.decoder)
    check_pair(encoder, decoder)
    tokenizer = encoder["tokenizer"]
    for prefix in filter(None, (cfg.data.path, cfg.data.valid_path)):
        manifest = read_manifest(prefix)
        if manifest and manifest.get("tokenizer", {}).get("identity") not in (None, tokenizer["identity"]):
            raise ConfigError(f"tokenizer mismatch: data {prefix} was tokenized with {manifest['tokenizer']['path']}, "
                              f"the encoder {encoder['path']} with {tokenizer['path']}")
    return Plan(encoder=encoder, decoder=decoder, context_tokens=_checked_context_length(cfg, encoder, decoder),
                tokenizer=tokenizer)


def _checked_context_length(cfg: ICAETrainConfig, encoder: dict, decoder: dict) -> int:
    L = context_length(cfg)
    for role, meta in (("encoder", encoder), ("decoder", decoder)):
        positions = meta["model_preset"]["max_position_embeddings"]
        if L + cfg.model.num_memory_slots + 1 > positions:
            raise ConfigError(f"{role} preset {meta['model_preset']['name']} has {positions} positions, fewer than "
                              f"L + k + 1 = {L + cfg.model.num_memory_slots + 1}")
    return L


def dry_plan(cfg: ICAETrainConfig, dry) -> Plan:
    """The plan of a dry run: checkpoints that are not here are stood in for by --encoder/--decoder-preset."""
    from ccmega.presets import model_preset
    from ccmega.training.checkpointing import read_checkpoint_metadata

    if cfg.model.pipeline_parallel != 1:
        raise ConfigError(f"ICAE does not support pipeline parallelism (model.pipeline_parallel="
                          f"{cfg.model.pipeline_parallel}); use tensor and data parallelism")
    metas = {}
    for role, path, preset in (("encoder", cfg.model.encoder, dry.args.encoder_preset),
                               ("decoder", cfg.model.decoder, dry.args.decoder_preset)):
        if path and dry.available(path, what=f"{role} checkpoint"):
            metas[role] = read_checkpoint_metadata(path)
        elif preset:
            metas[role] = {"path": path, "model_preset": asdict(model_preset(preset)), "tokenizer": None}
        else:
            raise ConfigError(f"the {role} checkpoint is not here: give --{role}-preset NAME for the dry run")
    if metas["encoder"]["tokenizer"] and metas["decoder"]["tokenizer"]:
        check_pair(metas["encoder"], metas["decoder"])
    return Plan(encoder=metas["encoder"], decoder=metas["decoder"],
                context_tokens=_checked_context_length(cfg, metas["encoder"], metas["decoder"]),
                tokenizer=metas["encoder"]["tokenizer"] or {"path": None, "identity": None})


def end_token_of(tokenizer: dict, override: int | None) -> int:
    if override is not None:
        return override
    from ccmega.data.tokenizers import load_tokenizer

    try:
        return int(load_tokenizer(tokenizer["path"]).eod_id)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; the end token is the tokenizer's EOD: make the tokenizer file available or "
                          "set model.end_token_id") from None


# ---- the forward step ----------------------------------------------------------------------------------

class ICAEForwardStep:
    """megatron forward_step: reconstruction loss per micro-batch; counts correct tokens on the side
    (the schedule only returns losses) for the token accuracy of the step."""

    def __init__(self, monitor=None):
        self.correct, self.total = 0, 0  # correct: a device tensor once counted (no host sync per micro-batch)
        self.monitor = monitor  # a CollapseMonitor: sees each micro-batch's contexts

    def __call__(self, data_iterator, model):
        import torch

        from ccmega.training.engine import masked_lm_loss

        context = next(data_iterator)["tokens"]
        if self.monitor is not None:
            self.monitor.contexts.append(context)
        per_token, correct = model(context)

        def loss_func(output):
            self.correct = self.correct + correct.sum(dtype=torch.float64)
            self.total += correct.numel()
            return masked_lm_loss(torch_ones_like(output), output)

        return per_token, loss_func

    def metrics(self) -> dict:
        """Token accuracy since the last call, over the data-parallel group; resets the counts."""
        import torch
        from megatron.core import parallel_state as ps

        from ccmega.runtime import device

        counts = torch.stack([torch.as_tensor(self.correct, dtype=torch.float64, device=device()),
                              torch.tensor(float(self.total), dtype=torch.float64, device=device())])
        torch.distributed.all_reduce(counts, group=ps.get_data_parallel_group())
        self.correct, self.total = 0, 0
        if self.monitor is not None:
            self.monitor.end_step()
        return {"token_accuracy": float(counts[0] / counts[1]) if counts[1] else float("nan")}


def torch_ones_like(t):
    import torch

    return torch.ones_like(t, dtype=torch.float32)


def decoder_check_flops_per_sample(decoder_preset, L: int) -> float:
    """Model FLOPs of the collapse monitor's frozen-decoder forward over one sample's L context tokens."""
    from ccmega.training.logging_utils import flops_per_token

    return flops_per_token(decoder_preset, L) / 3 * L  # forward only: a third of forward + backward


def icae_flops_per_sample(encoder_preset, decoder_preset, k: int, L: int) -> float:
    """Model FLOPs of one training sample: the encoder's forward + backward over L + k positions and the
    frozen decoder's forward + input-gradient backward (no weight gradients: 2/3 of training FLOPs)
    over k + 1 + L positions."""
    from ccmega.training.logging_utils import flops_per_token

    enc_s, dec_s = L + k, k + 1 + L
    return flops_per_token(encoder_preset, enc_s) * enc_s + 2 / 3 * flops_per_token(decoder_preset, dec_s) * dec_s


# ---- the task -----------------------------------------------------------------------------------------

def build_task(env, cfg: ICAETrainConfig, the_plan: Plan, dry=None):
    """The ICAE Task for this rank. `dry` (a dry run): no weights are read, and data that is not on this
    machine is stood in for."""
    from megatron.core import parallel_state as ps

    from ccmega.models.icae_checkpoint import build_icae, decoder_params_sha256, hash_checkpoint_files
    from ccmega.presets import ModelPreset
    from ccmega.training.checkpointer import computed_on_rank0, dataset_fingerprint
    from ccmega.training.checkpointing import load_model_weights
    from ccmega.training.dry_run import SyntheticContexts
    from ccmega.training.icae_data import ContextSamples, EpochShuffled, InOrder
    from ccmega.training.icae_monitor import CollapseMonitor, check_section, earlier_probe, probe_at_start
    from ccmega.training.logging_utils import print_rank0
    from ccmega.training.loop import Task, model_config, schedule_identity

    check_section(cfg.monitor)
    k, L = cfg.model.num_memory_slots, the_plan.context_tokens
    enc_preset = ModelPreset(**the_plan.encoder["model_preset"])
    dec_preset = ModelPreset(**the_plan.decoder["model_preset"])
    end_token = end_token_of(the_plan.tokenizer, cfg.model.end_token_id)
    if not 0 <= end_token < min(enc_preset.vocab_size, dec_preset.vocab_size):
        raise ConfigError(f"end token {end_token} is outside the vocabulary of {enc_preset.name} "
                          f"({enc_preset.vocab_size}) or {dec_preset.name} ({dec_preset.vocab_size})")
    tp = cfg.model.tensor_parallel
    enc_config, dtype = model_config(cfg.precision, enc_preset, tp, 1, cfg.speed)
    dec_config, _ = model_config(cfg.precision, dec_preset, tp, 1, cfg.speed)
    model = build_icae(enc_preset, dec_preset, enc_config, dec_config, k, end_token, cfg.train.seed)
    decoder_files_sha256 = decoder_sha = None  # a dry run reads no weights
    if dry is None:
        decoder_files_sha256 = computed_on_rank0(lambda: hash_checkpoint_files(the_plan.decoder["path"]))
        load_model_weights(model.decoder, the_plan.decoder["path"])
        decoder_sha = decoder_params_sha256(model.decoder)

    run_dir = os.path.abspath(cfg.run_dir)
    status = {}  # status.json: the decoder probe and, if it happens, the collapse warning

    def load_initial_weights():
        load_model_weights(model.encoder, the_plan.encoder["path"])
        print_rank0(f"[ccmega] encoder initialised from {the_plan.encoder['path']}")
        if cfg.model.match_decoder_scale:
            rms = model.match_decoder_scale()
            print_rank0(f"[ccmega] projector and [AE] scaled to the decoder's token-embedding RMS "
                        f"{rms['token_embedding_rms']:.4f} (projected memory would start at RMS "
                        f"{rms['projected_rms_before']:.4f}; model.match_decoder_scale=false keeps that)")
        if cfg.monitor.probe:
            status["decoder_probe"] = probe_at_start(model, cfg.data.path, L, the_plan.tokenizer["path"], cfg.monitor,
                                                     run_dir, env.rank == 0, print_rank0)

    def check_decoder_untouched():
        if decoder_params_sha256(model.decoder) != decoder_sha:  # cannot happen unless freezing broke
            raise RuntimeError("the frozen decoder's parameters changed during training")

    dp = ps.get_data_parallel_world_size()
    mbs = cfg.train.micro_batch_size
    gbs = cfg.train.global_batch_size or mbs * dp
    data_here = dry is None or dry.available(cfg.data.path + ".bin", cfg.data.path + ".idx", what="fine-tune data")
    samples = ContextSamples(cfg.data.path, L) if data_here else SyntheticContexts(L, count=gbs)
    train_data = EpochShuffled(samples, gbs, cfg.train.seed)
    steps_per_epoch = train_data.epoch_samples // gbs
    steps = cfg.train.steps or cfg.train.epochs * steps_per_epoch
    if not data_here and not cfg.train.steps:
        dry.not_checked.append("the schedule: train.steps defaults to epochs of the fine-tune data (give --steps N)")
        steps = max(cfg.optim.warmup_steps, cfg.optim.lr_decay_steps or 0) + 1
    valid_data = InOrder(ContextSamples(cfg.data.valid_path, L)) if cfg.data.valid_path and dry is None else None
    eval_batches = min(cfg.logging.eval_iters, len(valid_data) // gbs) if valid_data and cfg.logging.eval_interval else 0

    identity, metadata = {}, {}  # what checkpoints record: a dry run writes none
    if dry is None:
        data_path = os.path.abspath(cfg.data.path)
        identity = {"model.encoder_preset": asdict(enc_preset), "model.decoder_preset": asdict(dec_preset),
                    "model.decoder_files_sha256": decoder_files_sha256, "model.num_memory_slots": k,
                    "model.encoder": the_plan.encoder["path"], "data.tokenizer": the_plan.tokenizer["identity"],
                    "data.context_tokens": L, "data.path": data_path,
                    "data.fingerprint": computed_on_rank0(lambda: dataset_fingerprint(data_path)),
                    **schedule_identity(cfg, steps, gbs)}

        def role(meta, preset, **extra):
            return {"checkpoint": meta["path"], "model_preset": asdict(preset), **extra}

        metadata = {
            "tokenizer": the_plan.tokenizer, "dtype": dtype, "global_batch_size": gbs,
            "icae": {"num_memory_slots": k, "context_tokens": L, "compression_ratio": L / k,
                     "end_token_id": end_token, "encoder": role(the_plan.encoder, enc_preset),
                     "decoder": role(the_plan.decoder, dec_preset, files_sha256=decoder_files_sha256,
                                     params_sha256=decoder_sha),
                     "data": data_path},
        }
    earlier = earlier_probe(run_dir) if dry is None and cfg.monitor.probe else None
    if earlier:  # a resume: the probe ran at the fresh start
        status["decoder_probe"] = earlier
    monitor = CollapseMonitor(model.decoder, cfg.monitor, steps, status, print_rank0,
                              flops_per_check=decoder_check_flops_per_sample(dec_preset, L) * gbs)
    forward_step = ICAEForwardStep(monitor)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    banner = (f"[ccmega] icae-train encoder {enc_preset.name} ({the_plan.encoder['path']}) -> frozen decoder "
              f"{dec_preset.name} ({the_plan.decoder['path']}); k={k} slots, L={L} tokens (r={L / k:g}); "
              f"{trainable / 1e6:.2f} M trainable params on this rank; {env.world_size} rank(s): TP {tp} x DP {dp}"
              f"{' (distributed optimizer)' if cfg.train.distributed_optimizer else ''}; {dtype}; {steps} steps x "
              f"{gbs} samples ({steps_per_epoch} steps/epoch, {len(train_data.samples)} samples in {cfg.data.path})")
    return Task(modules=[model], config=enc_config, forward_step=forward_step, train_data=train_data, steps=steps,
                global_batch_size=gbs, micro_batch_size=mbs, seq_length=L + 1, tokens_per_sample=L,
                flops_per_sample=icae_flops_per_sample(enc_preset, dec_preset, k, L), metadata=metadata,
                identity=identity, banner=banner, valid_data=valid_data, eval_batches=eval_batches,
                validate_at_start=True, load_initial_weights=load_initial_weights,
                step_metrics=forward_step.metrics, after_step=monitor.after_step, status=status,
                epoch_of=train_data.epoch_of,
                check_before_save=check_decoder_untouched)


# ---- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from ccmega.training.loop import EXIT_CONFIG, run

    from ccmega.training import dry_run

    cfg, args = parse_config(ICAETrainConfig, sys.argv[1:] if argv is None else argv, SHORTCUTS,
                             description=__doc__, prog="ccmega icae-train",
                             extra_arguments=lambda parser: dry_run.add_arguments(parser, icae=True))
    dry = dry_run.DryRun(args) if args.dry_run else None
    try:
        the_plan = dry_plan(cfg, dry) if dry else plan(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ccmega icae-train: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        from ccmega.presets import ModelPreset
        from ccmega.training.memory import icae_memory_report

        presets = [ModelPreset(**meta["model_preset"]) for meta in (the_plan.encoder, the_plan.decoder)]
        return dry_run.run("icae-train", cfg, lambda env, cfg, dry: build_task(env, cfg, the_plan, dry), dry,
                           lambda cfg, layout, gib: icae_memory_report(
                               *presets, layout, cfg.train.micro_batch_size, the_plan.context_tokens,
                               cfg.model.num_memory_slots, cfg.train.distributed_optimizer,
                               cfg.precision.dtype, gib, cfg.train.global_batch_size,
                               fused_cross_entropy=cfg.speed.cross_entropy_fusion))
    return run("icae-train", cfg, lambda env, cfg: build_task(env, cfg, the_plan))


if __name__ == "__main__":
    sys.exit(main())
