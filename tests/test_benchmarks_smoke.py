"""The CPU benchmarks with their same-run transformers references run end to end at toy sizes: one timed
step each, both in one subprocess (they start and stop their own process group; one interpreter pays the
~9 s of imports once). No timing is checked: the figures are only valid on a quiet machine."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = """
import sys
sys.path[:0] = ["benchmarks", "tests"]
import icae_train, pretrain_step
rc = pretrain_step.main(["--preset", "qwen3-tiny", "--seq-length", "16", "--micro-batch-size", "1", "--accumulation",
                         "2", "--warmup", "0", "--steps", "1", "--dtype", "bf16", "--json", sys.argv[1]])
print("ICAE BENCHMARK")
icae_train.main(["--memory-slots", "4", "--context-tokens", "8", "--batch", "2", "--warmup", "0", "--steps", "1",
                 "--dtype", "fp32"])
raise SystemExit(rc)
"""


def test_the_cpu_benchmarks_run_beside_their_references(tmp_path):
    out = tmp_path / "pretrain_step.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pretrain, icae = proc.stdout.split("ICAE BENCHMARK")

    result = json.loads(out.read_text())
    assert result["dtype"] == "bf16" and result["reference"]["mode"] == "bf16"
    assert result["ccmega_over_reference"] > 0 and result["tokens_per_s"] > 0 and "mfu" in result
    assert result["speed_switches"]["train.distributed_optimizer"] is False  # a CPU run: decided off
    # the same weights and the same tokens: the first losses agree to bf16 precision
    assert abs(result["losses"][0] - result["reference"]["losses"][0]) < 0.05, result
    assert "| transformers Qwen3ForCausalLM (bf16) |" in pretrain and "[ccmega] switch speed.overlap_grad_reduce" in pretrain

    assert "dtype fp32 (--dtype fp32)" in icae and "| transformers HFICAE |" in icae
    assert "speed-up ccmega / transformers:" in icae and "[ccmega] switch train.distributed_optimizer" in icae
