"""Counts written the way people write them: 200k, 5M, 50B, 1.5T (powers of 1000) or plain integers."""
from __future__ import annotations

_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str | int) -> int:
    if isinstance(text, int):
        return text
    raw = text.strip().replace("_", "").replace(",", "")
    scale = _SUFFIXES.get(raw[-1:].lower(), 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a count: {text!r} (write e.g. 200000, 200k, 5M, 50B)") from None
    if value < 0 or value != int(value):
        raise ValueError(f"not a whole non-negative count: {text!r}")
    return int(value)
