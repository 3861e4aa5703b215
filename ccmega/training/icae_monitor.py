"""Watching an ICAE train: is the frozen decoder usable, and does the memory get used?

* At a fresh start, `probe_at_start` runs the decoder probes of `ccmega probe-decoder` (copy score and
  free-prefix drivability, `ccmega.evaluation.probe`) on a few windows of the fine-tune data, prints them
  with their warnings, and writes RUN_DIR/decoder_probe.json (read back on resume).
* Every `monitor.interval` steps and at the last, `CollapseMonitor` computes the frozen decoder's own LM
  loss on that step's contexts (what an ICAE that ignores its memory reaches) and logs it beside the
  reconstruction loss; its forward pass is counted in the step's FLOPs. Past
  `monitor.collapse_after` of training, a reconstruction loss still above (1 - `monitor.collapse_margin`)
  x that LM loss means the memory is not being used: a warning is printed once and status.json records it.

Both reach status.json through `status`, a dict the training loop merges into every status it writes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

PROBE_FILE = "decoder_probe.json"


@dataclass
class MonitorSection:
    probe: bool = True  # probe the frozen decoder at a fresh start (copy score, drivability)
    probe_samples: int = 8  # fine-tune windows probed
    probe_steps: int = 100  # Adam steps of the free prefix
    collapse_after: float = 0.5  # share of train.steps after which a collapse is reported
    collapse_margin: float = 0.05  # "collapsed": reconstruction loss above (1 - margin) x the decoder's LM loss
    # steps between the decoder LM-loss checks (and the last step). One check is a frozen-decoder forward over
    # the step's contexts, 5-30% of a step for the paper's size pairs: every 20 steps costs at most 1.6%.
    interval: int = 20


def check_section(m: MonitorSection) -> None:
    from ccmega.config import ConfigError

    if not 0.0 <= m.collapse_after <= 1.0:
        raise ConfigError(f"monitor.collapse_after must be a share of training in [0, 1], not {m.collapse_after}")
    if m.interval < 1:
        raise ConfigError(f"monitor.interval must be at least 1 (steps between checks), not {m.interval}")
    if not 0.0 <= m.collapse_margin < 1.0:
        raise ConfigError(f"monitor.collapse_margin must be in [0, 1), not {m.collapse_margin}")
    if m.probe and (m.probe_samples < 1 or m.probe_steps < 1):
        raise ConfigError("monitor.probe_samples and monitor.probe_steps must be at least 1 (or monitor.probe=false)")


def probe_at_start(model, split_prefix: str, context_tokens: int, tokenizer_path: str, m: MonitorSection,
                   run_dir: str, rank0: bool, log) -> dict:
    """Probe the ICAE's frozen decoder at its k and L; returns the summary status.json keeps."""
    from ccmega.data.tokenizers import load_tokenizer
    from ccmega.evaluation.probe import describe, probe_decoder, probe_windows
    from ccmega.fileio import atomic_write_text

    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except FileNotFoundError as e:
        log(f"[ccmega] decoder probe skipped: {e} (it needs the tokenizer for the F1 of its reconstructions)")
        return {"skipped": str(e)}
    windows = probe_windows(split_prefix, context_tokens, m.probe_samples)
    log(f"[ccmega] probing the frozen decoder on {len(windows)} windows of {split_prefix} "
        f"(monitor.probe=false skips this)")
    result = probe_decoder(model.decoder, windows, model.num_memory_slots, model.end_token_id, model.real_vocab_size,
                           tokenizer, steps=m.probe_steps)
    for line in describe(result):
        log(f"[ccmega] decoder {line}")
    for warning in result.warnings:
        log(f"[ccmega] WARNING: {warning}")
    summary = probe_summary(result.as_dict())
    if rank0:
        atomic_write_text(os.path.join(run_dir, PROBE_FILE), json.dumps({"data": split_prefix, **result.as_dict()},
                                                                         indent=2) + "\n")
    return summary


def probe_summary(record: dict) -> dict:
    c, d = record["copy"], record["drivability"]
    return {"first_copy_nll": c["first_copy_nll"], "second_copy_nll": c["second_copy_nll"],
            "lm_loss": d["lm_loss"], "free_prefix_loss": d["final_loss"], "free_prefix_f1": d["f1"],
            "warnings": record["warnings"]}


def earlier_probe(run_dir: str) -> dict | None:
    """The probe summary a resumed run wrote at its fresh start, if any."""
    try:
        with open(os.path.join(run_dir, PROBE_FILE)) as f:
            return probe_summary(json.load(f))
    except (OSError, ValueError, KeyError):
        return None


class CollapseMonitor:
    """The decoder's LM loss on a logged step's contexts, and the collapse verdict (see module doc)."""

    def __init__(self, decoder, m: MonitorSection, steps: int, status: dict, log, flops_per_check: float = 0.0):
        self.decoder, self.m, self.steps, self.status, self.log = decoder, m, steps, status, log
        self.flops_per_check = flops_per_check  # the decoder forward over one step's contexts, all ranks
        self.contexts: list = []  # micro-batches of the current step (the forward step appends)
        self.step_contexts: list = []  # those of the step just finished (`end_step`)

    def decoder_lm_loss(self) -> float:
        """Mean LM loss (nats, over c_2..c_L) of the frozen decoder on this step's contexts, over DP."""
        import torch
        from megatron.core import parallel_state as ps

        from ccmega.evaluation.entropy import token_nll

        with torch.no_grad():
            nll = torch.cat([token_nll(self.decoder, c).flatten() for c in self.step_contexts])
            total = torch.stack([nll.sum().double(), torch.tensor(float(nll.numel()), dtype=torch.float64,
                                                                  device=nll.device)])
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
        return float(total[0] / total[1])

    def after_step(self, iteration: int, loss: float) -> tuple[dict, float]:
        """(values to log, FLOPs spent): the check every `monitor.interval` steps and at the last step."""
        if iteration % self.m.interval and iteration != self.steps:
            return {}, 0.0
        values = self.check(iteration, loss)
        return values, self.flops_per_check if values else 0.0

    def check(self, iteration: int, loss: float) -> dict:
        """The decoder's LM loss on the last step's contexts, and the collapse verdict, now."""
        if not self.step_contexts:
            return {}
        lm = self.decoder_lm_loss()
        if (iteration >= self.m.collapse_after * self.steps and "collapse" not in self.status
                and loss > (1 - self.m.collapse_margin) * lm):
            message = (f"the ICAE is not using its memory: at step {iteration}/{self.steps} its reconstruction loss "
                       f"{loss:.4f} is still within {100 * self.m.collapse_margin:g}% of the frozen decoder's own LM "
                       f"loss on the same contexts ({lm:.4f} nats), i.e. of what it would reach ignoring the memory. "
                       "Check the decoder probe at the top of this log (a decoder that cannot copy or be driven "
                       "cannot be taught to reconstruct), then the learning rate and steps")
            self.log(f"[ccmega] WARNING: {message}")
            self.status["collapse"] = {"step": iteration, "reconstruction_loss": loss, "decoder_lm_loss": lm,
                                       "message": message}
        return {"decoder_lm_loss": lm}

    def end_step(self) -> None:
        """After each train step (and validation): its contexts are what `check` scores."""
        self.step_contexts, self.contexts = self.contexts, []
