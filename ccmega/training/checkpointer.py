"""The training loop's checkpointer: when to save, what to keep, and whether a checkpoint may be resumed.

Saving and loading themselves are `ccmega.training.checkpointing` (dist_checkpointing, atomic `latest`).
This component adds the policy around them:

- saves at `checkpoint.save_interval`, at the end and on a stop signal;
- retention: only the newest `checkpoint.keep_last` checkpoints stay, plus the milestones (multiples of
  `checkpoint.milestone_interval`); the one `latest` names is never deleted;
- resume checks: every checkpoint records the run's identity (preset, tokenizer, data and its
  fingerprint, schedule). A resume whose identity differs stops and names the field, unless the field
  is listed in `checkpoint.allow_changes`; an accepted schedule change rebuilds the LR schedule from
  the new values (megatron's scheduler would otherwise silently keep the checkpoint's);
- the distributed optimizer's format on disk (`checkpoint.optimizer_format`, see
  `ccmega.training.checkpointing`); a dp_reshardable checkpoint resumed at another TP/PP is refused.
"""
from __future__ import annotations

import os
import re
import shutil
import time

from ccmega.config import ConfigError
from ccmega.training import checkpointing as ckpt

# Identity fields a resume can never change: the shapes of the saved tensors, and the frozen decoder.
STRUCTURAL_FIELDS = ("model.preset", "model.encoder_preset", "model.decoder_preset", "model.num_memory_slots",
                     "model.decoder_files_sha256")
SCHEDULE_FIELDS = ("train.steps", "optim.warmup_steps", "optim.lr_decay_steps", "optim.max_lr", "optim.min_lr",
                   "optim.lr_decay_style")
_ITER_DIR = re.compile(r"iter_(\d{7})$")


class Checkpointer:
    def __init__(self, run_dir: str, section, identity: dict, metadata: dict, log=print):
        self.run_dir, self.section, self.identity, self.log = run_dir, section, identity, log
        self.metadata = dict(metadata, identity=identity)
        self.ckpt_dir = ckpt.checkpoints_dir(run_dir)
        if section.optimizer_format not in ckpt.OPTIMIZER_FORMATS:
            raise ConfigError(f"checkpoint.optimizer_format must be one of {', '.join(ckpt.OPTIMIZER_FORMATS)}, "
                              f"not {section.optimizer_format!r}")
        self.last_saved: int | None = None

    # ---- resume ------------------------------------------------------------------------------------
    def resume_point(self) -> str | None:
        """The iter dir to resume from (checked against this run's identity), or None for a fresh start."""
        if not self.section.resume:
            return None
        iter_dir = ckpt.latest_iter_dir(self.ckpt_dir)
        if iter_dir is None:
            return None
        saved = ckpt.read_checkpoint_metadata(iter_dir)
        self._check_identity(saved.get("identity"), iter_dir)
        ckpt.check_layout(saved)  # a dp_reshardable optimizer state at another TP/PP: refused before the build
        return iter_dir

    def _check_identity(self, saved: dict | None, iter_dir: str) -> None:
        if saved is None:
            self.log(f"[ccmega] warning: {iter_dir} records no run identity (an older ccmega): resuming unchecked")
            return
        allowed = set(self.section.allow_changes)
        unknown = allowed - set(self.identity)
        if unknown:
            raise ConfigError(f"checkpoint.allow_changes names {', '.join(sorted(unknown))}; the checked fields are "
                              f"{', '.join(self.identity)}")
        changed = [key for key in self.identity if saved.get(key) != self.identity[key]]
        structural = [key for key in changed if key in STRUCTURAL_FIELDS]
        if structural:
            raise ConfigError("cannot resume " + iter_dir + ": " + _describe(structural, saved, self.identity)
                              + "; the checkpoint's tensors belong to the old value. Use a new run dir (or "
                              "--set checkpoint.resume=false to start this one afresh)")
        refused = [key for key in changed if key not in allowed]
        if refused:
            raise ConfigError(
                "refusing to resume " + iter_dir + ": " + _describe(refused, saved, self.identity) + ". If the "
                "change is deliberate, add --set checkpoint.allow_changes=" + ",".join(refused)
                + (" (a changed schedule is then rebuilt from the new values from the current step on)"
                   if any(key in SCHEDULE_FIELDS for key in refused) else "")
                + "; otherwise restore the old value or use a new run dir")
        for key in changed:
            self.log(f"[ccmega] resuming with a deliberate change of {key}: {saved.get(key)!r} -> {self.identity[key]!r}")

    def load(self, iter_dir: str, setup, scheduler) -> dict:
        """Restore model, optimizer, scheduler and RNG from `iter_dir`; returns the saved progress."""
        saved = ckpt.read_checkpoint_metadata(iter_dir).get("identity") or {}
        # megatron keeps the checkpoint's schedule unless told to override it with the constructor's values
        scheduler.override_opt_param_scheduler = any(
            key in SCHEDULE_FIELDS and saved.get(key, self.identity[key]) != self.identity[key]
            for key in self.identity)
        progress = ckpt.load_checkpoint(iter_dir, setup.model, setup.optimizer, scheduler)
        scheduler.override_opt_param_scheduler = False
        self.last_saved = progress["iteration"]
        return progress

    # ---- save ----------------------------------------------------------------------------------------
    def due(self, iteration: int, final: bool, stopping: bool) -> bool:
        interval = self.section.save_interval
        if self.last_saved == iteration:
            return False
        return stopping or final or bool(interval and iteration % interval == 0)

    def save(self, setup, scheduler, progress: dict) -> str:
        t = time.perf_counter()
        path = ckpt.save_checkpoint(self.run_dir, setup.model, setup.optimizer, scheduler, progress, self.metadata,
                                    optimizer_format=self.section.optimizer_format)
        self.last_saved = int(progress["iteration"])
        self.log(f"[ccmega] saved {path} in {time.perf_counter() - t:.1f} s")
        import torch

        if torch.distributed.get_rank() == 0:
            for old in self.expired():
                shutil.rmtree(old, ignore_errors=True)
                self.log(f"[ccmega] removed {old} (checkpoint.keep_last={self.section.keep_last})")
        return path

    def expired(self) -> list[str]:
        """Complete checkpoints beyond the newest `keep_last`, milestones and `latest` excepted."""
        keep_last, milestone = self.section.keep_last, self.section.milestone_interval
        if not keep_last or not os.path.isdir(self.ckpt_dir):
            return []
        latest = ckpt.latest_iter_dir(self.ckpt_dir)
        found = sorted((int(m.group(1)), os.path.join(self.ckpt_dir, name))
                       for name in os.listdir(self.ckpt_dir) if (m := _ITER_DIR.match(name))
                       and os.path.isfile(os.path.join(self.ckpt_dir, name, ckpt.METADATA_FILE)))
        old = found[:-keep_last] if keep_last < len(found) else []
        return [path for iteration, path in old
                if not (milestone and iteration % milestone == 0) and os.path.abspath(path) != latest]


def computed_on_rank0(compute):
    """`compute()` run on rank 0 only and broadcast: file hashes every rank needs, read once."""
    import torch

    box = [compute() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def dataset_fingerprint(prefix: str, samples: int = 16, block: int = 1 << 16) -> str:
    """SHA-256 of an indexed dataset: its .idx (document and sequence boundaries), its manifest, the
    .bin's size and `samples` evenly spaced blocks of the .bin. Cheap for a corpus of terabytes, and
    any regenerated or replaced corpus differs in some sampled block."""
    import hashlib

    digest = hashlib.sha256()
    from ccmega.data.budget import manifest_path

    for path in (prefix + ".idx", str(manifest_path(prefix))):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
        digest.update(b"\0")
    size = os.path.getsize(prefix + ".bin")
    digest.update(str(size).encode())
    with open(prefix + ".bin", "rb") as f:
        for i in range(samples):
            f.seek(max(size - block, 0) * i // max(samples - 1, 1))
            digest.update(f.read(block))
    return digest.hexdigest()


def _describe(keys: list[str], saved: dict, now: dict) -> str:
    return "; ".join(f"{key} was {_short(saved.get(key))} and is now {_short(now[key])}" for key in keys)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
