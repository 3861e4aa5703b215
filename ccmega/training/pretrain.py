"""`ccmega pretrain`: pretrain a Qwen3 preset from scratch on megatron indexed datasets (paper §3.3, Table 6).

    ccmega pretrain --config examples/pretrain_tiny.yaml --set train.steps=20
    torchrun --nproc-per-node 8 -m ccmega.cli pretrain --preset qwen3-1b --data OUT/D6/pretrain \
        --run-dir runs/d6_1b --fp8 hybrid

One step: the global batch at `consumed_samples` -> get_forward_backward_func (micro-batches, pipeline
schedule) -> DP grad reduction -> clip -> AdamW -> OptimizerParamScheduler. Checkpoints every
`checkpoint.save_interval` steps, at the end, and at the first step boundary after SIGTERM/SIGUSR1
(then exit 0; the SLURM launcher requeues). A run resumes from RUN_DIR/checkpoints/latest by default.
See docs/pretraining.md.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

from ccmega.config import ConfigError, dump_yaml, parse_config
from ccmega.presets import PRETRAIN_HPARAMS as T6

EXIT_NON_FINITE = 3
EXIT_FP8_UNAVAILABLE = 2


# ---- config ----------------------------------------------------------------------------------------

@dataclass
class ModelSection:
    preset: str = "qwen3-200m"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1


@dataclass
class DataSection:
    paths: list[str] = field(default_factory=list)  # indexed-dataset prefixes (no .bin/.idx)
    weights: list[float] | None = None  # blend weights; None: proportional to size
    split: str = "99,1,0"  # train, valid, test shares of the documents
    tokenizer: str | None = None  # tokenizer.json / folder / SentencePiece .model; None: Qwen3
    seq_length: int = T6.seq_length


@dataclass
class TrainSection:
    steps: int | None = None  # None: one epoch of the train split (Table 6: 1 epoch)
    global_batch_size: int = T6.global_batch_size
    micro_batch_size: int = T6.micro_batch_size
    seed: int = 1234
    distributed_optimizer: bool = False
    max_skipped_in_a_row: int = 10  # non-finite losses in a row before the run stops


@dataclass
class OptimSection:
    max_lr: float = T6.max_lr
    min_lr: float = T6.min_lr
    warmup_steps: int = T6.warmup_steps
    lr_decay_steps: int | None = None  # None: train.steps (cosine over the whole budget)
    lr_decay_style: str = T6.lr_schedule
    weight_decay: float = T6.weight_decay
    adam_beta1: float = T6.adam_beta1
    adam_beta2: float = T6.adam_beta2
    adam_eps: float = 1e-8
    clip_grad: float = T6.clip_grad


@dataclass
class PrecisionSection:
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or bf16 / fp32
    fp8: str | None = None  # hybrid | e4m3 (Transformer Engine on GPU only)
    fp8_recipe: str = "tensorwise"  # tensorwise | delayed | blockwise | mxfp8
    fp8_bf16_layers: int = 0  # keep this many layers at EACH end of the stack in bf16


@dataclass
class CheckpointSection:
    save_interval: int = 1000  # steps; 0: only at the end and on signals
    resume: bool = True  # continue from RUN_DIR/checkpoints/latest when it exists
    init_from: str | None = None  # start a new run from these weights (fresh optimizer and schedule)


@dataclass
class LoggingSection:
    log_interval: int = 1
    eval_interval: int = 1000  # steps; 0: never
    eval_iters: int = 10  # global batches per validation (the same batches every time)
    tensorboard: bool = True
    peak_tflops: float | None = None  # per GPU; None: 989 (H800 bf16 dense) or 1979 with FP8


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
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


# ---- pieces of the loop ---------------------------------------------------------------------------

class StopRequest:
    """SIGTERM/SIGUSR1 only set a flag; the loop acts on it at the next step boundary, on all ranks."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal_name = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank when any rank got a signal (a collective: call it on all ranks)."""
        import torch

        flag = torch.tensor([1 if self.signal_name else 0], dtype=torch.int32,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class SkipCounter:
    """Counts steps skipped for a non-finite loss; `exceeded` after `limit` in a row."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.in_a_row = limit, total, 0

    def update(self, update_successful: bool) -> None:
        if update_successful:
            self.in_a_row = 0
        else:
            self.total += 1
            self.in_a_row += 1

    @property
    def exceeded(self) -> bool:
        return self.limit > 0 and self.in_a_row >= self.limit


def fp8_unavailable_reason(precision: PrecisionSection) -> str | None:
    from ccmega.models.qwen3 import transformer_engine_available

    if not precision.fp8:
        return None
    if precision.fp8 not in ("hybrid", "e4m3"):
        return f"precision.fp8 must be 'hybrid' or 'e4m3', not {precision.fp8!r}"
    if not transformer_engine_available():
        import importlib.util

        import torch

        return (f"--fp8 {precision.fp8} needs NVIDIA Transformer Engine on a CUDA GPU "
                f"(CUDA available: {torch.cuda.is_available()}, transformer_engine installed: "
                f"{importlib.util.find_spec('transformer_engine') is not None}); drop --fp8 "
                "or run on a GPU node with Transformer Engine")
    return None


def model_config(cfg: PretrainConfig, preset):
    """The TransformerConfig for this run: dtype by platform, FP8 through TE when asked."""
    import torch

    from ccmega.models.qwen3 import transformer_config

    dtype = cfg.precision.dtype
    if dtype == "auto":
        dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if dtype not in ("bf16", "fp32"):
        raise ConfigError(f"precision.dtype must be auto, bf16 or fp32, not {dtype!r}")
    overrides = {}
    if cfg.precision.fp8:
        overrides = dict(fp8=cfg.precision.fp8, fp8_recipe=cfg.precision.fp8_recipe)
        if cfg.precision.fp8_bf16_layers:
            overrides.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=cfg.precision.fp8_bf16_layers,
                             num_layers_at_end_in_bf16=cfg.precision.fp8_bf16_layers)
    params_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    return transformer_config(preset, cfg.model.tensor_parallel, cfg.model.pipeline_parallel,
                              params_dtype=params_dtype, **overrides), dtype


def build_scheduler(optimizer, optim: OptimSection, steps: int):
    """Linear warmup from 0, then `lr_decay_style` down to min_lr at lr_decay_steps (default: the last step).
    The warmup is cut to decay_steps - 1 when a short run would not reach its end (megatron requires it)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from ccmega.training.logging_utils import print_rank0

    decay_steps = optim.lr_decay_steps or steps
    warmup = optim.warmup_steps
    if warmup >= decay_steps:
        warmup = max(decay_steps - 1, 0)
        print_rank0(f"[ccmega] warning: warmup {optim.warmup_steps} >= decay steps {decay_steps}: warmup cut to {warmup}")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.max_lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(steps, 1), wd_incr_style="constant")


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _write_status(run_dir: str, **status) -> None:
    from ccmega.fileio import atomic_write_text

    atomic_write_text(os.path.join(run_dir, "status.json"), json.dumps(status) + "\n")


# ---- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(PretrainConfig, sys.argv[1:] if argv is None else argv, SHORTCUTS,
                          description=__doc__, prog="ccmega pretrain")
    reason = fp8_unavailable_reason(cfg.precision)
    if reason:
        print(f"ccmega pretrain: {reason}", file=sys.stderr)
        return EXIT_FP8_UNAVAILABLE
    if not cfg.data.paths:
        print("ccmega pretrain: no data: give --data PREFIX[,PREFIX...] (or data.paths in the config)",
              file=sys.stderr)
        return 2
    return run(cfg)


def run(cfg: PretrainConfig) -> int:
    from ccmega import runtime

    with runtime.session(cfg.model.tensor_parallel, cfg.model.pipeline_parallel, seed=cfg.train.seed) as env:
        return _run(env, cfg)


def _run(env, cfg: PretrainConfig) -> int:
    from megatron.core import parallel_state as ps

    from ccmega.data.tokenizers import load_tokenizer
    from ccmega.models.qwen3 import build_model
    from ccmega.presets import model_preset
    from ccmega.training import checkpointing as ckpt
    from ccmega.training.data import build_datasets, global_batch
    from ccmega.training.engine import build_training_setup, evaluate_loss, train_step
    from ccmega.training.logging_utils import MetricsLogger, default_peak_tflops, flops_per_token, print_rank0

    stop = StopRequest()  # before the slow start-up: a signal during it still counts
    rank0 = env.rank == 0
    run_dir = os.path.abspath(cfg.run_dir)
    if rank0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))

    preset = model_preset(cfg.model.preset)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > preset.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but {preset.name} only "
                          f"{preset.vocab_size} embedding rows")
    config, dtype = model_config(cfg, preset)
    model = build_model(preset, config)
    o = cfg.optim
    setup = build_training_setup([model], config, lr=o.max_lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                 adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                                 clip_grad=o.clip_grad, use_distributed_optimizer=cfg.train.distributed_optimizer)

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    gbs, mbs, seq = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.data.seq_length
    eval_batches = cfg.logging.eval_iters if cfg.logging.eval_interval > 0 else 0
    data = build_datasets(cfg.data.paths, cfg.data.weights, cfg.data.split, seq, cfg.train.seed, tokenizer,
                          os.path.join(run_dir, "data_cache"),
                          train_samples=cfg.train.steps * gbs if cfg.train.steps else None,
                          valid_samples=eval_batches * gbs)
    if eval_batches and data.valid is None:
        print_rank0(f"[ccmega] warning: split {cfg.data.split!r} leaves no validation documents: validation off")
        eval_batches = 0
    steps = cfg.train.steps or len(data.train) // gbs
    if steps <= 0:
        raise ConfigError(f"the train split has {len(data.train)} sequences: less than one global batch of {gbs}")
    scheduler = build_scheduler(setup.optimizer, o, steps)

    iteration = consumed = 0
    skips = SkipCounter(cfg.train.max_skipped_in_a_row)
    ckpt_dir = ckpt.checkpoints_dir(run_dir)
    if cfg.checkpoint.resume and ckpt.latest_iter_dir(ckpt_dir):
        progress = ckpt.load_checkpoint(ckpt_dir, setup.model, setup.optimizer, scheduler)
        iteration, consumed = progress["iteration"], progress["consumed_samples"]
        skips.total = progress.get("skipped_steps", 0)
        print_rank0(f"[ccmega] resumed from {progress['path']}: iteration {iteration}, {consumed} samples consumed"
                    + (" (layout changed: RNG state not restored)" if progress["layout_changed"] else ""))
    elif cfg.checkpoint.init_from:
        meta = ckpt.load_model_weights(setup.model[0], cfg.checkpoint.init_from)
        print_rank0(f"[ccmega] initialised weights from {meta['path']}")

    metadata = {"model_preset": asdict(preset),
                "tokenizer": {"path": str(tokenizer.path), "identity": tokenizer.identity},
                "dtype": dtype, "fp8": cfg.precision.fp8, "seq_length": seq, "global_batch_size": gbs}

    def save():
        progress = {"iteration": iteration, "consumed_samples": consumed, "skipped_steps": skips.total}
        t = time.perf_counter()
        path = ckpt.save_checkpoint(run_dir, setup.model, setup.optimizer, scheduler, progress, metadata)
        print_rank0(f"[ccmega] saved {path} in {time.perf_counter() - t:.1f} s")

    tokens_per_step = gbs * seq
    flops_token = flops_per_token(preset, seq)
    peak = cfg.logging.peak_tflops or default_peak_tflops(cfg.precision.fp8)
    logger = MetricsLogger(run_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard)
    print_rank0(
        f"[ccmega] pretrain {preset.name} ({preset.total_params() / 1e6:.1f} M params) on {env.world_size} "
        f"rank(s): TP {config.tensor_model_parallel_size} x PP {config.pipeline_model_parallel_size} x DP {dp_size}; "
        f"{dtype}{' + fp8 ' + cfg.precision.fp8 if cfg.precision.fp8 else ''}; {steps} steps x {gbs} seqs x {seq} "
        f"tokens = {steps * tokens_per_step / 1e9:.3f} B tokens ({len(data.train)} train sequences); "
        f"lr {o.lr_decay_style} {o.max_lr:g} -> {o.min_lr:g}, warmup {scheduler.lr_warmup_steps}, decay over "
        f"{scheduler.lr_decay_steps} steps; run dir {run_dir}")

    def validate():
        losses = []
        for b in range(eval_batches):
            batches = global_batch(data.valid, b * gbs, gbs, mbs, dp_rank, dp_size)
            losses.append(evaluate_loss(setup, iter(batches), len(batches), seq, mbs))
        loss = sum(losses) / len(losses)
        logger.log("valid", iteration, {"loss": loss, "ppl": math.exp(min(loss, 50.0))},
                   f"[ccmega] step {iteration:>7d} | validation loss {loss:.4f} | ppl {math.exp(min(loss, 50.0)):.2f}")

    last_saved = iteration if iteration else -1
    exit_code, state = 0, "finished"
    while iteration < steps:
        t0 = time.perf_counter()
        batches = global_batch(data.train, consumed, gbs, mbs, dp_rank, dp_size)
        lr = current_lr(setup.optimizer)
        result = train_step(setup, iter(batches), len(batches), seq, mbs, skip_non_finite_loss=True)
        if result.update_successful:
            scheduler.step(1)
        skips.update(result.update_successful)
        iteration += 1
        consumed += gbs
        step_time = time.perf_counter() - t0
        tokens_per_s = tokens_per_step / step_time
        tflops = flops_token * tokens_per_s / env.world_size / 1e12
        if iteration % cfg.logging.log_interval == 0 or not result.update_successful:
            values = {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "consumed_samples": consumed,
                      "step_time_s": step_time, "tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops,
                      "mfu": tflops / peak, "skipped": not result.update_successful, "skipped_total": skips.total}
            text = (f"[ccmega] step {iteration:>7d}/{steps} | loss {result.loss:.4f} | lr {lr:.3e} | "
                    f"grad norm {result.grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | {tflops:.3g} TFLOP/s/GPU | "
                    f"MFU {100 * tflops / peak:.3g}%" + (" | SKIPPED (non-finite loss)" if values["skipped"] else ""))
            logger.log("train", iteration, values, text)
        if skips.exceeded:
            print_rank0(f"[ccmega] stopping: {skips.in_a_row} steps in a row had a non-finite loss (limit "
                        f"train.max_skipped_in_a_row={skips.limit}); parameters are those of step "
                        f"{iteration - skips.in_a_row}. Lower the learning rate or check the data, then resume "
                        "from the last checkpoint.")
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
    if state == "finished" and last_saved != iteration:  # resumed at the very end
        save()
    if rank0:
        _write_status(run_dir, state=state, iteration=iteration, steps=steps, skipped_steps=skips.total)
        print(f"[ccmega] {state} at step {iteration}/{steps}; {skips.total} step(s) skipped; run dir {run_dir}",
              flush=True)
    logger.close()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
