"""The random-text corpus (paper §4.6): its alphabet is a deliberate choice (--random-alphabet)."""
import json
import string

import pytest

from ccmega.data.indexed_writer import IndexedDatasetReader
from ccmega.data.tokenizers import load_tokenizer
from data_helpers import run_ccmega

EXPECTED = {  # written out here, not imported: what each name promises
    "letters-punctuation": set(string.ascii_letters + string.punctuation),
    "alphanumeric": set(string.ascii_letters + string.digits),
    "alphanumeric-punctuation": set(string.ascii_letters + string.digits + string.punctuation),
}


@pytest.mark.parametrize("alphabet", [None, "letters-punctuation", "alphanumeric"])
def test_random_corpus_uses_the_chosen_alphabet(tmp_path, alphabet):
    out = tmp_path / "out"
    choice = ["--random-alphabet", alphabet] if alphabet else []
    run_ccmega("preprocess", "--input", "@sample", "--output", str(out), "--recipes", "random",
               "--tokens-per-dataset", "20k", "--finetune-samples", "2", "--test-samples", "2", "--workers", "0",
               "--quiet", *choice)
    name = alphabet or "alphanumeric-punctuation"  # the documented default (§4.6; Table 5 shows digits)
    manifest = json.loads((out / "random" / "pretrain.manifest.json").read_text())
    assert manifest["alphabet"] == name and set(manifest["alphabet_characters"]) == EXPECTED[name]
    tok = load_tokenizer(None)
    for split in ("pretrain", "test"):
        reader = IndexedDatasetReader(out / "random" / split)
        text = "".join(tok.decode(reader[i][:-1] if split == "pretrain" else reader[i]) for i in range(len(reader)))
        assert set(text) == EXPECTED[name]  # every character of the alphabet, and nothing else
