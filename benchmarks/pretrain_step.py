"""Tokens/s, TFLOP/s per GPU and MFU of the pretraining step (ccmega's engine) for a preset and layout,
beside a plain Hugging Face transformers reference timed in the same run.

Random tokens, no data loading or checkpointing: the number measures the model step only (forward,
backward, DP reduction, clipping, AdamW). MFU uses the formula of docs/pretraining.md
(6N + 12 L n_q d s FLOPs per token, peak 989 TFLOP/s bf16 / 1979 FP8 per H800/H100 SXM unless --peak-tflops).
Megatron-LM's speed switches (ccmega/training/speed.py) are decided as a training run decides them and
printed; `--distributed-optimizer` sets train.distributed_optimizer=true.

The reference (world size 1 only; on by default on a CPU, off on a GPU unless --reference): a
transformers `Qwen3ForCausalLM` of the same preset, started from the same weights as ccmega's model (HF
weights converted with ccmega.convert.hf_qwen3), fed the same tokens as the same micro-batches x
accumulation, loss = mean token cross entropy on fp32 logits, torch AdamW with fused=True (torch's fastest
kernel on a GPU and on a CPU, 3-6x faster there than its for-loop default; weight decay 0.1 on matrices,
none on norms, as megatron's optimizer groups them), gradient clipping at 1.0, one host read of the loss
per step (as ccmega's step reads its loss and grad norm). The two do
not do the same bookkeeping in bf16, and the reference is the cheaper one:
  - ccmega (megatron-core, as Megatron-LM trains): bf16 parameters and activations, gradients accumulated
    into an fp32 buffer (grad_reduce_in_fp32), fp32 main parameters and fp32 Adam moments in the optimizer,
    the updated fp32 parameters copied back into the bf16 ones after each step.
  - reference, --reference-mode bf16 (default): the plain HF model cast to bf16: bf16 parameters,
    gradients and Adam moments, no fp32 copies at all (less memory and work, less precise updates).
  - reference, --reference-mode amp: fp32 parameters, gradients and Adam moments, forward and backward
    under torch.autocast(bf16) (what transformers' Trainer does with bf16=True): the same numerics class
    as megatron's, paying a bf16 cast of every weight per micro-batch instead.
In fp32 both are plain fp32. ccmega's step and the reference's alternate step by step (ABBA order), and
each row is the median over --steps timed steps after --warmup. On a CPU ccmega runs under
ccmega.runtime.cpu_compat's process-wide CUDA-redirect TorchFunctionMode; the reference runs with that
mode popped (as it would run in a process of its own).

    python benchmarks/pretrain_step.py --preset qwen3-tiny --seq-length 256 --micro-batch-size 4 \\
        --accumulation 4 --dtype bf16                                                  # CPU, with reference
    torchrun --nproc-per-node 2 benchmarks/pretrain_step.py --preset qwen3-tiny --tp 2  # CPU, TP=2 (no reference)
    python benchmarks/pretrain_step.py --preset qwen3-1b --seq-length 8192 --micro-batch-size 1 \\
        --accumulation 4                                                               # one GPU, bf16
    python benchmarks/pretrain_step.py --preset qwen3-1b --seq-length 8192 --fp8 hybrid  # one GPU, FP8
"""
from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto: bf16 on a GPU, fp32 on a CPU (precision.dtype)")
    parser.add_argument("--fp8", default=None, choices=["hybrid", "e4m3"])
    parser.add_argument("--fp8-recipe", default="tensorwise")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="train.distributed_optimizer=true (default: decided per platform)")
    parser.add_argument("--reference", default=None, action=argparse.BooleanOptionalAction,
                        help="time the transformers reference in the same run (default: on a CPU at world size 1; "
                             "on a GPU max_memory_gib then counts both models)")
    parser.add_argument("--reference-mode", default="bf16", choices=["bf16", "amp"],
                        help="in bf16: the reference's parameters in bf16 (default) or fp32 + autocast (see above)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)

    import torch
    from megatron.core import parallel_state as ps

    from ccmega import runtime
    from ccmega.config import set_dotted
    from ccmega.models.qwen3 import build_model
    from ccmega.presets import model_preset
    from ccmega.training.engine import build_training_setup, train_step
    from ccmega.training.logging_utils import default_peak_tflops, flops_per_token
    from ccmega.training.loop import fp8_unavailable_reason, model_config, resolve_speed
    from ccmega.training.pretrain import PretrainConfig

    cfg = PretrainConfig()
    for key, value in [("model.preset", args.preset), ("model.tensor_parallel", args.tp),
                       ("model.pipeline_parallel", args.pp), ("precision.dtype", args.dtype),
                       ("precision.fp8", args.fp8), ("precision.fp8_recipe", args.fp8_recipe)]:
        cfg = set_dotted(cfg, key, value)
    if args.distributed_optimizer:
        cfg = set_dotted(cfg, "train.distributed_optimizer", True)
    reason = fp8_unavailable_reason(cfg.precision)
    if reason:
        print(f"pretrain_step: {reason}")
        return 2
    env = runtime.initialize(args.tp, args.pp, seed=1234)
    rank0 = env.rank == 0
    log = print if rank0 else (lambda *_: None)
    dp = ps.get_data_parallel_world_size()
    switch_lines = []
    cfg = resolve_speed(cfg, dp, log=lambda line: (switch_lines.append(line), log(line)))
    preset = model_preset(args.preset)
    config, dtype = model_config(cfg.precision, preset, args.tp, args.pp, cfg.speed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    why_not = ("--no-reference" if args.reference is False else
               f"world size {env.world_size} (TP {args.tp}, PP {args.pp}, DP {dp}): the reference runs in one process "
               "only" if env.world_size > 1 else
               "FP8: no transformers counterpart" if args.fp8 else
               "on a GPU the reference is off unless --reference" if args.reference is None and device == "cuda"
               else None)
    reference = why_not is None

    model = build_model(preset, config)
    hf = None
    if reference:  # before the optimizer copies the parameters into its fp32 main params
        hf = reference_model(preset, seed=1234)
        from ccmega.convert.hf_qwen3 import hf_to_megatron, load_full_state

        load_full_state(model, hf_to_megatron(hf.state_dict(), preset))
    setup = build_training_setup([model], config, lr=1e-4,
                                 use_distributed_optimizer=cfg.train.distributed_optimizer,
                                 overlap_grad_reduce=cfg.speed.overlap_grad_reduce,
                                 overlap_param_gather=cfg.speed.overlap_param_gather)
    gen = torch.Generator().manual_seed(0)
    vocab = min(preset.vocab_size, 32000)
    mbs, seq = args.micro_batch_size, args.seq_length

    def batches():
        out = []
        for _ in range(args.accumulation):
            t = torch.randint(0, vocab, (mbs, seq + 1), generator=gen).to(device)
            out.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(mbs, seq, device=device)})
        return out

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def ours(data) -> float:
        return train_step(setup, iter(data), len(data), seq, mbs).loss

    steps = [("ccmega", ours)]
    if reference:
        steps.append(("reference", reference_step(hf, device, dtype, args.reference_mode)))
    times = {name: [] for name, _ in steps}
    losses = {name: [] for name, _ in steps}
    for i in range(args.warmup + args.steps):
        data = batches()
        for name, run_step in (steps if i % 2 == 0 else steps[::-1]):  # ABBA: neither always runs first
            sync()
            t0 = time.perf_counter()
            loss = run_step(data)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            if loss is not None:
                losses[name].append(loss)
    step = median(times["ccmega"])
    tokens = args.accumulation * mbs * seq * dp
    tokens_per_s = tokens / step
    tflops = flops_per_token(preset, seq) * tokens_per_s / env.world_size / 1e12
    peak = args.peak_tflops or default_peak_tflops(args.fp8)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result = {
        "preset": preset.name, "device": device_name,
        "world_size": env.world_size, "tp": args.tp, "pp": args.pp, "dp": dp, "dtype": dtype, "fp8": args.fp8,
        "seq_length": seq, "micro_batch_size": mbs, "accumulation": args.accumulation,
        "step_time_s": step, "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / env.world_size,
        "tflops_per_gpu": tflops, "mfu": tflops / peak, "peak_tflops": peak,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "speed_switches": {"train.distributed_optimizer": cfg.train.distributed_optimizer,
                           **{f"speed.{k}": v for k, v in vars(cfg.speed).items()}},
        "speed_switch_lines": switch_lines,
        "step_times_s": times["ccmega"],
        "reference": None,
    }
    if reference:
        ref_step = median(times["reference"])
        result["reference"] = {
            "implementation": f"transformers {transformers_version()} Qwen3ForCausalLM + torch AdamW",
            "mode": args.reference_mode if dtype == "bf16" else "fp32",
            "step_time_s": ref_step, "tokens_per_s": tokens / ref_step, "step_times_s": times["reference"],
            "ccmega_over_reference": ref_step / step,
            "losses": losses["reference"],
        }
        result["losses"] = losses["ccmega"]
        result["ccmega_over_reference"] = ref_step / step
    else:
        result["reference_skipped"] = why_not
    if rank0:
        print(f"{preset.name} {device_name} TP{args.tp} PP{args.pp} DP{dp} {dtype}{'+fp8' if args.fp8 else ''} "
              f"seq {seq} x mbs {mbs} x acc {args.accumulation}: step {step * 1e3:.1f} ms | "
              f"{tokens_per_s:,.0f} tok/s | {tflops:.3g} TFLOP/s/GPU | MFU {100 * result['mfu']:.3g}% "
              f"(peak {peak:g})")
        threads = "" if device == "cuda" else f", {torch.get_num_threads()} threads"
        print(f"\nPretraining step, {preset.name}, seq {seq} x micro-batch {mbs} x accumulation {args.accumulation}, "
              f"{dtype}, {device_name}{threads}; median of {args.steps} steps after {args.warmup}")
        print("| implementation | step time (ms) | tokens/s |\n|---|---:|---:|")
        print(f"| ccmega (megatron-core) | {1e3 * step:.1f} | {tokens_per_s:,.0f} |")
        if reference:
            r = result["reference"]
            print(f"| transformers Qwen3ForCausalLM ({r['mode']}) | {1e3 * r['step_time_s']:.1f} | "
                  f"{r['tokens_per_s']:,.0f} |")
            print(f"ccmega / transformers: {result['ccmega_over_reference']:.2f}x")
        else:
            print(f"(reference skipped: {why_not})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    runtime.destroy()
    return 0


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def reference_model(preset, seed: int):
    """A transformers Qwen3ForCausalLM of `preset` with random weights (norm gains perturbed off 1, as
    tests/test_qwen3_parity.py's random_hf_model does), in fp32 on the CPU."""
    import torch
    import transformers

    from ccmega.convert.hf_qwen3 import hf_config_dict

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_config_dict(preset)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def reference_step(hf, device: str, dtype: str, mode: str):
    """One optimizer step of the transformers reference over a list of micro-batches (see the docstring)."""
    import torch
    import torch.nn.functional as F

    amp = dtype == "bf16" and mode == "amp"
    hf.to(device=device, dtype=torch.bfloat16 if dtype == "bf16" and not amp else torch.float32)
    hf.train()
    decay = [p for n, p in hf.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in hf.named_parameters() if p.ndim < 2]
    params = decay + no_decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            fused=True)
    autocast = (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    from ccmega.runtime import cpu_compat

    def step(micro_batches) -> float:
        with cpu_compat.redirect_suspended():
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for mb in micro_batches:
                with autocast():
                    logits = hf(input_ids=mb["tokens"], use_cache=False).logits
                per_token = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten(), reduction="none")
                mask = mb["loss_mask"].flatten().float()
                loss = (per_token * mask).sum() / mask.sum().clamp(min=1) / len(micro_batches)
                loss.backward()
                total += loss.detach()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return float(total)

    return step


if __name__ == "__main__":
    raise SystemExit(main())
