"""`ccmega report` renders the paper's tables and figures from evaluation summaries made up here, and the
paper's numbers in ccmega.evaluation.paper_results are the ones printed in paper.txt."""
import json
import math
import os
import random
import re

import pytest

from ccmega.evaluation import paper_results, report
from ccmega.evaluation.correlation import correlate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "..", "shared", "paper", "paper.txt")
SIZES = {"200M": "qwen3-200m", "500M": "qwen3-500m", "800M": "qwen3-800m", "1B": "qwen3-1b"}


def _metrics(seed: float) -> dict:
    """Made-up but distinct numbers for one run."""
    return {"f1": 40 + seed, "bleu_corpus": 10 + seed / 2, "bleu_sentence_mean": 8 + seed / 2,
            "rougeL": 38 + seed, "n": 64, "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp"}


def _samples(rng: random.Random, n: int, gibberish: bool = False) -> list[dict]:
    """Encoder entropy drives quality down; decoder entropy is unrelated noise (the paper's Fig. 3)."""
    rows = []
    for i in range(n):
        enc, dec = rng.uniform(1.5, 4.5), rng.uniform(2.0, 5.0)
        f1 = max(0.0, min(100.0, 130 - 22 * enc + rng.gauss(0, 6)))
        rows.append({"reference": f"Sample {i}: FAQs | how long does it take?",
                     "reconstruction": "Rgggg0g5g3" if gibberish else f"Sample {i}: FAQs how long does it take",
                     "f1": f1, "bleu_sentence": max(0.0, f1 - 35 + rng.gauss(0, 5)), "rougeL": max(0.0, f1 - 3),
                     "entropy_encoder": enc, "entropy_decoder": dec})
    return rows


def write_fixture(folder) -> dict:
    """A study's worth of summaries: Table 3/Fig. 4 runs (encoder D1, decoders D1..D6 and random), the two
    Table 4 sweeps on D1 and D6 data, an unmatched toy-size run, and one JSON file that is no summary."""
    rng = random.Random(0)
    runs = []  # (enc recipe, enc size, dec recipe, dec size, data)
    runs += [("D1", "500M", dec, "500M", "D1") for dec in ["D1", "D2", "D3", "D4", "D5", "D6", "random"]]
    runs += [("D6", "500M", "D1", "500M", "D1"), ("D2", "500M", "D1", "500M", "D1")]
    for data in ["D1", "D6"]:
        runs += [("D1", size, "D6", "500M", data) for size in ["200M", "800M", "1B"]]
        runs += [("D6", "500M", "D1", size, data) for size in ["200M", "800M", "1B"]]
    runs += [("D1", "500M", "D6", "500M", "D6"), ("D6", "500M", "D1", "500M", "D6"), ("D6", "500M", "D6", "500M", "D6")]
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, (er, es, dr, ds, data) in enumerate(runs):
        name = f"E{er}-{es}_D{dr}-{ds}_{data}"
        summary = {"encoder": {"preset": SIZES[es], "recipe": er}, "decoder": {"preset": SIZES[ds], "recipe": dr},
                   "data": data, "metrics": _metrics(i * 1.7), "memory_tokens": 128,
                   "context_tokens_mean": 512.0, "generated_tokens_mean": 480.0 + i}
        if (er, dr, data) in {("D1", "D6", "D1"), ("D6", "D1", "D1")} or (er, dr) == ("D1", "D1"):
            summary["latency"] = {"context_tokens": 4096, "compression_s": 0.01 * (1 + list(SIZES).index(es)),
                                  "generation_s": 0.5 * (1 + list(SIZES).index(ds)), "device": "NVIDIA H20"}
        if (er, dr, data) in {("D1", "D1", "D1"), ("D1", "random", "D1")}:
            samples = _samples(rng, 64, gibberish=dr == "random")
            if dr == "random":  # case study only: no entropies, so no Fig. 3 for this run
                samples = [{k: v for k, v in s.items() if not k.startswith("entropy")} for s in samples]
            (folder / f"{name}.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
            summary["per_sample"] = f"{name}.samples.jsonl"
        sub = folder / data
        sub.mkdir(exist_ok=True)
        if "per_sample" in summary:
            summary["per_sample"] = f"../{summary['per_sample']}"
        (sub / f"{name}.summary.json").write_text(json.dumps(summary, indent=1))
        written[(er, es, dr, ds, data)] = summary
    toy = {"encoder": {"preset": "qwen3-tiny", "recipe": "d1", "name": "toy encoder"},
           "decoder": {"preset": "qwen3-tiny", "recipe": "D3"}, "data": "D1", "metrics": _metrics(3.3),
           "context_tokens_mean": 64}
    (folder / "toy.json").write_text(json.dumps(toy))
    (folder / "not_a_summary.json").write_text(json.dumps({"hello": 1}))
    return written


def _section(text: str, title_start: str) -> str:
    start = text.index(f"## {title_start}")
    end = text.find("\n## ", start + 3)
    return text[start:end if end >= 0 else None]


def _table_rows(section: str) -> list[list[str]]:
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]  # minus the header


def _assert_png(path):
    from matplotlib import image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
    pixels = image.imread(str(path))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 0.01, path  # not blank


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    written = write_fixture(root / "runs")
    out = root / "out"
    assert report.main([str(root / "runs"), "--out", str(out)]) == 0
    return written, out, (out / "report.md").read_text(encoding="utf-8"), root


def test_table3_rows_with_paper_numbers_beside_ours(rendered):
    written, _, text, _ = rendered
    rows = _table_rows(_section(text, "Table 3"))
    equal = [k for k in written if k[1] == k[3]]
    assert len(rows) == len(equal) + 1  # + the toy run
    by_key = {(r[0], r[1], r[2]): r for r in rows}
    for (er, es, dr, ds, data), summary in written.items():
        if es != ds:
            continue
        row = by_key[(f"LLM_{er}({es})", f"LLM_{dr}({ds})", data)]
        m = summary["metrics"]
        assert row[3:7] == [f"{m['f1']:.2f}", f"{m['bleu_corpus']:.2f}", f"{m['bleu_sentence_mean']:.2f}",
                            f"{m['rougeL']:.2f}"]
        paper = paper_results.lookup(er, es, dr, ds, data)
        assert row[7:] == ([f"{paper.f1:.2f}", f"{paper.bleu:.2f}", f"{paper.rougeL:.2f}"] if paper else ["–"] * 3)
    assert by_key[("LLM_D1(500M)", "LLM_D6(500M)", "D1")][7:] == ["69.44", "27.02", "67.82"]
    assert by_key[("toy encoder", "LLM_D3(qwen3-tiny)", "D1")][7:] == ["–"] * 3  # recipe "d1" normalised


def test_table4_follows_the_papers_layout(rendered):
    written, _, text, _ = rendered
    rows = _table_rows(_section(text, "Table 4"))
    keys = [(r[0], r[1], r[2]) for r in rows]
    paper_order = [(f"LLM_{p.encoder_recipe}({p.encoder_size})", f"LLM_{p.decoder_recipe}({p.decoder_size})", p.data)
                   for p in paper_results.TABLE4]
    assert keys == paper_order  # every Table 4 triple is in the fixture, in the paper's order
    for row, paper in zip(rows, paper_results.TABLE4):
        assert row[7:] == [f"{paper.f1:.2f}", f"{paper.bleu:.2f}", f"{paper.rougeL:.2f}"]


def test_fig3_correlations_and_figures(rendered):
    _, out, text, root = rendered
    section = _section(text, "Fig. 3")
    samples = report.read_samples(root / "runs" / "ED1-500M_DD1-500M_D1.samples.jsonl")
    expected = correlate([s["entropy_encoder"] for s in samples], [s["f1"] for s in samples])
    row = next(r for r in _table_rows(section) if r[0].startswith("LLM_D1(500M) → LLM_D1(500M)")
               and r[1] == "encoder" and r[2] == "F1")
    assert row[3:8] == ["64", f"{expected['pearson_r']:.3f}", f"{expected['pearson_p']:.2g}",
                        f"{expected['spearman_rho']:.3f}", f"{expected['spearman_p']:.2g}"]
    assert expected["pearson_r"] < -0.5
    figures = sorted(out.glob("fig3_entropy_*.png"))
    assert [p.name for p in figures] == ["fig3_entropy_E-D1-500M_D-D1-500M_D1.png"]
    assert not any(r[0].startswith("LLM_D1(500M) → LLM_random") for r in _table_rows(section))
    for path in figures:
        assert f"]({path.name})" in text
        _assert_png(path)


def test_figs_4_to_6_and_case_study(rendered):
    written, out, text, _ = rendered
    for name in ["fig4_decoder_recipe_500M_500M.png", "fig5_flops.png", "fig6_latency.png"]:
        assert f"]({name})" in text
        _assert_png(out / name)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.md", "fig4_decoder_recipe_500M_500M.png", "fig5_flops.png", "fig6_latency.png",
         "fig3_entropy_E-D1-500M_D-D1-500M_D1.png"])  # no temp files
    efficiency = _table_rows(_section(text, "Figs. 5 and 6"))
    assert len(efficiency) == len(written) + 1  # every run (and the toy one) has context_tokens_mean
    case = _section(text, "Table 5")
    assert paper_results.TABLE5_RECONSTRUCTION in case and "Rgggg0g5g3" in case
    assert "FAQs \\| how long" in case  # pipes escaped inside table cells


def test_fig5_series_group_size_sweeps(rendered):
    _, _, _, root = rendered
    runs = report.collect_runs([str(root / "runs")])
    labels = {label: [text for _, text in points] for label, points in report.fig5_series(runs)}
    assert labels["E_D1(·) + D_D6(500M) | D1"] == ["200M", "500M", "800M", "1B"]
    assert labels["E_D6(500M) + D_D1(·) | D1"] == ["200M", "500M", "800M", "1B"]
    assert labels["E_D1(500M) + D_D1(500M) | D1"] == [""]


def test_missing_inputs_skip_figures_with_a_note(tmp_path, capsys):
    summary = {"encoder": {"preset": "qwen3-500m", "recipe": "D1"}, "decoder": {"preset": "qwen3-500m", "recipe": "D6"},
               "data": "D1", "metrics": _metrics(29.44)}
    (tmp_path / "one.json").write_text(json.dumps(summary))
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "one.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for fig in ["Fig. 3", "Fig. 4", "Fig. 5", "Fig. 6"]:
        assert f"{fig} skipped" in printed
    assert [p.name for p in out.iterdir()] == ["report.md"]
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "| LLM_D1(500M) | LLM_D6(500M) | D1 | 69.44 |" in text and "| 69.44 | 27.02 | 67.82 |" in text
    assert "No size sweeps" in text


def test_latency_only_summaries_feed_fig6_alone(tmp_path):
    """`ccmega evaluate --latency` on random weights writes NaN metrics (JSON NaN) and unknown recipes."""
    nan_metrics = {"n": 0, "f1": math.nan, "bleu_corpus": math.nan, "bleu_sentence_mean": None, "rougeL": math.nan}
    for enc, dec in [("qwen3-200m", "qwen3-500m"), ("qwen3-500m", "qwen3-1b")]:
        summary = {"encoder": {"preset": enc, "recipe": "unknown"}, "decoder": {"preset": dec, "recipe": "unknown"},
                   "data": "unknown", "metrics": nan_metrics, "generated_tokens_mean": math.nan,
                   "latency": {"context_tokens": 4096, "compression_s": 0.05, "generation_s": 2.5, "device": "cpu"}}
        (tmp_path / f"latency_{enc}_{dec}.json").write_text(json.dumps(summary))
    out = tmp_path / "out"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fig6_latency.png", "report.md"]
    _assert_png(out / "fig6_latency.png")
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "_No runs with equal encoder and decoder sizes._" in text
    efficiency = _table_rows(_section(text, "Figs. 5 and 6"))
    assert [row[:4] for row in efficiency] == [["LLM_unknown(200M)", "LLM_unknown(500M)", "unknown", "–"],
                                               ["LLM_unknown(500M)", "LLM_unknown(1B)", "unknown", "–"]]


def test_bad_inputs(tmp_path, capsys):
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not an evaluation summary"):
        report.main([str(tmp_path / "x.json")])
    bad = {"encoder": {"preset": "qwen3-500m", "recipe": "D1"}, "decoder": {"preset": "qwen3-500m", "recipe": "D1"},
           "data": "D1", "metrics": {"f1": 1.0}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bleu_corpus"):
        report.main([str(tmp_path / "bad.json")])
    (tmp_path / "bad.json").write_text(json.dumps({**bad, "metrics": _metrics(1), "flops": {"encoder": 1.0}}))
    with pytest.raises(ValueError, match="flops needs 'total'"):
        report.main([str(tmp_path / "bad.json")])
    with pytest.raises(FileNotFoundError):
        report.main([str(tmp_path / "nowhere")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty), "--out", str(tmp_path / "out")]) == 1


def test_cli_dispatches_report(tmp_path):
    from ccmega import cli

    summary = {"encoder": {"preset": "qwen3-tiny", "recipe": "D1"}, "decoder": {"preset": "qwen3-tiny", "recipe": "D2"},
               "data": "D1", "metrics": _metrics(1.0)}
    (tmp_path / "s.json").write_text(json.dumps(summary))
    assert cli.main(["report", str(tmp_path / "s.json"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.skipif(not os.path.exists(PAPER), reason="paper.txt not available")
def test_paper_numbers_are_transcribed_from_paper_txt():
    lines = open(PAPER, encoding="utf-8").read().split("\n")

    def numbers_after(caption: str, count: int) -> list[tuple[float, float, float]]:
        start = next(i for i, line in enumerate(lines) if line.startswith(caption))
        found = []
        for line in lines[start + 1:]:
            values = re.findall(r"(\d+\.\d\d)", line)
            if len(values) == 3:
                found.append(tuple(float(v) for v in values))
            if len(found) == count:
                return found
        raise AssertionError(caption)

    assert numbers_after("Table 3.", 6) == [(r.f1, r.bleu, r.rougeL) for r in paper_results.TABLE3]
    assert numbers_after("Table 4.", 18) == [(r.f1, r.bleu, r.rougeL) for r in paper_results.TABLE4]
    # models and data: a blank cell repeats the one above, as transcribed
    start = next(i for i, line in enumerate(lines) if line.startswith("Table 4.")) + 3
    cells = ["", "", ""]
    for line, row in zip(lines[start:start + 18], paper_results.TABLE4):
        printed = line.split("\t")[:3]
        cells = [new or old for new, old in zip(printed, cells)]
        (er, es), (dr, ds) = (re.fullmatch(r"\$LLM_\{\\mathcal\{D\}_(\d)\}\((\w+)\)\$", c).groups() for c in cells[:2])
        data = re.fullmatch(r"\\mathcal\{D\}_(\d)", cells[2]).group(1)
        assert (f"D{er}", es, f"D{dr}", ds, f"D{data}") == row.key
    assert paper_results.TABLE5_ORIGIN in lines and paper_results.TABLE5_RECONSTRUCTION in lines
    assert all(not math.isnan(r.f1) for r in paper_results.paper_rows())


def _summary(enc, dec, metrics_seed=1.0, **extra) -> dict:
    return {"encoder": {"preset": SIZES[enc[1]], "recipe": enc[0]}, "decoder": {"preset": SIZES[dec[1]], "recipe": dec[0]},
            "metrics": _metrics(metrics_seed), **extra}


def test_paper_numbers_only_where_finetune_and_test_data_both_match(tmp_path):
    """Table 4's (D1 -> D6, D6 data) rows were fine-tuned on D6: a D1-fine-tuned ICAE tested on D6 is
    not one of them, and is labelled with both distributions."""
    enc, dec = ("D1", "500M"), ("D6", "500M")
    (tmp_path / "cross.json").write_text(json.dumps(_summary(enc, dec, finetune_data="D1", test_data="D6")))
    (tmp_path / "paper.json").write_text(json.dumps(_summary(enc, dec, 2.0, finetune_data="D6", test_data="d6")))
    (tmp_path / "shorthand.json").write_text(json.dumps(_summary(enc, dec, 3.0, data="D1")))
    runs = {r.path.name: r for r in report.collect_runs([str(tmp_path)])}
    assert runs["cross.json"].data == "ft D1 / test D6" and runs["cross.json"].paper_row() is None
    assert runs["paper.json"].paper_row() == paper_results.lookup("D1", "500M", "D6", "500M", "D6")
    assert runs["shorthand.json"].paper_row() == paper_results.lookup("D1", "500M", "D6", "500M", "D1")
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    rows = {tuple(r[:3]): r for r in _table_rows(_section((tmp_path / "out" / "report.md").read_text(), "Table 3"))}
    assert rows[("LLM_D1(500M)", "LLM_D6(500M)", "ft D1 / test D6")][7:] == ["–"] * 3
    assert rows[("LLM_D1(500M)", "LLM_D6(500M)", "D6")][7:] == ["46.28", "9.66", "45.48"]
    (tmp_path / "half.json").write_text(json.dumps(_summary(enc, dec, finetune_data="D1")))
    with pytest.raises(ValueError, match="has finetune_data but not test_data"):
        report.load_summary(tmp_path / "half.json")


def test_fig6_keeps_each_ratio_in_a_bar_of_its_own(tmp_path):
    """The same pair timed at context 4096 with k = 1024 (r = 4) twice and with k = 128 (r = 32) once:
    the two r = 4 records are averaged, the r = 32 one is not mixed in."""
    enc, dec = ("D1", "500M"), ("D6", "500M")
    records = [(1024, 0.10, 2.0), (1024, 0.20, 4.0), (128, 0.05, 1.0)]
    for i, (k, comp, gen) in enumerate(records):
        lat = {"context_tokens": 4096, "memory_tokens": k, "compression_s": comp, "generation_s": gen, "device": "H20"}
        (tmp_path / f"s{i}.json").write_text(json.dumps(_summary(enc, dec, data="D1", latency=lat)))
    bars = report.fig6_bars(report.collect_runs([str(tmp_path)]))
    assert [(b["memory_tokens"], b["compression_ratio"], b["n"]) for b in bars] == [(128, 32.0, 1), (1024, 4.0, 2)]
    assert bars[1]["compression_s"] == pytest.approx(0.15) and bars[1]["generation_s"] == pytest.approx(3.0)
    assert bars[0]["generation_s"] == pytest.approx(1.0)
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Note: bars measured at L / k (r) = 4096 / 128 (r 32), not at the paper's r = 4" in text
    assert [r[11] for r in _table_rows(_section(text, "Figs. 5 and 6"))] == ["4096 / 1024 (r 4)", "4096 / 1024 (r 4)",
                                                                             "4096 / 128 (r 32)"]
    _assert_png(tmp_path / "out" / "fig6_latency.png")
