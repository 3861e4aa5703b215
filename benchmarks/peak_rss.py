"""A call's peak growth of this process's resident set (Linux: the kernel's VmHWM mark, reset first).

Shared by benchmarks/icae_memory.py and benchmarks/checkpoint_save.py."""
from __future__ import annotations

import gc


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_growth(call):
    """(call(), bytes by which the resident set peaked above its level before the call)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    result = call()
    return result, (_status_kib("VmHWM") - before) * 1024
