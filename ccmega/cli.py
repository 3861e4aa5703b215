"""`ccmega <command> ...`: one entry point, each command in its own module (imported on demand so
that light commands such as `info` or `preprocess` never pay for importing megatron)."""
from __future__ import annotations

import importlib
import sys

from ccmega.config import ConfigError

# command -> (module with `main(argv) -> int | None`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("ccmega.models.info", "print a preset's architecture and parameter counts"),
    "preprocess": ("ccmega.data.preprocess", "build D1..D6/random corpora and splits from Pile shards"),
    "verify-splits": ("ccmega.data.verify", "prove zero overlap between pretraining corpora and splits"),
    "train-tokenizer": ("ccmega.data.train_tokenizer", "train a SentencePiece tokenizer on Pile shards"),
    "pretrain": ("ccmega.training.pretrain", "pretrain a Qwen3 LM on megatron-core"),
    "icae-train": ("ccmega.training.icae_train", "fine-tune an ICAE compressor (frozen decoder)"),
    "evaluate": ("ccmega.evaluation.evaluate", "reconstruction metrics, entropies, latency"),
    "probe-decoder": ("ccmega.evaluation.probe", "can an LM serve as a frozen ICAE decoder: copy score, drivability"),
    "report": ("ccmega.evaluation.report", "tables and figures from evaluation summaries"),
    "convert": ("ccmega.convert.cli", "convert checkpoints to/from Hugging Face Qwen3"),
    "demo": ("ccmega.demo", "the whole study at toy scale on a CPU"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ccmega <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ccmega: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest) or 0
    except ConfigError as e:  # refused at start (a bad setting, a GPU job's rank without a GPU): one line
        print(f"ccmega {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
