"""Shared fixtures and the three kinds of test. Megatron tests of one rank run in the pytest process (one
process group for the whole session): `unit`. Tests that launch real multi-process runs (torchrun, gloo,
through tests/helpers/launch.py) are `multirank`; tests that run jobs on the local one-node SLURM cluster
are `cluster`. Select with `-m unit`, `-m multirank`, `-m cluster`. Helpers live in tests/helpers/."""
import os
import warnings

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")



@pytest.fixture(scope="session")
def megatron_world_of_one():
    """torch.distributed + parallel_state for a single rank (TP=PP=DP=1)."""
    from ccmega import runtime

    env = runtime.initialize(1, 1, seed=1234)
    yield env
    runtime.destroy()


def pytest_collection_modifyitems(items):
    for item in items:
        if not any(item.get_closest_marker(kind) for kind in ("multirank", "cluster")):
            item.add_marker(pytest.mark.unit)
