"""The local one-node SLURM cluster (tests/slurm_cluster.py) really schedules `sbatch --wait` jobs."""
import re
import time

import pytest

from slurm_cluster import LocalSlurmCluster, SlurmError
from slurm_cluster import slurm_cluster  # noqa: F401 (session fixture; skips where SLURM is missing)

pytestmark = pytest.mark.cluster

TWO_TASKS = """#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --job-name=two-tasks
srun bash -c 'echo "task procid=$SLURM_PROCID ntasks=$SLURM_NTASKS localid=$SLURM_LOCALID \
nodelist=$SLURM_JOB_NODELIST value=$CCMEGA_TEST_VALUE"'
"""

FAILING = """#!/bin/bash
echo "about to fail"
exit 3
"""

# srun's exit code is the largest of its tasks' (here 4 + 1 = 5); as the script's last command it is
# the job's exit code, which `sbatch --wait` returns
FAILING_TASK = """#!/bin/bash
#SBATCH --ntasks=2
srun bash -c 'exit $((4 + SLURM_PROCID))'
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_two_task_job_runs_with_slurm_variables(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    rc, job_id = slurm_cluster.sbatch_wait(write(tmp_path, "two.sh", TWO_TASKS),
                                           env={"CCMEGA_TEST_VALUE": "propagated"})
    print(f"2-task job {job_id}: turnaround {time.monotonic() - t0:.1f} s")
    out = slurm_cluster.job_output(job_id)
    assert rc == 0, out
    tasks = sorted(re.findall(r"^task (.*)$", out, re.M))
    assert tasks == [
        "procid=0 ntasks=2 localid=0 nodelist=localhost value=propagated",
        "procid=1 ntasks=2 localid=1 nodelist=localhost value=propagated",
    ], out


def test_sbatch_wait_returns_the_scripts_exit_code(slurm_cluster, tmp_path):
    rc, job_id = slurm_cluster.sbatch_wait(write(tmp_path, "fail.sh", FAILING))
    assert rc == 3
    assert "about to fail" in slurm_cluster.job_output(job_id)


def test_sbatch_wait_returns_a_failing_srun_tasks_exit_code(slurm_cluster, tmp_path):
    rc, job_id = slurm_cluster.sbatch_wait(write(tmp_path, "fail_task.sh", FAILING_TASK))
    assert rc == 5, slurm_cluster.job_output(job_id)


def test_a_second_cluster_in_the_same_process_is_refused(slurm_cluster):
    with pytest.raises(SlurmError, match="already running"):
        LocalSlurmCluster().start()
    assert slurm_cluster.squeue() == []  # the running one is untouched


# What the one-node cluster cannot give is refused at submission (sbatch exits 1 at once, no job id).
# Multi-node and over-CPU requests are rejected only because slurm.conf sets EnforcePartLimits=ALL;
# without it such a job pends forever (reason PartitionNodeLimit) and `sbatch --wait` hangs. GPUs are
# refused because the node declares no GRES. (sbatch 22.05 has no --immediate; that is salloc/srun.)
@pytest.mark.parametrize("args, error", [
    (["--nodes=2"], "Node count specification invalid"),
    (["--gpus-per-node=8"], "Invalid generic resource"),
    (["--gres=gpu:1"], "Invalid generic resource"),
    (["--ntasks=64"], "More processors requested than permitted"),
])
def test_impossible_request_is_refused_at_once(slurm_cluster, tmp_path, args, error):
    script = write(tmp_path, "impossible.sh", "#!/bin/bash\necho should not run\n")
    t0 = time.monotonic()
    rc, job_id = slurm_cluster.sbatch_wait(script, args=args, timeout=120)
    elapsed = time.monotonic() - t0
    assert (rc, job_id) == (1, None)
    assert error in slurm_cluster.last_sbatch_stderr
    assert elapsed < 30, f"refusal took {elapsed:.0f} s"
