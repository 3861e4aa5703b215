"""Integer token (or sample) quotas per Pile subset that hit a recipe's shares as closely as integers can."""
from __future__ import annotations

import math


def largest_remainder(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Split `total` into integers proportional to `shares` (Hamilton's method): they sum to `total`
    and each is within 1 of its exact share."""
    exact = {name: total * share for name, share in shares.items()}
    quotas = {name: math.floor(value) for name, value in exact.items()}
    leftover = total - sum(quotas.values())
    for name in sorted(exact, key=lambda n: (quotas[n] - exact[n], n))[:leftover]:
        quotas[name] += 1
    return quotas


def affordable_total(total: int, shares: dict[str, float], supply: dict[str, int]) -> tuple[int, str | None]:
    """The largest total <= `total` whose quotas the supply covers, and the subset that limits it."""
    quotas = largest_remainder(total, shares)
    short = [name for name, quota in quotas.items() if supply.get(name, 0) < quota]
    if not short:
        return total, None
    limit, limiting = min((supply.get(name, 0) / share, name) for name, share in shares.items() if share > 0)
    best = min(total, math.floor(limit))
    while best > 0 and any(supply.get(n, 0) < q for n, q in largest_remainder(best, shares).items()):
        best -= 1  # rounding can ask for one more than the exact share: step down until covered
    return best, limiting
