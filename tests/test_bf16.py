"""bf16, the GPU jobs' dtype, end to end on the CPU through the commands a user runs.

`ccmega pretrain` (torchrun, DP=2) and `ccmega icae-train` (bf16 encoder and decoder from those
checkpoints; plain optimizer in one process, distributed optimizer at DP=2) each train once without
interruption and once SIGKILLed after a checkpoint and resumed: the losses must be bitwise equal. Then
`ccmega evaluate` and `ccmega convert` read the bf16 checkpoints. Until bf16 models were cast whole, the
first save of a bf16 run with the plain optimizer crashed ("Param id N does not match any model sharded
param": the local spec's torch RMSNorms stayed fp32).
"""
import json
import os
import random
import subprocess
import sys

import pytest

from icae_fixtures import make_split
from test_pretrain import REPO, finish, kill_job, output, pretrain_args, records, start, tiny_data, wait_for_step  # noqa: F401

STEPS, SAVE_EVERY = 8, 2
ICAE_STEPS, ICAE_SAVE = 8, 3
K, L = 8, 32
BF16 = ["--set", "precision.dtype=bf16"]


def bf16_pretrain_args(data, run_dir):
    args = pretrain_args(data, run_dir, *BF16, "--set", "logging.tensorboard=false")
    for flag, value in (("--steps", STEPS), ("--save-interval", SAVE_EVERY), ("--eval-interval", 0)):
        args[args.index(flag) + 1] = str(value)
    return args


def run_ok(proc):
    rc, out = finish(proc)
    assert rc == 0, out[-6000:]
    return out


def kill_after_a_save(proc, run_dir, last_step: int, seed: int) -> int:
    """SIGKILL the job at a random step past its first checkpoint; returns the last step it logged."""
    step = random.Random(seed).randint(SAVE_EVERY + 1, last_step - 1)
    wait_for_step(proc, run_dir, step)
    kill_job(proc)
    killed_at = max(records(run_dir))
    assert killed_at < last_step, "the run finished before it could be killed"
    return killed_at


def assert_bitwise_equal(run_dir, reference_dir, steps: int):
    ours, reference = records(run_dir), records(reference_dir)
    for step in range(1, steps + 1):
        assert (ours[step]["loss"], ours[step]["lr"]) == (reference[step]["loss"], reference[step]["lr"]), step


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):  # noqa: F811
    """A bf16 `ccmega pretrain` run (DP=2, plain optimizer) to the end: the reference and the ICAE's LM."""
    run_dir = tmp_path_factory.mktemp("bf16") / "pretrain"
    out = run_ok(start(bf16_pretrain_args(tiny_data, run_dir)))
    assert "bf16" in out
    return run_dir


@pytest.mark.multirank
def test_pretraining_saves_and_resumes_bitwise_after_sigkill(tiny_data, pretrained, tmp_path):  # noqa: F811
    from ccmega.training.checkpointing import read_checkpoint_metadata

    assert read_checkpoint_metadata(str(pretrained))["dtype"] == "bf16"
    proc = start(bf16_pretrain_args(tiny_data, tmp_path))
    killed_at = kill_after_a_save(proc, tmp_path, STEPS, seed=1)
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    out = run_ok(start(bf16_pretrain_args(tiny_data, tmp_path)))
    assert f"resumed from {tmp_path / 'checkpoints' / latest}" in out
    print(f"bf16 pretraining killed after step {killed_at}, resumed from {latest}")
    assert_bitwise_equal(tmp_path, pretrained, STEPS)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "finished"


# ---- the ICAE ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def icae_data(tiny_data, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("bf16_icae")
    return {"train": make_split(d / "finetune", 64, L, 1024, seed=0),
            "test": make_split(d / "test", 8, L, 1024, seed=1), "dir": d}


def icae_start(pretrained, icae_data, run_dir, nproc: int, *extra):
    """`ccmega icae-train` in bf16 (torchrun when nproc > 1), encoder and decoder the bf16 LM."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "ccmega.cli", "icae-train", "--encoder", str(pretrained), "--decoder", str(pretrained),
           "--data", icae_data["train"], "--run-dir", str(run_dir), "--memory-slots", str(K), "--context-tokens",
           str(L), "--micro-batch-size", str(8 // nproc), "--global-batch-size", "8", "--steps", str(ICAE_STEPS),
           "--save-interval", str(ICAE_SAVE), "--lr", "3e-3", "--warmup-steps", "1", "--set",
           "logging.tensorboard=false", "--set", "monitor.probe=false", *BF16, *extra]
    log = open(f"{run_dir}.log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


@pytest.fixture(scope="module")
def icae_reference(pretrained, icae_data):
    run_dir = icae_data["dir"] / "icae_reference"
    out = run_ok(icae_start(pretrained, icae_data, run_dir, 1))
    assert "bf16" in out
    return run_dir


@pytest.mark.multirank
@pytest.mark.parametrize("optimizer", ["plain", "distributed"])
def test_icae_saves_and_resumes_bitwise_after_sigkill(optimizer, pretrained, icae_data, icae_reference, tmp_path):
    """Plain optimizer in one process against the reference; the distributed optimizer at DP=2 against its own
    uninterrupted DP=2 run (another reduction order than one process)."""
    nproc, extra = (1, []) if optimizer == "plain" else (2, ["--distributed-optimizer", "true"])
    reference = icae_reference
    if optimizer == "distributed":
        reference = tmp_path / "reference"
        run_ok(icae_start(pretrained, icae_data, reference, nproc, *extra))
    run_dir = tmp_path / "run"
    proc = icae_start(pretrained, icae_data, run_dir, nproc, *extra)
    step = random.Random(optimizer).randint(ICAE_SAVE + 1, ICAE_STEPS - 1)
    wait_for_step(proc, run_dir, step)
    kill_job(proc)
    assert max(records(run_dir)) < ICAE_STEPS, "the run finished before it could be killed"
    out = run_ok(icae_start(pretrained, icae_data, run_dir, nproc, *extra))
    assert "resumed from" in out, out[-3000:]
    assert_bitwise_equal(run_dir, reference, ICAE_STEPS)


# ---- reading bf16 checkpoints ----------------------------------------------------------------------------

def ccmega(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "ccmega.cli", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_evaluate_and_convert_read_bf16_checkpoints(pretrained, icae_data, icae_reference, tmp_path):
    out = ccmega("convert", "to-hf", pretrained, tmp_path / "hf", "--verify")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16", config
    assert "verify" in out.lower()
    ccmega("evaluate", "--icae", icae_reference, "--data", icae_data["test"], "--output-dir", tmp_path / "eval")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary, summary
    ccmega("convert", "icae-export", icae_reference, tmp_path / "export")
    assert (tmp_path / "export" / "icae.safetensors").is_file()
