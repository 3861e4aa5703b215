"""Shared fixtures. Megatron tests of one rank run in the pytest process (one process group for the
whole session); multi-rank tests launch torchrun through `tests/launch.py`."""
import os
import warnings

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MINI_PILE = os.path.join(REPO, "..", "shared", "data", "mini_pile")


@pytest.fixture(scope="session")
def megatron_world_of_one():
    """torch.distributed + parallel_state for a single rank (TP=PP=DP=1)."""
    from ccmega import runtime

    env = runtime.initialize(1, 1, seed=1234)
    yield env
    runtime.destroy()
