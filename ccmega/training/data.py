"""Pretraining data: megatron indexed datasets -> GPTDataset (BlendedMegatronDatasetBuilder) -> micro-batches.

The order of samples is a pure function of the number of samples consumed so far: global batch `i`
is samples [i*G, (i+1)*G) of the (shuffled, cached) train GPTDataset, cut into micro-batches and
spread over the data-parallel ranks exactly like Megatron-LM's MegatronPretrainingSampler. Resuming
at `consumed_samples` therefore neither skips nor replays a sample, whatever the new layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch


class MegatronTokenizerAdapter:
    """The few fields GPTDatasetConfig reads from a tokenizer (megatron-core 0.16-0.19): `vocab_size`
    (chooses the token dtype), `eod` (document ends) and `unique_identifiers` (part of the hash that
    names the index cache). No `pad`: megatron then pads with -1, which collides with nothing."""

    def __init__(self, tokenizer):
        self.vocab_size = int(tokenizer.vocab_size)
        self.eod = int(tokenizer.eod_id)
        self.eos = self.eod
        self.unique_identifiers = {"class": type(tokenizer).__name__, "path": str(tokenizer.path),
                                   "identity": tokenizer.identity}


@dataclass
class Datasets:
    train: object  # GPTDataset (or BlendedDataset)
    valid: object | None


def build_datasets(paths: list[str], weights: list[float] | None, split: str, seq_length: int, seed: int,
                   tokenizer, cache_dir: str, train_samples: int | None, valid_samples: int) -> Datasets:
    """Train and validation datasets over the prefixes `paths` (blended by `weights`, or by size).

    train_samples None means one epoch of the train split. The shuffle/sample indices are cached in
    `cache_dir` (rank 0 builds them, the others wait and read them)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for prefix in paths:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"dataset file {prefix + ext} not found (give path prefixes without "
                                        ".bin/.idx, as written by `ccmega preprocess`)")
    os.makedirs(cache_dir, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(paths), list(weights) if weights else None),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention needs no mask tensor (TE and SDPAttention)
        mid_level_dataset_surplus=0.005,
    )
    # Build only the splits that are used: megatron loops forever on an empty split asked for samples.
    wanted = [True, valid_samples > 0, False]
    config.split_matrix = [m if w else None for m, w in zip(config.split_matrix, wanted)]
    _check_splits_have_documents(paths, config.split_matrix, split)
    sizes = [train_samples, valid_samples, 0]
    if len(paths) > 1 and train_samples is None:
        raise ValueError("a blend of several datasets needs train.steps (one epoch is defined for one dataset)")
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None or len(train) == 0:
        raise ValueError(f"no training samples of {seq_length} tokens in {paths} with split {split!r}")
    return Datasets(train=train, valid=valid if valid_samples else None)


def _check_splits_have_documents(paths: list[str], split_matrix, split: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in paths:
        documents = len(IndexedDataset(prefix).document_indices) - 1
        for name, bounds in zip(("train", "validation"), split_matrix):
            if bounds is not None and round(bounds[1] * documents) - round(bounds[0] * documents) < 1:
                raise ValueError(
                    f"{prefix}: the {name} share of data.split={split!r} holds no documents ({documents} in all); "
                    "give it a larger share (e.g. --set data.split=90,10,0) or turn validation off "
                    "(--set logging.eval_interval=0)")


def global_batch(dataset, first_sample: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at sample `first_sample`, on this rank's
    device (`ccmega.runtime.device()`: the one move of the pretraining and ICAE data paths).

    Each micro-batch step takes micro_batch_size x dp_size consecutive samples; rank r takes its slice
    (as MegatronPretrainingSampler does). Indices wrap around the dataset (only validation reuses)."""
    from ccmega.runtime import to_device

    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        raise ValueError(f"global batch {global_batch_size} is not a multiple of micro-batch "
                         f"{micro_batch_size} x data-parallel {dp_size}")
    n = len(dataset)
    micro_batches = []
    for start in range(first_sample, first_sample + global_batch_size, per_step):
        first = start + dp_rank * micro_batch_size
        samples = [dataset[(first + j) % n] for j in range(micro_batch_size)]
        micro_batches.append(to_device({key: torch.stack([s[key] for s in samples])
                                        for key in ("tokens", "labels", "loss_mask")}))
    return micro_batches


def micro_batch_iterator(micro_batches: list[dict]) -> Iterator[dict]:
    return iter(micro_batches)
