"""GPU paths: the Transformer Engine layer spec against Hugging Face logits, and a bf16/FP8 training step.
Marked `gpu`; skipped where CUDA or Transformer Engine is absent."""
import pytest
import torch

from ccmega.convert.hf_qwen3 import hf_to_megatron, load_full_state
from ccmega.presets import model_preset
from test_qwen3_parity import random_hf_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def te():
    return pytest.importorskip("transformer_engine")


def test_te_spec_matches_hf_logits(te, megatron_world_of_one):
    from ccmega.models.qwen3 import build_model, transformer_config

    preset = model_preset("qwen3-tiny").replace(head_dim=64)  # TE's fused attention wants head_dim >= 64
    hf = random_hf_model(preset).cuda()
    model = build_model(preset, transformer_config(preset), use_transformer_engine=True).cuda().eval()
    load_full_state(model, {k: v.cuda() for k, v in hf_to_megatron(hf.state_dict(), preset).items()})
    tokens = torch.randint(0, preset.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        ours = model(tokens, torch.arange(64, device="cuda").expand_as(tokens), None)[..., : preset.vocab_size]
        torch.testing.assert_close(ours, hf(tokens).logits, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("fp8", [None, "hybrid"])
def test_bf16_and_fp8_steps_train(te, megatron_world_of_one, fp8):
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.training.engine import build_training_setup, train_step

    preset = model_preset("qwen3-tiny").replace(hidden_size=128, head_dim=64, ffn_hidden_size=256)
    extra = {"fp8": fp8, "fp8_recipe": "tensorwise"} if fp8 else {}
    config = transformer_config(preset, params_dtype=torch.bfloat16, **extra)
    setup = build_training_setup([build_model(preset, config, use_transformer_engine=True).cuda()], config, lr=3e-3)
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = torch.randint(0, 32, (8, 65), device="cuda", generator=gen)
    batch = {"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": torch.ones(8, 64, device="cuda")}
    losses = [train_step(setup, iter([batch]), 1, 64, 8).loss for _ in range(10)]
    assert losses[-1] < losses[0] - 0.5, losses
