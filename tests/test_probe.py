"""Decoder probes: the copy score against transformers' NLL of the doubled window; drivability on a decoder
trained to copy (near-zero loss, exact greedy reconstruction, the loss recomputed through the transformers
twin from the optimised prefix) and on a random one (warnings); `ccmega probe-decoder` end to end."""
import json

import pytest
import torch
import torch.nn.functional as F

from ccmega.convert.hf_qwen3 import hf_to_megatron, load_full_state
from ccmega.presets import model_preset
from icae_fixtures import make_pretrain_checkpoint, make_split, make_tokenizer
from test_qwen3_parity import random_hf_model

PRESET = model_preset("qwen3-tiny")
L, END = 6, 5
ALPHABET = (3, 35)  # copy-task ids (the end token 5 is among them: it must still be predicted after c_L)


def _megatron_twin(hf):
    from ccmega.models.qwen3 import build_model, transformer_config

    model = build_model(PRESET, transformer_config(PRESET))
    load_full_state(model, hf_to_megatron(hf.state_dict(), PRESET))
    return model.eval()


@pytest.fixture(scope="module")
def copier(megatron_world_of_one):
    """A transformers qwen3-tiny trained ~5 s to continue [w, w] (a decoder that copies), and its megatron twin."""
    hf = random_hf_model(PRESET, seed=3).train()
    optimizer = torch.optim.Adam(hf.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        w = torch.randint(*ALPHABET, (32, L), generator=generator)
        seq = torch.cat([w, w], 1)
        logits = hf(seq[:, :-1]).logits[:, L - 1:]  # loss on the second copy only
        loss = F.cross_entropy(logits.transpose(1, 2), seq[:, L:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hf.eval().requires_grad_(False)
    return hf, _megatron_twin(hf)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from ccmega.data.tokenizers import load_tokenizer

    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", PRESET.vocab_size))


def _windows(n=4, seed=9):
    return torch.randint(*ALPHABET, (n, L), generator=torch.Generator().manual_seed(seed))


def _hf_nll(hf, tokens):
    with torch.no_grad():
        logp = torch.log_softmax(hf(tokens).logits.double(), -1)
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]


def test_copy_score_equals_transformers_nll_of_the_doubled_window(megatron_world_of_one, copier):
    from ccmega.evaluation.probe import copy_score

    hf = random_hf_model(PRESET, seed=4)
    windows = torch.randint(0, PRESET.vocab_size, (5, 9), generator=torch.Generator().manual_seed(1))
    nll = _hf_nll(hf, torch.cat([windows, windows], 1))  # [5, 17]: position t scores token t + 1
    score = copy_score(_megatron_twin(hf), windows, batch_size=2)
    assert (score.context_tokens, score.samples) == (9, 5)
    assert score.first_copy_nll == pytest.approx(float(nll[:, :8].mean()), abs=1e-5)  # c_2..c_9, first copy
    assert score.second_copy_nll == pytest.approx(float(nll[:, 9:].mean()), abs=1e-5)  # c_2..c_9, second copy
    assert score.difference == pytest.approx(score.first_copy_nll - score.second_copy_nll)
    assert abs(score.difference) < 0.5  # a random decoder does not copy

    copying = copy_score(copier[1], _windows())
    assert copying.second_copy_nll < 0.2 and copying.first_copy_nll > 2.5  # new windows: only the repeat is easy


def test_copier_can_be_driven_to_exact_reconstruction(copier, tokenizer):
    from ccmega.evaluation.probe import copy_score, decoder_warnings, drivability, fit_free_prefix

    hf, decoder = copier
    windows = _windows()
    result = drivability(decoder, windows, memory_slots=2 * L, end_token_id=END, real_vocab_size=PRESET.vocab_size,
                         tokenizer=tokenizer, steps=200, lr=0.2)
    assert result.initial_loss > 5 and result.final_loss < 0.1
    assert result.final_accuracy == 100.0 and result.f1 == 100.0  # greedy decoding gives the windows back
    assert [step for step, _ in result.loss_curve] == list(range(0, 201, 20))
    assert result.lm_loss == pytest.approx(float(_hf_nll(hf, windows).mean()), abs=1e-5)
    assert decoder_warnings(copy_score(decoder, windows), result) == []

    # the loss recomputed by hand: transformers twin, inputs_embeds = [optimised prefix, e(c)]
    prefix, _, curve = fit_free_prefix(decoder, windows, 2 * L, END, PRESET.vocab_size, steps=200, lr=0.2)
    assert curve == result.loss_curve  # seeded: the same optimisation
    embeds = torch.cat([prefix.transpose(0, 1), hf.get_input_embeddings()(windows)], 1)
    with torch.no_grad():
        logits = hf(inputs_embeds=embeds).logits[:, 2 * L:]
    targets = torch.cat([windows, torch.full((len(windows), 1), END)], 1)
    assert F.cross_entropy(logits.transpose(1, 2), targets).item() == pytest.approx(result.final_loss, abs=1e-5)


def test_random_decoder_gets_both_warnings(megatron_world_of_one, tokenizer):
    from ccmega.evaluation.probe import probe_decoder

    decoder = _megatron_twin(random_hf_model(PRESET, seed=5))
    decoder.requires_grad_(True)
    result = probe_decoder(decoder, _windows(), memory_slots=2, end_token_id=END, real_vocab_size=PRESET.vocab_size,
                           tokenizer=tokenizer, steps=20)
    assert len(result.warnings) == 2
    assert "barely copies" in result.warnings[0] and "cannot be driven" in result.warnings[1]
    assert result.drivability.final_loss < result.drivability.initial_loss  # the optimiser does move
    assert all(p.requires_grad for p in decoder.parameters())  # the caller's flags are restored
    assert decoder.embedding.word_embeddings.weight.grad is None  # and the decoder got no gradient


def test_probe_decoder_command_writes_what_the_api_computes(megatron_world_of_one, tmp_path, capsys):
    from ccmega.data.tokenizers import load_tokenizer
    from ccmega.evaluation.entropy import load_pretrained_lm
    from ccmega.evaluation.probe import main, probe_decoder, probe_windows

    tok = make_tokenizer(tmp_path / "tok" / "tokenizer.json", PRESET.vocab_size)
    split = make_split(tmp_path / "D1" / "test", 7, 16, PRESET.vocab_size, seed=3, tokenizer=tok)
    checkpoint = make_pretrain_checkpoint(tmp_path / "lm", PRESET, tok, seed=1, train_steps=5)
    out = tmp_path / "probe" / "probe.json"
    assert main([str(tmp_path / "lm"), "--data", split, "--samples", "3", "--steps", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "copy score (L=16, 3 windows)" in printed and "drivability (k=4, 6 Adam steps" in printed
    record = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["probe.json"]  # no temporary file left

    windows = probe_windows(split, None, 3)
    assert windows.shape == (3, 16)  # L defaults to the split's sample length, k to L / 4
    decoder, _, _ = load_pretrained_lm(checkpoint)
    expected = probe_decoder(decoder, windows, 4, load_tokenizer(tok).eod_id, PRESET.vocab_size,
                             load_tokenizer(tok), steps=6).as_dict()
    for key in ("copy", "drivability", "warnings"):  # seeded and deterministic: identical numbers
        assert record[key] == json.loads(json.dumps(expected[key])), key
    assert record["copy"]["first_copy_nll"] == pytest.approx(record["drivability"]["lm_loss"], abs=1e-6)
    assert record["drivability"]["memory_slots"] == 4 and record["drivability"]["steps"] == 6
