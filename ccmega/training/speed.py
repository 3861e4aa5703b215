"""Megatron-LM's speed switches, decided once per run and printed with their reasons.

A GPU job gets what Megatron-LM's GPT training turns on: the distributed optimizer, the DP gradient
reduce overlapped with the backward pass and the parameter all-gather with the next forward pass, fused
cross entropy, and the fused RoPE and gradient-accumulation kernels where Transformer Engine or APEX
provide them. A CPU run keeps the plain path unless a switch is set; a switch set to true that cannot
run is refused with the reason. `None` in the config means "decide"; the resolved values are what the
run records in RUN_DIR/config.yaml.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from packaging.version import Version

from ccmega.config import ConfigError

ROPE_FUSION_MIN_TE = "1.4"  # megatron-core's TransformerConfig refuses apply_rope_fusion below it


@dataclass(frozen=True)
class Platform:
    """What the switches depend on."""

    cuda: bool  # a GPU job (or the dry run of one)
    dtype: str  # the run's resolved dtype: bf16 | fp32
    data_parallel: int
    transformer_engine: str | None  # TE's version where it imports, else None
    apex_gradient_accumulation: bool  # APEX's fused_weight_gradient_mlp_cuda imports


@dataclass(frozen=True)
class Switch:
    key: str  # the dotted config key
    on: bool
    why: str


def platform_here(dtype: str, data_parallel: int, cuda: bool | None = None) -> Platform:
    """This process's platform (`cuda` overrides what torch sees: a dry run checks a GPU job)."""
    import torch

    from ccmega.runtime import transformer_engine

    # TE is imported only where CUDA is (a dry run on a laptop decides the TE switches off and says so)
    te = transformer_engine.status().version if torch.cuda.is_available() else None
    return Platform(cuda=torch.cuda.is_available() if cuda is None else cuda, dtype=dtype,
                    data_parallel=data_parallel, transformer_engine=te,
                    apex_gradient_accumulation=torch.cuda.is_available() and _apex_gradient_accumulation())


@functools.cache
def _apex_gradient_accumulation() -> bool:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401  (APEX's CUDA extension)
    except Exception:  # not installed, or built for another CUDA: either way megatron cannot use it
        return False
    return True


def resolve(cfg, platform: Platform):
    """(cfg with every switch decided, [Switch...]): `cfg` is a training command's config (train, precision,
    speed sections). Raises ConfigError for a switch set to true that cannot run on `platform`."""
    gpu, dp = platform.cuda, platform.data_parallel
    decided: dict[str, Switch] = {}

    def decide(key: str, value: bool | None, auto: tuple[bool, str], impossible: str | None = None) -> bool:
        if value is None:
            decided[key] = Switch(key, *auto)
        else:
            if value and impossible:
                raise ConfigError(f"{key}=true: {impossible}; set it to false or leave it unset (decided per run)")
            decided[key] = Switch(key, value, "set in the config")
        return decided[key].on

    s, t = cfg.speed, cfg.train
    dist_opt = decide("train.distributed_optimizer", t.distributed_optimizer,
                      (True, f"GPU job, DP {dp}: fp32 main parameters and Adam moments sharded {dp} ways") if gpu and dp > 1
                      else (False, "DP 1: nothing to shard") if gpu else (False, "CPU run: the plain optimizer"))
    overlap_grad = decide("speed.overlap_grad_reduce", s.overlap_grad_reduce,
                          (True, f"GPU job, DP {dp}: bucketed gradient reduction runs during the backward pass")
                          if gpu and dp > 1 else (False, "DP 1: no gradient reduction") if gpu
                          else (False, "CPU run: one reduction after the backward pass"))
    param_gather_needs = ("needs train.distributed_optimizer=true" if not dist_opt else
                          "needs speed.overlap_grad_reduce=true (as Megatron-LM requires)" if not overlap_grad else None)
    overlap_param = decide("speed.overlap_param_gather", s.overlap_param_gather,
                           (False, param_gather_needs) if param_gather_needs else
                           (True, "GPU job: each bucket's updated parameters are gathered during the next forward")
                           if gpu else (False, "CPU run: parameters gathered right after the optimizer step"),
                           impossible=param_gather_needs)
    ce_impossible = ("megatron's fused kernel returns bf16 gradients, an fp32 run would lose precision"
                     if platform.dtype != "bf16" else None)
    ce = decide("speed.cross_entropy_fusion", s.cross_entropy_fusion,
                (False, f"{platform.dtype}: the fused kernel's gradients are bf16") if ce_impossible else
                (True, "GPU job in bf16: megatron's native fused kernel") if gpu else
                (False, "CPU run: torch.compile would compile the kernel at every new shape"), impossible=ce_impossible)
    te = platform.transformer_engine
    rope_impossible = ("needs a CUDA GPU" if not gpu else
                       f"needs Transformer Engine >= {ROPE_FUSION_MIN_TE} (it does not import here)" if te is None else
                       f"needs Transformer Engine >= {ROPE_FUSION_MIN_TE}, found {te}"
                       if Version(te) < Version(ROPE_FUSION_MIN_TE) else None)
    rope = decide("speed.rope_fusion", s.rope_fusion,
                  (False, rope_impossible) if rope_impossible else (True, f"Transformer Engine {te}: fused kernel"),
                  impossible=rope_impossible)
    wgrad_impossible = ("needs a CUDA GPU" if not gpu else None if platform.apex_gradient_accumulation else
                        "needs APEX's fused_weight_gradient_mlp_cuda (megatron's output layer uses it even with "
                        "Transformer Engine), which does not import here")
    wgrad = decide("speed.gradient_accumulation_fusion", s.gradient_accumulation_fusion,
                   (False, wgrad_impossible) if wgrad_impossible else (True, "APEX: fused into the fp32 main_grad"),
                   impossible=wgrad_impossible)
    resolved = dataclasses.replace(
        cfg, train=dataclasses.replace(t, distributed_optimizer=dist_opt),
        speed=dataclasses.replace(s, overlap_grad_reduce=overlap_grad, overlap_param_gather=overlap_param,
                                  cross_entropy_fusion=ce, rope_fusion=rope, gradient_accumulation_fusion=wgrad))
    return resolved, list(decided.values())


def describe(switches: list[Switch]) -> list[str]:
    """One line per switch: key, on/off, why."""
    width = max(len(s.key) for s in switches)
    return [f"{s.key:<{width}}  {'on ' if s.on else 'off'}  {s.why}" for s in switches]
