"""Stage 2 of preprocessing: draw each recipe's corpora from the tokenized parts and write them.

Pretraining corpus of a recipe: per Pile subset, pretraining-split documents are taken in a seeded
pseudo-random order until the subset's token quota (EOD included) is met; the last document taken is
cut so that the quota is met exactly. A subset with fewer tokens than its quota is either taken again,
whole documents in a new seeded order each pass (`--scarce-subset repeat`), or the recipe shrinks to
what the input covers (`shrink`); see ccmega/data/budget.py. The documents of all subsets are then
written in one seeded order (repeats spread over the whole corpus), each followed by EOD. Because every recipe draws in the same order, the Pile-CC documents of
D(k+1) are a subset of those of D(k).

Held-out splits: every document of the split is cut into consecutive windows of `context_tokens`
tokens from its first token (the incomplete tail is dropped); windows are drawn in a seeded order,
per subset in the recipe's shares (largest remainder), and written one sample per sequence, no EOD.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ccmega.data.indexed_writer import IndexedDatasetWriter
from ccmega.data.mixture import affordable_total, largest_remainder
from ccmega.data.splits import PRETRAIN, epoch_keys, order_keys
from ccmega.data.tokenize_stage import Part

SOURCE_DTYPE = np.dtype([("digest", "S16"), ("subset", "u1"), ("start", "<i8"), ("ntokens", "<i8")])


@dataclass
class DocTable:
    """Every tokenized document of the parts read, with where its tokens are and its draw order."""

    docs: np.ndarray
    part: np.ndarray
    offset: np.ndarray
    key: np.ndarray
    parts: list[Part]

    @classmethod
    def build(cls, parts: list[Part], seed: int) -> "DocTable":
        docs = [p.docs for p in parts]
        table = np.concatenate(docs) if docs else np.zeros(0, dtype=parts[0].docs.dtype if parts else None)
        part = np.concatenate([np.full(len(d), i, dtype=np.int32) for i, d in enumerate(docs)]) if docs else \
            np.zeros(0, np.int32)
        offset = np.concatenate([np.cumsum(d["ntokens"]) - d["ntokens"] for d in docs]) if docs else \
            np.zeros(0, np.int64)
        return cls(table, part, offset, order_keys(table["digest"], seed), parts)

    def tokens(self, index: int, start: int, count: int, dtype) -> np.ndarray:
        memmaps = self.__dict__.setdefault("_memmaps", {})
        p = int(self.part[index])
        if p not in memmaps:
            path = self.parts[p].tokens_path
            memmaps[p] = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
        begin = int(self.offset[index]) + start
        return memmaps[p][begin:begin + count]


@dataclass
class Selection:
    """What one output holds: document index, first token, token count (without EOD), draw key."""

    index: np.ndarray
    start: np.ndarray
    count: np.ndarray
    key: np.ndarray

    @staticmethod
    def concat(pieces: list["Selection"]) -> "Selection":
        joined = Selection(*(np.concatenate([getattr(p, f) for p in pieces]) if pieces else np.zeros(0, np.int64)
                             for f in ("index", "start", "count", "key")))
        order = np.argsort(joined.key, kind="stable")
        return Selection(joined.index[order], joined.start[order], joined.count[order], joined.key[order])


def select_pretrain(table: DocTable, subset: int, quota: int) -> tuple[Selection, int]:
    """Documents of `subset` drawn in key order until `quota` tokens (EOD included); returns the
    selection and the number of documents cut short (0 or 1). When the subset holds fewer tokens than
    `quota`, further passes follow, each a new seeded order of the same (pretraining) documents."""
    if quota <= 0:
        return Selection(*(np.zeros(0, np.int64) for _ in range(4))), 0
    candidates = np.flatnonzero((table.docs["split"] == PRETRAIN) & (table.docs["subset"] == subset))
    supply = int((table.docs["ntokens"][candidates] + 1).sum())
    passes = max(1, -(-quota // supply)) if supply else 1
    order, keys = [], []
    for epoch in range(passes):
        epoch_key = table.key[candidates] if epoch == 0 else epoch_keys(table.key[candidates], epoch)
        ranked = np.argsort(epoch_key, kind="stable")
        order.append(candidates[ranked])
        keys.append(epoch_key[ranked])
    candidates, keys = np.concatenate(order), np.concatenate(keys)
    cumulative = np.cumsum(table.docs["ntokens"][candidates] + 1)
    last = int(np.searchsorted(cumulative, quota))  # first document reaching the quota
    chosen, keys = candidates[:last + 1], keys[:last + 1]
    counts = table.docs["ntokens"][chosen].astype(np.int64)
    before = int(cumulative[last - 1]) if last > 0 else 0
    truncated = 0
    if len(chosen) and quota - before - 1 < counts[-1]:
        counts[-1] = quota - before - 1  # keep quota - before tokens: the text part plus its EOD
        truncated = 1
        if counts[-1] == 0:  # no text left for it: drop it (the quota ends 1 token short)
            chosen, keys, counts, truncated = chosen[:-1], keys[:-1], counts[:-1], 0
    return Selection(chosen, np.zeros(len(chosen), np.int64), counts, keys), truncated


def heldout_windows(table: DocTable, split: int, subset: int, context: int, seed: int) -> Selection:
    """All windows of the split's documents of `subset`, in draw order."""
    docs = np.flatnonzero((table.docs["split"] == split) & (table.docs["subset"] == subset))
    per_doc = table.docs["ntokens"][docs] // context
    index = np.repeat(docs, per_doc)
    window = np.arange(len(index)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    keys = order_keys(table.docs["digest"][index], seed, salt=window + 1)
    order = np.argsort(keys, kind="stable")
    return Selection(index[order], window[order] * context, np.full(len(index), context, np.int64), keys[order])


def window_supply(table: DocTable, split: int, subset: int, context: int) -> int:
    mask = (table.docs["split"] == split) & (table.docs["subset"] == subset)
    return int((table.docs["ntokens"][mask] // context).sum())


def pretrain_supply(table: DocTable, subset: int) -> int:
    mask = (table.docs["split"] == PRETRAIN) & (table.docs["subset"] == subset)
    return int((table.docs["ntokens"][mask] + 1).sum())


def _scarce(supply: dict[int, int], quotas: dict[int, int]) -> dict[int, dict]:
    return {s: {"available": supply[s], "needed": q} for s, q in quotas.items() if supply[s] < q}


def plan_pretrain(table: DocTable, shares: dict[int, float], budget: int,
                  max_epochs: float) -> tuple[Selection, dict]:
    """The pretraining selection at the recipe's shares. Subsets short of their quotas are taken for
    more than one epoch when each has documents and needs at most `max_epochs` (0: never repeat);
    otherwise the whole recipe shrinks to what the input covers (`plan["repeated"]` says which)."""
    supply = {s: pretrain_supply(table, s) for s in shares}
    shrink_total, limited_by = affordable_total(budget, shares, supply)
    scarce = _scarce(supply, largest_remainder(budget, shares))
    repeating = bool(scarce) and all(0 < info["needed"] <= max_epochs * info["available"]
                                     for info in scarce.values())
    total = budget if repeating or not scarce else shrink_total
    quotas = largest_remainder(total, shares)
    pieces, truncated = [], {}
    for subset, quota in quotas.items():
        selection, truncated[subset] = select_pretrain(table, subset, quota)
        pieces.append(selection)
    plan = {"requested_tokens": budget, "planned_tokens": total, "shortfall_tokens": budget - total,
            "shrink_tokens": shrink_total, "limited_by": limited_by,
            "quotas": quotas, "truncated_documents": truncated, "supply_tokens": supply,
            "epochs": {s: round(quotas[s] / supply[s], 6) if supply[s] else 0.0 for s in quotas},
            "scarce": scarce, "repeated": repeating}
    return Selection.concat(pieces), plan


def plan_heldout(table: DocTable, shares: dict[int, float], split: int, samples: int, context: int,
                 seed: int) -> tuple[Selection, dict]:
    """Held-out windows at the recipe's shares; never repeated, so a scarce subset shrinks the set."""
    supply = {s: window_supply(table, split, s, context) for s in shares}
    total, limited_by = affordable_total(samples, shares, supply)
    counts = largest_remainder(total, shares)
    pieces = []
    for subset, count in counts.items():
        windows = heldout_windows(table, split, subset, context, seed)
        pieces.append(Selection(windows.index[:count], windows.start[:count], windows.count[:count],
                                windows.key[:count]))
    plan = {"requested_samples": samples, "planned_samples": total, "shortfall_samples": samples - total,
            "limited_by": limited_by, "quotas": counts, "supply_windows": supply,
            "scarce": _scarce(supply, largest_remainder(samples, shares))}
    return Selection.concat(pieces), plan


def write_selection(table: DocTable, selection: Selection, prefix: Path, dtype, eod: int | None,
                    progress=None) -> np.ndarray:
    """Write the selected token ranges (each + EOD when `eod` is given); returns the sources table."""
    sources = np.zeros(len(selection.index), dtype=SOURCE_DTYPE)
    eod_array = np.array([eod], dtype=dtype) if eod is not None else None
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for row, (index, start, count) in enumerate(zip(selection.index, selection.start, selection.count)):
            tokens = table.tokens(int(index), int(start), int(count), dtype)
            writer.add_document(tokens if eod_array is None else np.concatenate([tokens, eod_array]))
            sources[row] = (table.docs["digest"][index], table.docs["subset"][index], start, count)
            if progress is not None:
                progress.update(docs=1, tokens=int(count) + (eod_array is not None))
    return sources
