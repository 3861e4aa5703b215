"""`ccmega demo --quick`: the quickstart's code path end to end (fewer steps), and a rerun that reuses it."""
import json
import os
import subprocess
import sys

from launch import REPO


def demo(out, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "ccmega.cli", "demo", "--quick", "--out", str(out), *extra], cwd=REPO,
                          env=dict(env, PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_quick_demo_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "demo"
    first = demo(out)
    # Table 3's three triples, each with numbers
    rows = [line for line in first.splitlines() if line.startswith("| LLM_D")]
    assert [r.split("|")[1:3] for r in rows] == [[" LLM_D1 ", " LLM_D1 "], [" LLM_D1 ", " LLM_D6 "], [" LLM_D6 ", " LLM_D1 "]]
    for enc, dec in [("D1", "D1"), ("D1", "D6"), ("D6", "D1")]:
        summary = json.loads((out / "eval" / f"{enc}_{dec}" / "summary.json").read_text())
        assert summary["metrics"]["n"] > 0 and 0 <= summary["metrics"]["f1"] <= 100
    report = (out / "report" / "report.md").read_text()
    assert "LLM" in report and list((out / "report").glob("*.png"))
    hf = json.loads((out / "hf" / "lm_D1" / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3ForCausalLM"]
    assert "verified" in (out / "logs" / "convert.log").read_text()
    table3 = json.loads((out / "table3.json").read_text())  # the controls and Table 3's ordering, recorded
    assert set(table3["pairs"]) == {"D1/D1", "D1/D6", "D6/D1"}
    assert [(r["claim"], r["metric"]) for r in table3["ordering"]] == [
        ("D1/D1 > D6/D1", "F1"), ("D1/D1 > D6/D1", "BLEU (sentence)"), ("D6/D1 > D1/D6", "F1"),
        ("D6/D1 > D1/D6", "BLEU (sentence)")]
    assert all(r["verdict"] in ("holds", "reversed", "not resolved") for r in table3["ordering"])
    assert "Table 3's ordering" in first and "own − shuffled" in first

    # the toy scale's stages are not the quick ones': reusing them would mix two scales in one table
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    mixed = subprocess.run([sys.executable, "-m", "ccmega.cli", "demo", "--out", str(out)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert mixed.returncode != 0 and "another scale" in mixed.stderr

    stages = len([l for l in first.splitlines() if ": running (" in l])
    second = demo(out)  # every stage reused, same table
    assert second.count("done earlier, reused") == stages
    assert [l for l in second.splitlines() if l.startswith("| LLM_D")] == rows

    fresh = demo(out, "--fresh")  # every stage retrained from nothing (no checkpoint resumed), same numbers
    assert fresh.count(": running (") == stages and "done earlier" not in fresh
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "resumed from" not in logs and "initialised from" in logs
    assert [l for l in fresh.splitlines() if l.startswith("| LLM_D")] == rows


def test_a_training_stage_stopped_by_a_signal_is_not_marked_done(tmp_path):
    """A training command stopped by SIGTERM saves, exits 0 and says `interrupted` in status.json: the demo
    must leave the stage unfinished (a rerun resumes it), not reuse it as done."""
    import pytest

    from ccmega.demo import Stage, run_stages

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    status = json.dumps({"state": "interrupted", "iteration": 3, "steps": 9})
    stage = Stage("pretrain X", [sys.executable, "-c", f"open({str(run_dir / 'status.json')!r}, 'w').write({status!r})"],
                  1, str(run_dir))
    with pytest.raises(SystemExit, match="interrupted at step 3/9"):
        run_stages(str(tmp_path), [stage], str(tmp_path / "logs"))
    assert not os.path.exists(stage.marker(str(tmp_path)))
