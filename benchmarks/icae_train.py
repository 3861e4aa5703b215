"""ICAE training throughput: ccmega (megatron-core) vs a plain transformers ICAE (HFICAE), same run.

Both train the same thing from the same weights: encoder + memory slots + [AE] + projector, frozen
decoder, AdamW, teacher-forced reconstruction of L context tokens from k memory slots. Context tokens
per second (batch x L / step time), the median over --steps timed steps after --warmup steps; the two
alternate step by step (ABBA order) so that both see the same machine.

--dtype auto is bf16 on a GPU, and on a CPU bf16 where the CPU has native bf16 matrix instructions
(AVX512-BF16 or AMX-BF16 on x86, the BF16 extension on Arm), fp32 elsewhere; the choice is printed with
its reason. Megatron-LM's speed switches (ccmega/training/speed.py) are decided as `ccmega icae-train`
decides them and printed. In bf16 the two do not keep the same copies (see benchmarks/pretrain_step.py):
ccmega trains bf16 parameters with fp32 main parameters, fp32 gradient buffer and fp32 Adam moments, as
Megatron-LM does; the reference (--reference-mode bf16, default) is the HF models cast to bf16 with torch
AdamW on the bf16 parameters (the cheaper bookkeeping), or with --reference-mode amp fp32 parameters under
torch.autocast(bf16). On a CPU ccmega runs under ccmega.runtime.cpu_compat's CUDA-redirect
TorchFunctionMode; the reference runs with that mode popped, as in a process of its own.

    python benchmarks/icae_train.py                                   # CPU: tiny presets (bf16 where native)
    python benchmarks/icae_train.py --encoder qwen3-mini --decoder qwen3-mini --memory-slots 32 \
        --context-tokens 128 --batch 4                                # CPU: a bigger pair
    python benchmarks/icae_train.py --encoder qwen3-500m --decoder qwen3-500m --memory-slots 128 \
        --context-tokens 512 --batch 32 --steps 20                   # GPU: the paper's 500M/500M, bf16
"""
import argparse
import contextlib
import time

import torch


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="qwen3-tiny")
    p.add_argument("--decoder", default="qwen3-tiny")
    p.add_argument("--memory-slots", type=int, default=16)
    p.add_argument("--context-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 on a GPU or a CPU with native bf16, else fp32")
    p.add_argument("--reference-mode", default="bf16", choices=["bf16", "amp"],
                   help="in bf16: the reference's parameters in bf16 (default) or fp32 + autocast")
    return p.parse_args(argv)


def cpu_bf16_support() -> str | None:
    """The CPU's native bf16 instructions, or None (read from /proc/cpuinfo's flags / Features)."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return None
    found = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in words]
    if not found and "bf16" in words:  # aarch64 Features: the BF16 extension
        found = ["bf16"]
    return ", ".join(found) or None


def choose_dtype(requested: str) -> tuple[str, str]:
    """(bf16 | fp32, why)."""
    if requested != "auto":
        return requested, "--dtype " + requested
    if torch.cuda.is_available():
        return "bf16", "auto: a GPU"
    native = cpu_bf16_support()
    if native:
        return "bf16", f"auto: the CPU has native bf16 ({native})"
    return "fp32", "auto: the CPU has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 flag in /proc/cpuinfo)"


def timed(steps: list, n: int, warmup: int) -> list:
    """Median seconds per step of each (name, fn), the fns alternating step by step (ABBA)."""
    times = {name: [] for name, _ in steps}
    for i in range(warmup + n):
        for name, fn in (steps if i % 2 == 0 else steps[::-1]):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return [(name, sorted(ts)[len(ts) // 2]) for name, ts in times.items()]


def main(argv=None):
    args = parse(argv)
    from ccmega import runtime
    from ccmega.config import set_dotted
    from ccmega.convert.hf_qwen3 import hf_to_megatron, load_full_state
    from ccmega.convert.icae_hf import HFICAE
    from ccmega.models.icae_checkpoint import build_icae
    from ccmega.presets import model_preset
    from ccmega.training.engine import build_training_setup, train_step
    from ccmega.training.icae_train import ICAEForwardStep, ICAETrainConfig
    from ccmega.training.loop import model_config, resolve_speed
    from test_qwen3_parity import random_hf_model  # tests/ on sys.path (see __main__)

    dtype_name, why = choose_dtype(args.dtype)
    print(f"dtype {dtype_name} ({why})")
    runtime.initialize(1, 1)
    from ccmega.runtime import cpu_compat

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cfg = set_dotted(ICAETrainConfig(), "precision.dtype", dtype_name)
    cfg = resolve_speed(cfg, 1, log=print)
    enc_p, dec_p = model_preset(args.encoder), model_preset(args.decoder)
    enc_config, dtype_name = model_config(cfg.precision, enc_p, 1, 1, cfg.speed)
    dec_config, _ = model_config(cfg.precision, dec_p, 1, 1, cfg.speed)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    k, L, b = args.memory_slots, args.context_tokens, args.batch
    hf_enc, hf_dec = random_hf_model(enc_p, seed=1), random_hf_model(dec_p, seed=2)

    # ccmega: megatron GPTModels (TE spec on GPU), DDP + megatron AdamW, the real forward step
    ours = build_icae(enc_p, dec_p, enc_config, dec_config, k, end_token_id=0, seed=0)
    load_full_state(ours.encoder, hf_to_megatron(hf_enc.state_dict(), enc_p))
    load_full_state(ours.decoder, hf_to_megatron(hf_dec.state_dict(), dec_p))
    setup = build_training_setup([ours], ours.encoder.config, lr=1e-4,
                                 use_distributed_optimizer=cfg.train.distributed_optimizer,
                                 overlap_grad_reduce=cfg.speed.overlap_grad_reduce,
                                 overlap_param_gather=cfg.speed.overlap_param_gather)
    forward_step = ICAEForwardStep()
    data = torch.randint(0, min(enc_p.vocab_size, 1000), (b, L), generator=torch.Generator().manual_seed(0)).to(device)

    def ours_step():
        train_step(setup, iter([{"tokens": data}]), 1, L + 1, b, forward_step)
        forward_step.metrics()

    # reference: Qwen3ForCausalLM encoder/decoder fed inputs_embeds, torch AdamW (fused=True: torch's fastest, on a GPU and on a CPU)
    amp = dtype_name == "bf16" and args.reference_mode == "amp"
    ref_dtype = torch.float32 if amp else dtype
    theirs = HFICAE(hf_enc.to(device, ref_dtype), hf_dec.to(device, ref_dtype), k, end_token_id=0).to(device)
    theirs.load_state_dict({n: p.float() for n, p in ours.state_dict().items()
                            if n.startswith(("memory_embeddings", "ae_embedding", "projector"))}, strict=False)
    theirs.to(ref_dtype)
    theirs.decoder.eval()
    params = [p for p in theirs.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                            fused=True)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def theirs_step():
        with cpu_compat.redirect_suspended():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss, _ = theirs(data)
            loss.mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

    rows = timed([("ccmega (megatron-core)", ours_step), ("transformers HFICAE", theirs_step)], args.steps, args.warmup)
    rows = [(name, seconds, b * L / seconds) for name, seconds in rows]
    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    mode = f", reference {args.reference_mode}" if dtype_name == "bf16" else ""
    print(f"\nICAE training, encoder {enc_p.name} -> frozen decoder {dec_p.name}, k={k}, L={L}, batch {b}, "
          f"{dtype_name}{mode}, {device_name}; median of {args.steps} steps after {args.warmup}")
    print("| implementation | step time (ms) | context tokens/s |\n|---|---:|---:|")
    for name, seconds, tps in rows:
        print(f"| {name} | {1000 * seconds:.1f} | {tps:,.0f} |")
    print(f"speed-up ccmega / transformers: {rows[0][2] / rows[1][2]:.2f}x")
    runtime.destroy()
    return rows


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    main()
