"""Checkpoints of the distributed optimizer (`checkpoint.optimizer_format`), end to end on CPU ranks (gloo).

A bf16 `ccmega pretrain` run at DP=2 with the distributed optimizer saves "dp_reshardable" (each DP rank
writes only its shard). Checked: a SIGKILLed run resumes bitwise equal to the uninterrupted one; the
checkpoint resumes at DP=1; a resume at another TP/PP layout is refused with one message naming the
checkpoint, both layouts and the fix; following that fix (resume once with
`checkpoint.optimizer_format=fully_reshardable`) writes checkpoints that resume at PP=2.
"""
import os
import shutil

import pytest

from test_pretrain import finish, kill_job, records, run_ok, start, tiny_data, wait_for_step  # noqa: F401

STEPS, SAVE_EVERY = 12, 4
BF16_DISTOPT = ["--set", "precision.dtype=bf16", "--set", "train.distributed_optimizer=true"]


def args(data, run_dir, *extra):
    return ["--run-dir", str(run_dir), "--preset", "qwen3-tiny", "--data", data["prefix"],
            "--tokenizer", data["tokenizer"], "--seq-length", "64", "--steps", str(STEPS),
            "--global-batch-size", "8", "--micro-batch-size", "2", "--warmup-steps", "2", "--lr", "3e-3",
            "--save-interval", str(SAVE_EVERY), "--eval-interval", "0", "--set", "logging.tensorboard=false",
            "--set", "data.split=90,10,0", *BF16_DISTOPT, *extra]


def resume_copy(source_run: str, iteration: int, run_dir) -> str:
    """A new run dir whose `latest` is a copy of `source_run`'s checkpoint at `iteration`."""
    name = f"iter_{iteration:07d}"
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    shutil.copytree(os.path.join(source_run, "checkpoints", name), os.path.join(run_dir, "checkpoints", name))
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write(name + "\n")
    return os.path.join(run_dir, "checkpoints", name)


def losses(run_dir, steps):
    train = records(run_dir)
    return [train[s]["loss"] for s in steps]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):  # noqa: F811
    """One uninterrupted DP=2 bf16 run with the distributed optimizer (default format: dp_reshardable)."""
    run_dir = tmp_path_factory.mktemp("distopt_reference")
    run_ok(args(tiny_data, run_dir))
    return {"dir": str(run_dir), "train": records(run_dir)}


@pytest.mark.multirank
def test_sigkill_then_resume_is_bitwise(tiny_data, reference, tmp_path):  # noqa: F811
    from ccmega.training.checkpointing import read_checkpoint_metadata

    meta = read_checkpoint_metadata(reference["dir"])
    assert (meta["optimizer_format"], meta["data_parallel"]) == ("dp_reshardable", 2)
    # each DP rank wrote its own optimizer shard: megatron's bucket-space keys, not model-space ones
    from megatron.core import dist_checkpointing

    keys = set(dist_checkpointing.load_tensors_metadata(meta["path"]))
    assert any(".bucket_idx_" in k for k in keys) and not any(k.startswith("optimizer.state.") for k in keys)

    proc = start(args(tiny_data, tmp_path))
    wait_for_step(proc, tmp_path, SAVE_EVERY + 2)
    kill_job(proc)
    killed_at = max(records(tmp_path))
    latest = open(tmp_path / "checkpoints" / "latest").read().strip()
    assert killed_at < STEPS, "the run finished before it could be killed"
    out = run_ok(args(tiny_data, tmp_path))
    assert f"resumed from {tmp_path / 'checkpoints' / latest}" in out
    train = records(tmp_path)
    for step in range(1, STEPS + 1):  # bitwise: the same floats in the JSON
        assert (train[step]["loss"], train[step]["lr"], train[step]["grad_norm"]) == (
            reference["train"][step]["loss"], reference["train"][step]["lr"],
            reference["train"][step]["grad_norm"]), step


@pytest.mark.multirank
def test_dp_reshardable_resumes_at_another_dp_size(tiny_data, reference, tmp_path):  # noqa: F811
    resume_copy(reference["dir"], SAVE_EVERY, tmp_path)
    out = run_ok(args(tiny_data, tmp_path), nproc=1)  # DP=2 -> DP=1
    assert "layout changed" in out
    after = range(SAVE_EVERY + 1, STEPS + 1)
    ours, theirs = losses(tmp_path, after), losses(reference["dir"], after)
    print("DP=1 resume: max |loss - reference| =", max(abs(a - b) for a, b in zip(ours, theirs)))
    # bf16 weights; only the order of the DP gradient sum differs
    assert ours == pytest.approx(theirs, abs=5e-4, rel=0)


@pytest.mark.multirank
def test_tp_pp_change_is_refused_then_fully_reshardable_resumes_under_pp2(tiny_data, reference, tmp_path):  # noqa: F811
    # a dp_reshardable checkpoint at PP=2: one clear refusal, before any model is built
    refused = resume_copy(reference["dir"], SAVE_EVERY, tmp_path / "refused")
    rc, out = finish(start(args(tiny_data, tmp_path / "refused", "--pp", "2")))
    assert rc != 0 and "exitcode  : 2" in out, out[-3000:]  # the workers exit with EXIT_CONFIG
    message = next(line for line in out.splitlines() if "error: cannot resume" in line)
    print(message)
    for part in (refused, "at TP=1, PP=2, DP=1", "saved at TP=1, PP=1, DP=2", "dp_reshardable",
                 "--set checkpoint.optimizer_format=fully_reshardable"):
        assert part in message, (part, message)
    assert not records(tmp_path / "refused")

    # the fix: resume once at the old layout with fully_reshardable (here: checkpoints every 2 steps)
    fix = tmp_path / "fix"
    resume_copy(reference["dir"], SAVE_EVERY, fix)
    run_ok(args(tiny_data, fix, "--set", "checkpoint.optimizer_format=fully_reshardable", "--save-interval", "2"))
    after = range(SAVE_EVERY + 1, STEPS + 1)
    assert losses(fix, after) == losses(reference["dir"], after)  # same layout: bitwise
    from ccmega.training.checkpointing import read_checkpoint_metadata

    middle = SAVE_EVERY + 2
    assert read_checkpoint_metadata(str(fix / "checkpoints" / f"iter_{middle:07d}"))["optimizer_format"] == \
        "fully_reshardable"

    # ... whose checkpoint resumes at PP=2 (DP=1)
    moved = tmp_path / "pp2"
    resume_copy(str(fix), middle, moved)
    out = run_ok(args(tiny_data, moved, "--pp", "2"))
    assert "layout changed" in out
    after = range(middle + 1, STEPS + 1)
    ours, theirs = losses(moved, after), losses(reference["dir"], after)
    print("PP=2 resume: max |loss - reference| =", max(abs(a - b) for a, b in zip(ours, theirs)))
    assert ours == pytest.approx(theirs, abs=5e-4, rel=0)
    assert read_checkpoint_metadata(str(moved))["pipeline_parallel"] == 2


# ---- one process: the checks themselves ----------------------------------------------------------------

def test_check_layout_names_checkpoint_layouts_and_fix(megatron_world_of_one):
    from ccmega.config import ConfigError
    from ccmega.training.checkpointing import check_layout

    meta = {"path": "/runs/a/checkpoints/iter_0000100", "optimizer_format": "dp_reshardable",
            "tensor_parallel": 2, "pipeline_parallel": 1, "data_parallel": 4}
    with pytest.raises(ConfigError) as e:
        check_layout(meta)
    text = str(e.value)
    for part in ("/runs/a/checkpoints/iter_0000100", "at TP=1, PP=1, DP=1", "saved at TP=2, PP=1, DP=4",
                 "TP=2, PP=1 with --set checkpoint.optimizer_format=fully_reshardable"):
        assert part in text, (part, text)
    check_layout(dict(meta, tensor_parallel=1, data_parallel=8))  # another DP size only: fine
    check_layout(dict(meta, optimizer_format="fully_reshardable"))  # reshards anywhere
    check_layout(dict(meta, optimizer_format="plain"))
    check_layout({k: v for k, v in meta.items() if k != "optimizer_format"})  # older checkpoints


def test_plain_optimizer_cannot_read_a_dp_reshardable_state():
    from ccmega.config import ConfigError
    from ccmega.training.checkpointing import _format_to_load

    meta = {"path": "/runs/a/checkpoints/iter_0000100", "optimizer_format": "dp_reshardable"}
    with pytest.raises(ConfigError, match="train.distributed_optimizer=true"):
        _format_to_load(meta, object())
    assert _format_to_load(dict(meta, optimizer_format="plain"), object()) == "fully_reshardable"
    assert _format_to_load(meta, None) == "dp_reshardable"  # weights only: no optimizer state read


def test_unknown_optimizer_format_is_a_config_error(tmp_path):
    from ccmega.config import ConfigError
    from ccmega.training.checkpointer import Checkpointer
    from ccmega.training.sections import CheckpointSection

    with pytest.raises(ConfigError, match="checkpoint.optimizer_format must be one of dp_reshardable, "
                                          "fully_reshardable"):
        Checkpointer(str(tmp_path), CheckpointSection(optimizer_format="zero"), {}, {})
