"""Rank and master address from torchrun or SLURM variables."""
import pytest

from ccmega.runtime.distributed import dist_env_from_environ, first_host


@pytest.mark.parametrize("nodelist,host", [
    ("gpu[012-015,020]", "gpu012"), ("node7", "node7"), ("a-b[3,5],c1", "a-b3"), ("h100-[1-4]", "h100-1"),
    ("localhost", "localhost"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_variables_win():
    env = dist_env_from_environ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                                 "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "n1", 1234)


def test_slurm_variables():
    env = dist_env_from_environ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                 "SLURM_JOB_NODELIST": "gpu[04-05]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (9, 16, 1, "gpu04")
    again = dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[04-05]",
                                   "SLURM_JOB_ID": "123456"})
    assert env.master_port == again.master_port  # every task derives the same port


def test_plain_process_is_world_of_one():
    env = dist_env_from_environ({})
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)


def test_session_refuses_another_layout_than_the_existing_groups(megatron_world_of_one):
    """A command run inside an existing world (a test, the demo) must not silently train at TP 1 when it
    asked for TP 2."""
    import pytest

    from ccmega import runtime

    with pytest.raises(ValueError, match="already exist with TP 1 x PP 1; this command asked for TP 2 x PP 1"):
        with runtime.session(2, 1):
            pass
    with runtime.session(1, 1) as env:  # the same layout is fine, and leaves the caller's group alive
        assert env.world_size == 1
    import torch

    assert torch.distributed.is_initialized()
