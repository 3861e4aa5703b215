"""ccmega/training/memory.py against hand-computed bytes for a small config, megatron's formula worked by
hand, and the checks that would fail on the cluster. (The real preset's per-rank parameters against a
meta-built model: tests/test_fake_cuda.py.)"""
import pytest

from ccmega.presets import model_preset
from ccmega.training.memory import GIB, Layout, icae_memory_report, memory_report

TINY = model_preset("qwen3-tiny")  # h 64, f 128, 4 layers, 4 heads, 2 query groups, head dim 16, vocab 1024


def test_tiny_at_tp2_pp2_by_hand():
    # world 4 = TP 2 x PP 2 x DP 1; micro-batch 2, seq 32 (s b = 64), global batch 8 -> 4 micro-batches
    report, text = memory_report(TINY, Layout(4, 2, 2), micro_batch=2, seq_length=32, global_batch=8)
    assert report.ok and report.num_microbatches == 4
    first, last = report.stages
    # per layer 37,024 params, 160 of them norms; embedding 1024 x 64 on stage 0 and (tied copy) on stage 1
    # stage 0: (2 x 36,864 + 65,536) / 2 + 2 x 160 = 69,952; stage 1: + final norm 64 = 70,016
    assert (first.params, last.params) == (69_952, 70_016)
    # bf16 weights 2 B, fp32 grads 4 B, AdamW 12 B per parameter (no distributed optimizer)
    assert (first.weights, first.gradients, first.optimizer) == (139_904, 279_808, 839_424)
    # one layer: 4 x 2 x 64 x 64 = 32,768 replicated + (2 x 64 x (3x64 + 3x32 + 3x128) + 4 x 64 x 4) / 2 = 43,520
    # stage 0: (2 x 76,288 + 8 x 64 token ids) x 2 in flight (1F1B: PP - 0 = 2 <= 4 micro-batches) = 306,176
    assert first.in_flight == 2 and first.activations == 306_176
    # stage 1: 2 x 76,288 + final-norm/output inputs 2 x 2 x 64 x 64 + fp32 softmax 4 x 64 x 1024 / 2; 1 in flight
    assert last.in_flight == 1 and last.activations == 152_576 + 16_384 + 131_072
    assert report.peak is first and first.total == 1_565_312
    assert "most loaded stage 0 of 2" in text and "checks: all passed" in text


def test_megatron_formula_by_hand():
    report, text = memory_report(TINY, Layout(4, 2, 2), micro_batch=2, seq_length=32, global_batch=8)
    # its layer: 2 h (1.5 f + 1) + 2 h d (a + g) = 24,704 + 12,288 = 36,992; block 4 x 36,992 + 64 = 148,032
    # most loaded shard (148,032 / 2 + 64 x 1024) / 2 = 69,776 params x 18 bytes
    assert report.megatron.weights_and_optimizer == 69_776 * 18
    # s b h (10 + 24 / 2) x 4 layers + 8 s b PP + s b h PP, x min(1, 4 / 2), x 1.05
    assert report.megatron.activations == round((4096 * 22 * 4 + 8 * 64 * 2 + 4096 * 2) * 1.05)
    assert "megatron report_theoretical_memory" in text


def test_distributed_optimizer_shards_only_the_optimizer_state():
    plain, _ = memory_report(TINY, Layout(8, 2, 1), 2, 32)
    sharded, _ = memory_report(TINY, Layout(8, 2, 1), 2, 32, distributed_optimizer=True)
    p = plain.peak.params
    assert sharded.peak.optimizer == -(-p * 12 // 4)  # 4 data-parallel ranks
    assert (sharded.peak.weights, sharded.peak.gradients) == (plain.peak.weights, plain.peak.gradients)
    assert sharded.megatron.weights_and_optimizer < plain.megatron.weights_and_optimizer
    fp32, _ = memory_report(TINY, Layout(8, 2, 1), 2, 32, dtype="fp32")
    assert (fp32.peak.weights, fp32.peak.optimizer) == (4 * p, 8 * p)  # fp32: no separate main params


def test_cluster_checks():
    report, text = memory_report(model_preset("qwen3-1b"), Layout(128, 3, 2), micro_batch=2, seq_length=9000,
                                 global_batch=500)
    assert not report.ok and report.stages == ()
    for expected in ("not divisible by TP 3 x PP 2", "16 attention heads do not split over TP=3",
                     "8 query groups", "global batch 500", "sequence 9000 exceeds the 8192 positions"):
        assert any(expected in p for p in report.problems), expected
    assert "151,936 -> 151,968" in text  # padded at TP=3
    tight, text = memory_report(model_preset("qwen3-1b"), Layout(8), 4, 8192, gpu_memory_gib=40)
    assert tight.peak.total > 40 * GIB and "more than the 40 GiB budget" in text
    with pytest.raises(ValueError, match="dtype"):
        memory_report(TINY, Layout(1), 1, 8, dtype="fp16")


def test_pretraining_job_of_the_paper():
    """slurm/pretrain_d6_1b.sh's job: 128 GPUs, micro-batch 1 x 4 accumulation x 128 DP = 512 x 8192."""
    report, text = memory_report(model_preset("qwen3-1b"), Layout(128), 1, 8192, distributed_optimizer=True,
                                 global_batch=512)
    assert report.ok and report.num_microbatches == 4 and report.peak.params == 1_026_191_872
    assert "4,194,304 tokens per step" in text


def test_icae_pair():
    enc, dec = model_preset("qwen3-tiny"), model_preset("qwen3-toy")  # h 64 -> h 128
    report, text = icae_memory_report(enc, dec, Layout(2), micro_batch=2, context_tokens=8, memory_slots=4)
    (stage,) = report.stages
    trainable = enc.total_params() + 4 * 64 + 128 + 64 * 128 + 128  # memory slots, [AE], projector + bias
    assert stage.gradients == 4 * trainable and stage.optimizer == 12 * trainable
    assert stage.weights == 2 * (trainable + dec.total_params())  # the frozen decoder: weights only
    assert "frozen decoder" in text
    bad, _ = icae_memory_report(enc, dec, Layout(4, 1, 2), 2, 8, 4)
    assert any("pipeline parallelism" in p for p in bad.problems)


def test_estimate_against_what_autograd_keeps_on_the_cpu(megatron_world_of_one):
    """The bytes megatron's local spec actually saves for backward (unique storages, parameters aside) in one
    fp32 forward on the CPU. That path keeps more than the fused kernels the formula counts (torch's unfused
    RMSNorm saves its normalised input too, the SwiGLU its sigmoid): measured 1.55x here. The formula must
    stay below it, and not far."""
    import torch

    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.training.memory import layer_activation_bytes, output_activation_bytes

    preset = TINY.replace(vocab_size=512)
    model = build_model(preset, transformer_config(preset))
    s, b = 64, 2
    tokens = torch.randint(0, 512, (b, s), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(s).expand(b, s), None, labels=tokens)
    measured = sum(saved.values())
    estimate = (preset.num_layers * layer_activation_bytes(preset, 1, b, s, "fp32") + 8 * s * b
                + output_activation_bytes(preset, 1, b, s, "fp32"))
    assert estimate == 2_237_440  # 4 x 477,184 per layer + 1,024 token ids + 65,536 + 262,144 (fp32 softmax)
    assert estimate <= measured <= 1.7 * estimate, (estimate, measured)


@pytest.mark.parametrize("dtype, slots, context, micro_batches", [("bf16", 64, 256, [1, 2]), ("fp32", 32, 128, [4])])
def test_icae_estimate_within_15_percent_of_the_measured_peak(dtype, slots, context, micro_batches):
    """benchmarks/icae_memory.py: real ICAE training steps of the paper's smallest size (qwen3-200m ->
    qwen3-200m, its real vocabulary; L and k cut to fit CI's time), each step's measured peak RSS growth
    against icae_step_bytes for megatron's local spec. In bf16 micro-batch 1 peaks at the embedding's
    gradient, 2 at the logits; fp32 has no logits copy."""
    import subprocess
    import sys

    repo = __file__.rsplit("/tests/", 1)[0]
    cmd = [sys.executable, f"{repo}/benchmarks/icae_memory.py", "--memory-slots", str(slots), "--context-tokens",
           str(context), "--dtype", dtype, "--micro-batches", *map(str, micro_batches)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=repo,
                          env={**__import__("os").environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": repo})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    print(proc.stdout)
    rows = [line.strip("|").split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "GiB" not in line]
    assert [int(r[0]) for r in rows] == micro_batches
    for micro_batch, measured, estimate, ratio in rows:
        assert 0.85 <= float(estimate) / float(measured) <= 1.15, (micro_batch, measured, estimate)


def test_every_paper_pair_fits_80_gb_at_the_launcher_defaults():
    """slurm/icae_finetune.sh's defaults (32 GPUs, Table 7's 32 per GPU as micro-batch 16 x 2, plain optimizer,
    bf16) fit an 80 GiB GPU for every encoder/decoder size pair of the paper's tables by the validated estimate;
    32 at once would not, and the refusal names the micro-batch that fits."""
    from ccmega.evaluation.paper_results import PAPER_SIZE_OF_PRESET, paper_rows

    preset_of = {size: name for name, size in PAPER_SIZE_OF_PRESET.items()}
    pairs = {(preset_of[r.encoder_size], preset_of[r.decoder_size]) for r in paper_rows()}
    assert ("qwen3-1b", "qwen3-500m") in pairs and len(pairs) == 7
    for enc, dec in sorted(pairs):
        report, text = icae_memory_report(model_preset(enc), model_preset(dec), Layout(32), 16, 512, 128,
                                          global_batch=1024)
        assert report.ok and report.num_microbatches == 2, text
    too_big, text = icae_memory_report(model_preset("qwen3-1b"), model_preset("qwen3-500m"), Layout(32), 32, 512, 128,
                                       global_batch=1024)
    assert not too_big.ok and "fits as micro-batch 16 x 2 accumulation" in text
