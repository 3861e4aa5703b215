import os as _os
import sys as _sys

if _sys.platform.startswith("linux") and _os.environ.get("CCMEGA_DIE_WITH_PID") == str(_os.getppid()):
    # Spawned by a training run (multiprocessing imports the parent's __main__, so ccmega): die with it,
    # even when it is SIGKILLed. Why, and the forked children: ccmega/runtime/lifetime.py.
    import ctypes as _ctypes
    import signal as _signal

    _ctypes.CDLL(None).prctl(1, int(_signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if _os.getppid() != int(_os.environ["CCMEGA_DIE_WITH_PID"]):  # it died before the prctl
        _os._exit(1)
