"""Thin launcher: `python tools/convert_to_hf.py ...` == `ccmega convert to-hf ...` (see docs/conversion.md)."""
import sys

if __name__ == "__main__":
    from ccmega.convert.cli import main

    sys.exit(main(["to-hf", *sys.argv[1:]]))
