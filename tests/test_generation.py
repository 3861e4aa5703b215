"""Greedy reconstruction (megatron KV cache vs recompute vs transformers `generate`) and the entropy
definition (vs the training step's LM loss)."""
import pytest
import torch

from ccmega.convert.hf_qwen3 import hf_to_megatron, load_full_state
from test_icae_model import ENCODER
from test_icae_model import build_pair as build_icae_pair
from test_qwen3_parity import random_hf_model

L = 24


def build_pair(end_token=5, decoder_scale=6.0):
    """The ICAE pair of test_icae_model with the decoder's weights scaled up, so that greedy decoding does not
    collapse into repeating one token (a weak test); norms stay as they are."""
    ours, theirs = build_icae_pair(end_token, decoder_scale)
    return ours.eval(), theirs


@pytest.fixture(scope="module")
def pair(megatron_world_of_one):
    return build_pair()


def _context(batch=4, seed=0):
    return torch.randint(0, ENCODER.vocab_size, (batch, L), generator=torch.Generator().manual_seed(seed))


def _set_end(pair, token):
    for model in pair:
        model.end_token_id = token


def test_cached_equals_uncached_equals_transformers(pair):
    from ccmega.evaluation.generation import reconstruct

    ours, theirs = pair
    _set_end(pair, 5)
    context = _context()
    cached = reconstruct(ours, context)
    uncached = reconstruct(ours, context, use_cache=False)
    hf = theirs.reconstruct(context)
    assert cached.tokens.shape == (4, L)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert torch.equal(cached.lengths, uncached.lengths) and torch.equal(cached.ended, uncached.ended)
    assert torch.equal(cached.tokens, hf)
    assert len(set(cached.tokens.flatten().tolist())) > 20  # not a degenerate repetition
    assert not cached.ended.any() and (cached.lengths == L).all()


def test_each_sample_stops_at_its_end_token(pair):
    from ccmega.evaluation.generation import reconstruct

    ours, theirs = pair
    _set_end(pair, 5)
    context = _context()
    free = reconstruct(ours, context).tokens
    end = int(free[0, 7])  # sample 0 emits it at step 7 (or earlier): make it the end token
    _set_end(pair, end)
    try:
        cached = reconstruct(ours, context)
        uncached = reconstruct(ours, context, use_cache=False)
        hf = theirs.reconstruct(context)
    finally:
        _set_end(pair, 5)
    first = [(row == end).nonzero()[0, 0].item() if (row == end).any() else L for row in free]
    assert first[0] <= 7 and first != [L] * 4 and max(first) > first[0]  # samples stop at different steps
    assert cached.lengths.tolist() == first == uncached.lengths.tolist()
    assert cached.ended.tolist() == [n < L for n in first]
    for i, n in enumerate(first):
        assert torch.equal(cached.tokens[i, :n], free[i, :n])
        assert (cached.tokens[i, n:] == end).all()
    assert torch.equal(cached.tokens, uncached.tokens)
    assert torch.equal(cached.tokens[:, :hf.shape[1]], hf)
    assert (cached.tokens[:, hf.shape[1]:] == end).all()
    assert cached.token_lists()[0] == free[0, :first[0]].tolist()


def test_max_new_tokens_and_no_stop(pair):
    from ccmega.evaluation.generation import generate, reconstruct

    ours, _ = pair
    context = _context(batch=2, seed=3)
    short = reconstruct(ours, context, max_new_tokens=5)
    assert short.tokens.shape == (2, 5) and (short.lengths == 5).all()
    with torch.no_grad():
        prefix = ours.decoder_prefix(ours.compress(context))
    full = generate(ours, prefix, 30, stop_at_end=False)  # beyond L: the cache is sized by max_new_tokens
    assert torch.equal(full.tokens[:, :5], short.tokens)
    assert torch.equal(full.tokens, generate(ours, prefix, 30, use_cache=False, stop_at_end=False).tokens)


# ---- entropy ---------------------------------------------------------------------------------------------

def test_entropy_equals_training_lm_loss(megatron_world_of_one):
    from ccmega.evaluation.entropy import sequence_entropy, token_nll
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.training.engine import TrainingSetup, evaluate_loss, gpt_forward_step

    preset = ENCODER
    config = transformer_config(preset)
    hf = random_hf_model(preset, seed=4)
    model = build_model(preset, config)
    load_full_state(model, hf_to_megatron(hf.state_dict(), preset))
    model.eval()
    texts = torch.randint(0, preset.vocab_size, (3, 17), generator=torch.Generator().manual_seed(5))

    entropy = sequence_entropy(model, texts)
    assert entropy.shape == (3,)

    # independent: log-softmax of the transformers model's logits
    with torch.no_grad():
        logp = torch.log_softmax(hf(texts).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(-1, texts[:, 1:, None])[..., 0]
    torch.testing.assert_close(token_nll(model, texts).double(), nll, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), nll.mean(-1), atol=1e-5, rtol=0)

    # the training step's loss: one micro-batch per text through gpt_forward_step + masked_lm_loss
    def batch(text):
        return {"tokens": text[None, :-1], "labels": text[None, 1:], "loss_mask": torch.ones(1, 16)}

    with torch.no_grad():
        for i, text in enumerate(texts):
            output, loss_func = gpt_forward_step(iter([batch(text)]), model)
            loss, logged = loss_func(output)
            torch.testing.assert_close(loss, entropy[i], atol=1e-6, rtol=0)
            torch.testing.assert_close(logged["lm loss"], entropy[i], atol=1e-6, rtol=0)
    # ... and through megatron's schedule (evaluate_loss: forward-only get_forward_backward_func)
    setup = TrainingSetup(model=[model], optimizer=None, config=config)
    mean = evaluate_loss(setup, iter([batch(t) for t in texts]), num_microbatches=3, seq_length=16,
                         micro_batch_size=1)
    assert mean == pytest.approx(entropy.double().mean().item(), abs=1e-6)
