"""Measured ICAE inference latency, split like the paper's Fig. 6 into compression and generation.

    compression  encoder forward over [c_1..c_L, m_1..m_k] + projector  (`compress` + `decoder_prefix`)
    generation   decoder prefill over [m'_1..m'_k, e([AE])] + greedy steps with megatron's KV cache
                 (`ccmega.evaluation.generation.generate`), exactly `generate_tokens` of them (no early
                 stop at the end token, so the work is the same on every repeat and every model)

Each phase is timed separately on a fixed random context of `context_tokens` (paper: 4096, one
sequence), after `warmup` untimed runs (kernel selection, allocator, lazy init), over `repeats` timed
runs; the reported seconds are the median, with every repeat recorded. On GPU the phases are timed with
`torch.cuda.Event`s recorded on the current stream and read after one synchronisation; on CPU with
`time.perf_counter` (the work is synchronous). The weights do not matter for latency: random weights of
the right presets measure the same thing as trained ones (`ccmega evaluate --latency` without --icae).
"""
from __future__ import annotations

import statistics
import time

import torch

from ccmega.evaluation.generation import generate
from ccmega.runtime import device


class _Timer:
    """Seconds between start() and stop(), read after all work is done (CUDA events or perf_counter)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self._pairs = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._pairs.append([event, None])
        else:
            self._pairs.append([time.perf_counter(), None])

    def stop(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._pairs[-1][1] = event
        else:
            self._pairs[-1][1] = time.perf_counter()

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in self._pairs]
        return [b - a for a, b in self._pairs]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@torch.no_grad()
def measure_latency(icae, context_tokens: int, generate_tokens: int | None = None, warmup: int = 1,
                    repeats: int = 3, batch_size: int = 1, seed: int = 0) -> dict:
    """The `latency` record of an evaluation summary (report schema) for one ICAE; all TP ranks call it."""
    icae.eval()
    generate_tokens = generate_tokens or context_tokens
    vocab = min(icae.real_vocab_size, icae.encoder.vocab_size)  # ids both embeddings have
    context = torch.randint(0, vocab, (batch_size, context_tokens), generator=torch.Generator().manual_seed(seed))
    context = context.to(device())  # the one move of the latency input
    compression, generation = _Timer(), _Timer()
    for i in range(warmup + repeats):
        timed = i >= warmup
        if timed:
            compression.start()
        prefix = icae.decoder_prefix(icae.compress(context))
        if timed:
            compression.stop()
            generation.start()
        generate(icae, prefix, generate_tokens, use_cache=True, stop_at_end=False)
        if timed:
            generation.stop()
    comp, gen = compression.seconds(), generation.seconds()
    return {
        "context_tokens": context_tokens,
        "compression_s": statistics.median(comp),
        "generation_s": statistics.median(gen),
        "device": device_name(),
        "memory_tokens": icae.num_memory_slots,
        "compression_ratio": context_tokens / icae.num_memory_slots,  # r = L / k of what was timed
        "generated_tokens": generate_tokens,
        "batch_size": batch_size,
        "dtype": str(next(icae.decoder.parameters()).dtype).replace("torch.", ""),
        "warmup": warmup,
        "repeats": repeats,
        "compression_s_all": comp,
        "generation_s_all": gen,
        "statistic": "median",
    }
