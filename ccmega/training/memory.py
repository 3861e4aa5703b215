"""Per-GPU memory of a training job before it runs, and the checks that would fail on the cluster.

For one rank of the most loaded pipeline stage (all bytes):

    weights      P x e                       P: this rank's parameters (`ccmega info --tp --pp` counts)
    gradients    P x 4                       megatron DDP's grad buffer (grad_reduce_in_fp32)
    optimizer    P x 12 / D   (bf16)         AdamW: fp32 main params + 2 fp32 moments
                 P x 8 / D    (fp32)         2 moments (the fp32 model params are the main params)
                                             D: data-parallel size with the distributed optimizer, else 1
    activations  min(PP - stage, m) micro-batches in flight (1F1B), each holding, per layer,
                 4 e s b h                                   the two RMSNorm inputs, QKV and FC1 inputs
                 + e s b (3 a d + 3 g d + 3 f) / t           QKV output (q, k, v), q and k after norm and
                                                             RoPE, attention output, FC1 output (gate and
                                                             up), SwiGLU output
                 + 4 s b a / t                               attention log-sum-exp (flash / SDPA)
                 + 8 s b on the first stage                  token ids
                 + 2 e s b h + 4 s b V / t on the last       final norm and output-layer inputs, fp32
                                                             softmax of the cross entropy

e: bytes per element of the dtype; s: sequence, b: micro-batch, h: hidden, a: heads, g: query groups,
d: head dim, f: FFN hidden, V: padded vocabulary, t: TP, m: micro-batches per step. It counts what
fused kernels (Transformer Engine, flash attention) keep for the backward pass, with no recompute,
no sequence parallelism and no dropout (Qwen3 trains without); megatron's local spec on a CPU keeps
more (unfused RMSNorm and SwiGLU). Not counted: the CUDA context, NCCL buffers, allocator
fragmentation and transient tensors (the bf16 logits before their fp32 copy).

Beside it: Megatron-LM's `report_theoretical_memory` (megatron/training/theoretical_memory_usage.py),
re-derived for the same config: 18 bytes per parameter of the most loaded shard (6 + 12 / DP with the
distributed optimizer), and without sequence parallelism s b h (10 + 24 / t) per layer for all layers,
8 s b PP token ids + s b h PP embedding dropout, x min(1, m / PP) when PP > 1, the logits
2 (s b V / t + s b h) when PP = 1, and 5 % on top. Its parameter count leaves out the QK-norms.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ccmega.models.info import stage_counts
from ccmega.presets import ModelPreset, padded_vocab_size

GIB = 1024 ** 3
ELEMENT_BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZER_BYTES = {"bf16": 12, "fp32": 8}  # per parameter, before sharding over DP
DEFAULT_GPU_MEMORY_GIB = 80.0  # H800
KERNELS = ("te", "local")  # Transformer Engine's fused kernels; megatron's local spec on torch ops


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)


@dataclass(frozen=True)
class StageMemory:
    stage: int
    params: int  # this rank's (one TP shard of the stage)
    weights: int  # bytes
    gradients: int
    optimizer: int
    activations: int
    in_flight: int  # micro-batches whose activations the stage holds at once
    transients: int = 0  # short-lived tensors at the step's peak, beside the kept activations

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transients


@dataclass(frozen=True)
class MegatronFormula:
    weights_and_optimizer: int  # bytes
    activations: int

    @property
    def total(self) -> int:
        return self.weights_and_optimizer + self.activations


@dataclass(frozen=True)
class MemoryReport:
    preset: str
    layout: Layout
    micro_batch: int
    seq_length: int
    num_microbatches: int  # gradient accumulation: micro-batches per step on each DP rank
    global_batch: int
    dtype: str
    distributed_optimizer: bool
    gpu_memory: int  # bytes
    stages: tuple[StageMemory, ...]  # empty when the layout cannot be built
    megatron: MegatronFormula | None
    problems: tuple[str, ...]  # what would fail on the cluster
    notes: tuple[str, ...] = field(default=())

    @property
    def peak(self) -> StageMemory | None:
        return max(self.stages, key=lambda s: s.total) if self.stages else None

    @property
    def ok(self) -> bool:
        return not self.problems


# ---- the pieces -------------------------------------------------------------------------------------------

def layer_activation_bytes(p: ModelPreset, tp: int, micro_batch: int, seq: int, dtype: str, kernels: str = "te",
                           trainable: bool = True) -> int:
    """Activations one transformer layer keeps for the backward pass, for one micro-batch. "te": the fused
    kernels' formula above (frozen layers counted as trainable ones: an upper bound). "local": megatron's local
    spec on torch ops, as measured by autograd's saved-tensor hooks in bf16 (see LOCAL_SPEC below)."""
    e, sb = ELEMENT_BYTES[dtype], seq * micro_batch
    a, g, d, f, h = p.num_attention_heads, p.num_query_groups, p.head_dim, p.ffn_hidden_size, p.hidden_size
    if kernels == "te":
        return 4 * e * sb * h + (e * sb * (3 * a * d + 3 * g * d + 3 * f) + 4 * sb * a) // tp
    if kernels != "local":
        raise ValueError(f"kernels must be one of {KERNELS}, not {kernels!r}")
    a, g, f = a // tp, g // tp, f // tp
    norm = 8 if trainable else 4  # torch's RMSNorm works in fp32: fp32 input, + fp32 output if its weight trains
    per_token = (2 * (norm * h + 4)  # input and pre-MLP RMSNorm (+ the fp32 inverse RMS)
                 + norm * (a + g) * d + 4 * (a + g)  # QK-norms, one per head
                 + e * (3 * a * d + 3 * g * d) + 4 * a  # attention: q, k, v, output, log-sum-exp
                 + 4 * e * f  # SwiGLU: FC1 output (gate and up) and two products
                 + (e * (2 * h + f) if trainable else 0))  # inputs of QKV, FC1 and FC2 (weight gradients)
    return sb * per_token + 4 * e * d * seq  # RoPE's cos and sin, per position


def output_activation_bytes(p: ModelPreset, tp: int, micro_batch: int, seq: int, dtype: str) -> int:
    """Final norm and output-layer inputs and the fp32 softmax of the vocab-parallel cross entropy."""
    sb = seq * micro_batch
    return 2 * ELEMENT_BYTES[dtype] * sb * p.hidden_size + 4 * sb * padded_vocab_size(p.vocab_size, tp) // tp


def state_bytes(params: int, dtype: str, dp: int, distributed_optimizer: bool) -> tuple[int, int, int]:
    """(weights, fp32 gradients, AdamW state) of `params` trainable parameters on one rank."""
    shards = dp if distributed_optimizer else 1
    return params * ELEMENT_BYTES[dtype], params * 4, math.ceil(params * OPTIMIZER_BYTES[dtype] / shards)


def megatron_formula(p: ModelPreset, layout: Layout, micro_batch: int, seq: int, num_microbatches: int,
                     distributed_optimizer: bool) -> MegatronFormula:
    """Megatron-LM's report_theoretical_memory for this config (no SP, no recompute, no MoE/MTP)."""
    h, t, pp, dp = p.hidden_size, layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    vocab = padded_vocab_size(p.vocab_size, t)
    attention = 2 * h * p.head_dim * (p.num_attention_heads + p.num_query_groups)
    layer = 2 * h * (p.ffn_hidden_size * 3 / 2 + 1) + attention  # RMSNorm: one vector; no QK-norm
    block = layer * p.num_layers + h
    embedding = h * vocab
    shard = (block / pp + embedding) / t
    if not p.tie_word_embeddings and pp == 1:
        shard += embedding / t
    per_param = 6 + 12 / dp if distributed_optimizer else 18
    sbh = seq * micro_batch * h
    activations = sbh * (10 + 24 / t) * p.num_layers + 8 * seq * micro_batch * pp + sbh * pp
    if pp > 1:
        activations *= min(1, num_microbatches / pp)
    else:
        activations += 2 * (seq * micro_batch * vocab / t + sbh)
    return MegatronFormula(weights_and_optimizer=round(shard * per_param), activations=round(activations * 1.05))


def layout_problems(p: ModelPreset, layout: Layout, micro_batch: int, global_batch: int, seq: int) -> list[str]:
    """What megatron (or the launcher) would refuse on the cluster for this preset and layout."""
    t, pp = layout.tensor_parallel, layout.pipeline_parallel
    problems = []
    if min(layout.world_size, t, pp, micro_batch, global_batch) < 1:
        return [f"sizes must be positive: world {layout.world_size}, TP {t}, PP {pp}, micro-batch {micro_batch}, "
                f"global batch {global_batch}"]
    if layout.world_size % (t * pp):
        problems.append(f"world size {layout.world_size} is not divisible by TP {t} x PP {pp}")
    if p.num_attention_heads % t:
        problems.append(f"{p.num_attention_heads} attention heads do not split over TP={t}")
    if p.num_query_groups % t:
        problems.append(f"{p.num_query_groups} query groups (KV heads) do not split over TP={t}")
    if p.num_layers % pp:
        problems.append(f"{p.num_layers} layers do not split evenly over PP={pp} stages")
    dp = layout.data_parallel
    if dp and global_batch % (micro_batch * dp):
        problems.append(f"global batch {global_batch} is not micro-batch {micro_batch} x accumulation x DP {dp}")
    if seq > p.max_position_embeddings:
        problems.append(f"sequence {seq} exceeds the {p.max_position_embeddings} positions of {p.name}")
    return problems


def _vocab_note(p: ModelPreset, tp: int) -> list[str]:
    padded = padded_vocab_size(p.vocab_size, tp)
    return [f"vocabulary padded {p.vocab_size:,} -> {padded:,} rows at TP={tp} (export strips them)"] \
        if padded != p.vocab_size else []


# ---- pretraining ------------------------------------------------------------------------------------------

def memory_report(preset: ModelPreset, layout: Layout, micro_batch: int, seq_length: int,
                  distributed_optimizer: bool = False, dtype: str = "bf16",
                  gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
                  global_batch: int | None = None) -> tuple[MemoryReport, str]:
    """The memory of one pretraining rank (every pipeline stage; the peak is the report's) and the cluster
    checks, as (report, text). global_batch None: one micro-batch per DP rank (no accumulation)."""
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"dtype must be one of {sorted(ELEMENT_BYTES)}, not {dtype!r}")
    dp = layout.data_parallel
    global_batch = global_batch or micro_batch * max(dp, 1)
    problems = layout_problems(preset, layout, micro_batch, global_batch, seq_length)
    num_microbatches = global_batch // (micro_batch * dp) if not problems else 0
    stages, megatron = (), None
    if not problems:
        t, pp = layout.tensor_parallel, layout.pipeline_parallel
        per_layer = layer_activation_bytes(preset, t, micro_batch, seq_length, dtype)
        built = []
        for s in stage_counts(preset, t, pp):
            one = len(s.layers) * per_layer
            if s.stage == 0:
                one += 8 * seq_length * micro_batch  # token ids
            if s.stage == pp - 1:
                one += output_activation_bytes(preset, t, micro_batch, seq_length, dtype)
            in_flight = min(pp - s.stage, num_microbatches)
            weights, grads, optimizer = state_bytes(s.params_per_tp_rank, dtype, dp, distributed_optimizer)
            built.append(StageMemory(s.stage, s.params_per_tp_rank, weights, grads, optimizer, one * in_flight,
                                     in_flight))
        stages = tuple(built)
        megatron = megatron_formula(preset, layout, micro_batch, seq_length, num_microbatches, distributed_optimizer)
    notes = _vocab_note(preset, layout.tensor_parallel)
    if stages and num_microbatches < layout.pipeline_parallel:
        notes.append(f"{num_microbatches} micro-batch(es) per step for {layout.pipeline_parallel} pipeline stages: "
                     "most stages idle most of the step (raise the accumulation)")
    report = _finish(MemoryReport(preset.name, layout, micro_batch, seq_length, num_microbatches, global_batch, dtype,
                                  distributed_optimizer, round(gpu_memory_gib * GIB), stages, megatron,
                                  tuple(problems), tuple(notes)))
    return report, describe(report)


# ---- ICAE ------------------------------------------------------------------------------------------------

def icae_trainable_extra(encoder: ModelPreset, decoder: ModelPreset, memory_slots: int) -> int:
    """The ICAE's own parameters (replicated on every rank): memory slots, [AE], projector with bias."""
    enc_h, dec_h = encoder.hidden_size, decoder.hidden_size
    return memory_slots * enc_h + dec_h + enc_h * dec_h + dec_h


def icae_step_bytes(encoder: ModelPreset, decoder: ModelPreset, layout: Layout, micro_batch: int,
                    context_tokens: int, memory_slots: int, dtype: str = "bf16", kernels: str = "te",
                    fused_cross_entropy: bool = False) -> int:
    """What one ICAE micro-batch adds at the step's peak: activations kept for backward plus the transients."""
    activations, transients = icae_activation_bytes(encoder, decoder, layout.tensor_parallel, micro_batch,
                                                    context_tokens, memory_slots, dtype, kernels,
                                                    fused_cross_entropy)
    return activations + transients


def icae_activation_bytes(encoder: ModelPreset, decoder: ModelPreset, tp: int, micro_batch: int, L: int, k: int,
                          dtype: str, kernels: str, fused_cross_entropy: bool = False) -> tuple[int, int]:
    """(kept, transient) bytes of one ICAE micro-batch. Kept: the trainable encoder over L + k positions, its
    final norm and the projector's input; the frozen decoder over k + 1 + L positions (it keeps what the
    gradient to the memory needs: no linear-layer inputs with the local spec), its final norm, and the fp32
    softmax of the cross entropy at the L + 1 positions the loss reads. Transient: the step peaks either at
    the start of the backward pass, where bf16 logits sit beside that fp32 copy (then their gradient does;
    fp32 logits are the copy), or at its end, when the encoder's embedding gradient [V / TP, h] is accumulated
    into megatron's fp32 grad buffer (autograd's gradient, its copy, and on a CPU an fp32 temporary of a
    bf16 one: 2 e + 4 bytes per element, measured). Whichever is larger counts. megatron's fused cross
    entropy (speed.cross_entropy_fusion) holds one more fp32 copy of the logits at the peak (measured on a CPU,
    where torch.compile builds the kernel: benchmarks/icae_memory.py --cross-entropy-fusion)."""
    e, b = ELEMENT_BYTES[dtype], micro_batch
    enc_s, dec_s = L + k, k + 1 + L
    vocab = padded_vocab_size(decoder.vocab_size, tp) // tp
    if kernels == "local":  # torch's RMSNorm keeps fp32 tensors (see layer_activation_bytes)
        enc_norm, dec_norm = 8 * encoder.hidden_size + 4, 4 * decoder.hidden_size + 4
    else:
        enc_norm, dec_norm = e * encoder.hidden_size, e * decoder.hidden_size
    encoder_kept = (encoder.num_layers * layer_activation_bytes(encoder, tp, b, enc_s, dtype, kernels)
                    + b * enc_s * enc_norm + e * b * k * encoder.hidden_size + 8 * b * L)
    decoder_kept = (decoder.num_layers * layer_activation_bytes(decoder, tp, b, dec_s, dtype, kernels, trainable=False)
                    + b * dec_s * dec_norm + 4 * b * (L + 1) * vocab + 8 * b * L)
    kept = encoder_kept + decoder_kept
    logits = e * b * (L + 1) * vocab if e != 4 else 0  # fp32 logits: the cross entropy works on them in place
    if fused_cross_entropy:
        logits += 4 * b * (L + 1) * vocab
    embedding_gradient = (2 * e + (4 if e != 4 else 0)) * (padded_vocab_size(encoder.vocab_size, tp) // tp) \
        * encoder.hidden_size
    return kept, max(logits, embedding_gradient - kept)


def icae_memory_report(encoder: ModelPreset, decoder: ModelPreset, layout: Layout, micro_batch: int,
                       context_tokens: int, memory_slots: int, distributed_optimizer: bool = False,
                       dtype: str = "bf16", gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
                       global_batch: int | None = None, kernels: str = "local",
                       fused_cross_entropy: bool = False) -> tuple[MemoryReport, str]:
    """One ICAE training rank: the trainable encoder + ICAE parameters (weights, gradients, optimizer), the
    frozen decoder (weights only), and one micro-batch's activations and transients (icae_activation_bytes).
    `kernels` "local" (megatron's local spec, validated against measured peaks: benchmarks/icae_memory.py) is
    the default: it bounds what Transformer Engine's fused kernels keep from above. PP must be 1."""
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"dtype must be one of {sorted(ELEMENT_BYTES)}, not {dtype!r}")
    L, k, t, dp = context_tokens, memory_slots, layout.tensor_parallel, layout.data_parallel
    global_batch = global_batch or micro_batch * max(dp, 1)
    problems = []
    if layout.pipeline_parallel != 1:
        problems.append(f"the ICAE does not support pipeline parallelism (PP={layout.pipeline_parallel})")
    for role, p, positions in (("encoder", encoder, L + k), ("decoder", decoder, k + 1 + L)):
        problems += [f"{role}: {msg}" for msg in layout_problems(p, layout, micro_batch, global_batch, positions)
                     if "global batch" not in msg and "world size" not in msg and "layers" not in msg]
    problems += [msg for msg in layout_problems(encoder, layout, micro_batch, global_batch, 0)
                 if "global batch" in msg or "world size" in msg]
    num_microbatches = global_batch // (micro_batch * dp) if not problems else 0
    stages = ()
    if not problems:
        trainable = stage_counts(encoder, t, 1)[0].params_per_tp_rank + icae_trainable_extra(encoder, decoder, k)
        frozen = stage_counts(decoder, t, 1)[0].params_per_tp_rank
        weights, grads, optimizer = state_bytes(trainable, dtype, dp, distributed_optimizer)
        kept, transients = icae_activation_bytes(encoder, decoder, t, micro_batch, L, k, dtype, kernels,
                                                 fused_cross_entropy)
        stages = (StageMemory(0, trainable + frozen, weights + frozen * ELEMENT_BYTES[dtype], grads, optimizer,
                              kept, 1, transients),)
    name = f"ICAE {encoder.name} -> frozen {decoder.name} (k={k}, L={L})"
    notes = _vocab_note(encoder, t) + _vocab_note(decoder, t) + [
        "activations of megatron's local layer spec (validated against measured peaks on a CPU, "
        "benchmarks/icae_memory.py); Transformer Engine's fused kernels keep less" if kernels == "local" else
        "activations of Transformer Engine's fused kernels (not validated: the measured peaks are of the local spec)",
        "megatron's report_theoretical_memory covers one trainable GPT: not applicable to an encoder + frozen "
        "decoder pair"]
    if stages:
        notes.insert(0, f"parameters: {trainable:,} trainable (encoder + ICAE) + {frozen:,} frozen decoder "
                        "(weights only: no gradients, no optimizer state)")
    report = _finish(MemoryReport(name, layout, micro_batch, L, num_microbatches, global_batch, dtype,
                                  distributed_optimizer, round(gpu_memory_gib * GIB), stages, None,
                                  tuple(problems), tuple(notes)))
    if stages and not report.ok and micro_batch > 1 and len(report.problems) == 1:  # over budget only
        fits = [mb for mb in range(micro_batch - 1, 0, -1) if micro_batch % mb == 0 and icae_memory_report(
            encoder, decoder, layout, mb, L, k, distributed_optimizer, dtype, gpu_memory_gib, global_batch,
            kernels, fused_cross_entropy)[0].ok]
        if fits:
            smaller, _ = icae_memory_report(encoder, decoder, layout, fits[0], L, k, distributed_optimizer, dtype,
                                            gpu_memory_gib, global_batch, kernels, fused_cross_entropy)
            report = dataclasses.replace(report, problems=report.problems[:-1] + (
                report.problems[-1] + f"; the same global batch fits as micro-batch {fits[0]} x "
                f"{smaller.num_microbatches} accumulation: {smaller.peak.total / GIB:.1f} GiB (--micro-batch-size "
                f"{fits[0]} --global-batch-size {global_batch})",))
    return report, describe(report)


# ---- verdict and text ---------------------------------------------------------------------------------------

def _finish(report: MemoryReport) -> MemoryReport:
    peak = report.peak
    if peak is None or peak.total <= report.gpu_memory:
        return report
    over = (f"stage {peak.stage} needs {peak.total / GIB:.1f} GiB per GPU, more than the "
            f"{report.gpu_memory / GIB:g} GiB budget (--gpu-memory): lower the micro-batch, raise TP/PP or use "
            "the distributed optimizer")
    return MemoryReport(**{**report.__dict__, "problems": report.problems + (over,)})


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def describe(r: MemoryReport) -> str:
    lay = r.layout
    lines = [f"{r.preset}: {lay.world_size} GPUs = TP {lay.tensor_parallel} x PP {lay.pipeline_parallel} x "
             f"DP {lay.data_parallel}; micro-batch {r.micro_batch} x {r.num_microbatches or '?'} accumulation x DP "
             f"{lay.data_parallel} = global batch {r.global_batch} ({r.global_batch * r.seq_length:,} tokens per "
             f"step at {r.seq_length}); {r.dtype}"
             + ("; distributed optimizer" if r.distributed_optimizer else "")]
    peak = r.peak
    if peak is not None:
        sharded = f" / {lay.data_parallel} DP" if r.distributed_optimizer else ""
        lines += [
            f"memory per GPU, most loaded stage {peak.stage} of {lay.pipeline_parallel}:",
            f"  parameters        {peak.params:>15,}",
            f"  weights           {_gib(peak.weights)}   ({r.dtype})",
            f"  gradients         {_gib(peak.gradients)}   (fp32 grad buffer)",
            f"  optimizer         {_gib(peak.optimizer)}   (AdamW{' fp32 main +' if r.dtype == 'bf16' else ''} "
            f"2 moments{sharded})",
            f"  activations       {_gib(peak.activations)}   ({peak.in_flight} micro-batch(es) in flight)",
            *([f"  transients        {_gib(peak.transients)}   (logits beside their fp32 copy, or the embedding's gradient)"]
              if peak.transients else []),
            f"  total             {_gib(peak.total)}   of {r.gpu_memory / GIB:g} GiB "
            f"({100 * peak.total / r.gpu_memory:.0f}%)",
        ]
        if len(r.stages) > 1:
            lines.append("  per stage total   " + ", ".join(f"{s.stage}: {s.total / GIB:.2f}" for s in r.stages)
                         + " GiB")
    if r.megatron is not None:
        m = r.megatron
        lines.append(f"megatron report_theoretical_memory (same config): weights+optimizer "
                     f"{m.weights_and_optimizer / GIB:.2f} GiB, activations {m.activations / GIB:.2f} GiB, total "
                     f"{m.total / GIB:.2f} GiB")
    lines += [f"note: {n}" for n in r.notes]
    lines += [f"PROBLEM: {p}" for p in r.problems] or ["checks: all passed"]
    return "\n".join(lines)
