"""Tiny inputs for ICAE tests and benchmarks: a word-level tokenizer, fine-tune splits, and pretraining
checkpoints (random weights, written by ccmega's own checkpointing exactly as `ccmega pretrain` does)."""
import json
import os

import numpy as np

from ccmega.data.indexed_writer import IndexedDatasetWriter, token_dtype


def make_tokenizer(path, vocab_size=1024, variant=""):
    """A tokenizer.json (WordLevel) with `vocab_size` ids, the last one <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{variant}{i}": i for i in range(1, vocab_size - 1)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(str(path))
    return str(path)


def skewed_tokens(rng, shape):
    """Ids from a 48-symbol alphabet with Zipf-like frequencies: a tiny LM learns them in a few steps."""
    alphabet = np.arange(3, 3 + 48)
    weights = 1.0 / np.arange(1, len(alphabet) + 1)
    return rng.choice(alphabet, size=shape, p=weights / weights.sum())


def make_split(prefix, samples, context_tokens, vocab_size, seed=0, tokenizer=None):
    """`samples` sequences of `context_tokens` skewed ids, with a preprocess-style manifest naming the
    tokenizer when one is given."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with IndexedDatasetWriter(prefix, token_dtype(vocab_size)) as writer:
        for _ in range(samples):
            writer.add_document(skewed_tokens(rng, context_tokens))
    if tokenizer is not None:
        from ccmega.data.tokenizers import tokenizer_summary

        with open(f"{prefix}.manifest.json", "w") as f:
            json.dump({"tokenizer": tokenizer_summary(tokenizer), "split": os.path.basename(prefix)}, f)
    return str(prefix)


def make_pretrain_checkpoint(run_dir, preset, tokenizer_path, seed=0, train_steps=30):
    """RUN_DIR/checkpoints/iter_0000001 of `preset` after `train_steps` LM steps on skewed ids (a stand-in
    for `ccmega pretrain`; needs parallel_state initialised)."""
    from dataclasses import asdict

    import torch

    from ccmega.data.tokenizers import load_tokenizer
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.training.engine import build_training_setup, train_step

    from ccmega.training.checkpointing import save_checkpoint

    torch.manual_seed(seed)
    model = build_model(preset, transformer_config(preset))
    if train_steps:
        setup = build_training_setup([model], model.config, lr=1e-2)
        rng = np.random.default_rng(seed)
        for _ in range(train_steps):
            data = torch.from_numpy(skewed_tokens(rng, (16, 65)))
            batch = {"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": torch.ones(16, 64)}
            train_step(setup, iter([batch]), 1, 64, 16)
        model = setup.model[0].module
    tok = load_tokenizer(tokenizer_path)
    meta = {"model_preset": asdict(preset), "tokenizer": {"path": str(tok.path), "identity": tok.identity},
            "dtype": "fp32"}
    return save_checkpoint(str(run_dir), [model], None, None, {"iteration": 1, "consumed_samples": 0}, meta)
