"""A random Hugging Face Qwen3ForCausalLM mapped into a ccmega (megatron) model gives the same logits."""
import pytest
import torch

from ccmega.convert.hf_qwen3 import hf_config_dict, hf_to_megatron, load_full_state, megatron_to_hf
from ccmega.presets import model_preset

transformers = pytest.importorskip("transformers")

SHAPES = {
    "tiny": model_preset("qwen3-tiny"),
    # odd sizes: 3 query groups of 2 heads, head_dim 32 != hidden / heads, untied output layer
    "odd": model_preset("qwen3-tiny").replace(hidden_size=96, ffn_hidden_size=160, num_layers=3,
                                              num_attention_heads=6, num_query_groups=3, head_dim=32,
                                              vocab_size=1000, tie_word_embeddings=False),
}


def random_hf_model(preset, seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**hf_config_dict(preset))
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1; perturb them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("shape", SHAPES)
def test_hf_logits_match_megatron(megatron_world_of_one, shape):
    from ccmega.models.qwen3 import build_model, transformer_config

    preset = SHAPES[shape]
    hf = random_hf_model(preset)
    model = build_model(preset, transformer_config(preset)).eval()
    load_full_state(model, hf_to_megatron(hf.state_dict(), preset))

    tokens = torch.randint(0, preset.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, positions, None)[..., : preset.vocab_size]
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_state_dict_round_trip_is_exact(shape):
    preset = SHAPES[shape]
    hf_state = random_hf_model(preset).state_dict()
    back = megatron_to_hf(hf_to_megatron(hf_state, preset, tensor_parallel=2), preset)
    assert back.keys() == hf_state.keys()
    for name, tensor in hf_state.items():
        assert torch.equal(back[name], tensor), name
