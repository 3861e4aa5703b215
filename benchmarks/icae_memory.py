"""ICAE training memory: the estimate (ccmega/training/memory.py) against the measured peak of real steps.

One process builds the ICAE (random weights: memory does not depend on their values), megatron DDP and
the optimizer, and takes one step to create the optimizer state. Then, for each micro-batch size, it
resets the kernel's peak-RSS mark (/proc/self/clear_refs), takes one training step and reads the peak
(VmHWM): the step's peak growth over the resident memory before it. glibc is told to serve every
allocation above 64 KiB with its own mapping (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the
resident set at once and RSS follows the live tensors. Compared with the estimate's activations plus
transients for megatron's local layer spec (what runs without Transformer Engine: here, and on a GPU
without TE).

    python benchmarks/icae_memory.py                                   # qwen3-200m -> qwen3-200m, bf16
    python benchmarks/icae_memory.py --encoder qwen3-tiny --decoder qwen3-tiny --micro-batches 1 2
"""
from __future__ import annotations

import argparse
import os
import sys

MMAP_THRESHOLD = "65536"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="qwen3-200m")
    p.add_argument("--decoder", default="qwen3-200m")
    p.add_argument("--memory-slots", type=int, default=128)
    p.add_argument("--context-tokens", type=int, default=512)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--cross-entropy-fusion", action="store_true",
                   help="megatron's fused cross entropy (speed.cross_entropy_fusion; bf16 only)")
    return p.parse_args(argv)


def measure(encoder: str, decoder: str, memory_slots: int, context_tokens: int, micro_batches: list[int],
            dtype: str = "bf16", cross_entropy_fusion: bool = False) -> list[dict]:
    """[{micro_batch, measured, estimate}] in bytes, one training step each (world of one, TP 1)."""
    import torch

    from ccmega import runtime
    from ccmega.models.icae_checkpoint import build_icae
    from ccmega.models.qwen3 import transformer_config
    from ccmega.presets import model_preset
    from ccmega.training.engine import build_training_setup, train_step
    from ccmega.training.icae_train import ICAEForwardStep
    from ccmega.training.memory import Layout, icae_step_bytes
    from peak_rss import peak_growth

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        raise RuntimeError(f"run with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (glibc reads it at start-up)")
    params_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    enc, dec = model_preset(encoder), model_preset(decoder)
    k, L = memory_slots, context_tokens
    rows = []
    with runtime.session():
        configs = [transformer_config(p, params_dtype=params_dtype, cross_entropy_loss_fusion=cross_entropy_fusion)
                   for p in (enc, dec)]
        model = build_icae(enc, dec, *configs, k, end_token_id=1, seed=0)
        setup = build_training_setup([model], configs[0], lr=1e-4)
        forward = ICAEForwardStep()
        generator = torch.Generator().manual_seed(0)

        def step(b: int):
            batch = [{"tokens": torch.randint(0, min(enc.vocab_size, dec.vocab_size), (b, L), generator=generator)}]
            train_step(setup, iter(batch), 1, L + k, b, forward_step=forward)

        step(1)  # the optimizer state appears at the first step: not part of a step's growth
        for b in micro_batches:
            _, measured = peak_growth(lambda: step(b))
            estimate = icae_step_bytes(enc, dec, Layout(1), b, L, k, dtype, kernels="local",
                                       fused_cross_entropy=cross_entropy_fusion)
            rows.append({"micro_batch": b, "measured": measured, "estimate": estimate})
    return rows


def main(argv=None) -> int:
    args = parse(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:  # glibc reads it once, at start-up
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        os.execv(sys.executable, [sys.executable, *sys.argv])
    rows = measure(args.encoder, args.decoder, args.memory_slots, args.context_tokens, args.micro_batches, args.dtype,
                   args.cross_entropy_fusion)
    gib = 1024 ** 3
    print(f"ICAE {args.encoder} -> frozen {args.decoder}, k={args.memory_slots}, L={args.context_tokens}, "
          f"{args.dtype}, megatron local spec{', fused cross entropy' if args.cross_entropy_fusion else ''}, CPU: "
          "one training step's peak growth")
    print("| micro-batch | measured GiB | estimate GiB | estimate / measured |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['micro_batch']} | {r['measured'] / gib:.3f} | {r['estimate'] / gib:.3f} | "
              f"{r['estimate'] / r['measured']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
