"""Config sections every training command shares (train, optim, precision, checkpoint, logging).

A command's config is a dataclass of these plus its own `model` and `data` sections; a command that
wants other defaults (Table 7 for the ICAE instead of Table 6) passes them through `default_factory`
instead of declaring the section again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ccmega.presets import PRETRAIN_HPARAMS as T6


@dataclass
class TrainSection:
    steps: int | None = None  # None: `epochs` over the train split
    epochs: int = 1  # used only when steps is None (Table 6: 1 epoch; Table 7: 3)
    global_batch_size: int | None = T6.global_batch_size  # None: micro-batch x DP (no accumulation)
    micro_batch_size: int = T6.micro_batch_size
    seed: int = 1234
    distributed_optimizer: bool | None = None  # None: on for a GPU job with DP > 1 (ccmega/training/speed.py)
    max_skipped_in_a_row: int = 10  # non-finite losses in a row before the run stops


@dataclass
class SpeedSection:
    """Megatron-LM's speed switches. None: decided per run by `ccmega.training.speed.resolve` (on for a GPU
    job where megatron-core can run it, off on a CPU), printed at start with the reason."""

    overlap_grad_reduce: bool | None = None  # DP gradient reduce-scatter/all-reduce overlapped with backward
    overlap_param_gather: bool | None = None  # distributed optimizer's parameter all-gather overlapped with forward
    cross_entropy_fusion: bool | None = None  # megatron's fused vocab-parallel cross entropy (bf16 gradients)
    rope_fusion: bool | None = None  # Transformer Engine's fused RoPE kernel
    gradient_accumulation_fusion: bool | None = None  # weight gradients accumulated into fp32 main_grad (APEX)


@dataclass
class OptimSection:
    max_lr: float = T6.max_lr
    min_lr: float = T6.min_lr
    warmup_steps: int = T6.warmup_steps  # linear from 0; must be below the decay steps
    lr_decay_steps: int | None = None  # None: train.steps (decay over the whole run)
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
    keep_last: int | None = None  # keep only the newest N checkpoints (None: keep all)
    milestone_interval: int = 0  # checkpoints at multiples of this step are never deleted (0: none)
    # fields whose change against the checkpoint is accepted on resume, e.g. [train.steps, data.paths]
    allow_changes: list[str] = field(default_factory=list)
    # the distributed optimizer's state on disk (ignored by the plain optimizer, which reshards at any layout):
    # dp_reshardable: each DP rank writes/reads only its shard; resumes under another DP size, not TP/PP.
    # fully_reshardable: gathers the whole state on every DP rank at save (host RAM); resumes at any layout.
    optimizer_format: str = "dp_reshardable"


@dataclass
class LoggingSection:
    log_interval: int = 1
    eval_interval: int = 1000  # steps; 0: never
    eval_iters: int = 10  # global batches per validation (the same batches every time)
    tensorboard: bool = True
    peak_tflops: float | None = None  # per GPU; None: 989 (H800 bf16 dense) or 1979 with FP8

