"""Thin launcher: `python tools/convert_from_hf.py ...` == `ccmega convert from-hf ...` (see docs/conversion.md)."""
import sys

if __name__ == "__main__":
    from ccmega.convert.cli import main

    sys.exit(main(["from-hf", *sys.argv[1:]]))
