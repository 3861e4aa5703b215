"""The CUDA path's device discipline, on a CPU: steps on the fake device (ccmega/runtime/fake_device.py).

The models sit on `meta` (the stand-in accelerator), ops refuse tensors on two devices and collectives
refuse tensors off the model's device, as CUDA and NCCL do. Each scenario runs every rank of its fake
world (tests/fake_cuda_steps.py), all in one subprocess: the suite's process group must not be touched.
Values are not checked here (meta tensors hold none): placement, shapes and the collectives' devices are.
The models are bf16, the dtype `precision.dtype=auto` gives on a GPU; FP8 (Transformer Engine) is not simulated.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fake_cuda_steps import SUITE

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the fake device needs a CPU-only process")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The ICAE forward step the ICAE scenario drives: "MODULE:FACTORY", a zero-argument callable returning the
# command's forward step (its .metrics() all-reduce is called after the step); None: the script's minimal one.
ICAE_FORWARD_STEP = "ccmega.training.icae_train:ICAEForwardStep"


@pytest.fixture(scope="module")
def suite():
    cmd = [sys.executable, os.path.join(REPO, "tests", "helpers", "fake_cuda_steps.py"), "suite"]
    if ICAE_FORWARD_STEP:
        cmd += ["--forward-step", ICAE_FORWARD_STEP]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_scenario = {}
    for line in lines:
        by_scenario.setdefault(line["scenario"], []).append(line)
    return by_scenario, proc


def _ranks(suite, name: str, ranks) -> list[dict]:
    by_scenario, proc = suite
    lines = by_scenario.get(name, [])
    for line in lines:
        assert "error" not in line, f"{name} rank {line['rank']}: {line['error']}\n{line.get('traceback', '')}"
    assert [line["rank"] for line in lines] == list(ranks), f"{name}: {proc.stderr[-3000:]}"
    return lines


@pytest.mark.parametrize("name", ["pretrain_tp2", "pretrain_pp2"])
def test_pretraining_step_on_the_device(suite, name):
    """engine.train_step + gpt_forward_step on data.global_batch, then evaluate_loss: TP=2, and PP=2 x DP=2
    with the distributed optimizer; the batch, the loss reductions and megatron's own collectives."""
    for line in _ranks(suite, name, range(int(SUITE[name][2]))):
        assert line["param_devices"] == ["meta"] and line["param_dtypes"] == ["torch.bfloat16"]  # the GPU dtype
        assert line["updated"] and line["loss"] == line["valid_loss"] == 1.0  # 1.0: meta reads as ones


def test_icae_training_step_on_the_device(suite):
    """ICAEModel (memory slots, [AE], projector on the backbones' device) at TP=2 x DP=2: one train_step."""
    for line in _ranks(suite, "icae_tp2_dp2", range(4)):
        assert line["param_devices"] == ["meta"] and line["param_dtypes"] == ["torch.bfloat16"]
        assert line["updated"]
        if ICAE_FORWARD_STEP:
            assert line["metrics"]["token_accuracy"] == 1.0  # counts all-reduced on the device (meta reads ones)


def test_evaluation_batch_on_the_device(suite):
    """ContextSamples.batch -> reconstruct with megatron's KV cache (and without), entropy, latency at TP=2."""
    for line in _ranks(suite, "evaluate_tp2", range(2)):
        assert line["param_devices"] == ["meta"] and line["param_dtypes"] == ["torch.bfloat16"]
        assert line["reconstruction"] == line["uncached"] == [2, 4]  # 2 samples x max_new_tokens
        assert len(line["entropy"]) == 2 and "compression_s" in line["latency_keys"]


def test_the_fake_device_refuses_what_cuda_and_nccl_refuse(suite):
    (line,) = suite[0]["refusals"]
    assert line["op"] == "device mix in embedding: cpu, meta"
    assert line["collective"].startswith("allreduce got a tensor on cpu") and "NCCL" in line["collective"]
    assert line["gloo_collective"].startswith("allreduce got a tensor on meta")
    assert line["scalar"] == [4, 3]
    assert line["read"] == [1.0, True, [[1.0, 1.0, 1.0]]]


def test_the_real_preset_builds_and_steps_as_one_rank_of_128(suite):
    """qwen3-1b at TP=2 x PP=2 x DP=32, seq 8192, for ranks 0 (first stage) and 127 (last): nothing allocated;
    the built parameters are what `ccmega info` prints and what the memory report counts."""
    from ccmega.models.info import describe
    from ccmega.presets import model_preset

    info = describe(model_preset("qwen3-1b"), 2, 2)
    printed = [int(row.split("per TP rank")[1].replace(",", "")) for row in info.splitlines() if "per TP rank" in row]
    lines = _ranks(suite, "qwen3_1b_of_128", [0, 127])
    assert [line["stage"] for line in lines] == [0, 1]
    for line in lines:
        assert line["params"] == line["info_params"] == line["report_params"] == printed[line["stage"]]
        assert line["param_devices"] == ["meta"] and line["updated"] and line["micro_batches"] == 2
    assert printed == [314_914_304, 314_915_840]  # embedding + 14 layers / 14 layers + tied output + final norm


def test_device_names_this_ranks_device():
    from ccmega.runtime import device, stand_in, to_device

    assert device() == torch.device("cpu")  # no CUDA here
    with stand_in("meta"):
        assert device() == torch.device("meta")
        batch = to_device({"tokens": torch.zeros(2, 3, dtype=torch.long)})
        assert batch["tokens"].device.type == "meta" and batch["tokens"].shape == (2, 3)
    assert device() == torch.device("cpu")
