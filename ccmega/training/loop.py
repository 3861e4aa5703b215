"""The one training loop: every training command (`ccmega pretrain`, `ccmega icae-train`) is a `Task`.

A command parses its config and hands `run` a function that builds its Task: the model chunks, the
data, the forward step, what its checkpoints record. The loop owns everything else, the same way for
every task: megatron DDP + optimizer + LR schedule, resume (through the Checkpointer, which checks what
it resumes), the step loop, validation, SIGTERM/SIGUSR1, non-finite-loss skips, logging, saving and
RUN_DIR/status.json (a run that dies of an exception leaves it `failed`, with the error).

One step: the global batch at `consumed_samples` -> get_forward_backward_func (micro-batches, pipeline
schedule) -> DP grad reduction -> clip -> AdamW -> OptimizerParamScheduler.
"""
from __future__ import annotations

import glob
import json
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ccmega.config import ConfigError, dump_yaml

EXIT_CONFIG = 2
EXIT_NON_FINITE = 3


# ---- what a task provides -------------------------------------------------------------------------------

@dataclass
class Task:
    """One training job, described for the loop. Batches come from `train_data[sample]` cut by
    `ccmega.training.data.global_batch`, so the order is a pure function of consumed samples."""

    modules: list  # this rank's model chunks (before DDP)
    config: object  # the TransformerConfig that drives the schedule and the optimizer's precision
    forward_step: Callable
    train_data: object
    steps: int
    global_batch_size: int
    micro_batch_size: int
    seq_length: int  # what the pipeline schedule is told (tokens per sample through the model)
    tokens_per_sample: int  # counted in tokens/s
    flops_per_sample: float  # model FLOPs of one sample (forward + backward), for TFLOP/s and MFU
    metadata: dict  # written into every checkpoint's ccmega.json
    identity: dict  # checked against the checkpoint on resume (see Checkpointer)
    banner: str  # the start-up line (what is trained, on what)
    valid_data: object | None = None
    eval_batches: int = 0
    validate_at_start: bool = False
    load_initial_weights: Callable[[], None] | None = None  # a fresh start only (not a resume)
    step_metrics: Callable[[], dict] = field(default=dict)  # extra values after a train step or validation
    # (iteration, loss) -> (values, FLOPs): work after a step (the ICAE's collapse check), every step; values
    # put the step in the log, FLOPs (the whole job's) count in its TFLOP/s and MFU
    after_step: Callable[[int, float], tuple[dict, float]] | None = None
    status: dict = field(default_factory=dict)  # what the task adds to status.json (it may add more as it trains)
    epoch_of: Callable[[int], int] | None = None  # consumed samples -> epoch, when the data has epochs
    check_before_save: Callable[[], None] | None = None


# ---- pieces of the loop ---------------------------------------------------------------------------------

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

        from ccmega.runtime import device

        flag = torch.tensor([1 if self.signal_name else 0], dtype=torch.int32, device=device())
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


def fp8_unavailable_reason(precision) -> str | None:
    from ccmega.runtime import transformer_engine

    if not precision.fp8:
        return None
    if precision.fp8 not in ("hybrid", "e4m3"):
        return f"precision.fp8 must be 'hybrid' or 'e4m3', not {precision.fp8!r}"
    return transformer_engine.fp8_problem(precision.fp8, precision.fp8_recipe)


def resolved_dtype(precision) -> str:
    """bf16 or fp32: "auto" is bf16 on a GPU, fp32 on a CPU."""
    import torch

    dtype = precision.dtype
    if dtype == "auto":
        dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if dtype not in ("bf16", "fp32"):
        raise ConfigError(f"precision.dtype must be auto, bf16 or fp32, not {dtype!r}")
    return dtype


def model_config(precision, preset, tensor_parallel: int, pipeline_parallel: int, speed=None):
    """The TransformerConfig of a preset for this run: dtype by platform, FP8 through TE when asked, and the
    kernel fusions of a resolved `speed` section (ccmega/training/speed.py; None: all off)."""
    import torch

    from ccmega.models.qwen3 import transformer_config

    dtype = resolved_dtype(precision)
    overrides = {}
    if precision.fp8:
        overrides = dict(fp8=precision.fp8, fp8_recipe=precision.fp8_recipe)
        if precision.fp8_bf16_layers:
            overrides.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=precision.fp8_bf16_layers,
                             num_layers_at_end_in_bf16=precision.fp8_bf16_layers)
    if speed is not None:
        overrides.update(cross_entropy_loss_fusion=bool(speed.cross_entropy_fusion),
                         cross_entropy_fusion_impl="native", apply_rope_fusion=bool(speed.rope_fusion),
                         gradient_accumulation_fusion=bool(speed.gradient_accumulation_fusion))
    params_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    return transformer_config(preset, tensor_parallel, pipeline_parallel, params_dtype=params_dtype,
                              **overrides), dtype


def decay_steps_of(optim, steps: int) -> int:
    """The LR decay length; the warmup must end before it (one rule for every task)."""
    decay_steps = optim.lr_decay_steps or steps
    if optim.warmup_steps >= decay_steps:
        raise ConfigError(f"optim.warmup_steps={optim.warmup_steps} must be below the decay steps ({decay_steps}: "
                          f"optim.lr_decay_steps or train.steps); lower it for a short run, e.g. "
                          f"--warmup-steps {max(decay_steps // 20, 1) if decay_steps > 1 else 0}")
    return decay_steps


def build_scheduler(optimizer, optim, steps: int):
    """Linear warmup from 0, then `lr_decay_style` down to min_lr at the decay steps (default: the last)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.max_lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=decay_steps_of(optim, steps),
        lr_decay_style=optim.lr_decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(steps, 1), wd_incr_style="constant")


def schedule_identity(cfg, steps: int, global_batch_size: int) -> dict:
    """The schedule fields a resume checks (resolved values, not the config's Nones)."""
    o = cfg.optim
    return {"train.steps": steps, "train.global_batch_size": global_batch_size,
            "optim.warmup_steps": o.warmup_steps, "optim.lr_decay_steps": o.lr_decay_steps or steps,
            "optim.max_lr": o.max_lr, "optim.min_lr": o.min_lr, "optim.lr_decay_style": o.lr_decay_style}


def record_config(run_dir: str, cfg) -> None:
    """RUN_DIR/config.yaml is the first start's config (evaluation reads it) and is never overwritten;
    every start also leaves its resolved config in RUN_DIR/configs/start_NNN.yaml."""
    from ccmega.fileio import atomic_write_text

    text = dump_yaml(cfg)
    first = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(first):
        atomic_write_text(first, text)
    history = os.path.join(run_dir, "configs")
    os.makedirs(history, exist_ok=True)
    n = len(glob.glob(os.path.join(history, "start_*.yaml")))
    atomic_write_text(os.path.join(history, f"start_{n:03d}.yaml"), f"# started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                      + text)


def write_status(run_dir: str, **status) -> None:
    from ccmega.fileio import atomic_write_text

    atomic_write_text(os.path.join(run_dir, "status.json"), json.dumps(status) + "\n")


def error_line(error: BaseException) -> str:
    """The last line of the exception's traceback, e.g. "ValueError: Param id 17 does not match any model
    sharded param" (a CheckpointException's is the failing writer's own error)."""
    lines = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()
    line = lines[-1].strip() if lines else type(error).__name__
    return line if len(line) <= 1000 else line[:1000] + " [...]"


def record_failure(run_dir: str, error: BaseException, **status) -> None:
    """status.json says `failed` with the error; never raises (the error itself must propagate)."""
    try:
        write_status(run_dir, state="failed", error=error_line(error), **status)
    except Exception as e:  # e.g. the disk that failed the save
        print(f"[ccmega] could not record the failure in {run_dir}/status.json: {e}", file=sys.stderr, flush=True)


def _format_extra(values: dict) -> str:
    return "".join(f" | {key.replace('_', ' ')} {100 * v:.2f}%" if key.endswith("accuracy") else
                   f" | {key.replace('_', ' ')} {v:.4g}" for key, v in values.items())


# ---- the loop -----------------------------------------------------------------------------------------------

def run(command: str, cfg, build_task: Callable) -> int:
    """Start the distributed runtime, build the task and train it. Returns the process exit code."""
    from ccmega import runtime
    from ccmega.runtime import lifetime

    reason = fp8_unavailable_reason(cfg.precision)
    if reason:
        print(f"ccmega {command}: {reason}", file=sys.stderr)
        return EXIT_CONFIG
    with lifetime.children_die_with_this_process(), \
            runtime.session(cfg.model.tensor_parallel, cfg.model.pipeline_parallel, seed=cfg.train.seed) as env:
        stop = StopRequest()  # before the slow start-up: a signal during it still counts
        run_dir = os.path.abspath(cfg.run_dir)
        try:
            from ccmega.training.logging_utils import print_rank0

            cfg = resolve_speed(cfg, env.world_size // (cfg.model.tensor_parallel * cfg.model.pipeline_parallel),
                                log=print_rank0)
            task = build_task(env, cfg)
            trainer = Trainer(env, cfg, task, stop, run_dir)
        except (ConfigError, FileNotFoundError) as e:  # refused before anything ran: status.json unchanged
            print(f"ccmega {command}: error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        except BaseException as e:  # e.g. a checkpoint that does not load
            if env.rank == 0:
                record_failure(run_dir, e)
            raise
        return trainer.train()


def resolve_speed(cfg, data_parallel: int, log, cuda: bool | None = None):
    """`cfg` with Megatron-LM's speed switches decided for this platform (ccmega/training/speed.py), each
    logged with its reason. `cuda` overrides what torch sees (a dry run checks a GPU job)."""
    from ccmega.training import speed

    dtype = resolved_dtype(cfg.precision) if cuda is None else cfg.precision.dtype
    cfg, switches = speed.resolve(cfg, speed.platform_here(dtype, data_parallel, cuda))
    for line in speed.describe(switches):
        log(f"[ccmega] switch {line}")
    return cfg


def build_setup(task: Task, cfg):
    """megatron DDP + optimizer over the task's modules, and the LR schedule."""
    from ccmega.training.engine import build_training_setup

    o = cfg.optim
    setup = build_training_setup(
        task.modules, task.config, lr=o.max_lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        use_distributed_optimizer=cfg.train.distributed_optimizer, overlap_grad_reduce=cfg.speed.overlap_grad_reduce,
        overlap_param_gather=cfg.speed.overlap_param_gather)
    return setup, build_scheduler(setup.optimizer, o, task.steps)


class Trainer:
    def __init__(self, env, cfg, task: Task, stop: StopRequest, run_dir: str):
        from megatron.core import parallel_state as ps

        from ccmega.training.checkpointer import Checkpointer
        from ccmega.training.logging_utils import MetricsLogger, default_peak_tflops, print_rank0

        self.env, self.cfg, self.task, self.stop, self.run_dir = env, cfg, task, stop, run_dir
        self.rank0 = env.rank == 0
        self.log = print_rank0
        if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be at least 1 (or null: keep all), not {cfg.checkpoint.keep_last}")
        decay_steps_of(cfg.optim, task.steps)  # refuse a bad schedule before the slow parts
        self.checkpointer = Checkpointer(run_dir, cfg.checkpoint, task.identity, task.metadata, log=print_rank0)
        resume_from = self.checkpointer.resume_point()
        if self.rank0:
            os.makedirs(run_dir, exist_ok=True)
            record_config(run_dir, cfg)
        if resume_from is None and task.load_initial_weights is not None:
            task.load_initial_weights()  # before the optimizer copies the parameters into its main params
        self.setup, self.scheduler = build_setup(task, cfg)
        self.iteration = self.consumed = 0
        self.skips = SkipCounter(cfg.train.max_skipped_in_a_row)
        if resume_from:
            progress = self.checkpointer.load(resume_from, self.setup, self.scheduler)
            self.iteration, self.consumed = progress["iteration"], progress["consumed_samples"]
            self.skips.total = progress.get("skipped_steps", 0)
            print_rank0(f"[ccmega] resumed from {progress['path']}: iteration {self.iteration}, {self.consumed} "
                        "samples consumed" + (" (layout changed: RNG state not restored)"
                                              if progress["layout_changed"] else ""))
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.peak = cfg.logging.peak_tflops or default_peak_tflops(cfg.precision.fp8)
        self.metrics = MetricsLogger(run_dir, enabled=self.rank0, tensorboard=cfg.logging.tensorboard)
        o = cfg.optim
        print_rank0(f"{task.banner}; lr {o.lr_decay_style} {o.max_lr:g} -> {o.min_lr:g}, warmup "
                    f"{self.scheduler.lr_warmup_steps}, decay over {self.scheduler.lr_decay_steps} steps; run dir {run_dir}")

    def _batches(self, dataset, first_sample: int):
        from ccmega.training.data import global_batch

        t = self.task
        return global_batch(dataset, first_sample, t.global_batch_size, t.micro_batch_size, self.dp_rank, self.dp_size)

    def validate(self) -> None:
        from ccmega.training.engine import evaluate_loss

        t = self.task
        losses = []
        for b in range(t.eval_batches):
            batches = self._batches(t.valid_data, b * t.global_batch_size)
            losses.append(evaluate_loss(self.setup, iter(batches), len(batches), t.seq_length, t.micro_batch_size,
                                        t.forward_step))
        loss = sum(losses) / len(losses)
        values = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), **t.step_metrics()}
        self.metrics.log("valid", self.iteration, values,
                         f"[ccmega] step {self.iteration:>7d} | validation loss {loss:.4f}"
                         + _format_extra({k: v for k, v in values.items() if k != "loss"}))

    def step(self) -> bool:
        """One optimizer step and its log line; False when the run must stop for non-finite losses."""
        from ccmega.training.engine import train_step

        t = self.task
        t0 = time.perf_counter()
        batches = self._batches(t.train_data, self.consumed)
        epoch = t.epoch_of(self.consumed) if t.epoch_of else None
        lr = float(self.setup.optimizer.param_groups[0]["lr"])
        result = train_step(self.setup, iter(batches), len(batches), t.seq_length, t.micro_batch_size,
                            t.forward_step, skip_non_finite_loss=True)
        extra = t.step_metrics()
        if result.update_successful:
            self.scheduler.step(1)
        self.skips.update(result.update_successful)
        self.iteration += 1
        self.consumed += t.global_batch_size
        after, after_flops = t.after_step(self.iteration, result.loss) if t.after_step else ({}, 0.0)
        extra.update(after)
        step_time = time.perf_counter() - t0  # with the work after the step: the time the step really took
        tokens_per_s = t.tokens_per_sample * t.global_batch_size / step_time
        flops = t.flops_per_sample * t.global_batch_size + after_flops
        tflops = flops / step_time / self.env.world_size / 1e12
        if self.iteration % self.cfg.logging.log_interval == 0 or not result.update_successful or after:
            values = {"loss": result.loss, **extra, "lr": lr, "grad_norm": result.grad_norm,
                      **({"epoch": epoch} if epoch is not None else {}), "consumed_samples": self.consumed,
                      "step_time_s": step_time, "tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops,
                      "mfu": tflops / self.peak, "skipped": not result.update_successful,
                      "skipped_total": self.skips.total}
            text = (f"[ccmega] step {self.iteration:>7d}/{t.steps}" + (f" | epoch {epoch}" if epoch is not None else "")
                    + f" | loss {result.loss:.4f}" + _format_extra(extra) + f" | lr {lr:.3e} | grad norm "
                    f"{result.grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | {tflops:.3g} TFLOP/s/GPU | MFU "
                    f"{100 * tflops / self.peak:.3g}%" + (" | SKIPPED (non-finite loss)" if values["skipped"] else ""))
            self.metrics.log("train", self.iteration, values, text)
            if t.status != self.status_written:  # e.g. a warning the task recorded: on disk now, not at the end
                self.write_status("running")
        if self.skips.exceeded:
            self.log(f"[ccmega] stopping: {self.skips.in_a_row} steps in a row had a non-finite loss (limit "
                     f"train.max_skipped_in_a_row={self.skips.limit}); parameters are those of step "
                     f"{self.iteration - self.skips.in_a_row}. Lower the learning rate or check the data, then resume "
                     "from the last checkpoint.")
            return False
        return True

    def save(self) -> None:
        from ccmega.training.engine import gather_params

        gather_params(self.setup)  # the checkpoint holds this step's parameters, not the last gathered ones
        if self.task.check_before_save:
            self.task.check_before_save()
        progress = {"iteration": self.iteration, "consumed_samples": self.consumed, "skipped_steps": self.skips.total}
        self.checkpointer.save(self.setup, self.scheduler, progress)

    def write_status(self, state: str) -> None:
        self.status_written = dict(self.task.status)
        if self.rank0:
            write_status(self.run_dir, state=state, iteration=self.iteration, steps=self.task.steps,
                         skipped_steps=self.skips.total, **self.task.status)

    def train(self) -> int:
        """Train to the end (or a stop); an exception leaves status.json `failed` (rank 0) and propagates."""
        try:
            return self._train()
        except BaseException as e:
            if self.rank0:
                record_failure(self.run_dir, e, iteration=self.iteration, steps=self.task.steps,
                               skipped_steps=self.skips.total, **self.task.status)
            raise

    def _train(self) -> int:
        t, cfg = self.task, self.cfg
        steps = t.steps
        self.write_status("running")
        exit_code, state = 0, "finished"
        if t.eval_batches and t.validate_at_start and self.iteration == 0:
            self.validate()  # the starting point
        while self.iteration < steps:
            if not self.step():
                exit_code, state = EXIT_NON_FINITE, "diverged"
                break
            if t.eval_batches and cfg.logging.eval_interval and self.iteration % cfg.logging.eval_interval == 0:
                self.validate()
            stopping = self.stop.agreed()
            if self.checkpointer.due(self.iteration, self.iteration == steps, stopping):
                self.save()
            if stopping:
                self.log(f"[ccmega] got {self.stop.signal_name or 'a signal on another rank'}: checkpoint at step "
                         f"{self.iteration} saved, exiting")
                state = "interrupted"
                break
        if state == "finished" and self.checkpointer.due(self.iteration, True, False):  # resumed at the very end
            self.save()
        self.write_status(state)
        if self.rank0:
            print(f"[ccmega] {state} at step {self.iteration}/{steps}; {self.skips.total} step(s) skipped; run dir "
                  f"{self.run_dir}", flush=True)
        self.metrics.close()
        return exit_code
