"""`ccmega report SUMMARY_OR_FOLDER... [--out DIR]`: the paper's tables and figures from evaluation summaries.

Writes DIR/report.md (Markdown tables laid out like Tables 3 and 4, the entropy correlations of Fig. 3,
the efficiency numbers of Figs. 5 and 6, the case study of Table 5) with the paper's numbers beside ours
where the (encoder recipe/size, decoder recipe/size, data) triple matches a paper row (the run's fine-tuning
and test data must both be the row's Data), and PNG figures
(matplotlib, Agg): fig3_entropy_<run>.png, fig4_decoder_recipe_<sizes>.png, fig5_flops.png,
fig6_latency.png. A figure whose inputs are absent is skipped with a printed note. Every file is
written atomically (temporary file + rename).

A folder argument is searched recursively for *.json files that are summaries (they have "encoder",
"decoder" and "metrics"); other JSON files there are skipped with a note.

Summary JSON (one per evaluated encoder/decoder pair; written by `ccmega evaluate`):

    {
      "encoder": {"preset": "qwen3-500m", "recipe": "D1", "name": "LLM_D1(500M)"},  # name optional
      "decoder": {"preset": "qwen3-500m", "recipe": "D6", "name": ...},             # recipe: D1..D6 | random
      "finetune_data": "D1",              # the ICAE's fine-tuning data recipe
      "test_data": "D1",                  # the evaluated split's recipe
                                          #   (or "data": "D1" alone: fine-tuned and tested on it)
      "metrics": {                        # percentages, see ccmega.evaluation.metrics
        "f1": 69.44, "bleu_corpus": 27.02, "bleu_sentence_mean": 25.3, "rougeL": 67.82,
        "n": 10000, "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"  # optional
      },
      "memory_tokens": 128,               # optional (default 128): k, for FLOPs
      "context_tokens_mean": 512.0,       # optional: mean original length in tokens, for FLOPs
      "generated_tokens_mean": 497.3,     # optional: mean reconstruction length (default: context_tokens_mean)
      "per_sample": "samples.jsonl",      # optional: JSONL path, relative to this file's folder
      "flops": {"total": 1.2e12, ...},    # optional: FLOPs per generation; else computed by
                                          #   ccmega.evaluation.flops from the presets and token means
      "latency": {"context_tokens": 4096, "memory_tokens": 1024, "compression_ratio": 4.0,
                  "compression_s": 0.021, "generation_s": 1.87, "device": "NVIDIA H100"},
                                          # optional: one measured ICAE generation (Fig. 6); a bar
                                          #   averages only records of one (L, k)
      "controls": {...}                   # optional: `ccmega evaluate --controls` (ccmega/evaluation/controls.py)
    }

Per-sample JSONL, one object a line (extra keys are ignored):

    {"reference": "...", "reconstruction": "...", "f1": 80.0, "bleu_sentence": 41.2, "rougeL": 78.9,
     "entropy_encoder": 2.31, "entropy_decoder": 2.87}

Entropies are the mean per-token negative log-likelihood of the original under the encoder's and the
decoder's pretrained LM, in nats/token; a sample without one (or with null) is left out of that correlation.
null anywhere means "not measured" (`ccmega evaluate` writes non-finite numbers as null).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ccmega.evaluation import paper_results
from ccmega.evaluation.controls import controls_section
from ccmega.evaluation.correlation import correlate
from ccmega.evaluation.flops import baseline_flops, icae_flops
from ccmega.fileio import atomic_write_text
from ccmega.presets import FINETUNE_HPARAMS, MODEL_PRESETS

SUMMARY_METRICS = ("f1", "bleu_corpus", "bleu_sentence_mean", "rougeL")
SAMPLE_METRICS = (("f1", "F1"), ("bleu_sentence", "BLEU (sentence)"), ("rougeL", "ROUGE-L"))
ENTROPY_SIDES = (("encoder", "entropy_encoder"), ("decoder", "entropy_decoder"))
RECIPE_ORDER = ["D1", "D2", "D3", "D4", "D5", "D6", "random"]
NA = "–"
FIG6_RATIO = FINETUNE_HPARAMS.compression_ratio  # the paper's r ("unless otherwise stated", §4.1)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Side:
    preset: str
    recipe: str
    name: str

    @property
    def size(self) -> str:
        """The paper's size label (200M...1B) for Table 2 presets, else the preset name."""
        return paper_results.PAPER_SIZE_OF_PRESET.get(self.preset, self.preset)

    @property
    def params(self) -> int:
        preset = MODEL_PRESETS.get(self.preset)
        return preset.total_params() if preset else 0


@dataclass
class Run:
    path: Path
    encoder: Side
    decoder: Side
    finetune_data: str
    test_data: str
    metrics: dict
    memory_tokens: int = 128
    context_tokens_mean: float | None = None
    generated_tokens_mean: float | None = None
    per_sample: Path | None = None
    flops: dict | None = None
    latency: dict | None = None
    controls: dict | None = None  # memory-dependence controls (ccmega.evaluation.controls), when evaluated
    slug: str = ""  # unique file-name stem, set by collect_runs

    @property
    def has_metrics(self) -> bool:
        """False for latency-only summaries (random weights, metrics NaN)."""
        return any(math.isfinite(v) for v in self.metrics.values())

    @property
    def data(self) -> str:
        """The Data column: the distribution fine-tuned and tested on, or both when they differ."""
        if self.finetune_data == self.test_data:
            return self.test_data
        return f"ft {self.finetune_data} / test {self.test_data}"

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.encoder.recipe, self.decoder.recipe, self.data)

    @property
    def label(self) -> str:
        return f"{self.encoder.name} → {self.decoder.name} on {self.data}"

    def paper_row(self):
        if self.finetune_data != self.test_data:  # the paper fine-tunes and tests on one distribution
            return None
        return paper_results.lookup(self.encoder.recipe, self.encoder.size, self.decoder.recipe,
                                    self.decoder.size, self.data)

    def flops_per_generation(self) -> dict | None:
        if self.flops is not None:
            return self.flops
        if self.context_tokens_mean is None:
            return None
        if self.encoder.preset not in MODEL_PRESETS or self.decoder.preset not in MODEL_PRESETS:
            return None
        flops = icae_flops(self.encoder.preset, self.decoder.preset, self.context_tokens_mean,
                           self.memory_tokens, self.generated_tokens_mean).as_dict()
        flops["baseline_total"] = baseline_flops(self.decoder.preset, self.context_tokens_mean,
                                                 self.generated_tokens_mean).total
        return flops


def _recipe(value: str) -> str:
    value = str(value).strip()
    if value.lower() == "random":
        return "random"
    return value.upper() if re.fullmatch(r"[dD]\d+", value) else value


def _side(obj: dict, where: str) -> Side:
    try:
        preset, recipe = str(obj["preset"]), _recipe(obj["recipe"])
    except (KeyError, TypeError):
        raise ValueError(f"{where} needs 'preset' and 'recipe'") from None
    size = paper_results.PAPER_SIZE_OF_PRESET.get(preset, preset)
    return Side(preset, recipe, str(obj.get("name") or f"LLM_{recipe}({size})"))


def is_summary(obj) -> bool:
    return isinstance(obj, dict) and all(key in obj for key in ("encoder", "decoder", "metrics"))


def load_summary(path: Path) -> Run:
    obj = json.loads(path.read_text(encoding="utf-8"))
    if not is_summary(obj):
        raise ValueError(f"{path}: not an evaluation summary (needs 'encoder', 'decoder' and 'metrics')")
    if "finetune_data" in obj or "test_data" in obj:
        absent = [key for key in ("finetune_data", "test_data") if key not in obj]
        if absent:
            raise ValueError(f"{path}: has {'test_data' if absent == ['finetune_data'] else 'finetune_data'} "
                             f"but not {absent[0]}")
        finetune_data, test_data = obj["finetune_data"], obj["test_data"]
    elif "data" in obj:  # the shorthand for one distribution
        finetune_data = test_data = obj["data"]
    else:
        raise ValueError(f"{path}: missing 'finetune_data' and 'test_data' (or 'data' for both)")
    missing = [key for key in SUMMARY_METRICS if key not in obj["metrics"]]
    if missing:
        raise ValueError(f"{path}: metrics lacks {', '.join(missing)}")
    if obj.get("flops") is not None and "total" not in obj["flops"]:
        raise ValueError(f"{path}: flops needs 'total' (FLOPs per generation)")
    per_sample = obj.get("per_sample")

    def optional_float(key):  # absent, null and NaN all mean "not measured"
        value = obj.get(key)
        return float(value) if value is not None and math.isfinite(float(value)) else None

    def metric(key):
        value = obj["metrics"][key]
        return math.nan if value is None else float(value)

    return Run(
        path=path,
        encoder=_side(obj["encoder"], f"{path}: encoder"),
        decoder=_side(obj["decoder"], f"{path}: decoder"),
        finetune_data=_recipe(finetune_data if finetune_data is not None else "unknown"),
        test_data=_recipe(test_data if test_data is not None else "unknown"),
        metrics={key: metric(key) for key in SUMMARY_METRICS},
        memory_tokens=int(obj.get("memory_tokens", 128)),
        context_tokens_mean=optional_float("context_tokens_mean"),
        generated_tokens_mean=optional_float("generated_tokens_mean"),
        per_sample=(path.parent / per_sample) if per_sample else None,
        flops=obj.get("flops"),
        latency=obj.get("latency"),
        controls=obj.get("controls"),
    )


def collect_runs(paths: list[str]) -> list[Run]:
    runs = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            for candidate in sorted(path.rglob("*.json")):
                try:
                    obj = json.loads(candidate.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    obj = None
                if is_summary(obj):
                    runs.append(load_summary(candidate))
                else:
                    print(f"report: note: skipping {candidate} (not an evaluation summary)")
        elif path.is_file():
            runs.append(load_summary(path))
        else:
            raise FileNotFoundError(f"no such file or folder: {arg}")
    slugs: dict[str, int] = {}
    for run in runs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", f"E-{run.encoder.recipe}-{run.encoder.size}_"
                                                 f"D-{run.decoder.recipe}-{run.decoder.size}_{run.data}")
        slugs[base] = slugs.get(base, 0) + 1
        run.slug = base if slugs[base] == 1 else f"{base}-{slugs[base]}"
    return runs


def read_samples(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- output
def atomic_save_figure(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _pct(value) -> str:
    return NA if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _sci(value) -> str:
    return NA if value is None else f"{value:.3e}"


def _p(value: float) -> str:
    return NA if math.isnan(value) else f"{value:.2g}"


def _r(value: float) -> str:
    return NA if math.isnan(value) else f"{value:.3f}"


def _tokens(value) -> str:
    return NA if value is None else f"{value:.1f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; "|" inside a cell is escaped."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _recipe_key(recipe: str):
    return (RECIPE_ORDER.index(recipe), "") if recipe in RECIPE_ORDER else (len(RECIPE_ORDER), recipe)


# ---------------------------------------------------------------------------------------------- tables
METRIC_HEADERS = ["Encoder", "Decoder", "Data", "F1", "BLEU (corpus)", "BLEU (sent. mean)", "ROUGE-L",
                  "F1 (paper)", "BLEU (paper)", "ROUGE-L (paper)"]


def _metric_row(run: Run, paper) -> list[str]:
    m = run.metrics
    ours = [run.encoder.name, run.decoder.name, run.data, _pct(m["f1"]), _pct(m["bleu_corpus"]),
            _pct(m["bleu_sentence_mean"]), _pct(m["rougeL"])]
    return ours + ([_pct(paper.f1), _pct(paper.bleu), _pct(paper.rougeL)] if paper else [NA] * 3)


def table3_runs(runs: list[Run]) -> list[Run]:
    """Pairs of equal size: the intrinsic-data alignment study."""
    same = [r for r in runs if r.encoder.preset == r.decoder.preset]
    return sorted(same, key=lambda r: (_recipe_key(r.data), r.encoder.params, _recipe_key(r.encoder.recipe),
                                       _recipe_key(r.decoder.recipe)))


def size_sweeps(runs: list[Run]) -> list[tuple[str, str, list[Run]]]:
    """[(fixed side, its preset, runs)]: runs with the same (encoder recipe, decoder recipe, data) and the
    same preset on one side while the other side's preset varies, sorted by the varied side's size."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.triple, []).append(r)
    sweeps = []
    for triple in sorted(groups, key=lambda t: tuple(map(_recipe_key, t))):
        for fixed, varied in (("encoder", "decoder"), ("decoder", "encoder")):
            by_fixed: dict[str, list[Run]] = {}
            for r in groups[triple]:
                by_fixed.setdefault(getattr(r, fixed).preset, []).append(r)
            for preset, line in by_fixed.items():
                if len({getattr(r, varied).preset for r in line}) > 1:
                    sweeps.append((fixed, preset, sorted(line, key=lambda r: getattr(r, varied).params)))
    return sweeps


def table4_runs(runs: list[Run]) -> list[Run]:
    """Every run in a size sweep, plus the aligned runs (encoder recipe = decoder recipe = data) of the
    same data as references; ordered like the paper's Table 4."""
    swept = {id(r) for _, _, line in size_sweeps(runs) for r in line}
    datas = {r.data for r in runs if id(r) in swept}
    chosen = [r for r in runs if id(r) in swept
              or (r.data in datas and r.encoder.recipe == r.decoder.recipe == r.data)]

    def key(r):
        aligned = r.encoder.recipe == r.decoder.recipe == r.data
        return (_recipe_key(r.data), aligned, _recipe_key(r.encoder.recipe), _recipe_key(r.decoder.recipe),
                r.encoder.params, r.decoder.params)

    return sorted(chosen, key=key)


def _table3(runs: list[Run]) -> str:
    rows = table3_runs(runs)
    if not rows:
        return "_No runs with equal encoder and decoder sizes._"
    return _table(METRIC_HEADERS, [_metric_row(r, r.paper_row()) for r in rows])


def _table4(runs: list[Run]) -> str:
    rows = table4_runs(runs)
    if not rows:
        return "_No size sweeps (a group of runs with the same recipes and data but different sizes)._"
    return _table(METRIC_HEADERS, [_metric_row(r, r.paper_row()) for r in rows])


def _efficiency_table(runs: list[Run]) -> str:
    headers = ["Encoder", "Decoder", "Data", "F1", "ctx tokens", "gen tokens", "FLOPs/gen (ICAE)",
               "of which compression", "FLOPs/gen (no compression)", "latency: compression (s)",
               "latency: generation (s)", "latency L / k (r)", "device"]
    rows = []
    for r in sorted(runs, key=lambda r: (r.encoder.params, r.decoder.params, r.label)):
        flops, lat = r.flops_per_generation(), r.latency or {}
        if flops is None and not lat:
            continue
        flops = flops or {}
        rows.append([r.encoder.name, r.decoder.name, r.data, _pct(r.metrics["f1"]),
                     _tokens(r.context_tokens_mean), _tokens(r.generated_tokens_mean or r.context_tokens_mean),
                     _sci(flops.get("total")), _sci(flops.get("compression")), _sci(flops.get("baseline_total")),
                     _pct(lat.get("compression_s")), _pct(lat.get("generation_s")),
                     _latency_shape_text(lat) if lat else NA, str(lat.get("device", NA))])
    if not rows:
        return "_No FLOPs or latency inputs (context_tokens_mean, flops or latency in the summaries)._"
    return _table(headers, rows)


# ---------------------------------------------------------------------------------------------- Fig. 3
def entropy_correlations(samples: list[dict]) -> dict[str, dict[str, dict]]:
    """{side: {metric: correlate(...)}} for the sides whose entropy any sample has."""
    out = {}
    for side, key in ENTROPY_SIDES:
        if not any(s.get(key) is not None for s in samples):
            continue
        entropy = [math.nan if s.get(key) is None else s[key] for s in samples]
        out[side] = {metric: correlate(entropy, [s.get(metric, math.nan) for s in samples])
                     for metric, _ in SAMPLE_METRICS}
    return out


def figure3(run: Run, samples: list[dict], correlations: dict, out: Path) -> Path:
    import numpy as np

    sides = list(correlations)
    fig = _new_figure(13, 3.6 * len(sides) + 0.6)
    axes = fig.subplots(len(sides), len(SAMPLE_METRICS), squeeze=False)
    fig.suptitle(f"Entropy vs reconstruction quality: {run.label}  (n = {len(samples)})")
    colors = {"encoder": "tab:blue", "decoder": "tab:orange"}
    for row, side in enumerate(sides):
        key = dict(ENTROPY_SIDES)[side]
        for col, (metric, metric_name) in enumerate(SAMPLE_METRICS):
            ax = axes[row][col]
            pairs = np.array([(s[key], s.get(metric, math.nan)) for s in samples if s.get(key) is not None],
                             dtype=float).reshape(-1, 2)
            pairs = pairs[np.isfinite(pairs).all(axis=1)]
            alpha = min(0.8, max(0.15, 40 / max(len(pairs), 1)))
            ax.scatter(pairs[:, 0], pairs[:, 1], s=10, alpha=alpha, color=colors[side], edgecolors="none")
            c = correlations[side][metric]
            if not math.isnan(c["pearson_r"]):
                slope, intercept = np.polyfit(pairs[:, 0], pairs[:, 1], 1)
                xs = np.array([pairs[:, 0].min(), pairs[:, 0].max()])
                ax.plot(xs, slope * xs + intercept, color="black", linewidth=1.2)
                text = (f"Pearson r = {c['pearson_r']:.3f} (p = {_p(c['pearson_p'])})\n"
                        f"Spearman ρ = {c['spearman_rho']:.3f} (p = {_p(c['spearman_p'])})")
            else:
                text = c["note"]
            ax.text(0.03, 0.04, text, transform=ax.transAxes, fontsize=8.5, va="bottom",
                    bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, edgecolor="0.7"))
            ax.set_ylim(-3, 103)
            ax.set_xlabel(f"entropy measured by the {side} (nats/token)")
            ax.set_ylabel(f"{metric_name} (%)")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_title(f"({'ab'[row]}) {side}-measured entropy", loc="left", fontsize=10)
    path = out / f"fig3_entropy_{run.slug}.png"
    atomic_save_figure(fig, path)
    return path


# ---------------------------------------------------------------------------------------------- Fig. 4
FIG4_SERIES = (("f1", "F1", "o", "tab:blue"), ("bleu_corpus", "BLEU (corpus)", "s", "tab:green"),
               ("bleu_sentence_mean", "BLEU (sent. mean)", "D", "tab:olive"),
               ("rougeL", "ROUGE-L", "^", "tab:red"))
PAPER_FIG4_FIELD = {"f1": "f1", "bleu_corpus": "bleu", "rougeL": "rougeL"}


def fig4_groups(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Encoder recipe D1, data D1, decoder recipe varying: {(encoder preset, decoder preset): runs}, for
    size pairs with at least two decoder recipes."""
    groups: dict[tuple[str, str], dict[str, Run]] = {}
    for r in runs:
        if r.encoder.recipe == "D1" and r.data == "D1":
            groups.setdefault((r.encoder.preset, r.decoder.preset), {}).setdefault(r.decoder.recipe, r)
    return {sizes: sorted(by_recipe.values(), key=lambda r: _recipe_key(r.decoder.recipe))
            for sizes, by_recipe in groups.items() if len(by_recipe) > 1}


def figure4(sizes: tuple[str, str], group: list[Run], out: Path) -> Path:
    fig = _new_figure(9.5, 4.6)
    ax = fig.subplots()
    recipes = [r.decoder.recipe for r in group]
    xs = list(range(len(recipes)))
    for key, name, marker, color in FIG4_SERIES:
        dashed = key == "bleu_sentence_mean"
        ax.plot(xs, [r.metrics[key] for r in group], marker=marker, color=color, label=name,
                linestyle="--" if dashed else "-")
    enc_size, dec_size = (paper_results.PAPER_SIZE_OF_PRESET.get(p, p) for p in sizes)
    if (enc_size, dec_size) == ("500M", "500M"):
        known = [(i, paper_results.FIG4_KNOWN[rec]) for i, rec in enumerate(recipes) if rec in paper_results.FIG4_KNOWN]
        for key, name, marker, color in FIG4_SERIES:
            if key in PAPER_FIG4_FIELD and known:
                ax.scatter([i for i, _ in known], [getattr(row, PAPER_FIG4_FIELD[key]) for _, row in known],
                           marker=marker, s=90, facecolors="none", edgecolors=color, linewidths=1.5,
                           label=f"{name.split(' (')[0]}, paper (Table 3)")
    ax.set_xticks(xs, [f"LLM_{rec}" for rec in recipes])
    ax.set_xlabel("decoder pretraining data (encoder LLM_D1, data D1)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(f"Intrinsic-data gap: encoder {enc_size}, decoder {dec_size}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = out / f"fig4_decoder_recipe_{re.sub(r'[^A-Za-z0-9._-]+', '-', f'{enc_size}_{dec_size}')}.png"
    atomic_save_figure(fig, path)
    return path


# ---------------------------------------------------------------------------------------------- Fig. 5
def fig5_series(runs: list[Run]) -> list[tuple[str, list[tuple[Run, str]]]]:
    """[(legend label, [(run, point label)])] for the Table 4 runs (all runs when there is no size sweep):
    one line per size sweep (see size_sweeps), points labelled with the varied side's size; runs on no
    line are single points."""
    runs = [r for r in (table4_runs(runs) or runs) if r.flops_per_generation() is not None]
    series, on_a_line = [], set()
    for fixed, preset, line in size_sweeps(runs):
        er, dr, data = line[0].triple
        size = paper_results.PAPER_SIZE_OF_PRESET.get(preset, preset)
        if fixed == "encoder":
            series.append((f"E_{er}({size}) + D_{dr}(·) | {data}", [(r, r.decoder.size) for r in line]))
        else:
            series.append((f"E_{er}(·) + D_{dr}({size}) | {data}", [(r, r.encoder.size) for r in line]))
        on_a_line.update(id(r) for r in line)
    for r in runs:
        if id(r) not in on_a_line:
            er, dr, data = r.triple
            series.append((f"E_{er}({r.encoder.size}) + D_{dr}({r.decoder.size}) | {data}", [(r, "")]))
    return series


def figure5(series, out: Path) -> Path:
    fig = _new_figure(10.5, 5.2)
    ax = fig.subplots()
    markers = "osD^vP*X"
    for i, (label, points) in enumerate(series):
        xs = [r.flops_per_generation()["total"] for r, _ in points]
        ys = [r.metrics["f1"] for r, _ in points]
        ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="-" if len(points) > 1 else "none",
                label=label, markersize=7)
        for x, y, (_, text) in zip(xs, ys, points):
            if text:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    everything = [r.flops_per_generation()["total"] for _, points in series for r, _ in points]
    if max(everything) < 10 * min(everything):  # under a decade: log ticks alone would label one value
        from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

        def sci(x, _):
            if x <= 0:  # matplotlib asks for ticks at 0 when there is a single value
                return ""
            exponent = math.floor(math.log10(x))
            return f"${x / 10 ** exponent:.3g}\\times10^{{{exponent}}}$"

        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(sci))
    ax.set_xlabel("FLOPs per generation (compression + reconstruction, log scale)")
    ax.set_ylabel("F1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("F1 vs compute across encoder/decoder sizes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = out / "fig5_flops.png"
    atomic_save_figure(fig, path)
    return path


# ---------------------------------------------------------------------------------------------- Fig. 6
def latency_shape(lat: dict) -> tuple:
    """(L, k, r) a latency record was measured at; k and r are None when the record does not say."""
    ctx, k = lat.get("context_tokens"), lat.get("memory_tokens")
    ratio = lat.get("compression_ratio") or (ctx / k if ctx and k else None)
    return ctx, k, ratio


def _latency_shape_text(lat: dict) -> str:
    ctx, k, ratio = latency_shape(lat)
    return f"{ctx if ctx is not None else NA} / {k if k is not None else '?'} (r {f'{ratio:g}' if ratio else '?'})"


def fig6_bars(runs: list[Run]) -> list[dict]:
    """One bar per (encoder preset, decoder preset, context L, memory slots k) with latency; repeated
    measurements of the same shape averaged, never records of different ratios."""
    bars: dict[tuple, list[dict]] = {}
    for r in runs:
        lat = r.latency
        if lat and lat.get("compression_s") is not None and lat.get("generation_s") is not None:
            ctx, k, _ = latency_shape(lat)
            key = (r.encoder.params, r.decoder.params, r.encoder.size, r.decoder.size, ctx, k)
            bars.setdefault(key, []).append(lat)
    out = []
    def order(item):  # by sizes, then L and k (unknown last)
        *_, ctx, k = item[0]
        return item[0][:2], ctx is None, ctx or 0, k is None, k or 0

    for (_, _, enc, dec, ctx, k), lats in sorted(bars.items(), key=order):
        out.append({"encoder": enc, "decoder": dec, "context_tokens": ctx, "memory_tokens": k,
                    "compression_ratio": latency_shape(lats[0])[2], "n": len(lats),
                    "compression_s": sum(l["compression_s"] for l in lats) / len(lats),
                    "generation_s": sum(l["generation_s"] for l in lats) / len(lats),
                    "device": ", ".join(sorted({str(l.get("device", "?")) for l in lats}))})
    return out


def figure6(bars: list[dict], out: Path) -> Path:
    shapes = {(b["context_tokens"], b["memory_tokens"]) for b in bars}
    devices = {b["device"] for b in bars}
    fig = _new_figure(max(6.0, 1.1 * len(bars) + 2), 4.8)
    ax = fig.subplots()
    xs = list(range(len(bars)))
    comp = [b["compression_s"] for b in bars]
    gen = [b["generation_s"] for b in bars]
    ax.bar(xs, comp, color="tab:blue", label="compression (encoder)")
    ax.bar(xs, gen, bottom=comp, color="tab:orange", label="generation (decoder)")
    for x, c, g in zip(xs, comp, gen):
        ax.annotate(f"{c + g:.3g} s", (x, c + g), textcoords="offset points", xytext=(0, 3), ha="center",
                    fontsize=8)
    labels = [f"E {b['encoder']}\nD {b['decoder']}"
              + ("" if len(shapes) == 1 else f"\nL {b['context_tokens']}, k {b['memory_tokens'] or '?'}") for b in bars]
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("latency per generation (s)")
    ax.set_ylim(0, max(c + g for c, g in zip(comp, gen)) * 1.15)
    if len(shapes) == 1:
        ratio = bars[0]["compression_ratio"]
        shape = f"context {bars[0]['context_tokens']} tokens, k = {bars[0]['memory_tokens'] or '?'}" + (
            f" (r = {ratio:g})" if ratio else "")
    else:
        shape = "several context lengths / ratios (per bar)"
    ax.set_title(f"Inference latency, {shape}" + (f" ({devices.pop()})" if len(devices) == 1 else ""))
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    path = out / "fig6_latency.png"
    atomic_save_figure(fig, path)
    return path


# ---------------------------------------------------------------------------------------------- report
def build_report(runs: list[Run], out: Path) -> tuple[str, list[Path]]:
    """Renders figures into `out` and returns (Markdown text, figure paths)."""
    figures: list[Path] = []
    scored = [r for r in runs if r.has_metrics]  # latency-only summaries count for Fig. 6 alone
    md = ["# ccmega evaluation report", "",
          f"{len(runs)} evaluation summaries. Metrics are percentages (paper §3.4): token F1 (SQuAD), "
          "BLEU-4 (sacrebleu, corpus-level and mean of sentence-level; the paper does not say which it "
          "reports), ROUGE-L F-measure (rouge-score). Paper columns are filled where the (encoder recipe/size, "
          "decoder recipe/size, data) triple matches a row of the paper's Tables 3-4 (Table 3's sizes are "
          "500M/500M).", ""]

    md += ["## Table 3 layout: intrinsic-data alignment (equal encoder and decoder sizes)", "", _table3(scored), ""]
    md += ["## Table 4 layout: scalability of encoder and decoder", "", _table4(scored), ""]
    md += ["## Memory-dependence controls", "", controls_section(scored), ""]

    md += ["## Fig. 3: input entropy vs compression quality", "",
           f"Paper: {paper_results.FIG3_CLAIM}. Entropy = mean per-token NLL of the original under the "
           "encoder's / decoder's pretrained LM (nats/token), correlated per sample.", ""]
    corr_rows = []
    for run in runs:
        if run.per_sample is None:
            continue
        if not run.per_sample.is_file():
            print(f"report: note: {run.path}: per-sample file {run.per_sample} not found; no Fig. 3 for it")
            continue
        samples = read_samples(run.per_sample)
        correlations = entropy_correlations(samples)
        if not correlations:
            print(f"report: note: {run.per_sample} has no entropies; no Fig. 3 for {run.label}")
            continue
        figures.append(figure3(run, samples, correlations, out))
        md.append(f"![Fig. 3 {run.label}]({figures[-1].name})")
        md.append("")
        for side, by_metric in correlations.items():
            for metric, name in SAMPLE_METRICS:
                c = by_metric[metric]
                corr_rows.append([run.label, side, name, str(c["n"]), _r(c["pearson_r"]), _p(c["pearson_p"]),
                                  _r(c["spearman_rho"]), _p(c["spearman_p"]), c["note"] or ""])
    if corr_rows:
        md += [_table(["Run", "entropy by", "metric", "n", "Pearson r", "p", "Spearman ρ", "p", "note"], corr_rows), ""]
    else:
        print("report: note: no per-sample entropies; Fig. 3 skipped")
        md += ["_Skipped: no summary points to a per-sample file with entropies._", ""]

    md += ["## Fig. 4: decoder pretraining data D1..D6 (encoder LLM_D1, data D1)", "",
           f"Paper: {paper_results.FIG4_TREND}. Its values are printed only for D1, D2 and D6 (Table 3, "
           "500M/500M); they are drawn as hollow markers when our sizes are 500M/500M.", ""]
    groups = fig4_groups(scored)
    for sizes, group in groups.items():
        figures.append(figure4(sizes, group, out))
        md += [f"![Fig. 4 {sizes[0]} / {sizes[1]}]({figures[-1].name})", ""]
    if not groups:
        print("report: note: no runs with encoder D1, data D1 and two or more decoder recipes; Fig. 4 skipped")
        md += ["_Skipped: needs runs with encoder recipe D1, data D1 and at least two decoder recipes._", ""]

    md += ["## Figs. 5 and 6: efficiency", "",
           f"Paper: {paper_results.FIG5_6_CLAIM}. FLOPs per generation from `ccmega.evaluation.flops` "
           "(at the mean token counts) unless the summary records them; the no-compression column is the "
           "decoder reading the whole context itself.", "", _efficiency_table(runs), ""]
    series = fig5_series(scored)
    if series:
        figures.append(figure5(series, out))
        md += [f"![Fig. 5]({figures[-1].name})", ""]
    else:
        print("report: note: no FLOPs inputs (context_tokens_mean or flops); Fig. 5 skipped")
        md += ["_Fig. 5 skipped: no summary has `context_tokens_mean` or `flops`._", ""]
    bars = fig6_bars(runs)
    if bars:
        figures.append(figure6(bars, out))
        md += [f"![Fig. 6]({figures[-1].name})", ""]
        odd = sorted({_latency_shape_text(b) for b in bars if b["compression_ratio"] != FIG6_RATIO})
        if odd:
            md += [f"Note: bars measured at L / k (r) = {', '.join(odd)}, not at the paper's r = {FIG6_RATIO} "
                   "(§4.1); each shape is a bar of its own.", ""]
    else:
        print("report: note: no latency records; Fig. 6 skipped")
        md += ["_Fig. 6 skipped: no summary has a `latency` record._", ""]

    md += ["## Table 5: case study, decoder pretrained on random text", ""]
    random_runs = [r for r in runs if r.decoder.recipe == "random"]
    md += ["Paper (encoder LLM_D1):", "", _table(["Origin context", "Reconstruction"],
           [[_cell(paper_results.TABLE5_ORIGIN), _cell(paper_results.TABLE5_RECONSTRUCTION)]]), ""]
    case_rows = []
    for run in random_runs:
        if run.per_sample and run.per_sample.is_file():
            sample = next((s for s in read_samples(run.per_sample) if "reference" in s and "reconstruction" in s), None)
            if sample:
                case_rows.append([run.label, _cell(sample["reference"]), _cell(sample["reconstruction"]),
                                  _pct(sample.get("f1"))])
    if case_rows:
        md += ["Ours (first test sample):", "", _table(["Run", "Origin context", "Reconstruction", "F1"], case_rows), ""]
    else:
        md += ["_Ours: no run with a random-text decoder and a per-sample file._", ""]

    md += ["## Inputs", ""] + [f"- `{r.path}`: {r.label}" for r in runs] + [""]
    return "\n".join(md), figures


def _cell(text: str, limit: int = 1000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " …"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ccmega report", description="Markdown tables and PNG figures like the paper's from evaluation summaries.")
    parser.add_argument("inputs", nargs="+", help="summary JSON files, or folders to search for them")
    parser.add_argument("--out", default="report", help="output folder for report.md and the PNGs")
    args = parser.parse_args(argv)

    runs = collect_runs(args.inputs)
    if not runs:
        print("report: no evaluation summaries found in " + ", ".join(args.inputs))
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"report: {len(runs)} summaries; writing to {out}/")
    text, figures = build_report(runs, out)
    atomic_write_text(out / "report.md", text)
    for path in figures:
        print(f"report: wrote {path}")
    print(f"report: {len(runs)} runs, {len(figures)} figures -> {out / 'report.md'}")
    return 0
