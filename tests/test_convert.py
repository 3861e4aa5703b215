"""`ccmega convert`: HF -> ccmega -> HF through real dist checkpoints on disk; checkpoints saved at TP=1,
TP=2 and PP=2 convert to HF models whose logits equal ccmega's; a converted model keeps training.

Run as a script under torchrun (2 ranks), this file is also the worker that saves the TP=2 and PP=2
checkpoints, computes ccmega's logits at those layouts and trains the from-hf checkpoint there: one
launch for all multi-rank checks (each process pays ~9 s of imports).
"""
import json
import os
import shutil
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PRESET = "qwen3-tiny"  # vocab 1024: unpadded at TP 1 and 2, like Qwen3's 151,936
TOL = 1e-4
SEQ, BATCH = 32, 4


def fixed_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(11))


def train_batch() -> torch.Tensor:
    """[BATCH, SEQ + 1] ids from the first 32 (learnable, so a step visibly lowers the loss)."""
    return torch.randint(0, 32, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(5))


# ======================= torchrun worker (2 ranks) ===========================================

def _layout_logits(model, tokens):
    """ccmega's own logits at the current TP/PP layout, gathered to full [b, s, vocab] on every rank."""
    from megatron.core import parallel_state as ps

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() > 1:  # two stages: hand the hidden states over
            group = ps.get_pipeline_model_parallel_group()
            first, last = ps.get_pipeline_model_parallel_first_rank(), ps.get_pipeline_model_parallel_last_rank()
            if ps.is_pipeline_first_stage():
                hidden = model(tokens, positions, None)
                torch.distributed.send(hidden.contiguous(), last)
                logits = None
            else:
                hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
                torch.distributed.recv(hidden, first)
                model.set_input_tensor(hidden)
                logits = model(tokens, positions, None)
            box = [logits]
            torch.distributed.broadcast_object_list(box, src=last, group=group)
            return box[0]
        logits = model(tokens, positions, None)
        shards = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(shards, dim=-1)


def _continue_training(preset, from_hf_ckpt: str) -> list[float]:
    """Load the from-hf checkpoint at this layout and train two steps on the same batch."""
    from megatron.core import parallel_state as ps

    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.training.checkpointing import load_model_weights
    from ccmega.training.engine import build_training_setup, train_step

    config = transformer_config(preset, ps.get_tensor_model_parallel_world_size(),
                                ps.get_pipeline_model_parallel_world_size())
    model = build_model(preset, config)
    load_model_weights(model, from_hf_ckpt)
    setup = build_training_setup([model], config, lr=1e-3, clip_grad=1.0)
    data = train_batch()
    micro = [{"tokens": mb[:, :-1].contiguous(), "labels": mb[:, 1:].contiguous(), "loss_mask": torch.ones(2, SEQ)}
             for mb in data.split(2)]
    return [train_step(setup, iter(micro), len(micro), SEQ, 2).loss for _ in range(2)]


def worker(full_state: str, from_hf_ckpt: str, out: str) -> None:
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from ccmega import runtime
    from ccmega.convert.hf_qwen3 import load_full_state
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset
    from ccmega.training.checkpointing import save_checkpoint

    preset = model_preset(PRESET)
    full = torch.load(full_state)
    results = {}
    for layout, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        env = runtime.initialize(tp, pp, seed=1234)
        config = transformer_config(preset, tp, pp)
        model = build_model(preset, config).eval()
        load_full_state(model, full, ps.get_tensor_model_parallel_rank(), tp, get_transformer_layer_offset(config))
        logits = _layout_logits(model, fixed_tokens(preset.vocab_size))
        save_checkpoint(os.path.join(out, f"run_{layout}"), [model], None, None,
                        {"iteration": 7, "consumed_samples": 56},
                        {"model_preset": dataclasses.asdict(preset), "tokenizer": {"path": None, "identity": None}})
        losses = _continue_training(preset, from_hf_ckpt)
        if env.rank == 0:
            torch.save(logits, os.path.join(out, f"logits_{layout}.pt"))
            results[layout] = losses
        ps.destroy_model_parallel()
    if env.rank == 0:
        with open(os.path.join(out, "worker.json"), "w") as f:
            json.dump(results, f)
    runtime.destroy()


# ======================= tests (pytest process: a world of one) =============================

def convert(*argv) -> None:
    from ccmega.convert.cli import main

    assert main([str(a) for a in argv]) == 0, argv


def random_hf_folder(preset, path, seed, tokenizer_dir=None):
    from test_qwen3_parity import random_hf_model

    model = random_hf_model(preset, seed=seed)
    model.save_pretrained(path)
    if tokenizer_dir:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(path, name))
    return model


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_state(path):
    from ccmega.convert.hf_folder import read_hf_weights

    return read_hf_weights(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, megatron_world_of_one):
    """A random HF model -> from-hf (TP=1 save) ; TP=2 and PP=2 saves and training by the worker."""
    from launch import torchrun

    from ccmega.convert.hf_qwen3 import hf_to_megatron
    from ccmega.data.tokenizers import default_tokenizer_dir
    from ccmega.presets import model_preset

    preset = model_preset(PRESET)
    tmp = tmp_path_factory.mktemp("convert")
    source = random_hf_folder(preset, tmp / "hf_source", seed=5, tokenizer_dir=default_tokenizer_dir())
    convert("from-hf", tmp / "hf_source", tmp / "run_tp1", "--tensor-parallel", "2", "--verify")
    torch.save(hf_to_megatron(source.state_dict(), preset), tmp / "full.pt")
    torchrun(__file__, 2, tmp / "full.pt", tmp / "run_tp1", tmp)
    return {"tmp": tmp, "source": source, "preset": preset}


@pytest.mark.multirank
def test_from_hf_checkpoint_metadata(converted):
    from megatron.core import dist_checkpointing

    from ccmega.training.checkpointing import read_checkpoint_metadata

    meta = read_checkpoint_metadata(str(converted["tmp"] / "run_tp1"))
    assert meta["path"].endswith("iter_0000000") and meta["iteration"] == 0
    assert meta["model_preset"]["num_layers"] == converted["preset"].num_layers
    assert meta["tokenizer"]["path"] == str(converted["tmp"] / "run_tp1" / "tokenizer" / "tokenizer.json")
    assert os.path.isfile(meta["tokenizer"]["path"])
    shapes = dist_checkpointing.load_tensors_metadata(meta["path"])
    assert shapes["embedding.word_embeddings.weight"].global_shape == (1024, converted["preset"].hidden_size)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_checkpoint_to_hf_logits_and_tensors(converted, layout):
    """to-hf of a checkpoint saved at `layout`: identical tensors to the original HF model, and
    transformers' logits equal ccmega's logits at that layout."""
    from ccmega.convert.verify import megatron_logits
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.training.checkpointing import load_model_weights

    tmp, preset = converted["tmp"], converted["preset"]
    out = tmp / f"hf_from_{layout}"
    convert("to-hf", tmp / f"run_{layout}", out, "--verify")

    original = converted["source"].state_dict()
    back = hf_state(out)
    assert set(back) == set(original) - {"lm_head.weight"}  # tied: written once, as transformers does
    for name, tensor in back.items():
        assert torch.equal(tensor, original[name]), name

    tokens = fixed_tokens(preset.vocab_size)
    if layout == "tp1":  # ccmega's own model, loaded from the checkpoint
        model = build_model(preset, transformer_config(preset)).eval()
        load_model_weights(model, str(tmp / "run_tp1"))
        ours = megatron_logits(model, tokens, preset.vocab_size)
    else:
        ours = torch.load(tmp / f"logits_{layout}.pt")[..., : preset.vocab_size]
    with torch.no_grad():
        theirs = hf_model(out)(tokens).logits
    delta = (ours - theirs).abs().max().item()
    print(f"{layout}: max |Δ logits| = {delta:.3e}")
    assert delta <= TOL

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] and "eos_token_id" not in config  # Qwen's 151643 >= toy vocab 1024
    if layout == "tp1":  # the pretraining tokenizer travelled along and loads with AutoTokenizer
        from transformers import AutoTokenizer

        from ccmega.data.tokenizers import load_tokenizer

        ours = load_tokenizer(out / "tokenizer.json")
        plain, quoting = "Context compression with ICAE.", "Context compression <|endoftext|> with ICAE."
        assert AutoTokenizer.from_pretrained(out).encode(plain) == ours.encode(plain)
        # ccmega tokenizes document text as text; transformers matches added tokens in text unless told not to
        assert ours.eod_id not in ours.encode(quoting) and ours.eod_id in AutoTokenizer.from_pretrained(out).encode(quoting)
        assert AutoTokenizer.from_pretrained(out, split_special_tokens=True).encode(quoting) == ours.encode(quoting)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_from_hf_checkpoint_continues_training(converted, layout):
    """The from-hf checkpoint loads at TP=2 / PP=2 (resharded), its first loss is HF's loss on the same
    batch, and a step lowers it."""
    losses = json.loads((converted["tmp"] / "worker.json").read_text())[layout]
    data = train_batch()
    with torch.no_grad():
        logits = converted["source"](data[:, :-1]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
    assert losses[0] == pytest.approx(hf_loss.item(), abs=1e-5)
    assert losses[1] < losses[0]


@pytest.mark.multirank
def test_pretrain_continues_from_converted_checkpoint(converted, tmp_path):
    """`ccmega pretrain --set checkpoint.init_from=<from-hf checkpoint>` trains on, and what it saves
    converts back to a HF model that transformers loads (verified) with weights that moved."""
    import subprocess

    import numpy as np
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([f"the {i} quick brown fox jumps over {i * 7} lazy dogs" for i in range(300)]),
        model_prefix=str(tmp_path / "sp"), vocab_size=200, model_type="bpe", unk_id=0, eos_id=1, bos_id=-1,
        pad_id=-1, minloglevel=2)
    builder = IndexedDatasetBuilder(str(tmp_path / "data.bin"), dtype=np.uint16)
    gen = torch.Generator().manual_seed(3)
    for _ in range(64):
        doc = torch.randint(2, 32, (40,), generator=gen)
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(tmp_path / "data.idx"))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ccmega.cli", "pretrain", "--run-dir", str(run), "--preset", PRESET,
           "--data", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "sp.model"), "--seq-length", "32",
           "--steps", "2", "--global-batch-size", "4", "--micro-batch-size", "2", "--warmup-steps", "1",
           "--lr", "1e-3", "--save-interval", "0", "--eval-interval", "0", "--set", "data.split=100,0,0",
           "--set", f"checkpoint.init_from={converted['tmp'] / 'run_tp1'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}  # ours, in use
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "initialised weights from" in proc.stdout + proc.stderr

    convert("to-hf", run, tmp_path / "hf_trained", "--verify")
    trained, original = hf_state(tmp_path / "hf_trained"), converted["source"].state_dict()
    assert set(trained) == set(original) - {"lm_head.weight"}
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])
    assert (trained["model.norm.weight"] - original["model.norm.weight"]).abs().max() < 0.05  # a small step


def test_untied_padded_round_trip(tmp_path, megatron_world_of_one):
    """Untied lm_head, 3 query groups, head_dim != hidden/heads, vocab 1000 padded to 1008 rows:
    written and stripped again, bit for bit, with a sharded safetensors index."""
    from megatron.core import dist_checkpointing

    from test_qwen3_parity import SHAPES

    preset = SHAPES["odd"]
    source = random_hf_folder(preset, tmp_path / "hf", seed=2)
    convert("from-hf", tmp_path / "hf", tmp_path / "run", "--verify")
    rows = dist_checkpointing.load_tensors_metadata(str(tmp_path / "run/checkpoints/iter_0000000"))
    assert rows["embedding.word_embeddings.weight"].global_shape[0] == 1008
    from ccmega.convert.cli import main

    assert main(["to-hf", str(tmp_path / "run"), str(tmp_path / "back"), "--verify", "--tolerance", "-1"]) == 1
    assert not (tmp_path / "back").exists()  # a failed verification leaves no folder behind
    convert("to-hf", tmp_path / "run", tmp_path / "back", "--verify", "--max-shard-size", "200KB")
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    back, original = hf_state(tmp_path / "back"), source.state_dict()
    assert set(back) == set(original)
    for name, tensor in back.items():
        assert torch.equal(tensor, original[name]), name


def test_refuses_unmappable(tmp_path, capsys):
    from ccmega.convert.cli import main
    from ccmega.convert.hf_qwen3 import hf_config_dict
    from ccmega.presets import model_preset

    config = dict(hf_config_dict(model_preset(PRESET)), attention_bias=True, hidden_act="gelu")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["from-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().out
    assert "attention_bias" in err and "hidden_act='gelu'" in err and "config.json" in err
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="llama", architectures=["LlamaForCausalLM"])))
    assert main(["from-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_refuses_extra_weights_and_bad_layout(tmp_path, capsys):
    from ccmega.convert.cli import main
    from ccmega.presets import model_preset

    model = random_hf_folder(model_preset(PRESET), tmp_path / "hf", seed=1)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "model.layers.0.self_attn.q_proj.bias" in capsys.readouterr().out
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out"), "--tensor-parallel", "3"]) == 2
    assert "num_attention_heads=4 is not divisible by --tensor-parallel=3" in capsys.readouterr().out


def test_sentencepiece_tokenizer_loads_with_autotokenizer(tmp_path):
    """A ccmega-trained SentencePiece .model (same trainer settings) ships as tokenizer.model and
    `AutoTokenizer` encodes exactly like ccmega's tokenizer."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    from ccmega.convert.hf_folder import write_tokenizer
    from ccmega.data.tokenizers import load_tokenizer

    lines = [f"the {i} quick  brown\tfox café naïve Ω x**2 = {i * 37}" for i in range(500)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=300, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, minloglevel=2)
    (tmp_path / "hf").mkdir()
    assert write_tokenizer(str(tmp_path / "sp.model"), tmp_path / "hf", 512)["eos_token_id"] == 2
    ours, theirs = load_tokenizer(tmp_path / "sp.model"), AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["the quick brown fox", "  two spaces\nand a tab\t", "café naïve Ω 日本 12345"]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)


if __name__ == "__main__":  # torchrun worker: FULL_STATE FROM_HF_CKPT OUT
    sys.path.insert(0, HERE)
    worker(*sys.argv[1:4])


def test_icae_export_tolerance_zero_is_a_tolerance(megatron_world_of_one, tmp_path, monkeypatch):
    """`--tolerance 0` demands an exact match: it used to become the default (`tolerance or default`)."""
    from icae_fixtures import make_pretrain_checkpoint, make_split, make_tokenizer

    from ccmega import cli
    from ccmega.convert import cli as convert_cli
    from ccmega.presets import model_preset

    preset = model_preset(PRESET)
    tok = make_tokenizer(tmp_path / "tok" / "tokenizer.json")
    data = make_split(tmp_path / "D1" / "finetune", 8, 16, preset.vocab_size, seed=1, tokenizer=tok)
    encoder = make_pretrain_checkpoint(tmp_path / "enc", preset, tok, seed=1, train_steps=0)
    decoder = make_pretrain_checkpoint(tmp_path / "dec", preset, tok, seed=2, train_steps=0)
    assert cli.main(["icae-train", "--encoder", str(encoder), "--decoder", str(decoder), "--data", data,
                     "--run-dir", str(tmp_path / "icae"), "--memory-slots", "4", "--context-tokens", "16",
                     "--steps", "1", "--micro-batch-size", "4", "--warmup-steps", "0"]) == 0
    seen = []

    def spy(ours, theirs, tolerance):
        seen.append(tolerance)
        return real(ours, theirs, tolerance)

    real = convert_cli.verify_icae
    monkeypatch.setattr(convert_cli, "verify_icae", spy)
    assert convert("icae-export", tmp_path / "icae", tmp_path / "default", "--verify") is None
    rc = convert_cli.main(["icae-export", str(tmp_path / "icae"), str(tmp_path / "exact"), "--verify", "--tolerance", "0"])
    assert seen == [convert_cli.FP32_TOLERANCE, 0.0]
    # float32 megatron vs transformers: not bit-identical, so an exact match fails and leaves no folder
    assert rc == 1 and not (tmp_path / "exact").exists()
