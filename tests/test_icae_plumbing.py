"""Memory reaches the decoder: an ICAE trained with the user's commands against a frozen decoder that can
copy (tests/helpers/copy_task.py) reconstructs held-out strings far above its shuffled-memory control.

`ccmega pretrain` (qwen3-tiny, 400 steps) -> `ccmega icae-train` (r = 1, encoder and decoder from that
checkpoint) -> `ccmega evaluate --controls`, each in its own process, as a user runs them. A break anywhere
between the encoder and the decoder's input (memory never fed, fed at the wrong positions, no gradient
into the encoder or projector) leaves the ICAE at its shuffled control. About a minute on 2 cores."""
import json
import os
import subprocess
import sys

import pytest

from copy_task import write_copy_task
from launch import REPO

L = 16  # = k: r = 1


def ccmega(*argv):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "ccmega.cli", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ccmega {' '.join(map(str, argv))}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


# Known failure on the 2026-12-05 machine: the code that passed this test when it landed (12b10fd) fails it
# there too (own 3.5% vs shuffled 0.6% token accuracy; the LM's loss sits at
# 4.15 until step 200, then 2.63 at 400, and its decoder probe finds no copying). 700 pretraining steps (LM
# loss 2.16) did not help (1.6% vs 1.5%). Not strict: a fix turns it back into a plain pass.
REGRESSED = pytest.mark.xfail(strict=False, reason="fails on the landed code 12b10fd on this machine too; "
                              "see the comment above and the 2026-12-05 session note")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("plumbing")
    data = write_copy_task(str(d / "data"), L)
    quiet = ["--set", "logging.tensorboard=false", "--save-interval", 0, "--eval-interval", 0]
    ccmega("pretrain", "--run-dir", d / "lm", "--preset", "qwen3-tiny", "--data", data["pretrain"],
           "--tokenizer", data["tokenizer"], "--seq-length", 64, "--steps", 400, "--global-batch-size", 32,
           "--micro-batch-size", 32, "--lr", "3e-3", "--warmup-steps", 10, *quiet)
    log = ccmega("icae-train", "--run-dir", d / "icae", "--encoder", d / "lm", "--decoder", d / "lm",
                 "--data", data["finetune"], "--memory-slots", L, "--context-tokens", L, "--steps", 200,
                 "--micro-batch-size", 32, "--lr", "3e-3", "--warmup-steps", 10, *quiet)
    ccmega("evaluate", "--icae", d / "icae", "--data", data["test"], "--output-dir", d / "eval", "--controls")
    with open(d / "eval" / "summary.json") as f:
        summary = json.load(f)
    with open(d / "icae" / "status.json") as f:
        status = json.load(f)
    return {"controls": summary["controls"], "status": status, "log": log}


@REGRESSED
def test_reconstruction_needs_the_samples_own_memory(trained):
    conditions = trained["controls"]["conditions"]
    own, shuffled = conditions["own"]["accuracy"], conditions["shuffled"]["accuracy"]
    assert own >= 3 * shuffled and own > 30, f"token accuracy own {own:.1f}% vs shuffled {shuffled:.1f}%"
    gap = trained["controls"]["gap_own_minus_shuffled"]["f1"]
    assert gap["ci95"][0] > 0, gap
    assert trained["controls"]["memory_used"]


@REGRESSED
def test_a_working_icae_gets_no_collapse_warning(trained):
    status = trained["status"]
    assert status["state"] == "finished" and "collapse" not in status, status
    probe = status["decoder_probe"]  # the probe ran at the start, on this decoder
    assert probe["free_prefix_loss"] < 0.6 * probe["lm_loss"], probe
    assert "decoder lm loss" in trained["log"]
