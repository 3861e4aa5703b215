"""The SLURM scripts: slurm/icae_grid.sh submits exactly the paper's runs and decides "finished" from
status.json; the two launchers share srun, signal forwarding, requeue and DRY_RUN (slurm/ccmega_job.sh).

ccmega itself is replaced by tests/fake_ccmega.py (through PYTHON=tests/fake_python.sh): these tests are
about what the scripts run and when, so each takes seconds. The grid's bookkeeping is tested against
stand-in `sbatch`/`squeue` commands on PATH and on the real one-node cluster (tests/slurm_cluster.py).
"""
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from ccmega.evaluation import paper_results
from slurm_cluster import slurm_cluster  # noqa: F401 (session fixture; skips where SLURM is missing)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GRID = os.path.join(REPO, "slurm", "icae_grid.sh")
FAKE_PYTHON = os.path.join(HERE, "helpers", "fake_python.sh")
SIZE_OF = {"200M": "200m", "500M": "500m", "800M": "800m", "1B": "1b"}


def run_name(er, es, dr, ds, data):
    return f"enc-{er.lower()}-{SIZE_OF[es]}_dec-{dr.lower()}-{SIZE_OF[ds]}_data-{data.lower()}"


def paper_triples() -> dict[str, set[str]]:
    """{run name: tables/figures}, from the paper's rows as transcribed in paper_results (checked against
    paper.txt by tests/test_report.py): Fig. 4 is encoder D1 -> decoders D1..D6 on D1 (500M; only D1, D2
    and D6 are printed, in Table 3), Table 5 the random-text decoder."""
    feeds: dict[str, set[str]] = {}
    for dec in ["D1", "D2", "D3", "D4", "D5", "D6"]:
        feeds.setdefault(run_name("D1", "500M", dec, "500M", "D1"), set()).add("fig4")
    for row in paper_results.TABLE3:
        feeds.setdefault(run_name(*row.key), set()).add("table3")
    for row in paper_results.TABLE4:
        feeds.setdefault(run_name(*row.key), set()).update({"table4", "fig5"})
    feeds.setdefault("enc-d1-500m_dec-random-500m_data-d1", set()).add("table5")
    return feeds


def grid(*args, env=None, check=True):
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    proc = subprocess.run(["bash", GRID, *args], env=full, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def listed(*args) -> dict[str, set[str]]:
    out = {}
    for line in grid("--list", *args).stdout.splitlines():
        name, feeds = re.fullmatch(r"(\S+)\s+feeds: (.+)", line).groups()
        out[name] = set(feeds.split())
    return out


# ---- which runs ----------------------------------------------------------------------------------------

def test_the_grid_is_the_papers_24_runs_each_named_by_what_it_feeds():
    expected = paper_triples()
    assert len(expected) == 24
    assert listed() == expected
    assert set(listed("--subset", "table3")) == {n for n, f in expected.items() if "table3" in f}
    assert set(listed("--subset", "fig4,table5")) == {n for n, f in expected.items() if f & {"fig4", "table5"}}


def test_runs_outside_the_paper_only_with_extra():
    default = listed()
    off_paper = ["enc-d6-500m_dec-d6-500m_data-d1", "enc-d1-500m_dec-d1-500m_data-d6"]  # the old grid's two
    assert not set(off_paper) & set(default)
    with_extra = listed("--extra", ",".join(off_paper))
    assert {n: with_extra[n] for n in off_paper} == {n: {"extra"} for n in off_paper}
    assert len(with_extra) == 26
    bad = grid("--list", "--extra", "enc-d1-500m_dec-d9-500m_data-d1", check=False)
    assert bad.returncode == 2 and "not a run name" in bad.stderr
    bad = grid("--list", "--subset", "table9", check=False)
    assert bad.returncode == 2 and "unknown subset table9" in bad.stderr


# ---- when: status.json, not a checkpoint, says finished ------------------------------------------------

def write_status(run_dir, state, iteration, steps, latest=True):
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    if latest:
        with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
            f.write(f"iter_{iteration:07d}\n")
    if state:
        with open(os.path.join(run_dir, "status.json"), "w") as f:
            json.dump({"state": state, "iteration": iteration, "steps": steps, "skipped_steps": 0}, f)


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def stand_in_slurm(tmp_path):
    """`sbatch` that logs its arguments and answers ids 1001, 1002, ...; `squeue` that answers from
    tmp/queue.json ({job name: id})."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "sbatch", f"""#!/bin/bash
n=$(( $(cat {tmp_path}/sbatch.count 2>/dev/null || echo 1000) + 1 )); echo $n > {tmp_path}/sbatch.count
printf '%s\\n' "$n $*" >> {tmp_path}/sbatch.log; echo $n
""")
    executable(bin_dir / "squeue", f"""#!/bin/bash
while [ $# -gt 0 ]; do [ "$1" = -n ] && name=$2; shift; done
{sys.executable} -c "import json,sys; print(json.load(open('{tmp_path}/queue.json')).get(sys.argv[1], ''))" "$name"
""")
    (tmp_path / "queue.json").write_text("{}")

    def submissions():
        if not (tmp_path / "sbatch.log").exists():
            return {}
        lines = (tmp_path / "sbatch.log").read_text().splitlines()
        return {line.split()[0]: line for line in lines}

    return {"env": {"PATH": f"{bin_dir}:{os.environ['PATH']}", "OUTPUT_ROOT": str(tmp_path / "runs")},
            "root": tmp_path / "runs", "queue": tmp_path / "queue.json", "submissions": submissions}


def test_pretraining_counts_as_finished_only_by_its_status(stand_in_slurm):
    """Fig. 4's six runs need LLM_D1..D6(500M); each pretraining run is in another state. A checkpoint
    on disk (the old rule) never makes a run finished: interrupted/requeued or running ones get afterok
    on their queued job, unfinished ones are (re)submitted, a diverged one blocks its fine-tuning."""
    root, s = stand_in_slurm["root"], stand_in_slurm
    write_status(root / "pretrain_d1_500m", "finished", 11, 11)
    write_status(root / "pretrain_d2_500m", "interrupted", 5, 11)         # requeued: pending in the queue
    write_status(root / "pretrain_d3_500m", None, 6, 11)                   # running: no status.json yet
    write_status(root / "pretrain_d4_500m", "interrupted", 5, 11)         # interrupted, not requeued
    write_status(root / "pretrain_d5_500m", "finished", 3, 11)            # finished short of its steps
    write_status(root / "pretrain_d6_500m", "diverged", 4, 11)
    s["queue"].write_text(json.dumps({"ccmega-pretrain-d2-500m": "777", "ccmega-pretrain-d3-500m": "778"}))

    proc = grid("--subset", "fig4", env=s["env"], check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log  # one fine-tuning run refused
    assert "pretrained d1-500m: finished" in log and "pretrained d6-500m: DIVERGED" in log
    jobs = s["submissions"]()
    pretrain = {re.search(r"slurm/pretrain_(d\d)_500m\.sh", line).group(1): job for job, line in jobs.items()
                if "slurm/pretrain_d" in line}
    assert sorted(pretrain) == ["d4", "d5"]  # resubmitted (they resume from their checkpoint)
    icae = {re.search(r"ccmega-icae-enc-d1-500m_dec-(d\d)", line).group(1): line for line in jobs.values()
            if "icae_finetune.sh" in line}
    assert sorted(icae) == ["d1", "d2", "d3", "d4", "d5"]
    assert "--dependency" not in icae["d1"]
    assert "--dependency=afterok:777 " in icae["d2"] and "--dependency=afterok:778 " in icae["d3"]
    assert f"--dependency=afterok:{pretrain['d4']} " in icae["d4"]
    assert f"--dependency=afterok:{pretrain['d5']} " in icae["d5"]
    assert "enc-d1-500m_dec-d6-500m_data-d1: NOT submitted" in log
    assert "6 run(s) selected, 5 submitted, 1 refused" in log

    # fine-tuning runs: finished ones are skipped by the same rule, unfinished ones are not
    write_status(root / "icae_enc-d1-500m_dec-d1-500m_data-d1", "finished", 9, 9)
    write_status(root / "icae_enc-d1-500m_dec-d2-500m_data-d1", "finished", 4, 9)
    again = grid("--subset", "fig4", "--match", "dec-d[12]", env=s["env"])
    assert "enc-d1-500m_dec-d1-500m_data-d1: finished already" in again.stdout
    assert "enc-d1-500m_dec-d2-500m_data-d1: submitted job" in again.stdout


def test_a_failing_squeue_stops_the_grid(stand_in_slurm, tmp_path):
    executable(tmp_path / "bin" / "squeue", "#!/bin/bash\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
    proc = grid("--subset", "table5", env=stand_in_slurm["env"], check=False)
    assert proc.returncode == 1 and "squeue failed" in proc.stderr and "Unable to contact" in proc.stderr
    assert stand_in_slurm["submissions"]() == {}


# ---- the launchers: one wrapper for srun, signals, requeue and DRY_RUN -------------------------------------

LAUNCHERS = {  # script -> (its environment, the ccmega command, the world size of its #SBATCH defaults)
    "pretrain_d6_1b.sh": ({"DATA_ROOT": "/data/ccmega"}, "pretrain", 128),
    "icae_finetune.sh": ({"ENC": "/ckpt/pretrain_d1_500m", "DEC": "/ckpt/pretrain_d6_500m",
                          "DATA": "/data/ccmega/D1/finetune"}, "icae-train", 32),
}


def fake_env(tmp_path, **extra):
    return {"PYTHON": FAKE_PYTHON, "FAKE_REAL_PYTHON": sys.executable, "FAKE_LOG": str(tmp_path / "fake.jsonl"),
            "OUTPUT_ROOT": str(tmp_path / "runs"), **extra}


def fake_calls(tmp_path) -> list[dict]:
    path = tmp_path / "fake.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("script", sorted(LAUNCHERS))
def test_dry_run_is_one_process_at_the_jobs_world_size(script, tmp_path):
    """DRY_RUN=1 on a login node: no srun, no run dir; `--dry-run --world-size` = the #SBATCH layout
    (or NODES x GPUS_PER_NODE), and the command's exit code is the script's."""
    variables, command, world = LAUNCHERS[script]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "srun", f"#!/bin/bash\ntouch {tmp_path}/srun-called\nexit 99\n")
    path = f"{bin_dir}:{os.environ['PATH']}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}

    def launch(**extra):
        env = {**base, **fake_env(tmp_path, DRY_RUN="1", PATH=path, **variables, **extra)}
        return subprocess.run(["bash", os.path.join(REPO, "slurm", script)], env=env, capture_output=True,
                              text=True, timeout=60)

    proc = launch()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (call,) = fake_calls(tmp_path)
    assert call["argv"][0] == command and call["argv"][-3:] == ["--dry-run", "--world-size", str(world)]
    if command == "pretrain":  # the real preset and precision, not the CPU cluster's
        assert call["argv"][call["argv"].index("--preset") + 1] == "qwen3-1b" and "--fp8" in call["argv"]
    assert not (tmp_path / "srun-called").exists() and not (tmp_path / "runs").exists()
    assert launch(NODES="2", GPUS_PER_NODE="4").returncode == 0
    assert fake_calls(tmp_path)[-1]["argv"][-1] == "8"
    assert launch(FAKE_EXIT="5").returncode == 5


@pytest.fixture
def logging_srun(tmp_path):
    """A stand-in `srun` on PATH that records its arguments and what the tasks' environment would hold."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "srun", f"""#!/bin/bash
printf '%s\\n' "$@" > {tmp_path}/srun.args
echo "CCMEGA_DEVICE=$CCMEGA_DEVICE OMP_NUM_THREADS=$OMP_NUM_THREADS CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-unset}}" \\
    > {tmp_path}/srun.env
""")

    def launch(script, **extra):
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "CCMEGA_", "CPUS_PER_TASK", "GPU_BIND")) and k != "OMP_NUM_THREADS"}
        variables, _, _ = LAUNCHERS[script]
        env = {**base, **fake_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", **variables, **extra)}
        proc = subprocess.run(["bash", os.path.join(REPO, "slurm", script)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        args = (tmp_path / "srun.args").read_text().splitlines()
        return args[:args.index(FAKE_PYTHON)], (tmp_path / "srun.env").read_text().split()

    return launch


GPU_ALLOCATION = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_ON_NODE": "64"}


@pytest.mark.parametrize("script", sorted(LAUNCHERS))
def test_srun_gets_cpus_per_task_and_the_gpu_binding(script, logging_srun):
    """A GPU job's tasks get their share of the node's cores (and as many OpenMP threads), see every GPU of
    the node (ccmega picks cuda:SLURM_LOCALID) and are marked as a GPU job (no silent CPU fallback)."""
    flags, env = logging_srun(script, **GPU_ALLOCATION)
    assert flags == ["--nodes=2", "--ntasks-per-node=4", "--ntasks=8", "--cpus-per-task=16", "--gpu-bind=none",
                     "--distribution=block:block", "--kill-on-bad-exit=1"]
    assert env == ["CCMEGA_DEVICE=cuda", "OMP_NUM_THREADS=16", "CUDA_VISIBLE_DEVICES=unset"]

    flags, env = logging_srun(script, **GPU_ALLOCATION, SLURM_CPUS_PER_TASK="12", OMP_NUM_THREADS="3")
    assert "--cpus-per-task=12" in flags and "OMP_NUM_THREADS=3" in env
    flags, env = logging_srun(script, **GPU_ALLOCATION, SLURM_CPUS_PER_TASK="12", CPUS_PER_TASK="5",
                              GPU_BIND="single:1")
    assert "--cpus-per-task=5" in flags and "--gpu-bind=single:1" in flags and "OMP_NUM_THREADS=5" in env


@pytest.mark.parametrize("script", sorted(LAUNCHERS))
def test_a_cpu_cluster_job_keeps_its_environment_and_binds_no_gpu(script, logging_srun):
    flags, env = logging_srun(script, CCMEGA_CPU="1", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2",
                              SLURM_CPUS_ON_NODE="2")
    assert flags == ["--nodes=1", "--ntasks-per-node=2", "--ntasks=2", "--cpus-per-task=1", "--kill-on-bad-exit=1"]
    assert env == ["CCMEGA_DEVICE=cpu", "OMP_NUM_THREADS=1", "CUDA_VISIBLE_DEVICES="]


def submit(cluster, script, env, cwd, args):
    proc = subprocess.run(["sbatch", "--parsable", *args, script], env={**cluster.env, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait_for(condition, timeout, what, cluster):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{cluster.log_tails()}")


ONE_CPU_TASK = ["--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--time=10"]


@pytest.mark.cluster
@pytest.mark.parametrize("script", sorted(LAUNCHERS))
def test_usr1_checkpoints_and_requeues_on_a_real_cluster(slurm_cluster, script, tmp_path):  # noqa: F811
    """The signal SLURM sends before the time limit reaches the task through the batch shell and srun;
    the task's "interrupted" status makes the shell requeue the job, and the requeued job (restart 1)
    finishes the run."""
    variables, command, _ = LAUNCHERS[script]
    run_dir = tmp_path / "run"
    env = fake_env(tmp_path, CCMEGA_CPU="1", FAKE_WAIT_FOR_SIGNAL="1", RUN_DIR=str(run_dir), **variables)
    job = submit(slurm_cluster, os.path.join(REPO, "slurm", script), env, tmp_path, ONE_CPU_TASK)
    wait_for(lambda: (run_dir / "started").exists(), 120, "the task to start", slurm_cluster)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_cluster.env, check=True, timeout=30)
    wait_for(lambda: slurm_cluster.scontrol_show_job(job).get("Restarts") == "1", 60, "the requeue", slurm_cluster)
    # SLURM holds a requeued job back for 120 s (BeginTime); let it start now
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_cluster.env, check=True,
                   timeout=30)
    wait_for(lambda: job not in slurm_cluster.squeue() and (run_dir / "status.json").exists()
             and json.loads((run_dir / "status.json").read_text())["state"] == "finished", 300,
             "the requeued job to finish", slurm_cluster)
    output = "".join(p.read_text(errors="replace") for p in tmp_path.glob(f"slurm-*-{job}.out"))
    assert "got USR1: asking the tasks to checkpoint and stop" in output, output
    assert f"requeueing job {job}" in output and "restart 1" in output, output
    calls = fake_calls(tmp_path)
    assert [c["restart"] for c in calls] == [0, 1]
    assert calls[0]["argv"] == calls[1]["argv"] and calls[0]["argv"][0] == command
    assert calls[0]["cuda_visible_devices"] == "" and calls[0]["ntasks"] == "1"  # CCMEGA_CPU=1, srun's task


@pytest.mark.cluster
def test_a_gpu_job_on_a_node_without_gpus_fails_at_start_on_a_real_cluster(slurm_cluster, tmp_path):  # noqa: F811
    """The GPU branch's srun flags are accepted, and the tasks (the real `ccmega pretrain`, as a GPU job:
    CCMEGA_DEVICE=cuda) refuse to start on this GPU-less node with one line: no hang, no CPU run. The first
    task to exit makes srun end the other (--kill-on-bad-exit), so the job's code is 2 or srun's 143."""
    env = {"PYTHON": sys.executable, "FP8": "off", "PRESET": "qwen3-tiny", "DATA_ROOT": str(tmp_path / "data"),
           "OUTPUT_ROOT": str(tmp_path / "runs"), "PYTHONWARNINGS": "ignore"}
    rc, job = slurm_cluster.sbatch_wait(os.path.join(REPO, "slurm", "pretrain_d6_1b.sh"), env=env, cwd=tmp_path,
                                        args=["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0",
                                              "--time=5"], timeout=180)
    output = slurm_cluster.job_output(job) if job else slurm_cluster.last_sbatch_stderr
    assert rc in (2, 143), output
    errors = re.findall(r"^ccmega pretrain: error: rank (\d) \(local rank \1\) on node localhost sees no CUDA GPU "
                        r"in a GPU job \(CCMEGA_DEVICE=cuda\): CUDA_VISIBLE_DEVICES unset, ", output, re.M)
    assert errors and set(errors) <= {"0", "1"}, output
    assert "Traceback" not in output and f"srun exited with {rc}" in output
    assert not (tmp_path / "runs" / "pretrain_d6_1b" / "status.json").exists()  # refused before the run began


@pytest.mark.cluster
def test_grid_waits_for_a_requeued_pretraining_on_a_real_cluster(slurm_cluster, tmp_path):  # noqa: F811
    """LLM_D1 is interrupted and requeued (pending, with a checkpoint on disk), LLM_D2 finished, LLM_D6
    interrupted and not queued: the fine-tuning jobs wait (afterok) for the requeued job and for a newly
    submitted D6 job; only the finished D2 adds no dependency."""
    root = tmp_path / "runs"
    env = fake_env(tmp_path, CCMEGA_CPU="1", FAKE_WAIT_FOR_SIGNAL="1", DATA_ROOT=str(tmp_path / "data"))
    write_status(root / "pretrain_d1_500m", None, 0, 2)  # a checkpoint from an earlier start
    d1 = submit(slurm_cluster, os.path.join(REPO, "slurm", "pretrain_d1_500m.sh"), env, tmp_path, ONE_CPU_TASK)
    wait_for(lambda: (root / "pretrain_d1_500m" / "started").exists(), 120, "LLM_D1 to start", slurm_cluster)
    subprocess.run(["scancel", "--batch", "--signal=USR1", d1], env=slurm_cluster.env, check=True, timeout=30)
    wait_for(lambda: slurm_cluster.scontrol_show_job(d1).get("JobState") == "PENDING", 60, "the requeue",
             slurm_cluster)  # and pending for 120 s (BeginTime): requeued, not finished
    assert json.loads((root / "pretrain_d1_500m" / "status.json").read_text())["state"] == "interrupted"
    write_status(root / "pretrain_d2_500m", "finished", 2, 2)
    write_status(root / "pretrain_d6_500m", "interrupted", 1, 2)

    grid_env = {**slurm_cluster.env, **env, "SBATCH_ARGS": " ".join(ONE_CPU_TASK), "PRETRAIN_SBATCH_ARGS": "--hold",
                "ICAE_SBATCH_ARGS": "--hold"}
    proc = subprocess.run(["bash", GRID, "--subset", "table3", "--match", "enc-d1-500m_dec-d[26]"], env=grid_env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert f"pretrained d1-500m: job {d1} already queued (status: interrupted)" in log
    d6 = re.search(r"pretrained d6-500m: submitted job (\d+) \(status: interrupted\)", log).group(1)
    icae = dict(re.findall(r"enc-d1-500m_dec-(d[26])-500m_data-d1: submitted job (\d+)", log))
    assert sorted(icae) == ["d2", "d6"], log

    def after(job):
        return sorted(re.findall(r"afterok:(\d+)", slurm_cluster.scontrol_show_job(job).get("Dependency", "")))

    assert after(icae["d2"]) == [d1]
    assert after(icae["d6"]) == sorted([d1, d6])
    subprocess.run(["scancel", d1, d6, *icae.values()], env=slurm_cluster.env, check=True, timeout=30)
