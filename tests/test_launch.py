"""Launch hardening: each SLURM task's rank, GPU and rendezvous from its variables; a GPU job's rank that
sees no CUDA fails at start with its node and CUDA_VISIBLE_DEVICES (instead of hanging the others in
NCCL); Transformer Engine checked by importing it, and each FP8 recipe refused below its TE version."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from ccmega.runtime import distributed
from ccmega.runtime import transformer_engine as te
from ccmega.runtime.distributed import LaunchError, dist_env_from_environ, gpu_index, gpu_job_reason, launch_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_ID = "1234567"  # port 20000 + 1234567 % 20000 = 34567
NODELIST = "gpu[012-013]"


def task_environ(procid: int, bound: bool) -> dict:
    """What srun sets for task `procid` of `--nodes=2 --ntasks-per-node=4` on gpu012 and gpu013 (4 GPUs each),
    with SLURM's per-task GPU binding (one GPU each) or without (all four)."""
    node, local = divmod(procid, 4)
    return {"SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NODELIST": NODELIST, "SLURM_NODELIST": NODELIST,
            "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
            "SLURMD_NODENAME": f"gpu01{2 + node}", "SLURM_GPUS_ON_NODE": "1" if bound else "4",
            "SLURM_STEP_GPUS": str(local) if bound else "0,1,2,3",
            "CUDA_VISIBLE_DEVICES": str(local) if bound else "0,1,2,3"}


def torch_device_count(environ) -> int:
    """What torch.cuda.device_count() reports under the task's CUDA_VISIBLE_DEVICES on a 4-GPU node."""
    return len(environ["CUDA_VISIBLE_DEVICES"].split(","))


# (global rank, local rank, device index) of the 8 tasks, written out by hand
UNBOUND = [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 0, 0), (5, 1, 1), (6, 2, 2), (7, 3, 3)]
BOUND = [(0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 3, 0), (4, 0, 0), (5, 1, 0), (6, 2, 0), (7, 3, 0)]


@pytest.mark.parametrize("bound, expected", [(False, UNBOUND), (True, BOUND)], ids=["all-gpus-visible", "one-gpu-per-task"])
def test_two_nodes_by_four_tasks_map_to_ranks_devices_and_one_master(bound, expected):
    got = []
    for procid in range(8):
        environ = task_environ(procid, bound)
        env = dist_env_from_environ(environ, cuda_devices=torch_device_count(environ))
        assert (env.world_size, env.master_addr, env.master_port) == (8, "gpu012", 34567), procid
        got.append((env.rank, env.local_rank, env.device_index))
    assert got == expected


def test_the_batch_shells_rendezvous_is_the_one_every_task_derives(tmp_path):
    """slurm/ccmega_job.sh exports MASTER_ADDR/PORT from the allocation (through `scontrol show hostnames`);
    the tasks' own SLURM-derived values must be the same, or tasks run without the launcher disagree."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu012\\ngpu013\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    environ = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NODELIST": NODELIST,
               "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_ON_NODE": "64"}
    script = f'source {REPO}/slurm/ccmega_job.sh && job_environment && echo "$MASTER_ADDR $MASTER_PORT"'
    out = subprocess.run(["bash", "-c", script], env=environ, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["gpu012", "34567"]
    for procid in (0, 5):
        task = {**task_environ(procid, bound=True), "MASTER_ADDR": "gpu012", "MASTER_PORT": "34567"}
        env = dist_env_from_environ(task, cuda_devices=1)
        assert (env.master_addr, env.master_port, env.device_index) == ("gpu012", 34567, 0)


@pytest.mark.parametrize("local_rank, visible, index", [(0, 1, 0), (3, 1, 0), (3, 4, 3), (0, 8, 0), (7, 8, 7)])
def test_gpu_index(local_rank, visible, index):
    assert gpu_index(local_rank, visible, {}) == index


def test_gpu_index_refuses_a_rank_without_a_gpu_of_its_own():
    environ = {"SLURMD_NODENAME": "gpu013", "CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(LaunchError, match=r"local rank 5 on node gpu013 cannot pick a GPU: it sees 2 "
                                          r"\(CUDA_VISIBLE_DEVICES='0,1'\)"):
        gpu_index(5, 2, environ)
    with pytest.raises(LaunchError, match="it sees 0"):
        gpu_index(0, 0, environ)


@pytest.mark.parametrize("environ, reason", [
    ({}, None),
    ({"CCMEGA_DEVICE": "cuda"}, "CCMEGA_DEVICE=cuda"),
    ({"CCMEGA_DEVICE": "cpu", "SLURM_GPUS_ON_NODE": "8"}, None),
    ({"CCMEGA_CPU": "1", "SLURM_JOB_GPUS": "0,1"}, None),
    ({"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS_PER_NODE": "0"}, None),  # the CPU test cluster's --gpus-per-node=0
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
    ({"SLURM_GPUS_PER_NODE": "h100:8"}, "SLURM_GPUS_PER_NODE=h100:8"),
    ({"SLURM_STEP_GPUS": "0"}, "SLURM_STEP_GPUS=0"),  # GPU id 0, not a count
    ({"SLURM_JOB_GPUS": "2,3"}, "SLURM_JOB_GPUS=2,3"),
])
def test_what_makes_a_gpu_job(environ, reason):
    assert gpu_job_reason(environ) == reason


def test_an_unknown_device_is_refused():
    with pytest.raises(LaunchError, match="CCMEGA_DEVICE must be cuda or cpu, not 'gpu'"):
        gpu_job_reason({"CCMEGA_DEVICE": "gpu"})


def test_a_gpu_job_rank_without_cuda_is_refused_with_its_node():
    assert not torch.cuda.is_available()
    with pytest.raises(LaunchError) as error:
        launch_env({**task_environ(6, bound=True), "CUDA_VISIBLE_DEVICES": ""})
    message = str(error.value)
    assert message.startswith("rank 6 (local rank 2) on node gpu013 sees no CUDA GPU in a GPU job "
                              "(SLURM_GPUS_ON_NODE=1): CUDA_VISIBLE_DEVICES='', torch ")
    assert "\n" not in message
    assert launch_env({}).world_size == 1  # a plain CPU run, as before


def test_on_a_gpu_the_rank_takes_its_bound_device_and_a_cpu_job_refuses_visible_gpus(monkeypatch):
    monkeypatch.setattr(distributed, "on_gpu", lambda: True)  # counts only: no CUDA tensor is made
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert launch_env(task_environ(7, bound=True)).device_index == 0
    with pytest.raises(LaunchError, match="CCMEGA_DEVICE=cpu, but this process on node gpu013 sees CUDA"):
        launch_env({**task_environ(7, bound=True), "CCMEGA_DEVICE": "cpu"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LaunchError, match="local rank 3 on node gpu013 cannot pick a GPU"):
        launch_env(task_environ(7, bound=True))


@pytest.mark.parametrize("slurm", [False, True], ids=["CCMEGA_DEVICE", "SLURM-allocation"])
def test_a_gpu_job_without_cuda_exits_at_once_with_one_line(slurm, tmp_path):
    """The real command line: exit code 2 and the one line, in seconds (a hang fails the timeout)."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "CCMEGA_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ["CUDA_VISIBLE_DEVICES"] = ""
    if slurm:
        environ.update({k: v for k, v in task_environ(5, bound=False).items() if k != "CUDA_VISIBLE_DEVICES"})
    else:
        environ["CCMEGA_DEVICE"] = "cuda"
    proc = subprocess.run([sys.executable, "-m", "ccmega.cli", "pretrain", "--preset", "qwen3-tiny", "--steps", "1",
                           "--data", str(tmp_path / "absent"), "--run-dir", str(tmp_path / "run")],
                          cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ccmega pretrain: error:")]
    assert len(errors) == 1, proc.stderr
    node, rank = ("gpu013", "rank 5 (local rank 1)") if slurm else (socket.gethostname(), "rank 0 (local rank 0)")
    assert f"{rank} on node {node} sees no CUDA GPU" in errors[0] and "CUDA_VISIBLE_DEVICES=''" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ---- Transformer Engine ---------------------------------------------------------------------------------

@pytest.fixture
def fake_te(tmp_path, monkeypatch):
    """Puts a stand-in `transformer_engine` package (with a `pytorch` part) on sys.path; forgets it after."""
    def install(init_text: str):
        package = tmp_path / "site" / "transformer_engine"
        (package / "pytorch").mkdir(parents=True)
        (package / "__init__.py").write_text(init_text)
        (package / "pytorch" / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        te.status.cache_clear()

    yield install
    for name in [n for n in sys.modules if n == "transformer_engine" or n.startswith("transformer_engine.")]:
        del sys.modules[name]
    te.status.cache_clear()
    te._warn_once.cache_clear()


def test_an_old_transformer_engine_refuses_the_recipes_it_cannot_build(fake_te, monkeypatch):
    fake_te('__version__ = "2.1.0"\n')
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert te.status() == te.Status("2.1.0", None)
    assert te.available()
    problem = te.fp8_problem("hybrid", "tensorwise")
    assert problem.startswith("FP8 recipe tensorwise needs Transformer Engine >= 2.2.0 (megatron-core's "
                              "get_fp8_recipe), found 2.1.0; use --fp8-recipe delayed or mxfp8")
    assert "needs Transformer Engine >= 2.3.0" in te.fp8_problem("hybrid", "blockwise")
    assert te.fp8_problem("hybrid", "delayed") is None and te.fp8_problem("e4m3", "mxfp8") is None
    assert te.recipe_problem("tensorwise", "2.2.0") is None and te.recipe_problem("tensorwise", "2.2.0.dev0+5fdd7bb") is None
    assert "precision.fp8_recipe must be one of" in te.fp8_problem("hybrid", "fast")


def test_a_transformer_engine_that_does_not_import_is_broken_not_present(fake_te, monkeypatch):
    fake_te('raise OSError("libcudnn.so.9: cannot open shared object file")\n')
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert te.status().problem == "installed but broken: OSError: libcudnn.so.9: cannot open shared object file"
    with pytest.warns(UserWarning, match="Transformer Engine is installed but broken: OSError: libcudnn"):
        assert not te.available()
    problem = te.fp8_problem("hybrid", "tensorwise")
    assert problem.startswith("--fp8 hybrid needs NVIDIA Transformer Engine on a CUDA GPU (CUDA available: True, "
                              "transformer_engine: installed but broken: OSError: libcudnn.so.9")


def test_without_cuda_fp8_is_refused_and_transformer_engine_never_imported(fake_te):
    from ccmega.training.loop import fp8_unavailable_reason
    from ccmega.training.sections import PrecisionSection

    fake_te('raise SystemExit("imported on a CPU")\n')
    reason = fp8_unavailable_reason(PrecisionSection(fp8="hybrid"))
    assert reason.startswith("--fp8 hybrid needs NVIDIA Transformer Engine on a CUDA GPU (CUDA available: False")
    assert "transformer_engine" not in sys.modules
    assert fp8_unavailable_reason(PrecisionSection(fp8=None)) is None
    from ccmega.models.qwen3 import transformer_engine_available

    assert not transformer_engine_available() and "transformer_engine" not in sys.modules
