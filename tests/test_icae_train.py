"""`ccmega icae-train` end to end on tiny presets: a real single-process run (encoder and decoder of
different sizes) whose loss falls, frozen decoder (bytes, parameters, optimizer), load_icae, exact
resume, TP=2 and DP=2 (distributed optimizer) equal to one process, refused configurations.
Gradients reaching encoder/slots/projector are asserted in tests/test_icae_model.py."""
import json
import re
import os
import shutil
import subprocess
import sys

import pytest
import torch

from icae_fixtures import make_pretrain_checkpoint, make_split, make_tokenizer
from launch import REPO, torchrun

K, L, MBS, STEPS, SAVE_AT = 8, 32, 8, 24, 12
COMMON = ["--memory-slots", K, "--context-tokens", L, "--lr", "3e-3", "--warmup-steps", 2,
          "--set", f"optim.lr_decay_steps={STEPS}", "--set", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, megatron_world_of_one):
    """Tokenizers A and B; encoder (qwen3-tiny), decoder (a different size) and a tokenizer-B decoder;
    fine-tune and test splits of L-token samples."""
    from ccmega.presets import model_preset

    d = tmp_path_factory.mktemp("icae")
    tok_a = make_tokenizer(d / "tok_a" / "tokenizer.json")
    tok_b = make_tokenizer(d / "tok_b" / "tokenizer.json", variant="b")
    enc = model_preset("qwen3-tiny")
    dec = enc.replace(name="tiny-dec-96", hidden_size=96, ffn_hidden_size=160, num_layers=3,
                      num_attention_heads=4, num_query_groups=2, head_dim=32)
    paths = {"dir": d, "enc": str(d / "enc"), "dec": str(d / "dec"), "dec_b": str(d / "dec_b"),
             "data": make_split(d / "data" / "finetune", 256, L, 1024, seed=0, tokenizer=tok_a),
             "valid": make_split(d / "data" / "test", 32, L, 1024, seed=1, tokenizer=tok_a)}
    make_pretrain_checkpoint(paths["enc"], enc, tok_a, seed=1)
    # a random (untrained) frozen decoder: a briefly trained one already predicts the unigram statistics
    # of this data, and the ICAE needs far more than a test's steps to beat that by reconstructing
    make_pretrain_checkpoint(paths["dec"], dec, tok_a, seed=2, train_steps=0)
    make_pretrain_checkpoint(paths["dec_b"], dec, tok_b, seed=3, train_steps=0)
    return paths


def args(inputs, run_dir, *extra):
    return ["--encoder", inputs["enc"], "--decoder", inputs["dec"], "--data", inputs["data"],
            "--run-dir", run_dir, *map(str, COMMON), *map(str, extra)]


def cli(*argv):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}  # set in-process
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "ccmega.cli", "icae-train", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc


def records(run_dir, kind="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(scope="module")
def full_run(inputs):
    """The reference: one process, STEPS steps, checkpoints at SAVE_AT and at the end, validation at the end."""
    from ccmega.models.icae_checkpoint import hash_checkpoint_files

    run_dir = str(inputs["dir"] / "run_full")
    dec_hash = hash_checkpoint_files(os.path.join(inputs["dec"], "checkpoints", "iter_0000001"))
    proc = cli(*args(inputs, run_dir, "--micro-batch-size", MBS, "--steps", STEPS, "--save-interval", SAVE_AT,
                     "--valid-data", inputs["valid"], "--eval-interval", STEPS, "--set", "logging.eval_iters=4"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"run_dir": run_dir, "stdout": proc.stdout, "decoder_hash_before": dec_hash}


def test_loss_falls_and_accuracy_is_logged(full_run):
    train = records(full_run["run_dir"])
    losses = [r["loss"] for r in train]
    assert len(losses) == STEPS
    valid = records(full_run["run_dir"], "valid")
    print(f"ICAE train loss (tiny enc h64 -> frozen dec h96, k={K}, L={L}): " + " ".join(f"{x:.3f}" for x in losses))
    print("validation (step, loss, token accuracy): " + ", ".join(
        f"({r['step']}, {r['loss']:.4f}, {r['token_accuracy']:.4f})" for r in valid))
    assert [r["step"] for r in valid] == [0, STEPS]  # before the first step, and at the end
    assert valid[1]["loss"] < valid[0]["loss"] - 0.1  # the same 32 samples, before and after
    assert sum(losses[-8:]) / 8 < sum(losses[:4]) / 4 - 0.05
    assert all(0.0 <= r["token_accuracy"] <= 1.0 for r in train)


def test_decoder_check_runs_every_interval_and_its_flops_count(full_run, inputs):
    """The collapse monitor's decoder forward runs at monitor.interval (20) and the last step, and the step's
    TFLOP/s counts it: FLOPs / step = the samples' training FLOPs + the check's forward (by hand, 6N + 12 L n d s
    per token for forward + backward, a third of it for a forward)."""
    from ccmega.presets import ModelPreset
    from ccmega.training.checkpointing import read_checkpoint_metadata

    train = {r["step"]: r for r in records(full_run["run_dir"])}
    assert [step for step, r in train.items() if "decoder_lm_loss" in r] == [20, STEPS]

    def fwd_bwd_per_token(preset, s):
        return 6 * preset.total_params() + 12 * preset.num_layers * preset.num_attention_heads * preset.head_dim * s

    enc, dec = (ModelPreset(**read_checkpoint_metadata(inputs[role])["model_preset"]) for role in ("enc", "dec"))
    sample = fwd_bwd_per_token(enc, L + K) * (L + K) + 2 / 3 * fwd_bwd_per_token(dec, K + 1 + L) * (K + 1 + L)
    check = fwd_bwd_per_token(dec, L) / 3 * L
    for step, r in train.items():
        flops = r["tflops_per_gpu"] * 1e12 * r["step_time_s"]  # one process
        expected = MBS * (sample + (check if step in (20, STEPS) else 0))
        assert flops == pytest.approx(expected, rel=1e-9), step


def test_token_accuracy_is_counted_without_a_host_sync():
    """The forward step's loss function adds the correct-token count on the device: on `meta` tensors, which
    have no values, any int()/item() per micro-batch would raise."""
    from ccmega.training.icae_train import ICAEForwardStep

    step = ICAEForwardStep()
    correct = torch.ones(2, L + 1, dtype=torch.bool, device="meta")
    model = lambda context: (torch.zeros(2, L + 1, device="meta"), correct)  # noqa: E731
    for _ in range(3):  # three micro-batches
        _, loss_func = step(iter([{"tokens": torch.zeros(2, L, dtype=torch.long)}]), model)
        loss_func(torch.zeros(2, L + 1, device="meta"))
    assert step.total == 3 * 2 * (L + 1) and step.correct.device.type == "meta"


def test_default_decoder_check_costs_at_most_two_percent():
    """For every encoder/decoder size pair of the paper (k 128, L 512), one check per monitor.interval steps."""
    from ccmega.presets import model_preset
    from ccmega.training.icae_monitor import MonitorSection
    from ccmega.training.icae_train import decoder_check_flops_per_sample, icae_flops_per_sample

    sizes = [model_preset(f"qwen3-{s}") for s in ("200m", "500m", "800m", "1b")]
    worst = max(decoder_check_flops_per_sample(d, 512) / icae_flops_per_sample(e, d, 128, 512)
                for e in sizes for d in sizes)
    assert 0.25 < worst < 0.35  # 200m encoder -> 1b decoder: a check costs 30% of a step
    assert worst / MonitorSection().interval <= 0.02


def test_decoder_frozen_bytes_untouched_and_not_in_checkpoint(full_run, inputs):
    from torch.distributed.checkpoint import FileSystemReader

    from ccmega.training.checkpointing import read_checkpoint_metadata
    from ccmega.models.icae_checkpoint import hash_checkpoint_files

    dec_iter = os.path.join(inputs["dec"], "checkpoints", "iter_0000001")
    assert hash_checkpoint_files(dec_iter) == full_run["decoder_hash_before"]
    meta = read_checkpoint_metadata(full_run["run_dir"])
    assert meta["iteration"] == STEPS
    assert meta["icae"]["decoder"]["checkpoint"] == dec_iter
    assert meta["icae"]["decoder"]["files_sha256"] == full_run["decoder_hash_before"]
    keys = FileSystemReader(meta["path"]).read_metadata().state_dict_metadata
    # the ICAE's decoder would appear as "decoder." (model) or "optimizer.state.<name>.decoder." (Adam state);
    # "encoder.decoder." is the encoder's own transformer block
    assert not [k for k in keys if k.startswith("decoder.") or ".exp_avg.decoder." in k or ".exp_avg_sq.decoder." in k]
    assert any(k.startswith("optimizer.state.exp_avg.memory_embeddings") for k in keys)
    assert {"memory_embeddings", "ae_embedding", "projector.weight", "projector.bias"} <= set(keys)


def test_load_icae_rebuilds_the_trained_model(full_run, inputs, megatron_world_of_one):
    """load_icae: the decoder's parameters hash as during training (never changed), and the rebuilt ICAE
    gives the validation loss the run logged."""
    from ccmega.training.checkpointing import read_checkpoint_metadata
    from ccmega.training.icae_data import ContextSamples
    from ccmega.models.icae_checkpoint import decoder_params_sha256, load_icae

    model = load_icae(full_run["run_dir"])
    meta = read_checkpoint_metadata(full_run["run_dir"])
    assert decoder_params_sha256(model.decoder) == meta["icae"]["decoder"]["params_sha256"]
    assert not model.training and not model.decoder.training
    samples = ContextSamples(inputs["valid"], L)
    with torch.no_grad():
        loss, _ = model(torch.stack([samples[i] for i in range(32)]))
    assert loss.mean().item() == pytest.approx(records(full_run["run_dir"], "valid")[-1]["loss"], abs=1e-5)

    other = str(inputs["dir"] / "dec_copy")
    shutil.copytree(inputs["dec"], other)
    with open(os.path.join(other, "checkpoints", "iter_0000001", "ccmega.json"), "a") as f:
        f.write(" ")  # any changed byte
    with pytest.raises(ValueError, match="differs from the one this ICAE was trained against"):
        load_icae(full_run["run_dir"], decoder_checkpoint=other)


def test_resume_is_exact(full_run, inputs):
    run_dir = inputs["dir"] / "run_resumed"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    name = f"iter_{SAVE_AT:07d}"
    shutil.copytree(os.path.join(full_run["run_dir"], "checkpoints", name), ckpts / name)
    (ckpts / "latest").write_text(name + "\n")
    proc = cli(*args(inputs, str(run_dir), "--micro-batch-size", MBS, "--steps", STEPS, "--save-interval", 0))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"resumed from {ckpts / name}" in proc.stdout
    resumed = records(str(run_dir))
    reference = records(full_run["run_dir"])[SAVE_AT:]
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # bit-exact
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]


# DP=2 runs plain megatron DDP (the distributed optimizer's save and resume: tests/test_bf16.py)
@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_parallel_layouts_match_one_process(layout, full_run, inputs, tmp_path):
    extra = {"tp2": ["--tp", 2, "--micro-batch-size", MBS],
             "dp2": ["--micro-batch-size", MBS // 2]}[layout]
    torchrun("-m", 2, "ccmega.cli", "icae-train",
             *args(inputs, str(tmp_path / "run"), "--steps", 3, "--save-interval", 0, *extra))
    ours = [r["loss"] for r in records(str(tmp_path / "run"))]
    reference = [r["loss"] for r in records(full_run["run_dir"])[:3]]
    print(f"{layout}: max |loss - reference| = {max(abs(a - b) for a, b in zip(ours, reference)):.2e}")
    assert ours == pytest.approx(reference, abs=1e-5, rel=0)


def _encoder_weights(checkpoint):
    """{name: tensor} of an encoder: from an ICAE checkpoint (its trained encoder) or a pretraining one."""
    from ccmega.models.icae_checkpoint import load_icae
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import ModelPreset
    from ccmega.training.checkpointing import load_model_weights, read_checkpoint_metadata

    meta = read_checkpoint_metadata(checkpoint)
    if "icae" in meta:
        return {k: v.clone() for k, v in load_icae(checkpoint).encoder.state_dict().items() if "_extra_state" not in k}
    preset = ModelPreset(**meta["model_preset"])
    model = build_model(preset, transformer_config(preset))
    load_model_weights(model, checkpoint)
    return {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


@pytest.mark.multirank
@pytest.mark.parametrize("tp", [1, 2])
def test_encoder_starts_from_its_checkpoint(tp, inputs, tmp_path, megatron_world_of_one):
    """One step at learning rate 0 leaves the ICAE's encoder exactly the pretraining checkpoint named by
    --encoder (a random encoder differed by ~5e-2), at TP=1 and TP=2."""
    run_dir = str(tmp_path / "lr0")
    argv = args(inputs, run_dir, "--micro-batch-size", MBS, "--steps", 1, "--save-interval", 0)
    argv[argv.index("--lr") + 1] = "0"
    argv[argv.index("--warmup-steps") + 1] = "0"
    argv += ["--set", "optim.min_lr=0", "--set", "optim.weight_decay=0"]
    if tp == 1:
        proc = cli(*argv)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    else:
        torchrun("-m", 2, "ccmega.cli", "icae-train", *argv, "--tp", 2, "--micro-batch-size", MBS)
    trained, pretrained = _encoder_weights(run_dir), _encoder_weights(inputs["enc"])
    assert trained.keys() == pretrained.keys()
    for name in pretrained:
        torch.testing.assert_close(trained[name], pretrained[name], rtol=0, atol=0, msg=name)


def test_the_encoder_flag_chooses_the_encoder(inputs, tmp_path, megatron_world_of_one):
    """Two ICAEs that differ only in --encoder end with different encoders, each near its own start."""
    from icae_fixtures import make_pretrain_checkpoint
    from ccmega.presets import model_preset

    other = str(inputs["dir"] / "enc_other")
    if not os.path.isdir(other):
        make_pretrain_checkpoint(other, model_preset("qwen3-tiny"), str(inputs["dir"] / "tok_a" / "tokenizer.json"),
                                 seed=11)
    runs = {}
    for name, encoder in (("a", inputs["enc"]), ("b", other)):
        run_dir = str(tmp_path / name)
        argv = args(inputs, run_dir, "--micro-batch-size", MBS, "--steps", 2, "--save-interval", 0)
        argv[argv.index("--encoder") + 1] = encoder
        proc = cli(*argv)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        runs[name] = (_encoder_weights(run_dir), _encoder_weights(encoder))
    (a, start_a), (b, start_b) = runs["a"], runs["b"]
    gap = max((a[n] - b[n]).abs().max().item() for n in a)
    drift = max(max((a[n] - start_a[n]).abs().max().item(), (b[n] - start_b[n]).abs().max().item()) for n in a)
    print(f"max |encoder a - encoder b| = {gap:.3e}; max drift from its own checkpoint = {drift:.3e}")
    assert gap > 10 * drift


def test_refused_configurations(inputs, capsys):
    from ccmega.training.icae_train import main

    base = ["--encoder", inputs["enc"], "--decoder", inputs["dec"], "--data", inputs["data"]]
    assert main([*base[:2], "--decoder", inputs["dec_b"], "--data", inputs["data"]]) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch between encoder and decoder" in err
    assert "enc/checkpoints/iter_0000001" in err and "dec_b/checkpoints/iter_0000001" in err
    assert "tok_a" in err and "tok_b" in err

    assert main([*base, "--pp", "2"]) == 2
    assert "does not support pipeline parallelism" in capsys.readouterr().err

    assert main(["--encoder", inputs["enc"], "--decoder", inputs["dec"]]) == 2
    assert "missing --data" in capsys.readouterr().err

    if not torch.cuda.is_available():  # the same FP8 availability check as pretraining
        assert main([*base, "--fp8", "hybrid", "--run-dir", str(inputs["dir"] / "fp8")]) == 2
        assert "needs NVIDIA Transformer Engine on a CUDA GPU" in capsys.readouterr().err


@pytest.mark.cluster
def test_grid_submits_pretraining_and_fine_tuning_with_dependencies(inputs, tmp_path):
    """slurm/icae_grid.sh on a local one-node cluster with CPU overrides: one Table 3 run (D1 encoder, D2
    decoder) -> two pretraining jobs, then the fine-tuning job after both (afterok); a second call finds
    everything done and submits nothing."""
    from slurm_cluster import LocalSlurmCluster, SlurmUnavailable

    data_root, out = tmp_path / "data", tmp_path / "runs"
    for recipe in ("D1", "D2"):
        make_split(data_root / recipe / "pretrain", 160, 65, 1024, seed=5)
    make_split(data_root / "D1" / "finetune", 32, L, 1024, seed=6)
    env = {"CCMEGA_CPU": "1", "PYTHON": sys.executable, "TOKENIZER": str(inputs["dir"] / "tok_a" / "tokenizer.json"),
           "DATA_ROOT": str(data_root), "OUTPUT_ROOT": str(out), "STEPS": "2", "EVAL_INTERVAL": "0",
           "MEMORY_SLOTS": str(K), "CONTEXT_TOKENS": str(L), "MICRO_BATCH_SIZE": "4", "CCMEGA_NO_REQUEUE": "1",
           "EXTRA_ARGS": "--warmup-steps 1 --set logging.tensorboard=false", "PYTHONWARNINGS": "ignore",
           "SBATCH_ARGS": "--nodes=1 --ntasks=1 --ntasks-per-node=1 --gpus-per-node=0 --time=15"}
    grid = [os.path.join(REPO, "slurm", "icae_grid.sh"), "--subset", "table3", "--match", "enc-d1-500m_dec-d2"]
    try:
        cluster = LocalSlurmCluster().start()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    env = {**{k: v for k, v in cluster.env.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}, **env}
    try:
        submit = subprocess.run(grid, env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        log = submit.stdout + submit.stderr
        pre = dict(re.findall(r"pretrained (d\d-500m): submitted job (\d+)", log))
        icae = re.search(r"enc-d1-500m_dec-d2-500m_data-d1: submitted job (\d+) after (\S+)", log)
        assert set(pre) == {"d1-500m", "d2-500m"} and icae, log
        assert sorted(icae.group(2).split(":")) == sorted(pre.values())
        waiter = tmp_path / "wait.sh"
        waiter.write_text("#!/bin/bash\ntrue\n")
        rc, _ = cluster.sbatch_wait(str(waiter), args=[f"--dependency=afterok:{icae.group(1)}",
                                                       "--kill-on-invalid-dep=yes"], cwd=str(tmp_path), timeout=600)
        outputs = "".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("slurm-*.out"))
        assert rc == 0, outputs + cluster.log_tails()
        run_dir = out / "icae_enc-d1-500m_dec-d2-500m_data-d1"
        assert (run_dir / "status.json").is_file(), outputs
        assert json.loads((run_dir / "status.json").read_text())["state"] == "finished", outputs
        with open(run_dir / "checkpoints" / "iter_0000002" / "ccmega.json") as f:
            icae_meta = json.load(f)["icae"]
        assert "/pretrain_d1_500m/" in icae_meta["encoder"]["checkpoint"]
        assert "/pretrain_d2_500m/" in icae_meta["decoder"]["checkpoint"]

        again = subprocess.run(grid, env=env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
        assert "finished already" in again.stdout and "0 submitted" in again.stdout, again.stdout + again.stderr
    finally:
        cluster.stop()


def test_icae_export_compresses_for_hugging_face(full_run, megatron_world_of_one, tmp_path):
    """`ccmega convert icae-export`: the exported HF compressor + decoder give the trained ICAE's losses."""
    from ccmega.convert.cli import icae_export
    from ccmega.convert.icae_hf import load_exported
    from ccmega.models.icae_checkpoint import load_icae

    out = tmp_path / "export"
    result = icae_export(full_run["run_dir"], str(out), verify=True)
    assert result["max_abs_loss_diff"] <= 1e-4
    assert {"icae.safetensors", "icae_config.json", "encoder", "decoder"} <= {p.name for p in out.iterdir()}
    exported = load_exported(str(out))  # plain transformers models underneath
    assert type(exported.encoder).__name__ == "Qwen3ForCausalLM" and exported.num_memory_slots == K
    context = torch.randint(3, 51, (2, L), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(exported(context)[0], load_icae(full_run["run_dir"])(context)[0], atol=1e-4, rtol=0)
