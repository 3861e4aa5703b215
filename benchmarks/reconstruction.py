#!/usr/bin/env python
"""Greedy ICAE reconstruction speed: megatron KV cache vs no cache vs transformers `generate`, one run
(issue 6, item 7; goal: the cache at least 5x faster than recomputing at L = 512).

    python benchmarks/reconstruction.py                       # CPU: qwen3-mini pair, L=512, k=128, batch 4
    python benchmarks/reconstruction.py --preset qwen3-tiny   # smaller still
    # GPU (one device): a Table 2 pair in bf16
    python benchmarks/reconstruction.py --preset qwen3-500m --batch-size 16 --dtype bf16

One random Hugging Face Qwen3 encoder/decoder pair is converted into the megatron ICAE (the same weights
in both; the decoder's weights are scaled up so that greedy decoding does not collapse into one repeated
token). Each row times whole reconstructions from the context (compression + greedy decoding of up to L
tokens, stopping per sample at the end token) after one untimed warm-up; tokens/s counts generated
tokens, end tokens included. "identical" compares every row's tokens with the cached megatron row's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")


def build(preset_name: str, k: int, dtype, device, decoder_scale: float = 6.0, seed: int = 0):
    import transformers

    from ccmega.convert.hf_qwen3 import hf_config_dict, hf_to_megatron, load_full_state
    from ccmega.convert.icae_hf import HFICAE
    from ccmega.models.icae import ICAEModel
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset

    preset = model_preset(preset_name)
    hf = []
    for i, scale in enumerate((1.0, decoder_scale)):
        torch.manual_seed(seed + i)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_config_dict(preset))).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.mul_(scale)
        hf.append(model)
    megatron = []
    for model in hf:
        m = build_model(preset, transformer_config(preset, params_dtype=dtype))
        load_full_state(m, hf_to_megatron(model.state_dict(), preset))
        megatron.append(m.to(device))
    end = preset.vocab_size - 1
    ours = ICAEModel(*megatron, num_memory_slots=k, end_token_id=end, real_vocab_size=preset.vocab_size).to(device)
    ours.to(dtype)
    theirs = HFICAE(hf[0].to(device, dtype), hf[1].to(device, dtype), num_memory_slots=k, end_token_id=end)
    theirs.load_state_dict({n: v for n, v in ours.state_dict().items()
                            if n.startswith(("memory_embeddings", "ae_embedding", "projector"))}, strict=False)
    return preset, ours.eval(), theirs.to(device, dtype).eval()


def timed(fn, repeats: int):
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-mini", help="encoder and decoder preset (default %(default)s)")
    p.add_argument("--context-tokens", type=int, default=512, help="L (default %(default)s)")
    p.add_argument("--memory-slots", type=int, default=128, help="k (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per row; the best is kept")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--skip-uncached", action="store_true", help="leave out the (slow) recompute row")
    args = p.parse_args(argv)

    from ccmega import runtime
    from ccmega.evaluation.generation import reconstruct

    runtime.initialize(1, 1, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    preset, ours, theirs = build(args.preset, args.memory_slots, dtype, device)
    L, b = args.context_tokens, args.batch_size
    context = torch.randint(0, preset.vocab_size - 1, (b, L), generator=torch.Generator().manual_seed(1)).to(device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ICAE {preset.name} -> {preset.name}, k={args.memory_slots}, L={L}, batch {b}, {args.dtype}, {where}, "
          f"torch {torch.__version__}", flush=True)

    rows = {}

    def count(tokens_or_rec):
        if hasattr(tokens_or_rec, "lengths"):
            return tokens_or_rec.tokens, int((tokens_or_rec.lengths + tokens_or_rec.ended.long()).sum())
        tokens = tokens_or_rec  # HF: up to and including the end token, then padding with it
        ended = (tokens == ours.end_token_id).any(dim=1)
        lengths = torch.where(ended, (tokens == ours.end_token_id).float().argmax(dim=1), tokens.shape[1])
        padded = torch.full((b, L), ours.end_token_id, dtype=tokens.dtype, device=tokens.device)
        padded[:, :tokens.shape[1]] = tokens
        return padded, int((lengths + ended.long()).sum())

    cases = [("megatron, KV cache (ccmega)", lambda: reconstruct(ours, context)),
             ("transformers generate (HF KV cache)", lambda: theirs.reconstruct(context))]
    if not args.skip_uncached:
        cases.append(("megatron, no cache (recompute)", lambda: reconstruct(ours, context, use_cache=False)))
    for name, fn in cases:
        print(f"  timing {name} ...", flush=True)
        with torch.no_grad():
            seconds, out = timed(fn, args.repeats)
        rows[name] = (seconds, *count(out))

    ref_tokens = rows["megatron, KV cache (ccmega)"][1]
    uncached = rows.get("megatron, no cache (recompute)")
    print()
    print(f"| {'reconstruction':36} | {'tokens':>6} | {'seconds':>8} | {'tokens/s':>9} | {'vs no cache':>11} | identical |")
    print(f"|{'-' * 38}|{'-' * 7}:|{'-' * 9}:|{'-' * 10}:|{'-' * 12}:|{'-' * 11}|")
    for name, (seconds, tokens, n) in rows.items():
        speed = n / seconds
        ratio = f"{speed / (uncached[2] / uncached[0]):.1f}x" if uncached else "-"
        same = "yes" if torch.equal(tokens, ref_tokens) else "NO"
        print(f"| {name:36} | {n:6d} | {seconds:8.2f} | {speed:9.1f} | {ratio:>11} | {same:9} |")
    cached = rows["megatron, KV cache (ccmega)"]
    hf = rows["transformers generate (HF KV cache)"]
    print(f"\nKV cache vs transformers generate: {(cached[2] / cached[0]) / (hf[2] / hf[0]):.2f}x"
          + (f"; vs no cache: {(cached[2] / cached[0]) / (uncached[2] / uncached[0]):.1f}x (goal >= 5x)" if uncached else ""))
    runtime.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
