"""ICAE training throughput: ccmega (megatron-core) vs a plain transformers ICAE (HFICAE), same run.

Both train the same thing from the same weights: encoder + memory slots + [AE] + projector, frozen
decoder, AdamW, teacher-forced reconstruction of L context tokens from k memory slots. Context tokens
per second (batch x L / step time) over --steps timed steps after --warmup steps.

    python benchmarks/icae_train.py                                   # CPU: tiny presets
    python benchmarks/icae_train.py --encoder qwen3-500m --decoder qwen3-500m --memory-slots 128 \
        --context-tokens 512 --batch 32 --steps 20                   # GPU: the paper's 500M/500M, bf16
"""
import argparse
import time

import torch


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="qwen3-tiny")
    p.add_argument("--decoder", default="qwen3-tiny")
    p.add_argument("--memory-slots", type=int, default=16)
    p.add_argument("--context-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args()


def timed(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main():
    args = parse()
    from ccmega import runtime
    from ccmega.convert.hf_qwen3 import hf_to_megatron, load_full_state
    from ccmega.convert.icae_hf import HFICAE
    from ccmega.presets import model_preset
    from ccmega.training.engine import build_training_setup, train_step
    from ccmega.models.icae_checkpoint import build_icae
    from ccmega.training.icae_train import ICAEForwardStep
    from ccmega.models.qwen3 import transformer_config
    from test_qwen3_parity import random_hf_model  # tests/ on sys.path (see __main__)

    runtime.initialize(1, 1)
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    device = torch.device("cuda" if gpu else "cpu")
    enc_p, dec_p = model_preset(args.encoder), model_preset(args.decoder)
    k, L, b = args.memory_slots, args.context_tokens, args.batch
    hf_enc, hf_dec = random_hf_model(enc_p, seed=1), random_hf_model(dec_p, seed=2)

    # ccmega: megatron GPTModels (TE spec + bf16 on GPU), DDP + megatron AdamW, the real forward step
    ours = build_icae(enc_p, dec_p, transformer_config(enc_p, params_dtype=dtype),
                      transformer_config(dec_p, params_dtype=dtype), k, end_token_id=0, seed=0)
    load_full_state(ours.encoder, hf_to_megatron(hf_enc.state_dict(), enc_p))
    load_full_state(ours.decoder, hf_to_megatron(hf_dec.state_dict(), dec_p))
    setup = build_training_setup([ours], ours.encoder.config, lr=1e-4)
    forward_step = ICAEForwardStep()
    data = torch.randint(0, min(enc_p.vocab_size, 1000), (b, L), generator=torch.Generator().manual_seed(0)).to(device)

    def ours_step():
        train_step(setup, iter([{"tokens": data}]), 1, L + 1, b, forward_step)
        forward_step.metrics()

    # baseline: Qwen3ForCausalLM encoder/decoder fed inputs_embeds, torch AdamW (fused on GPU)
    theirs = HFICAE(hf_enc.to(device, dtype), hf_dec.to(device, dtype), k, end_token_id=0).to(device)
    theirs.load_state_dict({n: p for n, p in ours.state_dict().items()
                            if n.startswith(("memory_embeddings", "ae_embedding", "projector"))}, strict=False)
    theirs.to(dtype)
    theirs.decoder.eval()
    params = [p for p in theirs.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=gpu)

    def theirs_step():
        opt.zero_grad(set_to_none=True)
        loss, _ = theirs(data)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    rows = []
    for name, step in (("ccmega (megatron-core)", ours_step), ("transformers HFICAE", theirs_step)):
        seconds = timed(step, args.steps, args.warmup)
        rows.append((name, seconds, b * L / seconds))
    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nICAE training, encoder {enc_p.name} -> frozen decoder {dec_p.name}, k={k}, L={L}, batch {b}, "
          f"{str(dtype).replace('torch.', '')}, {device_name}")
    print(f"| implementation | step time (ms) | context tokens/s |\n|---|---:|---:|")
    for name, seconds, tps in rows:
        print(f"| {name} | {1000 * seconds:.1f} | {tps:,.0f} |")
    print(f"speed-up ccmega / transformers: {rows[0][2] / rows[1][2]:.2f}x")
    runtime.destroy()


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    main()
