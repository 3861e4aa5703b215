"""Host memory and time of a checkpoint save (and load) with the distributed optimizer, per format.

Builds a model and megatron's distributed optimizer, takes one training step (so the Adam state
exists), then for each `checkpoint.optimizer_format` saves a checkpoint through ccmega's
`save_checkpoint`; then loads each into a fresh model and optimizer through `load_checkpoint` (as a
resume does). Measured on every rank:

- peak RSS growth: VmHWM (after resetting it by writing "5" to /proc/self/clear_refs) minus VmRSS
  before the call. What a format gathers is allocated in the rank's own process, so it shows here
  (megatron-core 0.16's torch_dist writer forks processes that share the parent's pages and are not
  counted; 0.19's writes from threads, counted);
- wall seconds of the call, and the checkpoint's size on disk.

    torchrun --nproc-per-node 2 benchmarks/checkpoint_save.py                      # ~75M params, fp32, DP=2
    torchrun --nproc-per-node 2 benchmarks/checkpoint_save.py --dtype bf16 --preset qwen3-mini

Linux only (/proc). The default model is `bench-75m`: qwen3-mini widened to 768 hidden, 8 layers and
a 32k vocabulary (75M parameters), big enough for the formats' difference to stand out of the noise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

FORMATS = ("dp_reshardable", "fully_reshardable")


def measured(call):
    """(result, peak RSS growth in MiB, seconds) of `call()` on this rank."""
    from peak_rss import peak_growth

    t0 = time.perf_counter()
    result, growth = peak_growth(call)
    return result, growth / 2**20, time.perf_counter() - t0


def du_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


def bench_preset(name: str):
    from ccmega.presets import model_preset

    if name == "bench-75m":
        return model_preset("qwen3-mini").replace(name="bench-75m", hidden_size=768, ffn_hidden_size=2048,
                                                  num_layers=8, num_attention_heads=12, num_query_groups=4,
                                                  head_dim=64, vocab_size=32000)
    return model_preset(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-75m", help="a model preset, or bench-75m")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, measured in this order")
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--json", help="also write the per-rank results here")
    args = parser.parse_args(argv)

    import torch
    from megatron.core import parallel_state as ps

    from ccmega import runtime
    from ccmega.config import set_dotted
    from ccmega.models.qwen3 import build_model
    from ccmega.training import checkpointing as ckpt
    from ccmega.training.engine import build_training_setup, train_step
    from ccmega.training.loop import model_config
    from ccmega.training.pretrain import PretrainConfig

    env = runtime.initialize(1, 1, seed=1234)
    preset = bench_preset(args.preset)
    precision = set_dotted(PretrainConfig(), "precision.dtype", args.dtype).precision
    config, dtype = model_config(precision, preset, 1, 1)
    model = build_model(preset, config)
    setup = build_training_setup([model], config, lr=1e-4, use_distributed_optimizer=True)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    seq = args.seq_length
    tokens = torch.randint(0, preset.vocab_size, (1, seq + 1), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, seq)}
    train_step(setup, iter([batch]), 1, seq, 1)

    root = args.dir or (tempfile.mkdtemp(prefix="ckpt_bench_") if env.rank == 0 else None)
    box = [root]
    torch.distributed.broadcast_object_list(box, src=0)
    root = box[0]
    formats = args.formats.split(",")
    # untimed warm-up: the first save of a process starts the torch_dist writer's helper processes
    ckpt.save_checkpoint(os.path.join(root, "warmup"), setup.model, setup.optimizer, None,
                         {"iteration": 0, "consumed_samples": 0}, {}, optimizer_format=formats[0])
    rows = {}
    for fmt in formats:
        progress = {"iteration": 1, "consumed_samples": 1}
        iter_dir, mib, seconds = measured(lambda: ckpt.save_checkpoint(
            os.path.join(root, fmt), setup.model, setup.optimizer, None, progress, {}, optimizer_format=fmt))
        rows[fmt] = {"format": fmt, "rank": env.rank, "iter_dir": iter_dir, "save_peak_rss_growth_mib": mib,
                     "save_s": seconds, "disk_mib": du_mib(iter_dir) if env.rank == 0 else None}
    # Loads go into a fresh model and optimizer, as a resume does (megatron's fully_reshardable load
    # fails on an optimizer that has already stepped: its state then has a "step" the format omits).
    del setup, model
    for fmt, row in rows.items():
        fresh = build_training_setup([build_model(preset, config)], config, lr=1e-4, use_distributed_optimizer=True)
        _, row["load_peak_rss_growth_mib"], row["load_s"] = measured(
            lambda: ckpt.load_checkpoint(row["iter_dir"], fresh.model, fresh.optimizer, None))
        del fresh
    rows = list(rows.values())
    torch.distributed.barrier()
    everyone = [None] * env.world_size
    torch.distributed.all_gather_object(everyone, rows)
    if env.rank == 0:
        print(f"\n{preset.name}: {params / 1e6:.1f}M parameters, {dtype}, distributed optimizer, "
              f"DP={ps.get_data_parallel_world_size()}, megatron-core {_mcore_version()}, torch {torch.__version__}")
        print("peak RSS growth (MiB) and seconds of one save_checkpoint / load_checkpoint, per rank")
        print(f"{'format':<18} {'rank':>4} {'save MiB':>9} {'save s':>7} {'load MiB':>9} {'load s':>7} {'disk MiB':>9}")
        for row in sorted((r for rank_rows in everyone for r in rank_rows), key=lambda r: (r["format"], r["rank"])):
            disk = f"{row['disk_mib']:9.0f}" if row["disk_mib"] is not None else " " * 9
            print(f"{row['format']:<18} {row['rank']:>4} {row['save_peak_rss_growth_mib']:9.0f} {row['save_s']:7.2f} "
                  f"{row['load_peak_rss_growth_mib']:9.0f} {row['load_s']:7.2f} {disk}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"preset": preset.name, "params": params, "dtype": dtype, "mcore": _mcore_version(),
                           "rows": everyone}, f, indent=2)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    runtime.destroy()
    return 0


def _mcore_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


if __name__ == "__main__":
    raise SystemExit(main())
