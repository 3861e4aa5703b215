"""`--dry-run`: the real 128-GPU pretraining job and an ICAE grid entry, built for one rank at their real
sizes on this CPU (meta tensors, fake NCCL-rule process group) and stepped once; layouts megatron would
refuse are reported, not crashed on."""
import os
import re
import subprocess
import sys

from launch import REPO


def run(*argv, env=None):
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID")}
    proc = subprocess.run(list(argv), cwd=REPO, env={**base, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                                                     "PYTHON": sys.executable, **(env or {})},
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_the_paper_job_script_dry_runs_at_its_real_size(tmp_path):
    rc, out = run("bash", "slurm/pretrain_d6_1b.sh", env={"DRY_RUN": "1", "DATA_ROOT": str(tmp_path / "data"),
                                                          "OUTPUT_ROOT": str(tmp_path / "runs")})
    assert rc == 0, out[-4000:]
    assert "--dry-run --world-size 128" in out and "rank 0 of 128 (TP 1 x PP 1 x DP 128)" in out
    assert "built 1,026,191,872 parameters (bfloat16) and ran one step of 4 micro-batch(es) x 1 x 8192 positions" in out
    assert "not checked here: FP8 is not simulated: the model is built in bf16" in out
    assert "global batch 512 (4,194,304 tokens per step at 8192)" in out
    assert "megatron report_theoretical_memory" in out and "dry run passed" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_pretrain_dry_run_of_a_pipeline_stage_matches_ccmega_info(tmp_path):
    rc, out = run(sys.executable, "-m", "ccmega.cli", "pretrain", "--preset", "qwen3-1b", "--data",
                  str(tmp_path / "D6" / "pretrain"), "--tp", "2", "--pp", "2", "--steps", "100", "--warmup-steps", "10",
                  "--dry-run", "--world-size", "128", "--rank", "127")
    assert rc == 0, out[-4000:]
    built = int(re.search(r"built ([\d,]+) parameters", out).group(1).replace(",", ""))
    _, info = run(sys.executable, "-m", "ccmega.cli", "info", "--preset", "qwen3-1b", "--tp", "2", "--pp", "2")
    assert "rank 127 (stage 1)" in out and f"{built:,}" in info, info
    assert "16 micro-batch(es)" in out  # 512 / (1 x 32 DP)


def test_layouts_the_cluster_would_refuse_are_reported(tmp_path):
    rc, out = run(sys.executable, "-m", "ccmega.cli", "pretrain", "--preset", "qwen3-1b", "--data",
                  str(tmp_path / "x"), "--tp", "3", "--steps", "100", "--warmup-steps", "10", "--global-batch-size",
                  "500", "--dry-run", "--world-size", "96")
    assert rc == 1, out[-4000:]
    assert "WOULD FAIL" in out and "attention heads do not split over TP=3" in out
    assert "global batch 500 is not micro-batch 1 x accumulation x DP 32" in out
    assert "dry run FAILED" in out

    rc, out = run(sys.executable, "-m", "ccmega.cli", "pretrain", "--preset", "qwen3-1b", "--data",
                  str(tmp_path / "x"), "--steps", "100", "--warmup-steps", "10", "--micro-batch-size", "8",
                  "--global-batch-size", "512", "--dry-run", "--world-size", "64")
    assert rc == 1 and "more than the 80 GiB budget" in out, out[-4000:]


def test_an_icae_grid_entry_dry_runs_at_its_real_size(tmp_path):
    """Table 3's LLM_D1 -> LLM_D6 run as the grid submits it (500M/500M, k=128, L=512, 32 GPUs), before
    either LM exists: the presets stand in for the checkpoints."""
    rc, out = run("bash", "slurm/icae_finetune.sh", env={
        "DRY_RUN": "1", "ENC": str(tmp_path / "pretrain_d1_500m"), "DEC": str(tmp_path / "pretrain_d6_500m"),
        "DATA": str(tmp_path / "D1" / "finetune"), "ENC_PRESET": "qwen3-500m", "DEC_PRESET": "qwen3-500m",
        "OUTPUT_ROOT": str(tmp_path / "runs")})
    assert rc == 0, out[-4000:]
    assert "rank 0 of 32 (TP 1 x PP 1 x DP 32)" in out
    # Table 7: 32 per device as 2 micro-batches of 16 (32 at once would not fit 80 GB), L + 1 positions
    assert "ran one step of 2 micro-batch(es) x 16 x 513 positions" in out
    assert "global batch 1024" in out and "checks: all passed" in out
    assert "ICAE qwen3-500m -> frozen qwen3-500m (k=128, L=512)" in out and "dry run passed" in out
    assert "encoder checkpoint" in out and "not checked here" in out
    assert not (tmp_path / "runs").exists()
