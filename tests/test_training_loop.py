"""The one training loop and its checkpointer, driven through `ccmega pretrain` in this process (one rank):
resume checks (schedule, tokenizer, data), a deliberate schedule change, retention, config history,
a preset read from `checkpoint.init_from`, and one warmup rule for every task."""
import json
import os

import pytest
import torch

from icae_fixtures import make_pretrain_checkpoint, make_split, make_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop")
    return {"dir": d,
            "tok": make_tokenizer(d / "tok" / "tokenizer.json"),
            "tok_b": make_tokenizer(d / "tok_b" / "tokenizer.json", variant="b"),
            "train": make_split(d / "D1" / "pretrain", 64, 2 * SEQ + 1, 1024, seed=0),
            "other": make_split(d / "D2" / "pretrain", 64, 2 * SEQ + 1, 1024, seed=1)}


def pretrain(data, run_dir, *extra, steps=4):
    from ccmega.training.pretrain import main

    argv = ["--run-dir", str(run_dir), "--preset", "qwen3-tiny", "--data", data["train"], "--tokenizer", data["tok"],
            "--seq-length", SEQ, "--steps", steps, "--global-batch-size", 4, "--micro-batch-size", 4,
            "--warmup-steps", 1, "--lr", "1e-3", "--save-interval", 2, "--eval-interval", 0,
            "--set", "logging.tensorboard=false", *extra]
    return main([str(a) for a in argv])


def train_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["kind"] == "train"}


def test_changed_steps_are_refused_then_rebuilt_when_allowed(data, tmp_path, capsys, megatron_world_of_one):
    run = tmp_path / "run"
    assert pretrain(data, run) == 0
    capsys.readouterr()
    assert pretrain(data, run, steps=6) == 2
    err = capsys.readouterr().err
    assert "train.steps was 4 and is now 6" in err and "--set checkpoint.allow_changes=train.steps" in err

    assert pretrain(data, run, "--set", "checkpoint.allow_changes=[train.steps,optim.lr_decay_steps]", steps=6) == 0
    assert "resuming with a deliberate change of train.steps: 4 -> 6" in capsys.readouterr().out
    reference = tmp_path / "reference"
    assert pretrain(data, reference, steps=6) == 0
    resumed, straight = train_records(run), train_records(reference)
    # the learning rates of steps 5-6 follow the new 6-step schedule (the old one had decayed to min_lr at 4)
    assert [resumed[s]["lr"] for s in (5, 6)] == [straight[s]["lr"] for s in (5, 6)]
    assert resumed[5]["lr"] > 2e-4


def test_changed_tokenizer_or_data_is_refused(data, tmp_path, capsys, megatron_world_of_one):
    run = tmp_path / "run"
    assert pretrain(data, run) == 0
    capsys.readouterr()
    from ccmega.training.pretrain import main

    argv = lambda *changes: [str(a) for a in ["--run-dir", run, "--preset", "qwen3-tiny", "--data", data["train"],
                                             "--tokenizer", data["tok"], "--seq-length", SEQ, "--steps", 4,
                                             "--global-batch-size", 4, "--micro-batch-size", 4, "--warmup-steps", 1,
                                             "--lr", "1e-3", "--eval-interval", 0, *changes]]
    assert main(argv("--tokenizer", data["tok_b"])) == 2
    assert "refusing to resume" in (err := capsys.readouterr().err) and "data.tokenizer was" in err
    assert main(argv("--data", data["other"])) == 2
    err = capsys.readouterr().err
    assert "data.paths was" in err and "data.fingerprint was" in err
    # the same prefix with other contents: caught by the fingerprint alone
    make_split(data["dir"] / "D1b" / "pretrain", 64, 2 * SEQ + 1, 1024, seed=7)
    for ext in (".bin", ".idx"):
        os.replace(str(data["dir"] / "D1b" / "pretrain") + ext, data["train"] + ext)
    assert main(argv()) == 2
    err = capsys.readouterr().err
    assert "data.fingerprint was" in err and "data.paths" not in err


def test_keep_last_keeps_milestones_and_latest(data, tmp_path, megatron_world_of_one):
    run = tmp_path / "run"
    assert pretrain(data, run, "--save-interval", 1, "--set", "checkpoint.keep_last=2",
                    "--set", "checkpoint.milestone_interval=3", steps=6) == 0
    kept = sorted(p for p in os.listdir(run / "checkpoints") if p.startswith("iter_"))
    assert kept == ["iter_0000003", "iter_0000005", "iter_0000006"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


def test_each_start_keeps_its_config_and_the_first_is_never_overwritten(data, tmp_path, megatron_world_of_one):
    run = tmp_path / "run"
    assert pretrain(data, run) == 0
    first = (run / "config.yaml").read_text()
    assert pretrain(data, run, "--set", "checkpoint.allow_changes=[train.steps,optim.lr_decay_steps]", steps=5) == 0
    assert (run / "config.yaml").read_text() == first and "steps: 4" in first
    starts = sorted(os.listdir(run / "configs"))
    assert starts == ["start_000.yaml", "start_001.yaml"]
    assert "steps: 5" in (run / "configs" / "start_001.yaml").read_text()


def test_init_from_builds_the_checkpoints_architecture(data, tmp_path, capsys, megatron_world_of_one):
    """A converted model matches no registered preset: `checkpoint.init_from` supplies it."""
    from ccmega.presets import model_preset
    from ccmega.training.checkpointing import read_checkpoint_metadata
    from ccmega.training.pretrain import main

    custom = model_preset("qwen3-tiny").replace(name="hf-converted", hidden_size=96, ffn_hidden_size=160,
                                                num_layers=3, num_attention_heads=4, num_query_groups=2, head_dim=32)
    init = tmp_path / "init"
    make_pretrain_checkpoint(init, custom, data["tok"], seed=3, train_steps=0)
    run = tmp_path / "run"
    base = ["--run-dir", run, "--data", data["train"], "--tokenizer", data["tok"], "--seq-length", SEQ, "--steps", 1,
            "--global-batch-size", 4, "--micro-batch-size", 4, "--warmup-steps", 0, "--lr", 0, "--eval-interval", 0,
            "--set", "optim.min_lr=0", "--set", f"checkpoint.init_from={init}", "--set", "logging.tensorboard=false"]
    assert main([str(a) for a in base + ["--preset", "qwen3-tiny"]]) == 2
    assert "differs from the architecture of checkpoint.init_from" in capsys.readouterr().err
    assert main([str(a) for a in base]) == 0
    meta = read_checkpoint_metadata(str(run))
    assert meta["model_preset"]["name"] == "hf-converted" and meta["model_preset"]["hidden_size"] == 96

    from torch.distributed.checkpoint import FileSystemReader

    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.training.checkpointing import load_model_weights

    models = []
    for path in (init, run):
        model = build_model(custom, transformer_config(custom))
        load_model_weights(model, str(path))
        models.append(model.state_dict())
    for name, value in models[0].items():
        if "_extra_state" not in name:
            torch.testing.assert_close(models[1][name], value, rtol=0, atol=0)
    assert FileSystemReader(meta["path"]).read_metadata()  # a complete dist checkpoint


@pytest.mark.parametrize("command", ["pretrain", "icae-train"])
def test_one_warmup_rule(command, data, tmp_path, capsys, megatron_world_of_one):
    """A warmup that does not end before the decay is the same error in both commands."""
    if command == "pretrain":
        rc = pretrain(data, tmp_path / "run", "--warmup-steps", 4)
    else:
        from ccmega.presets import model_preset
        from ccmega.training.icae_train import main

        lm = tmp_path / "lm"
        make_pretrain_checkpoint(lm, model_preset("qwen3-tiny"), data["tok"], seed=1, train_steps=0)
        split = make_split(tmp_path / "finetune", 16, 16, 1024, seed=2)
        rc = main([str(a) for a in ["--encoder", lm, "--decoder", lm, "--data", split, "--memory-slots", 4,
                                    "--context-tokens", 16, "--micro-batch-size", 4, "--steps", 4,
                                    "--warmup-steps", 4, "--run-dir", tmp_path / "icae"]])
    assert rc == 2
    assert "optim.warmup_steps=4 must be below the decay steps (4" in capsys.readouterr().err
