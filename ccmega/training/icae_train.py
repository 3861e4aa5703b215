"""`ccmega icae-train`: fine-tune an ICAE compressor (paper §3.3, Fig. 2, Table 7) on megatron-core.

    ccmega icae-train --encoder runs/pretrain_D1_500m --decoder runs/pretrain_D6_500m \
        --data data/D1/finetune --run-dir runs/icae_D1_D6_500m
    torchrun --nproc-per-node 8 -m ccmega.cli icae-train --config my.yaml --tp 2 --distributed-optimizer true

Encoder LLM_Di and decoder LLM_Dj come from two independent pretraining checkpoints (any sizes and
recipes; their presets are read from the checkpoints' metadata; their tokenizers must be the same).
Trainable: the encoder, k memory embeddings, the [AE] embedding and the projector. The decoder is frozen
(no gradients, not in DDP buckets or the optimizer, dropout off) and never saved: an ICAE checkpoint
holds the trainable parts, the optimizer and scheduler, plus the decoder checkpoint's path and a SHA-256
of its files, checked again on resume and by `load_icae`. TP and DP (optionally with the distributed
optimizer); PP > 1 is refused. Defaults are Table 7's: 3 epochs, 32 samples per device and no
accumulation, linear LR 1e-4 -> 1e-5 after 100 warmup steps, weight decay 0.1, k = 128, r = 4 (L = 512).
Checkpoints, resume, signals and logging work as in `ccmega pretrain`; the log adds the reconstruction
token accuracy (teacher-forced argmax == target, over the L context tokens and the end token).
See docs/icae.md.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from ccmega.config import ConfigError, dump_yaml, parse_config
from ccmega.presets import FINETUNE_HPARAMS as T7
from ccmega.training.pretrain import (EXIT_NON_FINITE, LoggingSection, PrecisionSection, SkipCounter, StopRequest,
                                      _write_status, build_scheduler, current_lr, model_config)

EXIT_CONFIG = 2


# ---- config ----------------------------------------------------------------------------------------

@dataclass
class ModelSection:
    encoder: str | None = None  # pretraining checkpoint: run dir, its checkpoints dir or an iter dir
    decoder: str | None = None  # the same for the frozen decoder
    num_memory_slots: int = T7.num_memory_slots  # k
    compression_ratio: int = T7.compression_ratio  # r: L = k * r unless data.context_tokens is set
    end_token_id: int | None = None  # None: the tokenizer's end-of-document token
    tensor_parallel: int = 1
    pipeline_parallel: int = 1  # must stay 1: ICAE refuses pipeline parallelism


@dataclass
class DataSection:
    path: str | None = None  # fine-tune split prefix, e.g. OUT/D1/finetune (no .bin/.idx)
    valid_path: str | None = None  # optional validation split, e.g. OUT/D1/test
    context_tokens: int | None = None  # L; None: num_memory_slots x compression_ratio


@dataclass
class TrainSection:
    epochs: int = T7.epochs
    steps: int | None = None  # None: epochs x (whole global batches in the split)
    micro_batch_size: int = T7.micro_batch_size  # per device
    global_batch_size: int | None = None  # None: micro-batch x DP (Table 7: no accumulation)
    seed: int = 1234  # ICAE parameter init and the per-epoch shuffle
    distributed_optimizer: bool = False
    max_skipped_in_a_row: int = 10


@dataclass
class OptimSection:
    max_lr: float = T7.max_lr
    min_lr: float = T7.min_lr
    warmup_steps: int = T7.warmup_steps
    lr_decay_steps: int | None = None  # None: train steps (linear over the whole run)
    lr_decay_style: str = T7.lr_schedule
    weight_decay: float = T7.weight_decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class CheckpointSection:
    save_interval: int = 500  # steps; 0: only at the end and on signals
    resume: bool = True  # continue from RUN_DIR/checkpoints/latest when it exists


@dataclass
class ICAETrainConfig:
    run_dir: str = "runs/icae"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=lambda: LoggingSection(eval_interval=0))


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
    L = context_length(cfg)
    for role, meta in (("encoder", encoder), ("decoder", decoder)):
        positions = meta["model_preset"]["max_position_embeddings"]
        if L + cfg.model.num_memory_slots + 1 > positions:
            raise ConfigError(f"{role} preset {meta['model_preset']['name']} has {positions} positions, fewer than "
                              f"L + k + 1 = {L + cfg.model.num_memory_slots + 1}")
    return Plan(encoder=encoder, decoder=decoder, context_tokens=L, tokenizer=tokenizer)


def hash_checkpoint_files(iter_dir: str) -> str:
    """SHA-256 over every file of a checkpoint dir (relative names and bytes, sorted by name)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(iter_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, iter_dir).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()


def decoder_params_sha256(decoder) -> list[str]:
    """SHA-256 of the decoder's parameters, one per TP rank (gathered): proof the frozen decoder is untouched."""
    import torch
    from megatron.core import parallel_state as ps

    digest = hashlib.sha256()
    for name, param in sorted(decoder.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    hashes = [None] * ps.get_tensor_model_parallel_world_size()
    torch.distributed.all_gather_object(hashes, digest.hexdigest(), group=ps.get_tensor_model_parallel_group())
    return hashes


def _broadcast(value):
    import torch

    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ---- building the ICAE ------------------------------------------------------------------------------

def end_token_of(tokenizer: dict, override: int | None) -> int:
    if override is not None:
        return override
    from ccmega.data.tokenizers import load_tokenizer

    try:
        return int(load_tokenizer(tokenizer["path"]).eod_id)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; the end token is the tokenizer's EOD: make the tokenizer file available or "
                          "set model.end_token_id") from None


def build_icae(encoder_preset, decoder_preset, encoder_config, decoder_config, num_memory_slots: int,
               end_token_id: int, seed: int):
    """Encoder and decoder GPTModels for this rank (TP shards) wrapped in an ICAEModel (random weights)."""
    from ccmega.models.icae import ICAEModel
    from ccmega.models.qwen3 import build_model

    encoder = build_model(encoder_preset, encoder_config)
    decoder = build_model(decoder_preset, decoder_config)
    return ICAEModel(encoder, decoder, num_memory_slots=num_memory_slots, end_token_id=end_token_id,
                     real_vocab_size=decoder_preset.vocab_size, seed=seed)


def load_icae(icae_checkpoint: str, decoder_checkpoint: str | None = None, verify_decoder: bool = True,
              params_dtype=None):
    """Rebuild a trained ICAE for evaluation: encoder + trainable parts from the ICAE checkpoint, the frozen
    decoder from the pretraining checkpoint it was trained against (or `decoder_checkpoint`).

    Needs torch.distributed and megatron parallel_state initialised (e.g. `ccmega.runtime.initialize(tp)`);
    works at any TP (dist_checkpointing reshards). `verify_decoder` re-hashes the decoder checkpoint's files
    and refuses a decoder that differs from the one trained against. params_dtype: None = bf16 on GPU,
    fp32 on CPU. Returns the ICAEModel in eval mode, on the current device."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from ccmega.models.qwen3 import transformer_config
    from ccmega.presets import ModelPreset
    from ccmega.training.checkpointing import load_model_weights, read_checkpoint_metadata

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("load_icae needs megatron parallel_state: call ccmega.runtime.initialize(tp) first")
    meta = read_checkpoint_metadata(icae_checkpoint)
    if "icae" not in meta:
        raise ValueError(f"{meta['path']} is not an ICAE checkpoint (no 'icae' metadata): a pretraining checkpoint?")
    icae = meta["icae"]
    decoder_path = decoder_checkpoint or icae["decoder"]["checkpoint"]
    decoder_meta = read_checkpoint_metadata(decoder_path)
    if verify_decoder:
        found = hash_checkpoint_files(decoder_meta["path"]) if torch.distributed.get_rank() == 0 else None
        found = _broadcast(found)
        if found != icae["decoder"]["files_sha256"]:
            raise ValueError(f"decoder checkpoint {decoder_meta['path']} differs from the one this ICAE was trained "
                             f"against ({icae['decoder']['checkpoint']}, sha256 {icae['decoder']['files_sha256'][:16]}"
                             f"...; now {found[:16]}...); pass verify_decoder=False to use it anyway")
    if params_dtype is None:
        params_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tp = ps.get_tensor_model_parallel_world_size()
    presets = [ModelPreset(**icae[role]["model_preset"]) for role in ("encoder", "decoder")]
    configs = [transformer_config(p, tp, 1, params_dtype=params_dtype) for p in presets]
    model = build_icae(*presets, *configs, icae["num_memory_slots"], icae["end_token_id"], seed=0)
    load_model_weights(model.decoder, decoder_meta["path"])
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, meta["path"])
    model.load_state_dict(loaded["model"])
    return model.eval()


# ---- the forward step ----------------------------------------------------------------------------------

class ICAEForwardStep:
    """megatron forward_step: reconstruction loss per micro-batch; counts correct tokens on the side
    (the schedule only returns losses) for the token accuracy of the step."""

    def __init__(self, device):
        self.device = device
        self.correct, self.total = 0, 0

    def __call__(self, data_iterator, model):
        from ccmega.training.engine import masked_lm_loss

        context = next(data_iterator)["tokens"].to(self.device)
        per_token, correct = model(context)

        def loss_func(output):
            self.correct += int(correct.sum())
            self.total += correct.numel()
            return masked_lm_loss(torch_ones_like(output), output)

        return per_token, loss_func

    def accuracy(self) -> float:
        """Token accuracy since the last call, over the data-parallel group; resets the counts."""
        import torch
        from megatron.core import parallel_state as ps

        counts = torch.tensor([self.correct, self.total], dtype=torch.float64)
        torch.distributed.all_reduce(counts, group=ps.get_data_parallel_group())
        self.correct, self.total = 0, 0
        return float(counts[0] / counts[1]) if counts[1] else float("nan")


def torch_ones_like(t):
    import torch

    return torch.ones_like(t, dtype=torch.float32)


def icae_flops_per_sample(encoder_preset, decoder_preset, k: int, L: int) -> float:
    """Model FLOPs of one training sample: the encoder's forward + backward over L + k positions and the
    frozen decoder's forward + input-gradient backward (no weight gradients: 2/3 of training FLOPs)
    over k + 1 + L positions."""
    from ccmega.training.logging_utils import flops_per_token

    enc_s, dec_s = L + k, k + 1 + L
    return flops_per_token(encoder_preset, enc_s) * enc_s + 2 / 3 * flops_per_token(decoder_preset, dec_s) * dec_s


# ---- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(ICAETrainConfig, sys.argv[1:] if argv is None else argv, SHORTCUTS,
                          description=__doc__, prog="ccmega icae-train")
    try:
        the_plan = plan(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ccmega icae-train: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return run(cfg, the_plan)


def run(cfg: ICAETrainConfig, the_plan: Plan) -> int:
    from ccmega import runtime

    with runtime.session(cfg.model.tensor_parallel, 1, seed=cfg.train.seed) as env:
        return _run(env, cfg, the_plan)


def _run(env, cfg: ICAETrainConfig, the_plan: Plan) -> int:
    import torch
    from megatron.core import parallel_state as ps

    from ccmega.presets import ModelPreset
    from ccmega.training import checkpointing as ckpt
    from ccmega.training.data import global_batch
    from ccmega.training.engine import build_training_setup, evaluate_loss, train_step
    from ccmega.training.icae_data import ContextSamples, EpochShuffled, InOrder
    from ccmega.training.logging_utils import MetricsLogger, default_peak_tflops, print_rank0

    stop = StopRequest()
    rank0 = env.rank == 0
    run_dir = os.path.abspath(cfg.run_dir)
    if rank0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))

    k, L = cfg.model.num_memory_slots, the_plan.context_tokens
    enc_preset = ModelPreset(**the_plan.encoder["model_preset"])
    dec_preset = ModelPreset(**the_plan.decoder["model_preset"])
    end_token = end_token_of(the_plan.tokenizer, cfg.model.end_token_id)
    if not 0 <= end_token < min(enc_preset.vocab_size, dec_preset.vocab_size):
        raise ConfigError(f"end token {end_token} is outside the vocabulary of {enc_preset.name} "
                          f"({enc_preset.vocab_size}) or {dec_preset.name} ({dec_preset.vocab_size})")
    enc_config, dtype = model_config(cfg, enc_preset)
    dec_config, _ = model_config(cfg, dec_preset)
    model = build_icae(enc_preset, dec_preset, enc_config, dec_config, k, end_token, cfg.train.seed)
    decoder_files_sha256 = _broadcast(hash_checkpoint_files(the_plan.decoder["path"]) if rank0 else None)
    ckpt.load_model_weights(model.decoder, the_plan.decoder["path"])
    decoder_sha = decoder_params_sha256(model.decoder)

    o = cfg.optim
    setup = build_training_setup([model], enc_config, lr=o.max_lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                 adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                                 clip_grad=o.clip_grad, use_distributed_optimizer=cfg.train.distributed_optimizer)

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs = cfg.train.micro_batch_size
    gbs = cfg.train.global_batch_size or mbs * dp_size
    train_data = EpochShuffled(ContextSamples(cfg.data.path, L), gbs, cfg.train.seed)
    steps_per_epoch = train_data.epoch_samples // gbs
    steps = cfg.train.steps or cfg.train.epochs * steps_per_epoch
    decay_steps = o.lr_decay_steps or steps
    if o.warmup_steps >= decay_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be below the decay steps ({decay_steps}): "
                          "lower it for short runs (e.g. --warmup-steps 2)")
    scheduler = build_scheduler(setup.optimizer, o, steps)
    valid_data = InOrder(ContextSamples(cfg.data.valid_path, L)) if cfg.data.valid_path else None
    eval_batches = min(cfg.logging.eval_iters, len(valid_data) // gbs) if valid_data and cfg.logging.eval_interval else 0

    iteration = consumed = 0
    skips = SkipCounter(cfg.train.max_skipped_in_a_row)
    ckpt_dir = ckpt.checkpoints_dir(run_dir)
    if cfg.checkpoint.resume and ckpt.latest_iter_dir(ckpt_dir):
        saved = ckpt.read_checkpoint_metadata(ckpt_dir)
        if saved["icae"]["decoder"]["files_sha256"] != decoder_files_sha256:
            raise ConfigError(f"{saved['path']} was trained against decoder {saved['icae']['decoder']['checkpoint']} "
                              f"with other bytes than {the_plan.decoder['path']} has now: refusing to resume")
        progress = ckpt.load_checkpoint(ckpt_dir, setup.model, setup.optimizer, scheduler)
        iteration, consumed = progress["iteration"], progress["consumed_samples"]
        skips.total = progress.get("skipped_steps", 0)
        print_rank0(f"[ccmega] resumed from {progress['path']}: iteration {iteration}, {consumed} samples consumed"
                    + (" (layout changed: RNG state not restored)" if progress["layout_changed"] else ""))

    def role(meta, preset, **extra):
        return {"checkpoint": meta["path"], "model_preset": asdict(preset), **extra}

    metadata = {
        "tokenizer": the_plan.tokenizer, "dtype": dtype, "global_batch_size": gbs,
        "icae": {"num_memory_slots": k, "context_tokens": L, "compression_ratio": L / k, "end_token_id": end_token,
                 "encoder": role(the_plan.encoder, enc_preset),
                 "decoder": role(the_plan.decoder, dec_preset, files_sha256=decoder_files_sha256,
                                 params_sha256=decoder_sha),
                 "data": os.path.abspath(cfg.data.path)},
    }

    def save():
        if decoder_params_sha256(model.decoder) != decoder_sha:  # cannot happen unless freezing broke
            raise RuntimeError("the frozen decoder's parameters changed during training")
        progress = {"iteration": iteration, "consumed_samples": consumed, "skipped_steps": skips.total}
        t = time.perf_counter()
        path = ckpt.save_checkpoint(run_dir, setup.model, setup.optimizer, scheduler, progress, metadata)
        print_rank0(f"[ccmega] saved {path} in {time.perf_counter() - t:.1f} s")

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    forward_step = ICAEForwardStep(device)
    tokens_per_step = gbs * L  # context tokens compressed and reconstructed
    flops_sample = icae_flops_per_sample(enc_preset, dec_preset, k, L)
    peak = cfg.logging.peak_tflops or default_peak_tflops(cfg.precision.fp8)
    logger = MetricsLogger(run_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print_rank0(
        f"[ccmega] icae-train encoder {enc_preset.name} ({the_plan.encoder['path']}) -> frozen decoder "
        f"{dec_preset.name} ({the_plan.decoder['path']}); k={k} slots, L={L} tokens (r={L / k:g}); "
        f"{trainable / 1e6:.2f} M trainable params on this rank; {env.world_size} rank(s): TP "
        f"{ps.get_tensor_model_parallel_world_size()} x DP {dp_size}"
        f"{' (distributed optimizer)' if cfg.train.distributed_optimizer else ''}; {dtype}; {steps} steps x {gbs} "
        f"samples ({steps_per_epoch} steps/epoch, {len(train_data.samples)} samples in {cfg.data.path}); lr "
        f"{o.lr_decay_style} {o.max_lr:g} -> {o.min_lr:g}, warmup {o.warmup_steps}; run dir {run_dir}")

    def validate():
        losses = []
        for b in range(eval_batches):
            batches = global_batch(valid_data, b * gbs, gbs, mbs, dp_rank, dp_size)
            losses.append(evaluate_loss(setup, iter(batches), len(batches), L + 1, mbs, forward_step))
        loss, acc = sum(losses) / len(losses), forward_step.accuracy()
        logger.log("valid", iteration, {"loss": loss, "token_accuracy": acc},
                   f"[ccmega] step {iteration:>7d} | validation loss {loss:.4f} | token accuracy {100 * acc:.2f}%")

    last_saved = iteration if iteration else -1
    exit_code, state = 0, "finished"
    if eval_batches and iteration == 0:
        validate()  # the starting point: random memory slots and projector
    while iteration < steps:
        t0 = time.perf_counter()
        batches = global_batch(train_data, consumed, gbs, mbs, dp_rank, dp_size)
        epoch = train_data.epoch_of(consumed)
        lr = current_lr(setup.optimizer)
        result = train_step(setup, iter(batches), len(batches), L + 1, mbs, forward_step, skip_non_finite_loss=True)
        accuracy = forward_step.accuracy()
        if result.update_successful:
            scheduler.step(1)
        skips.update(result.update_successful)
        iteration += 1
        consumed += gbs
        step_time = time.perf_counter() - t0
        tflops = flops_sample * gbs / step_time / env.world_size / 1e12
        if iteration % cfg.logging.log_interval == 0 or not result.update_successful:
            values = {"loss": result.loss, "token_accuracy": accuracy, "lr": lr, "grad_norm": result.grad_norm,
                      "epoch": epoch, "consumed_samples": consumed, "step_time_s": step_time,
                      "tokens_per_s": tokens_per_step / step_time, "tflops_per_gpu": tflops, "mfu": tflops / peak,
                      "skipped": not result.update_successful, "skipped_total": skips.total}
            text = (f"[ccmega] step {iteration:>7d}/{steps} | epoch {epoch} | loss {result.loss:.4f} | token acc "
                    f"{100 * accuracy:.2f}% | lr {lr:.3e} | grad norm {result.grad_norm:.3f} | "
                    f"{tokens_per_step / step_time:,.0f} tok/s | {tflops:.2f} TFLOP/s/GPU"
                    + (" | SKIPPED (non-finite loss)" if values["skipped"] else ""))
            logger.log("train", iteration, values, text)
        if skips.exceeded:
            print_rank0(f"[ccmega] stopping: {skips.in_a_row} steps in a row had a non-finite loss; resume from "
                        "the last checkpoint with a lower learning rate")
            exit_code, state = EXIT_NON_FINITE, "diverged"
            break
        if eval_batches and iteration % cfg.logging.eval_interval == 0:
            validate()
        stopping = stop.agreed()
        interval = cfg.checkpoint.save_interval
        if stopping or iteration == steps or (interval and iteration % interval == 0):
            save()
            last_saved = iteration
        if stopping:
            print_rank0(f"[ccmega] got {stop.signal_name or 'a signal on another rank'}: checkpoint at step "
                        f"{iteration} saved, exiting")
            state = "interrupted"
            break
    if state == "finished" and last_saved != iteration:
        save()
    if rank0:
        _write_status(run_dir, state=state, iteration=iteration, steps=steps, skipped_steps=skips.total)
        print(f"[ccmega] {state} at step {iteration}/{steps}; {skips.total} step(s) skipped; run dir {run_dir}",
              flush=True)
    logger.close()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
