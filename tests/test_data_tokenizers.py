"""Tokenizer loading and backends: GigaToken must be token-identical to Hugging Face `tokenizers`, and text
that spells a special token is tokenized as text, in both backends, SentencePiece and preprocessing."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

from ccmega.data import sample_data_dir
from ccmega.data.tokenizers import default_tokenizer_dir, load_tokenizer
from data_helpers import mini_pile, read_documents, run_ccmega, small_sentencepiece, write_shard


def test_default_is_qwen3_from_the_wheel_folder():
    tok = load_tokenizer(None)
    path = default_tokenizer_dir() / "tokenizer.json"
    assert tok.path == path and tok.eod_id == 151643 and tok.vocab_size == 151669
    assert tok.identity == hashlib.sha256(path.read_bytes()).hexdigest()


def test_gigatoken_matches_tokenizers_on_mini_pile():
    docs = read_documents(mini_pile() / "val.jsonl.zst")
    fast = load_tokenizer(None, backend="gigatoken")
    slow = load_tokenizer(None, backend="tokenizers")
    reference = tokenizers.Tokenizer.from_file(str(default_tokenizer_dir() / "tokenizer.json"))
    assert (fast.backend, slow.backend) == ("gigatoken", "tokenizers")
    for doc in docs:
        ids = reference.encode(doc["text"]).ids
        assert fast.encode(doc["text"]) == ids
        assert fast.decode(ids) == doc["text"] == slow.decode(ids)


def test_sentencepiece_is_lossless():
    tok = load_tokenizer(small_sentencepiece())
    text = "def f(x):\n\treturn  x ** 2  # ünïcode 🙂\n\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eod_id == 2 and tok.vocab_size == 1024


def test_tokenizing_path_imports_no_torch():
    code = ("import sys, ccmega.data.preprocess, ccmega.data.tokenize_stage, ccmega.data.tokenizers;"
            "print('torch' in sys.modules, 'megatron' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---- text is text: a document that spells a special token gets the tokens of its characters ----------
QWEN3_TOKENIZER = default_tokenizer_dir() / "tokenizer.json"
ADDED = {t["content"]: (t["id"], t["special"]) for t in json.loads(QWEN3_TOKENIZER.read_text())["added_tokens"]}
SPECIAL_ONLY_TEXT = ("A log line quoted in a forum post: <|endoftext|> ends a sample, and chat models wrap a "
                     "turn as <|im_start|>user\nhello<|im_end|> (see <|endoftext|><|endoftext|>).")
ALL_ADDED_TEXT = "Every added token, as text: " + " | ".join(ADDED) + "\n<think>x</think><|fim_prefix|>def"


def reference_text_encoding(text: str) -> list[int]:
    """Hugging Face `tokenizers` told to encode its special tokens as text (independent of ccmega)."""
    reference = tokenizers.Tokenizer.from_file(str(QWEN3_TOKENIZER))
    reference.encode_special_tokens = True
    assert all(ADDED[name][1] for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    return reference.encode(text).ids


@pytest.mark.parametrize("backend", ["gigatoken", "tokenizers"])
def test_special_token_strings_in_text_are_encoded_as_text(backend):
    tok = load_tokenizer(None, backend=backend)
    assert tok.backend == backend
    assert tok.encode(SPECIAL_ONLY_TEXT) == reference_text_encoding(SPECIAL_ONLY_TEXT)
    assert tok.encode_array(SPECIAL_ONLY_TEXT).tolist() == tok.encode(SPECIAL_ONLY_TEXT)
    ids = tok.encode(ALL_ADDED_TEXT)
    added_ids = {i for i, _ in ADDED.values()}
    assert not added_ids & set(ids) and max(ids) < min(added_ids)  # nothing but the BPE model's own ids
    assert tok.decode(ids) == ALL_ADDED_TEXT
    assert tok.decode([*ids, tok.eod_id]) == ALL_ADDED_TEXT + "<|endoftext|>"  # decoding still knows every id


def test_sentencepiece_control_piece_strings_in_text_are_text():
    tok = load_tokenizer(small_sentencepiece())
    text = "an XML-ish dump: <s>first</s> <unk> </s></s> <|endoftext|>"
    ids = tok.encode(text)
    assert not {0, 1, 2} & set(ids)  # <unk>, <s>, </s> (= eod_id)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("backend", ["gigatoken", "tokenizers"])
def test_preprocess_writes_the_eod_only_between_documents(tmp_path, backend):
    """End to end with Qwen3: one document of each split (by hash) spells special tokens; the pretraining
    corpus holds EOD only at document ends, held-out windows hold none, and they decode to the text."""
    from ccmega.data.indexed_writer import IndexedDatasetReader

    def landing(text, split):  # docs/data.md's split rule: SHA-256 prefix against --test-fraction 0.2
        while (int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64 < 0.2) != \
                (split == "test"):
            text += "\n"
        return text

    pretrain_text = landing(SPECIAL_ONLY_TEXT * 3, "pretrain")
    test_text = landing(ALL_ADDED_TEXT * 3, "test")
    docs = [d for d in read_documents(sample_data_dir() / "val.jsonl.zst") if d["meta"]["pile_set_name"] == "Pile-CC"]
    lines = [json.dumps(d).encode() for d in docs[:10]]
    lines[3:3] = [json.dumps({"text": t, "meta": {"pile_set_name": "Pile-CC"}}).encode()
                  for t in (pretrain_text, test_text)]
    shard = write_shard(tmp_path / "specials.jsonl.zst", lines)
    out = tmp_path / "out"
    run_ccmega("preprocess", "--input", str(shard), "--output", str(out), "--recipes", "D1", "--tokens-per-dataset",
               "1B", "--scarce-subset", "shrink", "--finetune-samples", "0", "--test-samples", "1k",
               "--test-fraction", "0.2", "--finetune-fraction", "0", "--context-tokens", "16", "--workers", "1",
               "--tokenizer-backend", backend, "--quiet")
    eod, added_ids = 151643, {i for i, _ in ADDED.values()}
    pretrain = IndexedDatasetReader(out / "D1" / "pretrain")
    sources = np.load(out / "D1" / "pretrain.sources.npy")
    found = 0
    for i in range(len(pretrain)):
        ids = pretrain[i].tolist()
        assert ids[-1] == eod and not added_ids & set(ids[:-1])
        if bytes(sources["digest"][i]).ljust(16, b"\0") == hashlib.sha256(pretrain_text.encode()).digest()[:16]:
            assert ids[:-1] == reference_text_encoding(pretrain_text)
            found += 1
    assert found == 1
    test = IndexedDatasetReader(out / "D1" / "test")
    sources = np.load(out / "D1" / "test.sources.npy")
    mine = [i for i in range(len(test))
            if bytes(sources["digest"][i]).ljust(16, b"\0") == hashlib.sha256(test_text.encode()).digest()[:16]]
    assert len(mine) >= 10 and all(not added_ids & set(test[i].tolist()) for i in range(len(test)))
    ordered = sorted(mine, key=lambda i: sources["start"][i])
    tok = load_tokenizer(None)  # the evaluation's decoder (ccmega evaluate decodes windows with it)
    assert test_text.startswith(tok.decode(np.concatenate([test[i] for i in ordered])))
