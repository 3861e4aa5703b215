"""The megatron ICAE against an independent transformers implementation, and its frozen decoder."""
import torch

from ccmega.convert.hf_qwen3 import hf_to_megatron, load_full_state
from ccmega.presets import model_preset
from test_qwen3_parity import random_hf_model

K, L = 4, 12
ENCODER = model_preset("qwen3-tiny")
DECODER = model_preset("qwen3-tiny").replace(hidden_size=96, ffn_hidden_size=160, num_layers=3,
                                             num_attention_heads=6, num_query_groups=3, head_dim=32)


def build_pair(end_token=5, decoder_scale=1.0):
    """A random megatron ICAE and its transformers twin with the same weights; `decoder_scale` multiplies
    the decoder's non-norm weights."""
    from ccmega.convert.icae_hf import HFICAE
    from ccmega.models.icae import ICAEModel
    from ccmega.models.qwen3 import build_model, transformer_config

    hf_enc, hf_dec = random_hf_model(ENCODER, seed=1), random_hf_model(DECODER, seed=2)
    with torch.no_grad():
        for name, p in hf_dec.named_parameters():
            if "norm" not in name:
                p.mul_(decoder_scale)
    enc = build_model(ENCODER, transformer_config(ENCODER))
    dec = build_model(DECODER, transformer_config(DECODER))
    load_full_state(enc, hf_to_megatron(hf_enc.state_dict(), ENCODER))
    load_full_state(dec, hf_to_megatron(hf_dec.state_dict(), DECODER))
    ours = ICAEModel(enc, dec, num_memory_slots=K, end_token_id=end_token, real_vocab_size=ENCODER.vocab_size)
    theirs = HFICAE(hf_enc, hf_dec, num_memory_slots=K, end_token_id=end_token)
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items()
                            if k.startswith(("memory_embeddings", "ae_embedding", "projector"))}, strict=False)
    return ours, theirs.eval()


def test_icae_loss_matches_transformers_reference(megatron_world_of_one):
    ours, theirs = build_pair()
    context = torch.randint(0, ENCODER.vocab_size, (3, L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss, correct = ours.eval()(context)
        ref_loss, ref_logits = theirs(context)
    assert loss.shape == (3, L + 1)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    targets = torch.cat([context, torch.full((3, 1), 5)], 1)
    assert torch.equal(correct, ref_logits.argmax(-1) == targets)


def test_only_encoder_slots_projector_train(megatron_world_of_one):
    from ccmega.models.qwen3 import transformer_config
    from ccmega.training.engine import build_training_setup

    ours, _ = build_pair()
    decoder_before = {k: v.detach().clone() for k, v in ours.decoder.named_parameters()}
    trainable_before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    setup = build_training_setup([ours], transformer_config(ENCODER), lr=1e-2)

    optimized = {id(p) for group in setup.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in ours.decoder.parameters()}
    assert all(not p.requires_grad for p in ours.decoder.parameters())

    context = torch.randint(0, ENCODER.vocab_size, (2, L), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        for m in setup.model:
            m.zero_grad_buffer()
        setup.optimizer.zero_grad()
        loss, _ = setup.model[0](context)
        loss.mean().backward()
        grads = {n: p.main_grad.abs().sum().item() for n, p in ours.named_parameters() if p.requires_grad}
        setup.optimizer.step()
    assert ours.decoder.training is False and ours.training is True
    for name in ("memory_embeddings", "ae_embedding", "projector.weight", "encoder.decoder.layers.0.mlp.linear_fc1.weight"):
        assert grads[name] > 0, name
    for name, before in trainable_before.items():
        if name != "encoder.output_layer.weight":  # the encoder's LM head plays no part in ICAE
            assert not torch.equal(dict(ours.named_parameters())[name], before), name
    for name, before in decoder_before.items():
        assert torch.equal(dict(ours.decoder.named_parameters())[name], before), name
    assert not [k for k in ours.sharded_state_dict() if k.startswith("decoder.")]
