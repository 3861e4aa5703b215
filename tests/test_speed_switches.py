"""Megatron-LM's speed switches (ccmega/training/speed.py).

Each switch that runs on a CPU trains like the run without it: `ccmega pretrain` under torchrun at DP=2
with the distributed optimizer, with and without the switch, gives the same training and validation
losses and writes the same weights into its checkpoints. Without a gather before validation and saving,
`speed.overlap_param_gather` validates and saves the parameters of the step before. The decisions for a
GPU job (the paper's 128-GPU pretraining) and the refusals are checked against hand-written tables.
"""
import subprocess
import sys

import pytest
import torch

from test_pretrain import REPO, finish, pretrain_args, records, start, tiny_data  # noqa: F401

STEPS = 4
BASE = ["--set", "train.distributed_optimizer=true", "--set", "logging.tensorboard=false"]


def switch_args(data, run_dir, dtype: str, *sets: str):
    args = pretrain_args(data, run_dir, *BASE, "--set", f"precision.dtype={dtype}",
                         *(a for s in sets for a in ("--set", s)))
    # saves at steps 2 and 4 with no validation just before them: a validation pass gathers the parameters
    for flag, value in (("--steps", STEPS), ("--save-interval", 2), ("--eval-interval", 3)):
        args[args.index(flag) + 1] = str(value)
    return args


def train(data, run_dir, dtype: str, *sets: str) -> str:
    rc, out = finish(start(switch_args(data, run_dir, dtype, *sets)))
    assert rc == 0, out[-6000:]
    return out


def checkpoint_weights(iter_dir) -> dict:
    """The model weights of a dist checkpoint, read with torch's own DCP reader, not megatron."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(iter_dir))
    state = {key: torch.zeros(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer.")}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


@pytest.fixture(scope="module")
def baselines(tiny_data, tmp_path_factory):  # noqa: F811
    """dtype -> run dir of the run without any switch."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        runs[dtype] = tmp_path_factory.mktemp(f"baseline_{dtype}") / "run"
        out = train(tiny_data, runs[dtype], dtype)
        assert "switch speed.overlap_grad_reduce           off  CPU run" in out
    return runs


SWITCHES = {  # name -> (dtype, --set values)
    "overlap_grad_reduce": ("fp32", ["speed.overlap_grad_reduce=true"]),
    "overlap_param_gather": ("fp32", ["speed.overlap_grad_reduce=true", "speed.overlap_param_gather=true"]),
    "cross_entropy_fusion": ("bf16", ["speed.cross_entropy_fusion=true"]),  # megatron's fused kernel: bf16 only
}
# (loss, weight) tolerances. The fused cross entropy rounds its logit gradients to bf16 at another point than
# the unfused one: measured, 1876 of 213,696 weights one bf16 step apart after one update; validation
# losses 1.4e-4 apart after four (6.89842 vs 6.89829). Both overlaps are exact in fp32.
TOLERANCE = {"fp32": (1e-6, 1e-6), "bf16": (5e-4, 2e-3)}


@pytest.mark.multirank
@pytest.mark.parametrize("name", SWITCHES)
def test_switch_trains_like_the_run_without_it(name, tiny_data, baselines, tmp_path):  # noqa: F811
    dtype, sets = SWITCHES[name]
    out = train(tiny_data, tmp_path, dtype, *sets)
    assert f"switch speed.{name}" in out and "on   set in the config" in out
    reference = baselines[dtype]
    loss_tol, weight_tol = TOLERANCE[dtype]
    for kind in ("train", "valid"):
        ours, theirs = records(tmp_path, kind), records(reference, kind)
        assert sorted(ours) == sorted(theirs) and ours, kind
        for step in ours:
            assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], abs=loss_tol, rel=0), (kind, step)
    for iteration in (2, STEPS):  # speed.overlap_param_gather without a gather before saving: stale shards
        name_ = f"iter_{iteration:07d}"
        ours, theirs = (checkpoint_weights(run / "checkpoints" / name_) for run in (tmp_path, reference))
        assert ours.keys() == theirs.keys() and "embedding.word_embeddings.weight" in ours
        for key in ours:
            torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=0, atol=weight_tol,
                                       msg=f"{name_} {key}")


# ---- what a GPU job decides, and what is refused ------------------------------------------------------

def _platform(**overrides):
    from ccmega.training.speed import Platform

    fields = dict(cuda=True, dtype="bf16", data_parallel=128, transformer_engine="2.8.0",
                  apex_gradient_accumulation=True)
    return Platform(**{**fields, **overrides})


def _decided(platform, **sets):
    from ccmega.config import set_dotted
    from ccmega.training.pretrain import PretrainConfig
    from ccmega.training.speed import resolve

    cfg = PretrainConfig()
    for key, value in sets.items():
        cfg = set_dotted(cfg, key.replace("__", "."), value)
    _, switches = resolve(cfg, platform)
    return {s.key: s.on for s in switches}


ALL_ON = {"train.distributed_optimizer": True, "speed.overlap_grad_reduce": True, "speed.overlap_param_gather": True,
          "speed.cross_entropy_fusion": True, "speed.rope_fusion": True, "speed.gradient_accumulation_fusion": True}


def test_gpu_job_decisions():
    assert _decided(_platform()) == ALL_ON
    assert _decided(_platform(transformer_engine=None, apex_gradient_accumulation=False)) == {
        **ALL_ON, "speed.rope_fusion": False, "speed.gradient_accumulation_fusion": False}
    assert _decided(_platform(transformer_engine="1.3.0"))["speed.rope_fusion"] is False
    assert _decided(_platform(dtype="fp32"))["speed.cross_entropy_fusion"] is False
    one_gpu = _decided(_platform(data_parallel=1))
    assert not one_gpu["train.distributed_optimizer"] and not one_gpu["speed.overlap_grad_reduce"]
    assert not one_gpu["speed.overlap_param_gather"]
    # the user's word wins where the switch can run
    assert _decided(_platform(), train__distributed_optimizer="false")["speed.overlap_param_gather"] is False
    cpu = _decided(_platform(cuda=False, dtype="fp32", data_parallel=2, transformer_engine=None,
                             apex_gradient_accumulation=False))
    assert not any(cpu.values())


@pytest.mark.parametrize("sets, message", [
    ({"speed__rope_fusion": "true"}, "needs a CUDA GPU"),
    ({"speed__gradient_accumulation_fusion": "true"}, "needs a CUDA GPU"),
    ({"speed__cross_entropy_fusion": "true"}, "bf16 gradients"),
    ({"speed__overlap_param_gather": "true"}, "needs train.distributed_optimizer=true"),
    ({"speed__overlap_param_gather": "true", "train__distributed_optimizer": "true"}, "overlap_grad_reduce=true"),
])
def test_impossible_switch_is_refused(sets, message):
    from ccmega.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _decided(_platform(cuda=False, dtype="fp32", data_parallel=2, transformer_engine=None,
                           apex_gradient_accumulation=False), **sets)


def test_refusal_is_one_clean_line_from_the_command(tiny_data, tmp_path):  # noqa: F811
    proc = subprocess.run([sys.executable, "-m", "ccmega.cli", "pretrain",
                           *pretrain_args(tiny_data, tmp_path, "--set", "speed.rope_fusion=true")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "speed.rope_fusion=true: needs a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_dry_run_prints_the_switches_of_the_paper_job(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ccmega.cli", "pretrain", "--preset", "qwen3-1b", "--data",
                           str(tmp_path / "absent"), "--seq-length", "8192", "--micro-batch-size", "1",
                           "--dry-run", "--world-size", "128"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = {line.split()[2]: line.split()[3] for line in proc.stdout.splitlines() if line.startswith("[ccmega] switch ")}
    assert lines == {"train.distributed_optimizer": "on", "speed.overlap_grad_reduce": "on",
                     "speed.overlap_param_gather": "on", "speed.cross_entropy_fusion": "on",
                     "speed.rope_fusion": "off", "speed.gradient_accumulation_fusion": "off"}, proc.stdout
    assert "distributed optimizer" in proc.stdout  # the memory estimate counts the sharded optimizer state
