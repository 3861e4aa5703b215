#!/usr/bin/env python
"""Build D1..D6 + random corpora and held-out splits from Pile shards: `ccmega preprocess --help`."""
import sys

from ccmega.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
