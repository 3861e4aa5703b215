"""The processes a training run starts die with it, even when the run is SIGKILLed (Linux; a no-op elsewhere).

Why: megatron's dist_checkpointing (torch_dist, `strategies/filesystem_async.py`) forks writer processes
at every save (copies of the trainer: same command line, same open log and dataset files) and spawns a
multiprocessing Manager server at the first save that lives as long as the trainer. When the trainer is
SIGKILLed (the OOM killer, `kill -9`, a hard time limit), nothing reaps them: after a kill during a save,
a forked writer was found 50 minutes later blocked on a futex and ignoring SIGTERM, beside the spawned
Manager. SLURM kills a job's whole cgroup; a plain `ccmega pretrain` or torchrun on a workstation do not.

How: each child asks the kernel to SIGKILL it when its parent dies, `prctl(PR_SET_PDEATHSIG, SIGKILL)`.
- Forked children (os.fork, multiprocessing "fork"): an `os.register_at_fork` hook. The parent may die
  between the fork and the prctl, so the child then checks that its parent is still the process that
  forked it, and exits at once if not.
- Spawned children (multiprocessing "spawn" execs a fresh interpreter, so no at-fork hook runs): the
  trainer exports CCMEGA_DIE_WITH_PID=<its pid>. A spawned child imports its parent's `__main__`
  (`ccmega.cli` or the `ccmega` script), hence `ccmega`, whose `__init__` makes the same prctl when the
  variable names its parent (anything else started with that environment is left alone). It does so
  itself, without importing this module: `ccmega.runtime` imports torch, which cost the Manager 1.5-2 s
  at the first save and 200 MiB per rank (measured).
A forked child passes the rule on to its own children (the variable then names it).
multiprocessing's resource tracker (started with `python -c`, no ccmega) is not covered: it exits by
itself once every process holding its pipe (trainer, writers, Manager) is gone.

Caveat: the kernel sends PDEATHSIG when the *thread* that forked exits, not the process; the forks and
spawns of a training run come from its main thread.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys

ENV = "CCMEGA_DIE_WITH_PID"
_PR_SET_PDEATHSIG = 1
_state = {"active": False, "forker": None, "prctl": None}


def _die_with(parent: int) -> None:
    """SIGKILL this process when `parent` dies; exit now if `parent` is no longer its parent."""
    _state["prctl"](_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl: nobody would kill this process later
        os._exit(1)
    os.environ[ENV] = str(os.getpid())  # this process's own spawned children die with it


def _before_fork() -> None:
    _state["forker"] = os.getpid()


def _after_fork_in_child() -> None:
    if _state["active"]:
        _die_with(_state["forker"])


@contextlib.contextmanager
def children_die_with_this_process():
    """While inside: every process this one forks or spawns dies with it (forked ones pass it on)."""
    if not sys.platform.startswith("linux") or _state["active"]:
        yield
        return
    if _state["prctl"] is None:  # once per process: at-fork hooks cannot be removed, "active" switches them
        import ctypes

        _state["prctl"] = ctypes.CDLL(None).prctl
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    before = os.environ.get(ENV)
    os.environ[ENV] = str(os.getpid())
    _state["active"] = True
    try:
        yield
    finally:
        _state["active"] = False
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
