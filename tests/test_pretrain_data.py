"""Pretraining data splits: unused splits are not built, an empty used split is a clear error (megatron
itself loops forever asking an empty split for samples)."""
import pytest

from icae_fixtures import make_split, make_tokenizer


@pytest.fixture(scope="module")
def few_documents(tmp_path_factory):
    d = tmp_path_factory.mktemp("few")
    tok = make_tokenizer(d / "tok.json", vocab_size=256)
    return str(make_split(d / "pretrain", 20, 64, 256)), tok  # 20 documents: a 1% share holds none


def test_validation_off_builds_train_only(few_documents, tmp_path, megatron_world_of_one):
    from ccmega.data.tokenizers import load_tokenizer
    from ccmega.training.data import build_datasets

    prefix, tok = few_documents
    data = build_datasets([prefix], None, "99,1,0", 32, 1, load_tokenizer(tok), str(tmp_path), 8, 0)
    assert data.valid is None and len(data.train) >= 8


def test_empty_validation_share_is_refused(few_documents, tmp_path, megatron_world_of_one):
    from ccmega.data.tokenizers import load_tokenizer
    from ccmega.training.data import build_datasets

    prefix, tok = few_documents
    with pytest.raises(ValueError, match=r"validation share of data.split='99,1,0' holds no documents \(20 in all\)"):
        build_datasets([prefix], None, "99,1,0", 32, 1, load_tokenizer(tok), str(tmp_path), 8, 8)
