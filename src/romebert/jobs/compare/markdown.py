"""report.md, rendered from report.json's content alone (so the two always agree, and an old report.json can
be rendered again): one function per section, each returning its lines, composed by :func:`render_markdown`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from romebert.jobs.compare.config import num

Report = dict[str, Any]


def render_markdown(report: Report) -> str:
    """The whole Markdown report: every section of :data:`SECTIONS`, in order."""
    return "\n".join(line for section in SECTIONS for line in section(report)) + "\n"


def title_section(rep: Report) -> list[str]:
    """Title, when and how fast the report was made, how many runs were trained / reused / missing."""
    env, runs = rep["environment"], rep["runs"]
    missing = [r for r in runs if r["status"] == "missing"]
    counts = {s: sum(r["status"] == s for r in runs) for s in ("trained", "evaluated", "reused", "missing")}
    lines = [f"# Comparison of multi-exit training methods: {rep['settings']['task']}", ""]
    lines.append(
        f"Generated {rep['created']} by romebert {env['romebert']} in {rep['wall_seconds']:.0f} s: "
        f"{len(runs)} runs ({counts['trained']} trained now, {counts['evaluated']} evaluated now, "
        f"{counts['reused']} reused, {counts['missing']} missing)."
    )
    if missing:
        lines.append(
            "Missing runs (not finished; rerun the command without --report-only): "
            + ", ".join(f"{r['pooling']}/{r['method']}/seed{r['seed']}" for r in missing)
            + "."
        )
    return lines + [""]


def command_section(rep: Report) -> list[str]:
    """The full command (every setting spelled out), and the one typed when it differs."""
    lines = ["## Command", "", "```bash", rep["command"], "```", ""]
    if rep["invocation"] and rep["invocation"] != rep["command"]:
        lines += ["As typed:", "", "```bash", rep["invocation"], "```", ""]
    return lines


def setup_section(rep: Report) -> list[str]:
    """Task and data, backbone, methods, training settings, thresholds, versions and machine."""
    st, env = rep["settings"], rep["environment"]
    data, tr, splits = st["data"], st["training"], st["splits"]
    done = _done(rep)
    n_train = sorted({r["num_train_examples"] for r in done if r.get("num_train_examples") is not None})
    n_dev = {
        s: sorted({r["splits"][s]["examples"] for r in done if r["splits"][s]["examples"] is not None}) for s in splits
    }
    subset = (
        f" (seeded subset, subset seed {data['subset_seed']}, the same for every run)"
        if data["max_train_examples"]
        else ""
    )
    lines = [
        "## Setup",
        "",
        f"- Task: {st['task']}, dev split(s) {', '.join(splits)}, metric `{st['metric']}`; "
        f"train examples: {', '.join(map(str, n_train)) or 'n/a'}"
        + subset
        + "; dev examples: "
        + ", ".join(f"{s} {', '.join(map(str, v)) or 'n/a'}" for s, v in n_dev.items())
        + ".",
        f"- Backbone: `{st['backbone']}`; max sequence length {data['max_seq_length']}.",
        f"- Methods: {', '.join(st['methods'])}; exit pooling: {', '.join(st['poolings'])}; "
        f"seeds: {', '.join(map(str, st['seeds']))} (a seed sets initialisation, dropout and batch order).",
        "- Training: "
        + ", ".join(
            f"{k} {num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v}" for k, v in tr.items()
        )
        + " (unset values: the reference defaults).",
        f"- Thresholds swept on dev: {len(st['thresholds'])} values from {num(min(st['thresholds']))} "
        f"to {num(max(st['thresholds']))}; all numbers below are dev numbers (no test set is used).",
        f"- Versions: romebert {env['romebert']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"numpy {env['numpy']}, Python {env['python']}.",
        f"- Machine: {env['cpu']}, {env['cpu_count']} logical CPUs ({env['cpus_usable']} usable, "
        f"{env['torch_threads']} torch threads), device {env['device']}"
        + (f" ({env['gpu']})" if env.get("gpu") else "")
        + f"; {env['platform']}.",
    ]
    other_env = {json.dumps(r["environment"], sort_keys=True) for r in done if r.get("environment")}
    if len(other_env) > 1 or (other_env and json.dumps(env, sort_keys=True) not in other_env):
        lines.append(
            "- Note: some runs were trained in another environment (see `runs[].environment` in "
            "report.json); compare their timings with care."
        )
    return lines + [""]


def per_exit_section(rep: Report) -> list[str]:
    """One table per split and pooling: every exit's metric, mean ± std over seeds."""
    st = rep["settings"]
    seeds_n = len(st["seeds"])
    lines = [f"## Per-exit dev {st['metric']} (%, mean ± std over {seeds_n} seed{'s' * (seeds_n > 1)})", ""]
    lines.append(
        "Every example leaves at that exit. `plain` trains only the last layer's classifier, so only its "
        "last exit is shown. `(k/n)`: only k of n seeds finished."
    )
    for split in st["splits"]:
        for pooling in st["poolings"]:
            table = rep["per_exit"][split].get(pooling, {})
            if not table:
                continue
            n_layers = max(len(v) for v in table.values())
            lines += ["", f"### {split}, {pooling} pooling", ""]
            lines += _table(
                ["method", *[f"exit {i}" for i in range(1, n_layers + 1)]],
                [[m, *[_pct(c) for c in col]] for m, col in table.items()],
            )
    return lines + [""]


def speedup_section(rep: Report) -> list[str]:
    """One table per split: the metric at the target layer speed-ups, the last exit and the largest speed-up."""
    st = rep["settings"]
    targets = [num(t) for t in st["speedups"]]
    lines = [f"## Dev {st['metric']} at fixed layer speed-ups (%, mean ± std over seeds)", ""]
    lines.append(
        "Layer speed-up = L / mean exit layer. For each seed, the threshold sweep gives points "
        "(speed-up, metric); they are sorted by speed-up, where several thresholds give the same speed-up "
        "the best metric is kept (same cost; a threshold picked on dev would take the better one), and the "
        "metric at a target is read off the piecewise-linear curve through them. A target beyond a seed's "
        "largest speed-up has no value (n/a; `(k/n)` when only k seeds reach it). `final` is the last "
        "exit (no early exit, 1x); for `plain` it is the only number."
    )
    for split in st["splits"]:
        rows = []
        for pooling in st["poolings"]:
            for m, e in rep["speedup"][split].get(pooling, {}).items():
                at = e.get("at")
                rows.append(
                    [
                        pooling,
                        m,
                        _pct(e["final"]),
                        *[_pct(at[t]) if at else "—" for t in targets],
                        _plain(e.get("max_speedup"), ".2f", "x") if at else "—",
                    ]
                )
        lines += ["", f"### {split}", ""]
        lines += _table(["pooling", "method", "final (1x)", *[f"{t}x" for t in targets], "max speed-up"], rows)
    return lines + [""]


def criteria_section(rep: Report) -> list[str]:
    """Per split: every compared criterion's metric at the target speed-ups, per method (from cached logits)."""
    st = rep["settings"]
    criteria = st.get("criteria") or ["entropy"]
    if criteria == ["entropy"]:
        return []
    targets = [num(t) for t in st["speedups"]]
    lines = [f"## Exit criteria: dev {st['metric']} at fixed layer speed-ups (%, mean ± std over seeds)", ""]
    lines.append(
        "Each criterion swept over its own grid (100 quantiles of its scores on these dev logits), read off "
        "the curve as above. Runs reused from an older report without these sweeps show —."
    )
    for split in st["splits"]:
        rows = []
        for pooling in st["poolings"]:
            for m, e in rep["speedup"][split].get(pooling, {}).items():
                for c in criteria:
                    entry = (e.get("criteria") or {}).get(c)
                    if entry is not None:
                        rows.append([pooling, m, c, *[_pct(entry["at"][t]) for t in targets]])
        lines += ["", f"### {split}", ""]
        lines += _table(["pooling", "method", "criterion", *[f"{t}x" for t in targets]], rows)
    return lines + [""]


def guarantee_section(rep: Report) -> list[str]:
    """The thresholds chosen with a guarantee, and how often the guarantee broke over random dev splits."""
    st = rep["settings"]
    if st.get("confidence") is None:
        return []
    eps, conf = st["max_metric_drop"], st["confidence"]
    lines = [f"## Thresholds with a guarantee (disagreement with the final exit <= {eps}, confidence {conf})", ""]
    lines.append(
        "Learn-then-Test on a seeded half of dev (exact binomial p-values, fixed-sequence testing): the most "
        f"aggressive threshold certified to change the final exit's answer on at most {100 * eps:g} % of new "
        f"inputs with probability {conf}. Speed-up and drop (percentage points of the metric against the final "
        "exit) are measured on the other half. `over ε`: the share of 20 random calibration / report splits "
        f"whose report half disagreed on more than {100 * eps:g} % (the guarantee allows {1 - conf:.2f}, up to "
        "the report half's own sampling error). `certified`: seeds with a certified threshold."
    )
    for split in st["splits"]:
        rows = []
        for pooling in st["poolings"]:
            for m, e in rep["speedup"][split].get(pooling, {}).items():
                for c, entry in (e.get("criteria") or {}).items():
                    g = entry.get("guarantee")
                    if g is not None:
                        rows.append([pooling, m, c, str(g["certified"]), _plain(g["speedup"], ".2f", "x"),
                                     _pct(g["report_metric_drop"], 2), _plain(g["share_over"], ".2f")])  # fmt: skip
        lines += ["", f"### {split}", ""]
        lines += _table(["pooling", "method", "criterion", "certified", "speed-up", "drop", "over ε"], rows)
    return lines + [""]


def training_cost_section(rep: Report) -> list[str]:
    """Seconds per epoch (whole and per stage) and the ratio to plain, per pooling and method."""
    lines = ["## Training cost", ""]
    lines.append(
        "Seconds per epoch = wall time of the training loop (all its stages) / epochs, from each run's "
        "train_summary.json (it includes saving the per-epoch checkpoint); runs are trained one after another in "
        "one process. `× plain`: per seed, divided "
        "by the `plain` run of the same pooling and seed (one classifier on the last layer, DeeBERT's stage "
        "one alone), then mean ± std over seeds. DeeBERT's two stages are listed separately; `romebert-sdgr` "
        "pays a second backward pass for the gradient projection. The two-stage methods continue from "
        "plain's fine-tuning (the same training), so their first stage's time is plain's and their "
        "`train_run s` covers the rest. Wall time includes everything else running on the machine, and "
        "the time a paused run stood still; `CPU s / epoch` is the training process's CPU time (all its "
        "threads), which neither inflates, and `× plain (CPU)` its ratio (n/a for runs trained before "
        "romebert recorded it)."
    )
    rows = []
    for pooling in rep["settings"]["poolings"]:
        for m, c in rep["training_cost"].get(pooling, {}).items():
            stages = " + ".join(f"{name} {_plain(ms)}" for name, ms in c["stages"].items())
            rows.append(
                [
                    pooling,
                    m,
                    _plain(c["seconds_per_epoch"]),
                    stages,
                    _plain(c["ratio_to_plain"], ".2f"),
                    _plain(c.get("cpu_seconds_per_epoch")),
                    _plain(c.get("cpu_ratio_to_plain"), ".2f"),
                    _plain(c["train_seconds"], ".0f"),
                ]
            )
    header = ["pooling", "method", "s / epoch", "per stage (s / epoch)", "× plain", "CPU s / epoch", "× plain (CPU)",
              "train_run s"]  # fmt: skip
    return lines + [""] + _table(header, rows) + [""]


def runs_section(rep: Report) -> list[str]:
    """Every run's status, wall times, steps and folder."""
    lines = [
        "## Runs",
        "",
        "Wall time of every run: `train_run s` is the whole training job (data, model load, "
        "training, saving), `eval s` the evaluation (one pass per dev split, sweep, plots).",
        "",
    ]
    rows = []
    for r in rep["runs"]:
        if r["status"] == "missing":
            rows.append([r["pooling"], r["method"], str(r["seed"]), "missing", "", "", "", "", f"`{r['dir']}`"])
            continue
        ev = r.get("eval_wall_seconds")
        rows.append(
            [
                r["pooling"],
                r["method"],
                str(r["seed"]),
                r["status"],
                f"{r['train_seconds']:.1f}",
                " + ".join(f"{s['seconds']:.1f}" for s in r["stages"]),
                " + ".join(str(s["steps"]) for s in r["stages"]),
                f"{ev:.1f}" if ev is not None else "n/a",
                f"`{r['dir']}`",
            ]
        )
    header = ["pooling", "method", "seed", "status", "train_run s", "stage s", "steps", "eval s", "folder"]
    return lines + _table(header, rows) + [""]


def figures_section(rep: Report) -> list[str]:
    """Links to every split's two figures."""
    metric = rep["settings"]["metric"]
    lines = ["## Figures", ""]
    for split, names in rep["figures"].items():
        lines += [
            f"{split}: {metric} of every exit, and {metric} against layer speed-up (mean over seeds, band ± std; "
            "markers at the target speed-ups; ★ plain's last layer).",
            "",
            f"![per-exit {metric}, {split}]({names['per_exit']})",
            "",
            f"![{metric} against layer speed-up, {split}]({names['speedup']})",
            "",
        ]
    return lines


def reading_section(rep: Report) -> list[str]:
    """The written reading (``--notes``), or how to add one."""
    if rep["notes"]:
        return ["## Reading", "", rep["notes"].rstrip()]
    return [
        "## Reading",
        "",
        "_Not written yet. Add it with the same command plus `--report-only --notes FILE` "
        "(FILE: Markdown appended here; nothing is retrained)._",
    ]


SECTIONS: tuple[Callable[[Report], list[str]], ...] = (
    title_section,
    command_section,
    setup_section,
    per_exit_section,
    speedup_section,
    criteria_section,
    guarantee_section,
    training_cost_section,
    runs_section,
    figures_section,
    reading_section,
)


def _done(rep: Report) -> list[dict]:
    return [r for r in rep["runs"] if r["status"] != "missing"]


def _pct(ms: dict | None, digits: int = 1) -> str:
    """``mean ± std`` in percent; "(k/n)" when only k of n seeds have a value; "n/a" when none."""
    if ms is None:
        return "—"
    if ms["mean"] is None:
        return "n/a"
    s = f"{100 * ms['mean']:.{digits}f}"
    if ms["std"] is not None:
        s += f" ± {100 * ms['std']:.{digits}f}"
    if ms["n"] < ms["of"]:
        s += f" ({ms['n']}/{ms['of']})"
    return s


def _plain(ms: dict | None, fmt: str = ".1f", suffix: str = "") -> str:
    """``mean ± std`` as plain numbers (seconds, ratios); "n/a" when there is none."""
    if ms is None or ms["mean"] is None:
        return "n/a"
    s = f"{ms['mean']:{fmt}}{suffix}"
    if ms["std"] is not None:
        s += f" ± {ms['std']:{fmt}}"
    return s


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]
