"""Tokenizer loading and backends: GigaToken must be token-identical to Hugging Face `tokenizers`."""
import hashlib
import subprocess
import sys

import tokenizers

from ccmega.data.tokenizers import default_tokenizer_dir, load_tokenizer
from test_data_helpers import mini_pile, read_documents, small_sentencepiece


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
