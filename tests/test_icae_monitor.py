"""The collapse monitor of `icae-train` (ccmega/training/icae_monitor.py): the decoder LM loss it logs is the
frozen decoder's mean NLL on the step's contexts (checked against `token_nll` computed independently), and
the warning fires once, past `collapse_after`, only when the reconstruction loss sits within the margin.
The whole command path (probe at start, no warning on a working ICAE) is driven in test_icae_plumbing.py."""
import pytest
import torch

from ccmega.config import ConfigError
from ccmega.training.icae_monitor import CollapseMonitor, MonitorSection, check_section


@pytest.fixture(scope="module")
def decoder(megatron_world_of_one):
    from ccmega.models.qwen3 import build_model, transformer_config
    from ccmega.presets import model_preset

    torch.manual_seed(0)
    preset = model_preset("qwen3-tiny")
    return build_model(preset, transformer_config(preset)).eval()


def monitor_after_one_step(decoder, contexts, **section):
    status, lines = {}, []
    monitor = CollapseMonitor(decoder, MonitorSection(**section), steps=100, status=status, log=lines.append)
    monitor.contexts.extend(contexts)
    monitor.end_step()
    return monitor, status, lines


def test_logged_lm_loss_is_the_decoders_nll_on_the_steps_contexts(decoder):
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, 1000, (4, 16), generator=g) for _ in range(2)]  # two micro-batches
    monitor, _, _ = monitor_after_one_step(decoder, contexts)
    with torch.no_grad():
        from ccmega.evaluation.entropy import token_nll

        expected = float(torch.cat([token_nll(decoder, c) for c in contexts]).mean())
    assert monitor.check(60, 0.0)["decoder_lm_loss"] == pytest.approx(expected, rel=1e-6)


def test_warning_fires_once_past_the_share_and_within_the_margin(decoder):
    contexts = [torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(1))]
    monitor, status, lines = monitor_after_one_step(decoder, contexts, collapse_after=0.5, collapse_margin=0.05)
    lm = monitor.check(10, 0.0)["decoder_lm_loss"]
    monitor.check(40, lm)  # before half of training: no verdict yet
    assert "collapse" not in status and not lines
    monitor.check(60, 0.90 * lm)  # 10% under the LM loss: the memory is used
    assert "collapse" not in status
    monitor.check(70, 0.97 * lm)  # within 5%
    assert status["collapse"]["step"] == 70 and status["collapse"]["decoder_lm_loss"] == pytest.approx(lm)
    monitor.check(80, lm)
    assert status["collapse"]["step"] == 70 and len(lines) == 1 and "not using its memory" in lines[0]


@pytest.mark.parametrize("field,value", [("collapse_after", 1.5), ("collapse_margin", -0.1), ("probe_steps", 0)])
def test_bad_monitor_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"monitor.{field}"):
        check_section(MonitorSection(**{field: value}))
