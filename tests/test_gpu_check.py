"""What of benchmarks/gpu_check.py a CPU can prove: the model config it builds on a GPU without Transformer
Engine is one megatron's local spec accepts; its time boxes hold (a part that fails or hangs is recorded,
its whole process group killed, and the run goes on); tests that skip are reported as skipped; and its
new parts run at toy sizes: bf16 pretraining with the distributed optimizer resumes bitwise equal to the
uninterrupted run and its checkpoint converts and verifies, and one ICAE step runs beside its memory
estimate."""
import importlib.util
import json
import os
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_config_builds_with_the_local_spec(megatron_world_of_one, monkeypatch):
    """On a GPU without TE the local spec's torch RMSNorm refused `persist_layer_norm` ("persist_layer_norm
    not supported by torch LayerNorm"): every GPU-check part would have stopped at its first model."""
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the config's GPU branch
    preset = model_preset("qwen3-tiny")
    config = transformer_config(preset, params_dtype=torch.bfloat16)
    assert config.bias_dropout_fusion and not config.use_cpu_initialization  # the GPU fields were taken
    model = build_model(preset, config, use_transformer_engine=False)
    assert isinstance(model.decoder.layers[0].input_layernorm, torch.nn.RMSNorm)


def test_a_hanging_command_is_killed_with_its_children(gpu_check, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "print('started', flush=True)\n"
              "time.sleep(120)\n")
    t0 = time.time()
    # a box long enough for a Python child to start and print on a loaded CI machine (3 s was not, once)
    rc, status = gpu_check.run_boxed([sys.executable, "-c", script], 15, str(tmp_path / "log"))
    assert (rc, status) == (None, "timeout") and time.time() - t0 < 60
    assert "started" in (tmp_path / "log").read_text()
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:  # reaped by init once killed
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(grandchild, 9)
        pytest.fail(f"the grandchild {grandchild} outlived the time box")


def test_a_failing_part_is_recorded_and_the_run_goes_on(gpu_check, tmp_path):
    with open(tmp_path / "all.log", "w") as log:
        failed = gpu_check.run_part("no_such_part", 60, time.time() + 60, str(tmp_path), False, log)
        late = gpu_check.run_part("env", 60, time.time() + 2, str(tmp_path), False, log)
    assert failed["status"] == "failed" and failed["rc"] != 0
    assert any("part_no_such_part" in line for line in failed["log_tail"]), failed["log_tail"]
    assert late == {"status": "skipped", "reason": "out of time (--budget-s)", "seconds": 0}


def test_report_files_name_every_part(gpu_check, tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.main(["--out", str(out), "--work", str(tmp_path / "work"), "--parts", "env,latency",
                         "--budget-s", "1"])
    assert rc == 1  # nothing ran: not a pass
    report = json.loads((out / "gpu_check.json").read_text())
    assert [(n, p["status"]) for n, p in report["parts"].items()] == [("env", "skipped"), ("latency", "skipped")]
    table = (out / "gpu_check.md").read_text()
    assert "| env | skipped |" in table and "| latency | skipped |" in table


def test_markdown_shows_the_measured_figures(gpu_check):
    report = {"cpu_smoke": False, "seconds": 400.0, "parts": {
        "env": {"status": "ok", "seconds": 9, "result": {"gpu": "H200", "torch": "2.11", "megatron_core": "0.19.2",
                                                         "transformer_engine": False}},
        "mfu": {"status": "ok", "seconds": 80, "result": {
            "preset": "qwen3-1b", "seq_length": 8192, "dtype": "bfloat16", "tokens_per_s": 50000.0,
            "tflops_per_gpu": 400.0, "mfu": 0.4044, "peak_tflops": 989.0, "max_memory_gib": 60.5,
            "lower_bound": "one GPU without Transformer Engine", "switches": {
                "use_distributed_optimizer": True, "overlap_grad_reduce": False, "cross_entropy_loss_fusion": True}}},
        "icae_step": {"status": "ok", "seconds": 40, "result": {
            "encoder": "qwen3-1b", "decoder": "qwen3-500m", "context_tokens": 512, "memory_slots": 128,
            "kernels": "local", "attempts": [
                {"micro_batch": 32, "oom": "CUDA out of memory", "estimated_gib": 123.0},
                {"micro_batch": 16, "step_s": 0.5, "measured_gib": 60.0, "estimated_gib": 70.0,
                 "measured_step_gib": 40.0, "estimated_step_gib": 45.0, "measured_over_estimated": 60 / 70}]}},
        "latency": {"status": "timeout", "seconds": 150, "result": {"pairs": [
            {"encoder": "qwen3-200m", "decoder": "qwen3-500m", "rc": 0, "context_tokens": 4096, "memory_tokens": 1024,
             "compression_s": 0.0123, "generation_s": 1.5, "generated_tokens": 128}]}}}}
    md = gpu_check.markdown(report)
    assert "# ccmega GPU check (H200)" in md
    assert "| mfu | ok | 80 | qwen3-1b seq 8192 bfloat16: 50,000 tok/s, 400 TFLOP/s, MFU 40.4% of 989" in md
    assert "| latency | timeout | 150 | 1/1 pairs measured |" in md
    assert "| qwen3-200m | qwen3-500m | 4096 | 1024 | 0.0123 | 1.5000 (128) |" in md
    assert "(a LOWER BOUND of the cluster's: one GPU without Transformer Engine)" in md
    assert "on: use_distributed_optimizer, cross_entropy_loss_fusion; off: overlap_grad_reduce, " \
           "overlap_param_gather, apply_rope_fusion, gradient_accumulation_fusion" in md
    assert "| icae_step | ok | 40 | micro-batch 32: out of memory (estimated 123.0 GiB); micro-batch 16: 60.00 GiB " \
           "measured / 70.00 estimated, step 0.5 s;" in md
    assert "| 32 | OOM | 123.00 | - | - / - | - |" in md
    assert "| 16 | 60.00 | 70.00 | 0.857 | 40.00 / 45.00 | 0.500 |" in md
    cannot = md[md.index("What this check cannot check"):]
    for item in ("Transformer Engine", "FP8", "multi-GPU", "TP / PP > 1", "multi-node"):
        assert item in cannot, item


PYTEST_SKIPS = """sss                                                                      [100%]
=========================== short test summary info ============================
SKIPPED [1] tests/test_gpu.py:19: could not import 'transformer_engine': No module named 'transformer_engine'
SKIPPED [2] tests/test_gpu.py:33: could not import 'transformer_engine': No module named 'transformer_engine'
3 skipped in 2.41s
"""


def test_gpu_tests_that_skip_are_reported_as_skipped(gpu_check):
    outcome = gpu_check.pytest_outcome(PYTEST_SKIPS, 0)
    assert outcome["status"] == "skipped" and outcome["counts"] == {"skipped": 3}
    assert outcome["skip_reasons"] == {"could not import 'transformer_engine': No module named 'transformer_engine'": 3}
    assert gpu_check.pytest_outcome("2 passed, 1 skipped in 9.0s\n", 0)["status"] == "ok"
    assert gpu_check.pytest_outcome("1 failed, 2 skipped in 9.0s\n", 1)["status"] == "failed"
    part = {"status": "skipped", "seconds": 5, "result": outcome}
    assert gpu_check.passed(part) and not gpu_check.passed({"status": "skipped", "reason": "out of time"})
    md = gpu_check.markdown({"cpu_smoke": False, "seconds": 5, "parts": {"gpu_tests": part}})
    assert "| gpu_tests | skipped | 5 | 3 skipped (skipped: 3 x could not import 'transformer_engine'" in md
    assert os.path.join("tests", "test_gpu.py") in gpu_check.gpu_test_files()


def test_resume_verdict(gpu_check):
    reference = {s: {"loss": 7.0 - s / 10, "lr": 1e-3 * s, "grad_norm": 1.5} for s in range(1, 5)}
    same = {s: dict(reference[s]) for s in (3, 4)}
    assert gpu_check.resume_verdict(same, reference, [3, 4], 0.0)["verdict"] == "bitwise equal (loss, lr, grad norm)"
    close = {s: {**reference[s], "loss": reference[s]["loss"] + 1e-4} for s in (3, 4)}
    assert not gpu_check.resume_verdict(close, reference, [3, 4], 0.0)["ok"]  # the CPU smoke wants bitwise
    verdict = gpu_check.resume_verdict(close, reference, [3, 4], 1e-2)
    assert verdict["ok"] and not verdict["bitwise"] and verdict["max_abs_loss_diff"] == pytest.approx(1e-4)
    other_lr = {s: {**reference[s], "lr": 0.5} for s in (3, 4)}
    assert not gpu_check.resume_verdict(other_lr, reference, [3, 4], 1e-2)["ok"]
    assert not gpu_check.resume_verdict({3: same[3]}, reference, [3, 4], 1e-2)["ok"]  # a step missing


def test_switches_are_read_off_the_setup(gpu_check, megatron_world_of_one):
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset
    from ccmega.training import engine

    preset = model_preset("qwen3-tiny")
    config = transformer_config(preset)
    seen = []
    with gpu_check.recording_setups(seen):
        engine.build_training_setup([build_model(preset, config)], config, lr=1e-3, use_distributed_optimizer=True)
    assert engine.build_training_setup.__name__ == "build_training_setup" and len(seen) == 1
    assert seen[0]["use_distributed_optimizer"] is True and seen[0]["overlap_grad_reduce"] is False
    assert any("Distributed" in name for name in seen[0]["optimizer"]), seen[0]


def test_cpu_smoke_of_the_resume_and_icae_parts(gpu_check, tmp_path):
    """The new parts at toy sizes, through the orchestrator: a CPU must resume bitwise."""
    out = tmp_path / "out"
    rc = gpu_check.main(["--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "work"),
                         "--parts", "icae_step,resume"])
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert rc == 0, {name: part.get("log_tail") for name, part in parts.items()}
    resume = parts["resume"]["result"]
    assert (resume["dtype"], resume["optimizer_format"]) == ("bf16", "dp_reshardable")
    assert resume["bitwise"] and resume["max_abs_loss_diff"] == 0 and resume["tolerance"] == 0.0
    assert resume["steps"] == [3, 4] and resume["resumed_from_step"] == 2
    assert resume["to_hf"]["greedy_agreement"] == 1.0
    icae = parts["icae_step"]["result"]
    (attempt,) = icae["attempts"]
    assert attempt["micro_batch"] == 2 and attempt["step_s"] > 0 and attempt["estimated_gib"] > 0
    assert "measured_gib" not in attempt  # no GPU: the peak RSS is not comparable
    assert icae["switches"]["grad_reduce_in_fp32"] is True
    md = (out / "gpu_check.md").read_text()
    assert "bitwise equal (loss, lr, grad norm)" in md and "What this check cannot check" in md
