"""ICAE fine-tuning data: the fixed-length samples of a held-out split, reshuffled every epoch.

A fine-tune split (`ccmega preprocess` -> OUT/<recipe>/finetune.{bin,idx}) holds one sample per
sequence of exactly L tokens. Sample `s` of the run (s counts samples consumed, across epochs) is
sequence perm_e[s mod n'] of epoch e = s // n', where n' is the split size rounded down to whole global
batches and perm_e a permutation seeded by (seed, e). The order is therefore a pure function of
(seed, global batch size, s): resuming neither skips nor replays a sample, whatever the layout, and
`ccmega.training.data.global_batch` cuts each global batch over the data-parallel ranks exactly as in
pretraining.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ccmega.data.budget import manifest_path
from ccmega.data.indexed_writer import IndexedDatasetReader


def read_manifest(prefix: str) -> dict | None:
    """The preprocess manifest beside a split (tokenizer identity, settings), or None if absent."""
    path = manifest_path(prefix)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class ContextSamples:
    """The samples of a split cut to `context_tokens` each; shorter sequences are an error."""

    def __init__(self, prefix: str, context_tokens: int):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"ICAE data {prefix + ext} not found (give the split's prefix without "
                                        ".bin/.idx, e.g. OUT/D1/finetune as written by `ccmega preprocess`)")
        self.prefix, self.context_tokens = prefix, context_tokens
        self.reader = IndexedDatasetReader(prefix)
        short = int((self.reader.lengths < context_tokens).sum())
        if short:
            raise ValueError(f"{prefix}: {short} of {len(self.reader)} samples are shorter than the context "
                             f"length L={context_tokens} (min {int(self.reader.lengths.min())} tokens); "
                             "preprocess with --context-tokens L or lower the number of memory slots")

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.reader[i][:self.context_tokens].astype(np.int64))

    def batch(self, indices) -> torch.Tensor:
        """Samples `indices` as one [b, L] batch on this rank's device (the evaluation path's one move)."""
        from ccmega.runtime import device

        return torch.stack([self[i] for i in indices]).to(device())


class EpochShuffled:
    """Samples in a fresh seeded order every epoch; an epoch is the whole global batches that fit.

    Items are {"tokens", "labels", "loss_mask"} so that `ccmega.training.data.global_batch` serves
    here as in pretraining (for ICAE, labels are the tokens themselves and every token counts)."""

    def __init__(self, samples: ContextSamples, global_batch_size: int, seed: int):
        self.samples, self.seed = samples, seed
        self.epoch_samples = len(samples) // global_batch_size * global_batch_size
        if self.epoch_samples == 0:
            raise ValueError(f"{samples.prefix}: {len(samples)} samples are fewer than one global batch "
                             f"of {global_batch_size}")
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm, self._perm_epoch = rng.permutation(len(self.samples)), epoch
        return self._perm

    def epoch_of(self, sample: int) -> int:
        return sample // self.epoch_samples

    def __getitem__(self, sample: int) -> dict:
        index = int(self.permutation(self.epoch_of(sample))[sample % self.epoch_samples])
        tokens = self.samples[index]
        return {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(tokens.shape[0])}

    def __len__(self) -> int:
        # global_batch() wraps indices modulo len(); consumed samples never wrap: a large sentinel.
        return 1 << 62


class InOrder:
    """A split in its stored order (validation: the same batches every time)."""

    def __init__(self, samples: ContextSamples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        tokens = self.samples[i]
        return {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(tokens.shape[0])}
