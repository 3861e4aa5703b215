"""What of benchmarks/gpu_check.py a CPU can prove: the model config it builds on a GPU without Transformer
Engine is one megatron's local spec accepts, and its time boxes hold (a part that fails or hangs is
recorded, its whole process group killed, and the run goes on)."""
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
        "env": {"status": "ok", "seconds": 9, "result": {"gpu": "H200", "torch": "2.11", "megatron_core": "0.19.2"}},
        "mfu": {"status": "ok", "seconds": 80, "result": {
            "preset": "qwen3-1b", "seq_length": 8192, "dtype": "bfloat16", "tokens_per_s": 50000.0,
            "tflops_per_gpu": 400.0, "mfu": 0.4044, "peak_tflops": 989.0, "max_memory_gib": 60.5}},
        "latency": {"status": "timeout", "seconds": 150, "result": {"pairs": [
            {"encoder": "qwen3-200m", "decoder": "qwen3-500m", "rc": 0, "context_tokens": 4096, "memory_tokens": 1024,
             "compression_s": 0.0123, "generation_s": 1.5, "generated_tokens": 128}]}}}}
    md = gpu_check.markdown(report)
    assert "# ccmega GPU check (H200)" in md
    assert "| mfu | ok | 80 | qwen3-1b seq 8192 bfloat16: 50,000 tok/s, 400 TFLOP/s, MFU 40.4% of 989" in md
    assert "| latency | timeout | 150 | 1/1 pairs measured |" in md
    assert "| qwen3-200m | qwen3-500m | 4096 | 1024 | 0.0123 | 1.5000 (128) |" in md
