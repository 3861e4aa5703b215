"""A few training steps of a tiny Qwen3 from given initial weights, at any TP/PP/DP layout.

Run by tests/test_parallel_equivalence.py under torchrun, and in-process (world of one) for the
reference. Writes the per-step losses and grad norms, each rank's parameter count, and the first-
and last-stage copies of the tied embedding to --out.
"""
import argparse
import json
import os

import torch

GLOBAL_BATCH, SEQ, STEPS = 8, 32, 3


def batches(vocab: int, dp_rank: int, dp_size: int, micro_batch: int, seed: int = 7):
    """Global batches of random tokens from the first 32 ids (learnable: loss falls toward ln 32);
    this DP rank's slice, cut into micro-batches."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        data = torch.randint(0, min(vocab, 32), (GLOBAL_BATCH, SEQ + 1), generator=gen)
        local = data.chunk(dp_size)[dp_rank]
        yield [{"tokens": mb[:, :-1].contiguous(), "labels": mb[:, 1:].contiguous(),
                "loss_mask": torch.ones(mb.shape[0], SEQ)} for mb in local.split(micro_batch)]


def run(init_path: str, preset_name: str, distributed_optimizer: bool, micro_batch: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from ccmega.convert.hf_qwen3 import load_full_state
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset
    from ccmega.training.engine import build_training_setup, train_step

    preset = model_preset(preset_name)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    config = transformer_config(preset, tp, pp)
    model = build_model(preset, config)
    load_full_state(model, torch.load(init_path), ps.get_tensor_model_parallel_rank(), tp,
                    get_transformer_layer_offset(config))
    setup = build_training_setup([model], config, lr=1e-3, clip_grad=1.0,
                                 use_distributed_optimizer=distributed_optimizer)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    losses, norms = [], []
    for micro_batches in batches(preset.vocab_size, dp_rank, dp_size, micro_batch):
        result = train_step(setup, iter(micro_batches), len(micro_batches), SEQ, micro_batch)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    tied = {}
    if ps.is_pipeline_first_stage():
        tied["embedding"] = model.embedding.word_embeddings.weight.detach().clone()
    if ps.is_pipeline_last_stage() and pp > 1:
        tied["output_layer"] = model.output_layer.weight.detach().clone()
    return {"losses": losses, "grad_norms": norms, "tied": tied,
            "local_params": sum(p.numel() for p in model.parameters()),
            "stage": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--preset", default="qwen3-tiny")
    args = parser.parse_args()

    from ccmega import runtime

    env = runtime.initialize(args.tp, args.pp, seed=1234)
    result = run(args.init, args.preset, args.distributed_optimizer, args.micro_batch)
    os.makedirs(args.out, exist_ok=True)
    torch.save(result["tied"], os.path.join(args.out, f"tied_rank{env.rank}.pt"))
    everyone = [None] * env.world_size
    torch.distributed.all_gather_object(everyone, {k: v for k, v in result.items() if k != "tied"})
    if env.rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(everyone, f)
    runtime.destroy()


if __name__ == "__main__":
    main()
