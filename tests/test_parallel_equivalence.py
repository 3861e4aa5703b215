"""TP=2, PP=2 (1F1B, 4 micro-batches) and DP=2 with the distributed optimizer train exactly like one
process from the same initial weights; tied embeddings stay tied across pipeline stages."""
import glob
import json
import os

import pytest
import torch

from ccmega.models.info import stage_counts
from ccmega.presets import model_preset
from launch import torchrun
from parallel_train import run
from test_qwen3_parity import random_hf_model

pytestmark = pytest.mark.multirank

HERE = os.path.dirname(os.path.abspath(__file__))
PRESET = "qwen3-tiny"


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    from ccmega.convert.hf_qwen3 import hf_to_megatron

    preset = model_preset(PRESET)
    path = tmp_path_factory.mktemp("init") / "full.pt"
    torch.save(hf_to_megatron(random_hf_model(preset, seed=3).state_dict(), preset, tensor_parallel=2), path)
    return str(path)


@pytest.fixture(scope="module")
def reference(init_weights, megatron_world_of_one):
    # micro-batch 2 over a global batch of 8 -> 4 micro-batches, the same split as the PP run
    return run(init_weights, PRESET, distributed_optimizer=False, micro_batch=2)


LAYOUTS = {
    "tp2": ["--tp", "2"],
    "pp2": ["--pp", "2", "--micro-batch", "2"],  # 4 micro-batches through the 1F1B schedule
    "dp2_distopt": ["--distributed-optimizer", "--micro-batch", "2"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(layout, init_weights, reference, tmp_path):
    torchrun(os.path.join(HERE, "helpers", "parallel_train.py"), 2, "--init", init_weights, "--out", tmp_path,
             *LAYOUTS[layout])
    ranks = json.loads((tmp_path / "result.json").read_text())
    for rank in ranks:
        assert len(rank["losses"]) == 3
        assert rank["losses"] == pytest.approx(reference["losses"], abs=1e-5, rel=0)
        assert rank["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)
    assert reference["losses"][-1] < reference["losses"][0]  # the steps did train

    # each rank holds exactly what `ccmega info` says it does
    tp = 2 if layout == "tp2" else 1
    pp = 2 if layout == "pp2" else 1
    expected = stage_counts(model_preset(PRESET), tp, pp)
    for rank in ranks:
        assert rank["local_params"] == expected[rank["stage"]].params_per_tp_rank

    if layout == "pp2":
        tied = [torch.load(f) for f in sorted(glob.glob(str(tmp_path / "tied_rank*.pt")))]
        first = next(t["embedding"] for t in tied if "embedding" in t)
        last = next(t["output_layer"] for t in tied if "output_layer" in t)
        assert torch.equal(first, last)
        assert not torch.equal(first, torch.load(init_weights)["embedding.word_embeddings.weight"])
