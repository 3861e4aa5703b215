"""Tokens/s, TFLOP/s per GPU and MFU of the pretraining step (ccmega's engine) for a preset and layout.

Random tokens, no data loading or checkpointing: the number measures the model step only (forward,
backward, DP reduction, clipping, AdamW). MFU uses the formula of docs/pretraining.md
(6N + 12 L n_q d s FLOPs per token, peak 989 TFLOP/s bf16 / 1979 FP8 per H800/H100 SXM unless --peak-tflops).

    python benchmarks/pretrain_step.py --preset qwen3-tiny --seq-length 256            # CPU, one process
    torchrun --nproc-per-node 2 benchmarks/pretrain_step.py --preset qwen3-tiny --tp 2  # CPU, TP=2
    python benchmarks/pretrain_step.py --preset qwen3-1b --seq-length 8192 --micro-batch-size 1 \\
        --accumulation 4                                                               # one GPU, bf16
    python benchmarks/pretrain_step.py --preset qwen3-1b --seq-length 8192 --fp8 hybrid  # one GPU, FP8
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-tiny")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per step and DP rank")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--fp8", default=None, choices=["hybrid", "e4m3"])
    parser.add_argument("--fp8-recipe", default="tensorwise")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)

    import torch
    from megatron.core import parallel_state as ps

    from ccmega import runtime
    from ccmega.models.qwen3 import build_model
    from ccmega.presets import model_preset
    from ccmega.training.engine import build_training_setup, train_step
    from ccmega.training.logging_utils import default_peak_tflops, flops_per_token
    from ccmega.training.loop import fp8_unavailable_reason, model_config
    from ccmega.training.pretrain import PretrainConfig
    from ccmega.config import set_dotted

    cfg = PretrainConfig()
    for key, value in [("model.preset", args.preset), ("model.tensor_parallel", args.tp),
                       ("model.pipeline_parallel", args.pp), ("precision.dtype", args.dtype),
                       ("precision.fp8", args.fp8), ("precision.fp8_recipe", args.fp8_recipe)]:
        cfg = set_dotted(cfg, key, value)
    reason = fp8_unavailable_reason(cfg.precision)
    if reason:
        print(f"pretrain_step: {reason}")
        return 2
    env = runtime.initialize(args.tp, args.pp, seed=1234)
    preset = model_preset(args.preset)
    config, dtype = model_config(cfg.precision, preset, args.tp, args.pp)
    setup = build_training_setup([build_model(preset, config)], config, lr=1e-4,
                                 use_distributed_optimizer=args.distributed_optimizer)
    dp = ps.get_data_parallel_world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    vocab = min(preset.vocab_size, 32000)
    mbs, seq = args.micro_batch_size, args.seq_length

    def batches():
        out = []
        for _ in range(args.accumulation):
            t = torch.randint(0, vocab, (mbs, seq + 1), generator=gen).to(device)
            out.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(mbs, seq, device=device)})
        return out

    times = []
    for i in range(args.warmup + args.steps):
        data = batches()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(setup, iter(data), len(data), seq, mbs)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]  # median
    tokens = args.accumulation * mbs * seq * dp
    tokens_per_s = tokens / step
    tflops = flops_per_token(preset, seq) * tokens_per_s / env.world_size / 1e12
    peak = args.peak_tflops or default_peak_tflops(args.fp8)
    result = {
        "preset": preset.name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "world_size": env.world_size, "tp": args.tp, "pp": args.pp, "dp": dp, "dtype": dtype, "fp8": args.fp8,
        "seq_length": seq, "micro_batch_size": mbs, "accumulation": args.accumulation,
        "step_time_s": step, "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / env.world_size,
        "tflops_per_gpu": tflops, "mfu": tflops / peak, "peak_tflops": peak,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    if env.rank == 0:
        print(f"{preset.name} {result['device']} TP{args.tp} PP{args.pp} DP{dp} {dtype}{'+fp8' if args.fp8 else ''} "
              f"seq {seq} x mbs {mbs} x acc {args.accumulation}: step {step * 1e3:.1f} ms | "
              f"{tokens_per_s:,.0f} tok/s | {tflops:.3g} TFLOP/s/GPU | MFU {100 * result['mfu']:.3g}% "
              f"(peak {peak:g})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    runtime.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
