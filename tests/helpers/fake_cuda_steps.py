"""The CUDA path's steps on the fake device (ccmega/runtime/fake_device.py): a pretraining step, an ICAE
training step and an evaluation batch, each run as every rank of a fake world in turn.

    python tests/fake_cuda_steps.py pretrain --world-size 2 --tp 2
    python tests/fake_cuda_steps.py icae --world-size 2 --tp 1 --forward-step my.module:make_forward_step

Why one process for all ranks: the fake process group does not communicate, so separate processes
would add nothing but megatron's import time per rank; each rank gets a fresh world (process group,
parallel_state, seed) and runs the same code it would run under torchrun on a GPU node. The models
live on the stand-in device, ccmega's batches must get there through the commands' own functions
(`global_batch`, `ContextSamples.batch`, `measure_latency`), and every collective refuses a tensor
off it. Prints one JSON line per rank; exits non-zero with the first error.
"""
import argparse
import importlib
import json
import os
import sys
import tempfile
from functools import partial

import numpy as np
import torch

SEQ, MICRO_BATCH, MICRO_BATCHES = 16, 2, 2
CLUSTER_DTYPE = torch.bfloat16  # what precision.dtype=auto gives on a GPU (FP8 needs TE: not simulated here)
VOCAB_IDS = 100  # token ids drawn below every tiny preset's vocabulary


def _samples(count: int, length: int, seed: int = 0) -> list[dict]:
    """Dataset items as GPTDataset / EpochShuffled return them: CPU tensors."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(count):
        tokens = torch.randint(0, VOCAB_IDS, (length + 1,), generator=gen)
        items.append({"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(length)})
    return items


def _devices(module) -> list[str]:
    return sorted({str(p.device) for p in module.parameters()})


def _dtypes(module) -> list[str]:
    return sorted({str(p.dtype) for p in module.parameters()})


def pretrain_step(args) -> dict:
    from megatron.core import parallel_state as ps

    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset
    from ccmega.training.data import global_batch
    from ccmega.training.engine import build_training_setup, evaluate_loss, gpt_forward_step, train_step

    preset = model_preset(args.preset)
    config = transformer_config(preset, args.tp, args.pp, params_dtype=CLUSTER_DTYPE)
    model = build_model(preset, config)
    setup = build_training_setup([model], config, lr=1e-3, use_distributed_optimizer=args.distributed_optimizer)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    gbs = MICRO_BATCH * MICRO_BATCHES * dp_size
    data = _samples(2 * gbs, SEQ)
    batches = global_batch(data, 0, gbs, MICRO_BATCH, dp_rank, dp_size)
    result = train_step(setup, iter(batches), len(batches), SEQ, MICRO_BATCH, gpt_forward_step)
    batches = global_batch(data, gbs, gbs, MICRO_BATCH, dp_rank, dp_size)
    valid = evaluate_loss(setup, iter(batches), len(batches), SEQ, MICRO_BATCH)
    return {"loss": result.loss, "grad_norm": result.grad_norm, "updated": result.update_successful,
            "valid_loss": valid, "param_devices": _devices(model), "param_dtypes": _dtypes(model)}


def _tiny_icae(args):
    from ccmega.models.icae import ICAEModel
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset

    preset = model_preset(args.preset)
    encoder, decoder = (build_model(preset, transformer_config(preset, args.tp, 1, params_dtype=CLUSTER_DTYPE)) for _ in range(2))
    return ICAEModel(encoder, decoder, num_memory_slots=args.memory_slots, end_token_id=0,
                     real_vocab_size=preset.vocab_size)


def icae_forward_step(data_iterator, model):
    """A minimal ICAE forward step on engine-level calls (stands in until a command's own is given)."""
    from ccmega.training.engine import masked_lm_loss

    per_token, _correct = model(next(data_iterator)["tokens"])
    return per_token, partial(masked_lm_loss, torch.ones_like(per_token))


def icae_step(args) -> dict:
    from megatron.core import parallel_state as ps

    from ccmega.training.data import global_batch
    from ccmega.training.engine import build_training_setup, train_step

    icae = _tiny_icae(args)
    setup = build_training_setup([icae], icae.encoder.config, lr=1e-3,
                                 use_distributed_optimizer=args.distributed_optimizer)
    forward_step = icae_forward_step
    if args.forward_step:  # MODULE:FACTORY, e.g. the command's own ICAE forward step
        module, name = args.forward_step.split(":")
        forward_step = getattr(importlib.import_module(module), name)()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    gbs = MICRO_BATCH * dp_size
    L = args.memory_slots * 2
    batches = global_batch(_samples(gbs, L), 0, gbs, MICRO_BATCH, dp_rank, dp_size)
    result = train_step(setup, iter(batches), len(batches), L + 1, MICRO_BATCH, forward_step)
    out = {"loss": result.loss, "grad_norm": result.grad_norm, "updated": result.update_successful,
           "param_devices": _devices(icae), "param_dtypes": _dtypes(icae)}
    if hasattr(forward_step, "metrics"):  # the command's step: its DP all-reduce of the token counts
        out["metrics"] = forward_step.metrics()
    return out


def evaluation_batch(args) -> dict:
    from ccmega.data.indexed_writer import IndexedDatasetWriter
    from ccmega.evaluation.entropy import sequence_entropy
    from ccmega.evaluation.generation import reconstruct
    from ccmega.evaluation.latency import measure_latency
    from ccmega.training.icae_data import ContextSamples

    L = args.memory_slots * 2
    icae = _tiny_icae(args).eval()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "test")
        with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
            for item in _samples(3, L):
                writer.add_document(item["tokens"].numpy())
        context = ContextSamples(prefix, L).batch([0, 2])
    cached = reconstruct(icae, context, max_new_tokens=4)
    uncached = reconstruct(icae, context, max_new_tokens=4, use_cache=False)
    entropy = sequence_entropy(icae.decoder, context)
    latency = measure_latency(icae, context_tokens=L, generate_tokens=3, warmup=0, repeats=1)
    return {"reconstruction": list(cached.tokens.shape), "uncached": list(uncached.tokens.shape),
            "tokens": cached.token_lists(), "entropy": entropy.tolist(), "latency_keys": sorted(latency),
            "param_devices": _devices(icae), "param_dtypes": _dtypes(icae)}


def real_preset(args) -> dict:
    """The real preset at its real layout and sequence length for this rank: parameters as `ccmega info`
    and the memory report count them, then one pretraining step (nothing allocated: all on meta)."""
    import time

    from megatron.core import parallel_state as ps

    from ccmega.models.info import stage_counts
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset
    from ccmega.training.data import global_batch
    from ccmega.training.engine import build_training_setup, train_step
    from ccmega.training.memory import Layout, memory_report

    preset = model_preset(args.preset)
    started = time.perf_counter()
    config = transformer_config(preset, args.tp, args.pp, params_dtype=CLUSTER_DTYPE)
    model = build_model(preset, config)
    stage = ps.get_pipeline_model_parallel_rank()
    report, _ = memory_report(preset, Layout(args.world_size, args.tp, args.pp), 1, args.seq_length,
                              distributed_optimizer=True, global_batch=args.global_batch)
    setup = build_training_setup([model], config, lr=1e-4, use_distributed_optimizer=True)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    batches = global_batch(_samples(args.global_batch, args.seq_length), 0, args.global_batch, 1, dp_rank, dp_size)
    result = train_step(setup, iter(batches), len(batches), args.seq_length, 1)
    return {"stage": stage, "params": sum(p.numel() for p in model.parameters()),
            "info_params": stage_counts(preset, args.tp, args.pp)[stage].params_per_tp_rank,
            "report_params": report.stages[stage].params, "micro_batches": len(batches),
            "updated": result.update_successful, "param_devices": _devices(model),
            "seconds": round(time.perf_counter() - started, 1)}


def refusals(args) -> dict:
    """The checks themselves: a CPU batch, a CPU collective tensor and a CPU gloo-group tensor."""
    from megatron.core import parallel_state as ps

    from ccmega.runtime import device

    out = {}
    weight = torch.zeros(4, 3, device=device())
    for name, action in (
            ("op", lambda: torch.nn.functional.embedding(torch.zeros(2, dtype=torch.long), weight)),
            ("collective", lambda: torch.distributed.all_reduce(torch.zeros(1), group=ps.get_data_parallel_group())),
            ("gloo_collective", lambda: torch.distributed.all_reduce(torch.zeros(1, device=device()),
                                                                     group=ps.get_data_parallel_group_gloo()))):
        try:
            action()
            out[name] = None
        except RuntimeError as e:
            out[name] = str(e)
    torch.distributed.all_reduce(torch.zeros(1, device=device()))  # allowed: on the device
    torch.distributed.all_reduce(torch.zeros(1), group=ps.get_data_parallel_group_gloo())  # allowed: gloo, CPU
    out["scalar"] = list((weight * torch.tensor(2.0)).shape)  # a 0-dim CPU tensor counts as a scalar
    out["read"] = [weight.sum().item(), bool(weight.any()), weight[:1].tolist()]
    return out


STEPS = {"pretrain": pretrain_step, "icae": icae_step, "evaluate": evaluation_batch, "real_preset": real_preset,
         "refusals": refusals}

# what tests/test_fake_cuda.py runs, in one process (megatron is imported once)
SUITE = {
    "pretrain_tp2": ["pretrain", "--world-size", "2", "--tp", "2"],
    "pretrain_pp2": ["pretrain", "--world-size", "4", "--pp", "2", "--distributed-optimizer"],
    "icae_tp2_dp2": ["icae", "--world-size", "4", "--tp", "2", "--distributed-optimizer"],
    "evaluate_tp2": ["evaluate", "--world-size", "2", "--tp", "2"],
    "refusals": ["refusals", "--world-size", "2", "--ranks", "1"],
    # the paper's 1B at seq 8192 as the first and the last rank of a 128-GPU job (2 micro-batches per step)
    "qwen3_1b_of_128": ["real_preset", "--preset", "qwen3-1b", "--world-size", "128", "--tp", "2", "--pp", "2",
                        "--ranks", "0,127", "--global-batch", "64"],
}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=sorted(STEPS) + ["suite"], help="one step, or the whole SUITE")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ranks", help="comma-separated ranks to run (default: all)")
    parser.add_argument("--preset", default="qwen3-tiny")
    parser.add_argument("--memory-slots", type=int, default=4)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--forward-step", help="ICAE: MODULE:FACTORY returning the forward step to drive")
    parser.add_argument("--seq-length", type=int, default=8192, help="real_preset: tokens per sequence")
    parser.add_argument("--global-batch", type=int, default=512, help="real_preset: sequences per step")
    return parser.parse_args(argv)


def run(name: str, args) -> bool:
    """Every asked rank of one scenario; a JSON line each, {"error": ...} for the first failure."""
    import traceback

    from ccmega.runtime.fake_device import fake_world

    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else range(args.world_size)
    for rank in ranks:
        line = {"scenario": name, "rank": rank}
        try:
            with fake_world(rank, args.world_size, args.tp, args.pp):
                line.update(STEPS[args.step](args))
        except Exception as e:  # reported, and the next scenario still runs
            line["error"] = f"{type(e).__name__}: {e}"
            line["traceback"] = traceback.format_exc()[-3000:]
        print(json.dumps(line), flush=True)
        if "error" in line:
            return False
    return True


def main(argv=None) -> int:
    args = parse(argv)
    if args.step != "suite":
        return 0 if run(args.step, args) else 1
    extra = [a for a in (sys.argv[2:] if argv is None else argv[1:])]  # e.g. --forward-step for the ICAE
    results = [run(name, parse(spec + (extra if spec[0] == "icae" else []))) for name, spec in SUITE.items()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
