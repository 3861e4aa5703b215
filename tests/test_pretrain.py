"""`ccmega pretrain` end to end on 2 CPU ranks (gloo) with qwen3-tiny on the bundled sample's text.

One uninterrupted reference run (DP=2) is compared with: a run SIGKILLed mid-way and resumed (bitwise
equal losses and learning rates), a run stopped by SIGTERM (checkpoint, exit 0) and resumed under
PP=2 (equal up to float reordering), and `sbatch --wait slurm/pretrain_d6_1b.sh` on a local SLURM
cluster. Test data: a 1024-piece SentencePiece model and megatron's IndexedDatasetBuilder over
the bundled sample's validation and test shards (ccmega/resources/sample_pile).
"""
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ccmega.data import sample_data_dir
from slurm_cluster import slurm_cluster  # noqa: F401 (session fixture; skips where SLURM is missing)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY, EVAL_EVERY = 16, 4, 8


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """{"prefix", "tokenizer", "root"}: DATA_ROOT/D6/pretrain.{bin,idx} tokenised by a tiny SentencePiece."""
    import numpy as np
    import sentencepiece as spm
    import torch
    import zstandard
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("pretrain_data")
    docs = []
    for name in ("val.jsonl.zst", "test.jsonl.zst"):  # the bundled sample: no ../shared needed
        with open(sample_data_dir() / name, "rb") as f:
            docs += [json.loads(line)["text"] for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f))]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(d[:20000] for d in docs), model_prefix=str(root / "spm"), vocab_size=1024,
        model_type="bpe", byte_fallback=True, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, minloglevel=2,
        num_threads=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    (root / "D6").mkdir()
    prefix = str(root / "D6" / "pretrain")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        ids = sp.encode(doc) + [sp.eos_id()]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")
    return {"prefix": prefix, "tokenizer": str(root / "spm.model"), "root": str(root)}


def pretrain_args(data, run_dir, *extra):
    return ["--run-dir", str(run_dir), "--preset", "qwen3-tiny", "--data", data["prefix"],
            "--tokenizer", data["tokenizer"], "--seq-length", "64", "--steps", str(STEPS),
            "--global-batch-size", "8", "--micro-batch-size", "2", "--warmup-steps", "2", "--lr", "3e-3",
            "--save-interval", str(SAVE_EVERY), "--eval-interval", str(EVAL_EVERY),
            "--set", "logging.eval_iters=1", "--set", "data.split=90,10,0", *extra]


def start(args, nproc=2):
    """torchrun in its own session (so the test can kill the whole job); output to RUN_DIR/../<name>.log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ccmega.cli", "pretrain", *args]
    run_dir = args[args.index("--run-dir") + 1]
    log = open(f"{run_dir}.{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def finish(proc, timeout=300):
    proc.wait(timeout=timeout)
    return proc.returncode, output(proc)


def run_ok(args, nproc=2):
    rc, out = finish(start(args, nproc))
    assert rc == 0, out[-6000:]
    return out


def records(run_dir, kind="train"):
    """{step: record}, the last record of each step (a resumed run repeats the steps after its checkpoint)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    result = {}
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # half a line written when a run was killed
                continue
            if r["kind"] == kind:
                result[r["step"]] = r
    return result


def wait_for_step(proc, run_dir, step, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(records(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{output(proc)[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} after {timeout} s")


def kill_job(proc):
    """SIGKILL torchrun and every process under it (the workers run in sessions of their own)."""
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait()


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    out = run_ok(pretrain_args(tiny_data, run_dir))
    return {"dir": str(run_dir), "train": records(run_dir), "valid": records(run_dir, "valid"), "out": out}


@pytest.mark.multirank
def test_loss_falls_and_everything_is_logged(reference):
    from ccmega.training.checkpointing import read_checkpoint_metadata

    train = reference["train"]
    assert sorted(train) == list(range(1, STEPS + 1))
    losses = [train[s]["loss"] for s in sorted(train)]
    print("reference losses:", " ".join(f"{x:.4f}" for x in losses))
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3, losses
    for r in train.values():
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu", "consumed_samples"):
            assert math.isfinite(r[key]), (key, r)
        assert not r["skipped"]
    assert train[STEPS]["consumed_samples"] == STEPS * 8
    assert train[1]["lr"] == 0.0 and train[3]["lr"] == pytest.approx(3e-3)  # warmup 2, then cosine
    assert train[STEPS]["lr"] < train[3]["lr"]
    assert sorted(reference["valid"]) == [EVAL_EVERY, STEPS]
    assert "validation loss" in reference["out"] and "MFU" in reference["out"]
    assert os.listdir(os.path.join(reference["dir"], "tensorboard"))

    # the checkpoint layout other commands rely on
    ckpt = os.path.join(reference["dir"], "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "iter_0000008", "iter_0000012", "iter_0000016", "latest"]
    assert open(os.path.join(ckpt, "latest")).read().strip() == "iter_0000016"
    for where in (reference["dir"], ckpt, os.path.join(ckpt, "iter_0000016")):
        meta = read_checkpoint_metadata(where)
        assert meta["path"] == os.path.join(ckpt, "iter_0000016")
    assert meta["format"] == "ccmega-gpt-v1" and meta["iteration"] == STEPS and meta["consumed_samples"] == STEPS * 8
    assert meta["model_preset"]["name"] == "qwen3-tiny" and meta["model_preset"]["hidden_size"] == 64
    assert (meta["tensor_parallel"], meta["pipeline_parallel"]) == (1, 1)
    assert set(meta["tokenizer"]) >= {"path", "identity"}
    assert json.load(open(os.path.join(reference["dir"], "status.json")))["state"] == "finished"


@pytest.mark.multirank
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_data, reference, tmp_path):
    proc = start(pretrain_args(tiny_data, tmp_path))
    wait_for_step(proc, tmp_path, SAVE_EVERY + 2)
    kill_job(proc)
    killed_at = max(records(tmp_path))
    latest = open(tmp_path / "checkpoints" / "latest").read().strip()
    assert killed_at < STEPS, "the run finished before it could be killed"
    out = run_ok(pretrain_args(tiny_data, tmp_path))
    resumed_from = int(latest.split("_")[1])
    assert f"resumed from {tmp_path / 'checkpoints' / latest}" in out
    train = records(tmp_path)
    print(f"killed after step {killed_at}; resumed from {latest}")
    for step in range(1, STEPS + 1):  # bitwise: the same floats in the JSON
        assert (train[step]["loss"], train[step]["lr"], train[step]["consumed_samples"]) == (
            reference["train"][step]["loss"], reference["train"][step]["lr"],
            reference["train"][step]["consumed_samples"]), step
    assert records(tmp_path, "valid")[STEPS]["loss"] == reference["valid"][STEPS]["loss"]
    assert resumed_from < killed_at


@pytest.mark.multirank
def test_sigterm_checkpoints_and_exits_then_resumes_under_pp2(tiny_data, reference, tmp_path):
    import psutil

    proc = start(pretrain_args(tiny_data, tmp_path))
    wait_for_step(proc, tmp_path, 2)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "ccmega.cli" in " ".join(p.cmdline())]
    assert len(workers) == 2, workers
    for w in workers:  # as SLURM does: every task gets the signal
        w.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 0, out[-4000:]
    status = json.load(open(tmp_path / "status.json"))
    assert status["state"] == "interrupted" and 2 <= status["iteration"] < STEPS, (status, out[-3000:])
    assert "got SIGTERM" in out
    stopped = status["iteration"]
    assert open(tmp_path / "checkpoints" / "latest").read().strip() == f"iter_{stopped:07d}"

    # resume under another layout: PP=2 (tied embedding split across stages), TP=1, DP=1
    out = run_ok(pretrain_args(tiny_data, tmp_path, "--pp", "2"))
    assert "layout changed" in out
    train = records(tmp_path)
    for step in range(1, STEPS + 1):
        assert train[step]["loss"] == pytest.approx(reference["train"][step]["loss"], rel=1e-5), step
        assert train[step]["lr"] == pytest.approx(reference["train"][step]["lr"], rel=1e-12), step
    from ccmega.training.checkpointing import read_checkpoint_metadata

    assert read_checkpoint_metadata(str(tmp_path))["pipeline_parallel"] == 2


@pytest.mark.multirank
def test_load_model_weights_any_layout(reference, megatron_world_of_one):
    """One process (TP=PP=1) reads the weights a DP=2 run saved; they differ from a fresh init."""
    import torch

    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset
    from ccmega.training.checkpointing import load_model_weights

    preset = model_preset("qwen3-tiny")
    model = build_model(preset, transformer_config(preset))
    before = model.embedding.word_embeddings.weight.detach().clone()
    meta = load_model_weights(model, reference["dir"])
    assert meta["iteration"] == STEPS
    assert not torch.equal(before, model.embedding.word_embeddings.weight)


def test_non_finite_loss_skips_the_update(megatron_world_of_one):
    import torch

    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset
    from ccmega.training.engine import build_training_setup, gpt_forward_step, train_step
    from ccmega.training.loop import SkipCounter

    preset = model_preset("qwen3-tiny")
    config = transformer_config(preset)
    setup = build_training_setup([build_model(preset, config)], config, lr=1e-2)

    def nan_forward(data_iterator, model):
        output, loss_func = gpt_forward_step(data_iterator, model)
        return output * float("nan"), loss_func

    tokens = torch.randint(0, 32, (2, 17))
    batch = [{"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16)}]
    params = [p.detach().clone() for p in setup.model[0].parameters()]
    result = train_step(setup, iter(batch), 1, 16, 2, forward_step=nan_forward, skip_non_finite_loss=True)
    assert not result.update_successful and math.isnan(result.loss)
    assert all(torch.equal(a, b) for a, b in zip(params, setup.model[0].parameters()))
    result = train_step(setup, iter(batch), 1, 16, 2, skip_non_finite_loss=True)  # a good step still trains
    assert result.update_successful and math.isfinite(result.loss)
    assert not all(torch.equal(a, b) for a, b in zip(params, setup.model[0].parameters()))

    skips = SkipCounter(limit=3)
    for ok in (False, False, True, False, False):
        skips.update(ok)
    assert (skips.total, skips.in_a_row, skips.exceeded) == (4, 2, False)
    skips.update(False)
    assert skips.exceeded


def test_fp8_is_refused_without_transformer_engine(tiny_data, tmp_path, capsys):
    import torch

    from ccmega.models.qwen3 import transformer_engine_available
    from ccmega.training.pretrain import main

    if transformer_engine_available():
        pytest.skip("Transformer Engine and CUDA are present: FP8 is allowed here")
    rc = main(pretrain_args(tiny_data, tmp_path, "--fp8", "hybrid"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "Transformer Engine" in err and f"CUDA available: {torch.cuda.is_available()}" in err


@pytest.mark.cluster
def test_sbatch_pretrain_d6_1b_on_a_cpu_cluster(slurm_cluster, tiny_data, tmp_path):  # noqa: F811
    env = {"CCMEGA_CPU": "1", "STEPS": "4", "SAVE_INTERVAL": "2", "EVAL_INTERVAL": "2", "DATA_ROOT": tiny_data["root"],
           "TOKENIZER": tiny_data["tokenizer"], "OUTPUT_ROOT": str(tmp_path), "PYTHON": sys.executable,
           "PYTHONWARNINGS": "ignore", "EXTRA_ARGS": "--warmup-steps 1 --set logging.eval_iters=1 --set data.split=90,10,0"}
    t0 = time.monotonic()
    rc, job_id = slurm_cluster.sbatch_wait(os.path.join(REPO, "slurm", "pretrain_d6_1b.sh"), env=env,
                                           args=["--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                                                 "--gpus-per-node=0", "--time=10"], timeout=600)
    log = slurm_cluster.job_output(job_id) if job_id else slurm_cluster.last_sbatch_stderr
    print(f"sbatch job {job_id}: rc {rc} in {time.monotonic() - t0:.0f} s")
    assert rc == 0, log[-6000:]
    run_dir = tmp_path / "pretrain_d6_1b"
    assert "D6 qwen3-tiny on 1 node(s) x 2 task(s)" in log
    assert "TP 1 x PP 1 x DP 2" in log and "step       4/4" in log and "validation loss" in log
    assert open(run_dir / "checkpoints" / "latest").read().strip() == "iter_0000004"
    meta = json.load(open(run_dir / "checkpoints" / "iter_0000004" / "ccmega.json"))
    assert meta["iteration"] == 4 and meta["model_preset"]["name"] == "qwen3-tiny"
    assert sorted(records(run_dir)) == [1, 2, 3, 4]
    shutil.rmtree(run_dir / "data_cache")
