"""Training metrics: model FLOPs (for TFLOP/s and MFU) and one logger writing stdout, JSONL and TensorBoard.

MFU counts model FLOPs, not hardware FLOPs (activation recomputation is not credited), per token of
a training step (forward + backward = 3 x forward):

    flops_per_token = 6 N + 12 L n_q d s

N is the parameter count of Table 2 (tied embedding counted once: it is the LM-head matmul), L the
number of layers, n_q the query heads, d the head dim, s the sequence length: the `6N + 12 L H Q T`
of the PaLM paper (Chowdhery et al. 2022, App. B), attention counted without causal halving.
TFLOP/s per GPU = flops_per_token x tokens/s / world size; MFU = that / peak FLOP/s of one GPU.
"""
from __future__ import annotations

import json
import math
import os

from ccmega.presets import ModelPreset

# Dense (no sparsity) peak FLOP/s of one H800 SXM (same tensor cores as the H100 SXM).
PEAK_TFLOPS_BF16 = 989.0
PEAK_TFLOPS_FP8 = 1979.0


def flops_per_token(preset: ModelPreset, seq_length: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 N + 12 L n_q d s."""
    attention = 12 * preset.num_layers * preset.num_attention_heads * preset.head_dim * seq_length
    return 6 * preset.total_params() + attention


def default_peak_tflops(fp8: str | None) -> float:
    return PEAK_TFLOPS_FP8 if fp8 else PEAK_TFLOPS_BF16


class MetricsLogger:
    """Rank 0 writes each record to stdout, RUN_DIR/metrics.jsonl and TensorBoard (RUN_DIR/tensorboard);
    other ranks stay silent. Records are appended: a resumed run continues the same files."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a+")
        self._jsonl.seek(0, os.SEEK_END)
        if self._jsonl.tell():  # a run killed mid-write may have left half a line: end it
            self._jsonl.seek(self._jsonl.tell() - 1)
            if self._jsonl.read(1) != "\n":
                self._jsonl.write("\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError as e:  # tensorboard missing: stdout and JSONL still work
                print(f"[ccmega] TensorBoard disabled: {e}", flush=True)

    def log(self, kind: str, step: int, values: dict, text: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()
        if text is not None:
            print(text, flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def print_rank0(*args) -> None:
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, flush=True)
