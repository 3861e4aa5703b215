#!/usr/bin/env python
"""Train a SentencePiece tokenizer on Pile shards: `ccmega train-tokenizer --help`."""
import sys

from ccmega.data.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
