"""A synthetic corpus on which a tiny LM learns to copy in a few hundred steps, for the ICAE plumbing test.

Pretraining documents are a random L-token string x over a 64-symbol alphabet followed by a separator
token, three times: [x, SEP, x, SEP, x, SEP]. Once it has seen x, a model predicts the repeats exactly by
attending L + 1 positions back. Fine-tune and test samples are fresh random L-token strings (never seen in
pretraining). An ICAE with k = L memory slots lays the decoder input out as [m_1 .. m_L, [AE], c_1 .. c_L]:
the same period, with [AE] in the separator's place. So the frozen decoder can reconstruct c exactly if,
and only if, the memory carries c: the shuffled-memory control has nothing to copy."""
import os

import numpy as np

from ccmega.data.indexed_writer import IndexedDatasetWriter, token_dtype
from icae_fixtures import make_tokenizer

VOCAB, ALPHABET, SEPARATOR = 256, np.arange(3, 3 + 64), 2


def write_copy_task(out, context_tokens: int, pretrain_documents: int = 4000, finetune: int = 2000,
                    test: int = 100, seed: int = 0) -> dict:
    """Tokenizer and the three splits under `out`; returns their paths."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {"tokenizer": make_tokenizer(os.path.join(out, "tokenizer.json"), vocab_size=VOCAB)}
    with IndexedDatasetWriter(os.path.join(out, "pretrain"), token_dtype(VOCAB)) as writer:
        for _ in range(pretrain_documents):
            period = np.append(rng.choice(ALPHABET, size=context_tokens), SEPARATOR)
            writer.add_document(np.tile(period, 3))
    paths["pretrain"] = os.path.join(out, "pretrain")
    for name, count in (("finetune", finetune), ("test", test)):
        with IndexedDatasetWriter(os.path.join(out, name), token_dtype(VOCAB)) as writer:
            for _ in range(count):
                writer.add_document(rng.choice(ALPHABET, size=context_tokens))
        paths[name] = os.path.join(out, name)
    return paths
