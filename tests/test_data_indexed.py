"""ccmega's torch-free .bin/.idx writer against megatron-core's own IndexedDatasetBuilder and reader."""
import numpy as np
import pytest

from ccmega.data.indexed_writer import IndexedDatasetWriter, token_dtype


@pytest.mark.parametrize("vocab_size", [1024, 151_669])
def test_bytes_equal_megatron_builder(tmp_path, vocab_size):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    documents = [rng.integers(0, vocab_size, size=int(n)).tolist() + [vocab_size - 1]
                 for n in rng.integers(1, 400, size=57)]
    dtype = DType.optimal_dtype(vocab_size)  # what preprocess_data.py picks
    assert dtype == token_dtype(vocab_size)

    builder = IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=dtype)
    for doc in documents:  # preprocess_data.py --append-eod: one sequence per document
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(tmp_path / "megatron.idx"))

    with IndexedDatasetWriter(tmp_path / "ours", dtype) as writer:
        for doc in documents:
            writer.add_document(doc)

    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"megatron{suffix}").read_bytes()
    dataset = IndexedDataset(str(tmp_path / "ours"))
    assert len(dataset) == len(documents)
    for i in (0, 13, len(documents) - 1):
        assert dataset[i].tolist() == documents[i]


def test_nothing_appears_until_finalized(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "part", np.int32)
    writer.add_document([1, 2, 3])
    assert not (tmp_path / "part.bin").exists() and not (tmp_path / "part.idx").exists()
    writer.abandon()
    assert list(tmp_path.iterdir()) == []
