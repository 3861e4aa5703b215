"""How a training run ends: status.json says so honestly, and no process the run started outlives it.

Real `ccmega pretrain` runs, each a process of its own (`python -m ccmega.cli`, one rank):
- a run whose first checkpoint save fails leaves status.json `failed` with the error's last line and exits
  non-zero; the demo reports such a stage as failed with that line, and the ICAE grid builds nothing on it.
  The save fails for real: the run gets a file-size limit (RLIMIT_FSIZE, which binds root too, as a full
  quota would), far above everything it writes before the save and far below a checkpoint shard, so
  megatron's shard writers fail and dist_checkpointing raises in the trainer;
- a run SIGKILLed during a save leaves nothing behind: megatron's forked shard writers (megatron-core
  0.16), the Manager it spawned and multiprocessing's resource tracker die with it
  (ccmega/runtime/lifetime.py).
"""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest

from icae_fixtures import make_split, make_tokenizer
from test_slurm_scripts import grid, stand_in_slurm, write_status  # noqa: F401 (stand_in_slurm: a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE_LIMIT = 256 * 1024  # bytes: a qwen3-tiny shard is ~1.4 MB; data cache, logs and config stay under 10 kB


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("run_end")
    return {"tok": make_tokenizer(d / "tok" / "tokenizer.json"),
            "prefix": make_split(d / "D1" / "pretrain", 256, 65, 1024)}


def pretrain_argv(data, run_dir, preset="qwen3-tiny", steps=4, save_interval=2):
    return [sys.executable, "-m", "ccmega.cli", "pretrain", "--run-dir", str(run_dir), "--preset", preset,
            "--data", data["prefix"], "--tokenizer", data["tok"], "--seq-length", "32", "--steps", str(steps),
            "--global-batch-size", "4", "--micro-batch-size", "4", "--warmup-steps", "1", "--lr", "1e-3",
            "--save-interval", str(save_interval), "--eval-interval", "0", "--set", "logging.tensorboard=false"]


def child_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


@pytest.fixture(scope="module")
def failed_run(data, tmp_path_factory):
    """A run that trains 2 steps and dies in its first checkpoint save: {"dir", "rc", "out", "status"}."""
    run_dir = tmp_path_factory.mktemp("failed") / "run"
    proc = subprocess.run(pretrain_argv(data, run_dir), cwd=REPO, env=child_env(), preexec_fn=limit_file_size,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    status_path = run_dir / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else None
    return {"dir": run_dir, "rc": proc.returncode, "out": proc.stdout, "status": status}


def test_a_run_that_dies_says_failed_with_its_error(failed_run):
    out, status = failed_run["out"], failed_run["status"]
    assert "step       2/4" in out, out[-4000:]  # it trained before the save failed
    assert failed_run["rc"] == 1, out[-4000:]  # the exception propagated
    assert "Traceback" in out and not (failed_run["dir"] / "checkpoints" / "latest").exists()
    print("status.json:", status)
    assert status["state"] == "failed", status
    assert (status["iteration"], status["steps"]) == (2, 4)
    last = [line for line in out.splitlines() if status["error"] in line]  # the traceback's last line
    assert status["error"] and last and last[-1].endswith(status["error"]), (status, out[-3000:])


def test_the_demo_reports_a_failed_stage_with_its_error(data, tmp_path, monkeypatch):
    from ccmega.demo import Stage, run_stages

    run_dir = tmp_path / "run"
    argv = [sys.executable, "-c", f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
            f"({FILE_LIMIT}, {FILE_LIMIT})); argv = {pretrain_argv(data, run_dir)!r}; os.execv(argv[0], argv)"]
    stage = Stage("pretrain X", argv, 1, str(run_dir))
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])  # the stage runs `python -m ccmega.cli`
    with pytest.raises(SystemExit) as stopped:
        run_stages(str(tmp_path), [stage], str(tmp_path / "logs"))
    status = json.loads((run_dir / "status.json").read_text())
    message = str(stopped.value)
    print(message[:600])
    assert status["state"] == "failed", (status, message[-3000:])
    assert re.search(r"\[1/1\] pretrain X failed \(exit 1\) after \d+ s: " + re.escape(status["error"]), message)
    assert not os.path.exists(stage.marker(str(tmp_path)))


def test_the_grid_builds_nothing_on_a_failed_run(failed_run, stand_in_slurm):  # noqa: F811
    """Table 5: encoder D1 500M, decoder pretrained on random text. The failed run's status.json stands for
    the random decoder's pretraining, then for the fine-tuning run itself."""
    root, s = stand_in_slurm["root"], stand_in_slurm
    error = failed_run["status"]["error"]
    write_status(root / "pretrain_d1_500m", "finished", 11, 11)
    failed_pretrain = root / "pretrain_random_500m"
    write_status(failed_pretrain, None, 0, 11)
    (failed_pretrain / "status.json").write_text((failed_run["dir"] / "status.json").read_text())

    proc = grid("--subset", "table5", env=s["env"], check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    assert f"pretrained random-500m: FAILED: {error} ({failed_pretrain}/status.json" in log, log
    assert "enc-d1-500m_dec-random-500m_data-d1: NOT submitted" in log
    assert s["submissions"]() == {}

    again = grid("--subset", "table5", "--retry-failed", env=s["env"])  # the cause is fixed: resubmit it
    assert "pretrained random-500m: submitted job 1001 (status: failed)" in again.stderr, again.stderr
    jobs = s["submissions"]()
    assert "RECIPE=random" in jobs["1001"] and "--dependency=afterok:1001 " in jobs["1002"]

    # a failed fine-tuning run: reported with its error and not resubmitted, until --retry-failed
    write_status(failed_pretrain, "finished", 11, 11)
    icae = root / "icae_enc-d1-500m_dec-random-500m_data-d1"
    write_status(icae, None, 0, 9)
    (icae / "status.json").write_text((failed_run["dir"] / "status.json").read_text())
    proc = grid("--subset", "table5", env=s["env"], check=False)
    assert proc.returncode == 1 and f"enc-d1-500m_dec-random-500m_data-d1: FAILED: {error}" in proc.stdout, proc.stdout
    assert sorted(s["submissions"]()) == ["1001", "1002"]
    again = grid("--subset", "table5", "--retry-failed", env=s["env"])
    assert "enc-d1-500m_dec-random-500m_data-d1: submitted job 1003" in again.stdout


def _describe(p) -> str:
    try:
        return f"{p.pid} ({p.status()}): {' '.join(p.cmdline())[:140]}"
    except Exception:
        return f"{p.pid} (gone)"


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a zombie is dead (nobody reaped it yet)
    except psutil.NoSuchProcess:
        return False


def shard_writers_are_processes() -> bool:
    """megatron-core 0.16 forks a process per shard writer at every torch_dist save; 0.19 writes from threads.
    Both spawn the Manager at the first save."""
    import inspect

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    method = getattr(FileSystemWriterAsync, "write_preloaded_data_multiproc", None)
    return method is not None and re.search(r"get_context\(['\"]fork['\"]\)", inspect.getsource(method)) is not None


def test_a_run_killed_mid_save_leaves_no_process_behind(data, tmp_path):
    """qwen3-mini saves every step; the trainer alone is SIGKILLed during a save (while a forked shard writer
    exists, where megatron forks them; else once a save has completed, with the Manager serving), and every
    process seen under it then must be gone within 15 s."""
    import psutil

    forked_writers = shard_writers_are_processes()
    argv = pretrain_argv(data, tmp_path / "run", preset="qwen3-mini", steps=200, save_interval=1)
    with open(tmp_path / "run.log", "w+") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        family = []
        try:
            trainer = psutil.Process(proc.pid)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    kids = trainer.children(recursive=True)
                    commands = [k.cmdline() for k in kids]
                except psutil.Error:  # a child came and went while we looked
                    continue
                # the Manager, once it runs (until its exec it has the trainer's command line, as the writers do)
                if any("spawn_main" in " ".join(c) for c in commands):
                    if forked_writers:
                        during_save = trainer.cmdline() in commands  # a shard writer: a copy of the trainer
                    else:  # no process marks a save: kill once the Manager is up and serving (a save is done)
                        during_save = "[ccmega] saved" in open(log.name).read()
                    if during_save:
                        family = kids
                        break
                time.sleep(0.002)
            if not family:
                log.seek(0)
                pytest.fail(f"no save seen (exit {proc.poll()}):\n{log.read()[-3000:]}")
            seen = [_describe(p) for p in family]
            proc.send_signal(signal.SIGKILL)  # the trainer only, not its children
            proc.wait()
            print("under the trainer during the save:\n  " + "\n  ".join(seen))
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(map(_alive, family)):
                time.sleep(0.1)
            left = [_describe(p) for p in family if _alive(p)]
            assert not left, "still alive 15 s after the trainer was killed:\n  " + "\n  ".join(left)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for p in family:  # leave nothing behind, whatever happened
                if _alive(p):
                    p.kill()
