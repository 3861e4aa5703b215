"""Table 2 parameter counts: analytic, from real instantiated models, and as `ccmega info` prints them."""
import subprocess
import sys

import pytest
import torch

from ccmega.models.info import stage_counts
from ccmega.presets import MODEL_PRESETS, QWEN3_VOCAB_SIZE, model_preset, padded_vocab_size

TABLE_2 = {"qwen3-200m": 201_643_776, "qwen3-500m": 533_126_144,
           "qwen3-800m": 799_686_144, "qwen3-1b": 1_026_191_872}


@pytest.mark.parametrize("name", TABLE_2)
def test_table2_totals(name):
    preset = model_preset(name)
    assert preset.total_params() == TABLE_2[name]
    assert (preset.head_dim, preset.vocab_size, preset.max_position_embeddings) == (128, 151_936, 8192)
    assert preset.tie_word_embeddings and preset.rope_theta == 1e6 and preset.norm_epsilon == 1e-6


def count_instantiated(preset, device):
    from ccmega.models.qwen3 import build_model, transformer_config

    with torch.device(device):
        model = build_model(preset, transformer_config(preset, perform_initialization=device != "meta"))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-mini"])
def test_tiny_presets_instantiated(megatron_world_of_one, name):
    preset = model_preset(name)
    assert count_instantiated(preset, "cpu") == preset.total_params()


@pytest.mark.parametrize("name", ["qwen3-200m", "qwen3-1b"])
def test_full_size_on_meta_device(megatron_world_of_one, name):
    assert count_instantiated(model_preset(name), "meta") == TABLE_2[name]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_qwen3_vocab_unpadded_for_tp(tp):
    assert padded_vocab_size(QWEN3_VOCAB_SIZE, tp) == QWEN3_VOCAB_SIZE
    assert padded_vocab_size(1000, tp) % (16 * tp) == 0


def test_stage_counts_add_up():
    preset = model_preset("qwen3-1b")
    one = stage_counts(preset)[0].params
    assert one == preset.total_params()
    # PP=2 adds the tied output-layer copy on the last stage; TP shards sum back to the stage totals
    stages = stage_counts(preset, tp=2, pp=2)
    assert sum(s.params for s in stages) == one + preset.embedding_params()
    with pytest.raises(ValueError, match="do not split evenly"):
        stage_counts(preset, pp=3)


def test_info_cli_prints_total():
    out = subprocess.run([sys.executable, "-m", "ccmega.cli", "info", "--preset", "qwen3-1b", "--tp", "2", "--pp", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert "1,026,191,872" in out and "stage 1: layers 14-27" in out


def test_unknown_preset_is_refused():
    with pytest.raises(KeyError, match="qwen3-200m"):
        model_preset("qwen3-2b")
    assert set(TABLE_2) <= set(MODEL_PRESETS)
