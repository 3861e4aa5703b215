"""What a recipe does when a Pile subset cannot fill its share of the token budget, and the check that
pretraining runs on a corpus's manifest.

`--scarce-subset` choices, for a pretraining corpus:
- repeat (default): take further passes (epochs) over the scarce subset's pretraining documents, whole
  documents in a new seeded order each pass, so the corpus keeps its budget and its shares; The Pile
  itself takes DM Mathematics for 2 epochs. Held-out documents are never among them.
- shrink: scale the whole recipe down to what the input covers at the exact shares.
- fail: stop before writing anything.
Held-out sets never repeat a window (a duplicated test sample measures nothing): repeat and shrink both
shrink them; fail stops.
"""
from __future__ import annotations

import json
from pathlib import Path

SCARCE_CHOICES = ("repeat", "shrink", "fail")
DEFAULT_SCARCE = "repeat"


def scarcity_message(where: str, unit: str, requested: int, scarce: dict[str, dict], shrink_total: int,
                     choice: str, action: str, repeat_blocker: str | None = None) -> str:
    """One message for a corpus `where` (e.g. 'D6/pretrain') whose `scarce` subsets ({name: {'available',
    'needed'}}, counted in `unit`) cannot fill `requested`: what exists, what is needed, what the user's
    `choice` leads to (`action`: repeat, shrink or fail) and what each other choice would do."""
    facts = "; ".join(f"subset {name!r} has {info['available']:,} {unit} in the input, {info['needed']:,} "
                      f"needed for its share of {requested:,}" for name, info in scarce.items())
    if repeat_blocker is None:
        passes = ", ".join(f"{name} {info['needed'] / info['available']:.2f} times" for name, info in scarce.items())
        repeat = (f"repeat takes further passes over those documents ({passes} in all; whole documents, a "
                  f"new seeded order each pass) and keeps {requested:,} {unit}")
    else:
        repeat = f"repeat is impossible ({repeat_blocker})"
    outcomes = {"repeat": repeat,
                "shrink": f"shrink writes {shrink_total:,} {unit} ({requested - shrink_total:,} short) at the "
                          f"recipe's shares",
                "fail": "fail stops without writing"}
    now = outcomes[choice] if action == choice else f"{outcomes[choice]}, so: {outcomes[action]}"
    others = "; ".join(text for name, text in outcomes.items() if name not in (choice, action))
    return f"{where}: {facts}. With --scarce-subset {choice}: {now}. Otherwise: {others}."


def manifest_path(prefix: str | Path) -> Path:
    """The manifest `ccmega preprocess` writes beside an indexed dataset `prefix` (OUT/D6/pretrain)."""
    return Path(f"{prefix}.manifest.json")


def corpus_budget_shortfall(prefix: str) -> str | None:
    """A message when the pretraining corpus at `prefix` holds fewer tokens than its recipe asked for
    (it was built with `--scarce-subset shrink`); None when it holds the whole budget, or when there is
    no manifest beside it (a corpus ccmega did not write)."""
    path = manifest_path(prefix)
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    plan = manifest.get("plan") or {}
    requested, planned = plan.get("requested_tokens"), plan.get("planned_tokens")
    if requested is None or planned is None or planned >= requested:
        return None
    scarce = plan.get("scarce") or {}
    why = "; ".join(f"{name!r} has {info['available']:,} pretraining tokens of the {info['needed']:,} needed"
                    for name, info in scarce.items()) or f"limited by {plan.get('limited_by')!r}"
    return (f"{prefix}: this {manifest.get('recipe', '?')} corpus holds {manifest.get('tokens', planned):,} tokens, "
            f"{requested - planned:,} short of the {requested:,} its recipe asked for: it was built with "
            f"`ccmega preprocess --scarce-subset {plan.get('scarce_subset', 'shrink')}` ({why}), so it "
            f"does not keep the recipe's budget. Rebuild it with `--scarce-subset repeat` (epochs over the "
            f"scarce subset) or with more input ({path})")
