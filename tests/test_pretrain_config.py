"""ccmega.config: defaults (Table 6) < YAML < --set / shortcut flags, typed and checked."""
import pytest

from ccmega.config import ConfigError, load_config, parse_config, set_dotted
from ccmega.presets import PRETRAIN_HPARAMS
from ccmega.training.pretrain import SHORTCUTS, PretrainConfig


def test_defaults_are_table_6():
    cfg = PretrainConfig()
    assert (cfg.optim.max_lr, cfg.optim.min_lr, cfg.optim.warmup_steps) == (3e-4, 3e-5, 2000)
    assert (cfg.train.global_batch_size, cfg.data.seq_length) == (PRETRAIN_HPARAMS.global_batch_size, 8192)
    assert cfg.optim.lr_decay_style == "cosine" and cfg.optim.lr_decay_steps is None and cfg.train.steps is None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: qwen3-tiny}\noptim: {max_lr: 1e-3}\ntrain: {steps: 5}\n")
    cfg, _ = parse_config(PretrainConfig, ["--config", str(path), "--set", "train.steps=9", "--tp", "2",
                                           "--data", "a/b,c/d", "--set", "optim.min_lr=3e-6",
                                           "--set", "precision.fp8=hybrid"], SHORTCUTS)
    assert cfg.model.preset == "qwen3-tiny" and cfg.model.tensor_parallel == 2
    assert cfg.optim.max_lr == 1e-3 and cfg.optim.min_lr == 3e-6  # YAML 1.1 '1e-3' strings become floats
    assert cfg.train.steps == 9 and cfg.data.paths == ["a/b", "c/d"] and cfg.precision.fp8 == "hybrid"
    assert set_dotted(cfg, "train.steps", "null").train.steps is None


@pytest.mark.parametrize("key, value, message", [
    ("train.stepz", "3", "unknown config key"),
    ("train.steps", "three", "expected an integer"),
    ("checkpoint.resume", "maybe", "true/false"),
])
def test_bad_overrides_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, [(key, value)])
