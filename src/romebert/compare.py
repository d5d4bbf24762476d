"""``romebert compare``: train several methods x exit poolings x seeds on one task, evaluate every exit,
sweep thresholds, and write one report (Markdown + JSON + two figures).

Layout of a comparison folder::

    <out>/runs/<pooling>/<method>/seed<k>/   an ordinary run folder (see pipeline.py), plus compare_run.json
    <out>/report.md, <out>/report.json        tables, settings, environment, wall time of every run
    <out>/per_exit.png, <out>/speedup.png     one panel per pooling, one line per method
                                              (tasks with several dev splits: per_exit-<split>.png, ...)

A run is finished when ``train_summary.json`` and ``eval/<split>/sweep.json`` of every dev split exist;
finished runs are reused, so rerunning the same command continues an interrupted comparison. A run
that was trained but not evaluated is only evaluated; any other half-finished run is deleted and
trained again from scratch (not resumed from a checkpoint: its wall time must cover one whole training);
for the same reason a finished training's checkpoints are deleted (``model/`` is kept).

``plain`` (one classifier on the last layer, DeeBERT's stage one alone) is trained next to the methods
as the training-cost baseline; only its last exit means anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from romebert.environment import backbone_label, environment
from romebert.environment import now as _now
from romebert.errors import RomebertError
from romebert.methods import get_method
from romebert.options import command_args, option_fields
from romebert.policies import REFERENCE_THRESHOLDS
from romebert.training_args import POOLINGS, TrainingArguments

if TYPE_CHECKING:
    from romebert.data import DataSpec

PLAIN = "plain"
DEFAULT_METHODS: tuple[str, ...] = ("deebert", "deebert-sd", "romebert-sd", "romebert-sdgr")
DEFAULT_SEEDS: tuple[int, ...] = (42, 43, 44)
DEFAULT_POOLINGS: tuple[str, ...] = ("mean", "cls")
DEFAULT_SPEEDUPS: tuple[float, ...] = (1.5, 2.0, 3.0)
# The reference grid stops at 0.7 and is coarse above 0.2; a 0.025 grid up to 1.2 (> ln 3) makes the
# interpolated curve follow the real one closely and reaches "everyone exits at layer 1" for up to three
# classes. Sweeping is numpy work on cached logits, so extra thresholds cost nothing measurable.
COMPARE_THRESHOLDS: tuple[float, ...] = tuple(
    sorted({*REFERENCE_THRESHOLDS, *(round(0.025 * k, 3) for k in range(1, 49))})
)
META_FILE = "compare_run.json"
# TrainingArguments fields that need not match for a finished run to be reused: where it was written and
# how it was logged or checkpointed; the backbone and pooling are compared through run.json.
_NOT_FINGERPRINTED = ("output_dir", "preset", "backbone", "pooling", "log_every", "save_steps", "save_total_limit",
                      "device", "progress")  # fmt: skip
_DATA_FINGERPRINT = (
    "task",
    "hub",
    "train_file",
    "text_a",
    "text_b",
    "label_column",
    "labels",
    "regression",
    "metric",
    "max_seq_length",
    "max_train_examples",
    "subset_seed",
)


# ----------------------------------------------------------------------------------------------
# the curve arithmetic (pure, tested against hand-computed values)
def speedup_curve(points: Sequence[tuple[float, float | None]]) -> list[tuple[float, float]]:
    """``(speedup, metric)`` points sorted by speed-up, one per speed-up.

    When several thresholds give the same speed-up the best metric is kept: they cost the same, and a
    threshold chosen on dev would pick the better one. Points without a finite metric are dropped.
    """
    best: dict[float, float] = {}
    for s, m in points:
        if m is None or not math.isfinite(float(m)) or not math.isfinite(float(s)):
            continue
        s, m = float(s), float(m)
        best[s] = max(best.get(s, -math.inf), m)
    return sorted(best.items())


def metric_at_speedup(points: Sequence[tuple[float, float | None]], target: float) -> float | None:
    """Metric at layer speed-up ``target``, piecewise-linear along the sweep curve; None outside it."""
    curve = speedup_curve(points)
    if not curve:
        return None
    xs = np.array([p[0] for p in curve])
    ys = np.array([p[1] for p in curve])
    # speed-ups are 1 / ratio of integer counts: allow float noise at the ends (3.0000000000000004)
    tol = 1e-9 * max(1.0, abs(target))
    if target < xs[0] - tol or target > xs[-1] + tol:
        return None
    return float(np.interp(min(max(target, xs[0]), xs[-1]), xs, ys))


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1) of the values that are not None.

    ``n`` is how many values were present, ``of`` how many there could have been; ``std`` is None
    with fewer than two values.
    """
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    mean = float(np.mean(present)) if present else None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return {"mean": mean, "std": std, "n": len(present), "of": len(values), "values": list(values)}


# ----------------------------------------------------------------------------------------------
@dataclass
class CompareConfig:
    """Everything a comparison needs. ``training`` is the template of every run's TrainingArguments
    (its output_dir, method, seed and pooling are set per run)."""

    data: DataSpec
    output_dir: str
    training: TrainingArguments = field(default_factory=lambda: TrainingArguments(output_dir="."))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    poolings: list[str] = field(default_factory=lambda: list(DEFAULT_POOLINGS))
    include_plain: bool = True
    thresholds: list[float] = field(default_factory=lambda: list(COMPARE_THRESHOLDS))
    speedups: list[float] = field(default_factory=lambda: list(DEFAULT_SPEEDUPS))
    eval_batch_size: int = 64
    device: str = "auto"
    progress: bool = False
    notes: str | None = None  # Markdown file for the report's "Reading" section
    report_only: bool = False  # rebuild the report from finished runs; train nothing
    invocation: str | None = None  # the command line as typed, when known

    @property
    def all_methods(self) -> list[str]:
        """Methods in run order: plain first (the baseline), then the requested ones."""
        return ([PLAIN] if self.include_plain and PLAIN not in self.methods else []) + list(self.methods)

    def validate(self) -> None:
        if not self.methods:
            raise RomebertError("--methods: give at least one method")
        for m in self.methods:
            get_method(m)
        if not self.seeds:
            raise RomebertError("--seeds: give at least one seed")
        bad = [p for p in self.poolings if p not in POOLINGS]
        if bad or not self.poolings:
            raise RomebertError(f"--poolings: choose from {list(POOLINGS)}, got {self.poolings}")
        if any(s <= 0 for s in self.speedups):
            raise RomebertError(f"--speedups must be positive, got {self.speedups}")
        if not self.thresholds:
            raise RomebertError("--thresholds: give at least one threshold")
        if self.notes is not None and not Path(self.notes).is_file():
            raise RomebertError(f"--notes {self.notes}: no such file")
        self.data.validate()
        if not self.data.eval_splits():
            raise RomebertError("compare needs a dev split (give --dev-file)")


@dataclass(frozen=True)
class RunKey:
    pooling: str
    method: str
    seed: int

    def path(self, out: Path) -> Path:
        return out / "runs" / self.pooling / self.method / f"seed{self.seed}"

    def label(self) -> str:
        return f"{self.pooling} pooling, {self.method}, seed {self.seed}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RomebertError(f"{path}: cannot read ({exc})") from None


def _same_backbone(a: str | None, b: str | None) -> bool:
    def norm(x: str | None) -> str | None:
        # a local folder may be named relative or absolute; hub names stay as they are
        return str(Path(x).resolve()) if x and Path(x).exists() else x

    return norm(a) == norm(b)


class Comparison:
    """Runs (or reuses) every run of a :class:`CompareConfig`, then writes the report."""

    def __init__(self, cfg: CompareConfig) -> None:
        cfg.validate()
        from romebert.environment import default_backbone

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.backbone = cfg.training.backbone or default_backbone()
        self.task = cfg.data.task_spec()
        self.splits = cfg.data.eval_splits()
        # train_run resolves "auto" before it saves training_args.json; resolve the same way to compare
        self.gr_anchor = cfg.training.resolved(self.task.gr_anchor).gr_anchor
        self.plan = [
            RunKey(pooling, method, seed)
            for seed in cfg.seeds  # seeds outermost: an interrupted comparison has every method for some seeds
            for pooling in cfg.poolings
            for method in cfg.all_methods
        ]

    # ------------------------------------------------------------------------------------------
    def training_arguments(self, key: RunKey) -> TrainingArguments:
        return dataclasses.replace(
            self.cfg.training,
            output_dir=str(key.path(self.out)),
            method=key.method,
            seed=key.seed,
            pooling=key.pooling,
            gr_anchor=self.gr_anchor,
            device=self.cfg.device,
            progress=self.cfg.progress,
        )

    def state(self, key: RunKey) -> str:
        """Where a run stands: finished, trained (model saved, evaluation incomplete) or absent (train it)."""
        run = key.path(self.out)
        if not (run / "train_summary.json").is_file():
            return "absent"
        if all((run / "eval" / s / "sweep.json").is_file() for s in self.splits):
            return "finished"
        return "trained" if (run / "model").is_dir() else "absent"

    def check_reusable(self, key: RunKey) -> None:
        """A run trained with other settings must not be mixed into this comparison."""
        run = key.path(self.out)
        args = asdict(self.training_arguments(key))
        expected = {k: v for k, v in args.items() if k not in _NOT_FINGERPRINTED}
        stored = _read_json(run / "training_args.json")
        diffs = [f"{k}: {stored[k]!r} there, {v!r} here" for k, v in expected.items() if k in stored and stored[k] != v]
        info = _read_json(run / "run.json")
        if info.get("pooling") != key.pooling:
            diffs.append(f"pooling: {info.get('pooling')!r} there, {key.pooling!r} here")
        if not _same_backbone(info.get("backbone"), self.backbone):
            diffs.append(f"backbone: {info.get('backbone')!r} there, {self.backbone!r} here")
        want = asdict(self.cfg.data)
        for k in _DATA_FINGERPRINT:
            if k in info.get("data", {}) and info["data"][k] != want[k]:
                diffs.append(f"{k}: {info['data'][k]!r} there, {want[k]!r} here")
        if diffs:
            raise RomebertError(
                f"{run} was trained with other settings ({'; '.join(diffs)}); "
                "use another --output-dir or delete that run folder"
            )

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train / evaluate / reuse every run, then write report.md, report.json and the figures."""
        t0 = time.perf_counter()
        states = {key: self.state(key) for key in self.plan}
        # check every reusable run before training anything: a mismatch fails in seconds, not hours in
        for key, st in states.items():
            if st != "absent":
                self.check_reusable(key)
        if self.cfg.report_only and all(st != "finished" for st in states.values()):
            raise RomebertError(f"{self.out}: no finished runs to report on")
        env = environment(self.cfg.device)
        records = []
        for i, key in enumerate(self.plan, start=1):
            status = self.ensure(key, states[key], env, f"[{i}/{len(self.plan)}]")
            records.append(self.read_run(key, status))
        wall = time.perf_counter() - t0
        return write_report(self, records, env, wall)

    def ensure(self, key: RunKey, state: str, env: dict, prefix: str) -> str:
        """Bring one run to "finished"; returns what was done: trained, evaluated, reused or missing."""
        from romebert import pipeline

        run = key.path(self.out)
        if self.cfg.report_only:
            if state != "finished":
                print(f"{prefix} {key.label()}: not finished, left out of the report", flush=True)
                return "missing"
            self._resweep_if_needed(run)
            return "reused"
        if state == "finished":
            self._resweep_if_needed(run)
            print(f"{prefix} {key.label()}: finished earlier, reused", flush=True)
            return "reused"
        meta: dict[str, Any] = {}
        if state == "absent":
            # half-finished leftovers (checkpoints, a stale eval/) would mix with the new run's files
            shutil.rmtree(run, ignore_errors=True)
            print(f"{prefix} {key.label()}: training ...", flush=True)
            t = time.perf_counter()
            summary = pipeline.train_run(self.cfg.data, self.training_arguments(key))
            meta["train_wall_seconds"] = time.perf_counter() - t
            # checkpoints only serve --resume, which a comparison never uses (a run is retrained whole so its
            # wall time is one training); they are 3x the model's size, and a comparison has dozens of runs
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            print(f"{prefix} {key.label()}: trained in {summary['seconds']:.0f} s", flush=True)
        else:
            meta = _read_json(run / META_FILE) if (run / META_FILE).is_file() else {}
        t = time.perf_counter()
        pipeline.evaluate_run(
            run, thresholds=list(self.cfg.thresholds), batch_size=self.cfg.eval_batch_size, device=self.cfg.device
        )
        meta.update(
            eval_wall_seconds=time.perf_counter() - t,
            finished_at=_now(),
            environment=env if state == "absent" else meta.get("environment"),
        )
        from romebert.reports import write_json

        write_json(run / META_FILE, meta)
        print(f"{prefix} {key.label()}: evaluated in {meta['eval_wall_seconds']:.0f} s", flush=True)
        return "trained" if state == "absent" else "evaluated"

    def _resweep_if_needed(self, run: Path) -> None:
        """Runs swept with another threshold grid are re-swept from their cached logits (no model pass)."""
        from romebert.pipeline import sweep_cached

        for split in self.splits:
            rows = _read_json(run / "eval" / split / "sweep.json")
            if [r["threshold"] for r in rows] != [float(t) for t in self.cfg.thresholds]:
                sweep_cached(run / "eval" / split, self.task, list(self.cfg.thresholds))

    # ------------------------------------------------------------------------------------------
    def read_run(self, key: RunKey, status: str) -> dict[str, Any]:
        """The numbers of one run that the report needs (metric values are fractions)."""
        run = key.path(self.out)
        rec: dict[str, Any] = {**asdict(key), "status": status, "dir": str(run.relative_to(self.out))}
        if status == "missing":
            return rec
        summary = _read_json(run / "train_summary.json")
        epochs = float(_read_json(run / "training_args.json")["epochs"])
        meta = _read_json(run / META_FILE) if (run / META_FILE).is_file() else {}
        stages = [
            {"stage": s["stage"], "seconds": float(s["seconds"]), "steps": s.get("steps")} for s in summary["stages"]
        ]
        rec.update(
            epochs=epochs,
            num_train_examples=summary.get("num_train_examples"),
            train_seconds=summary.get("seconds"),  # whole train_run: tokenizing, loading, training, saving
            stages=stages,
            seconds_per_epoch=sum(s["seconds"] for s in stages) / epochs,
            stage_seconds_per_epoch={s["stage"]: s["seconds"] / epochs for s in stages},
            eval_wall_seconds=meta.get("eval_wall_seconds"),
            finished_at=meta.get("finished_at"),
            environment=meta.get("environment"),
            splits={},
        )
        for split in self.splits:
            d = run / "eval" / split
            per_exit = _read_json(d / "per_exit.json")
            rows = _read_json(d / "sweep.json")
            timing = _read_json(d / "timing.json") if (d / "timing.json").is_file() else {}
            rec["splits"][split] = {
                "per_exit": [r[self.task.metric] for r in per_exit],
                "per_exit_all": per_exit,
                "sweep": [{k: r[k] for k in ("threshold", "speedup", "metric", "layer_ratio", "counts")} for r in rows],
                "examples": timing.get("examples"),
                "full_pass_seconds": timing.get("full_pass_seconds"),
            }
        return rec


# ----------------------------------------------------------------------------------------------
# aggregation over seeds
def aggregate(comp: Comparison, records: list[dict]) -> dict[str, Any]:
    """Per-exit, speed-up and training-cost tables (mean / std over seeds) from the run records."""
    cfg = comp.cfg
    done = [r for r in records if r["status"] != "missing"]
    by = {(r["pooling"], r["method"], r["seed"]): r for r in done}
    per_exit: dict = {}
    speed: dict = {}
    for split in comp.splits:
        per_exit[split], speed[split] = {}, {}
        for pooling in cfg.poolings:
            per_exit[split][pooling], speed[split][pooling] = {}, {}
            for method in cfg.all_methods:
                runs = [by.get((pooling, method, s)) for s in cfg.seeds]
                vals = [r["splits"][split]["per_exit"] if r else None for r in runs]
                num_layers = max((len(v) for v in vals if v), default=0)
                if not num_layers:
                    continue
                col = [mean_std([v[i] if v else None for v in vals]) for i in range(num_layers)]
                if method == PLAIN:  # its early exits were never trained: only the last one is a result
                    col = [None] * (num_layers - 1) + col[-1:]
                per_exit[split][pooling][method] = col
                entry: dict[str, Any] = {"final": mean_std([v[-1] if v else None for v in vals])}
                if method != PLAIN:
                    curves = [
                        [(p["speedup"], p["metric"]) for p in r["splits"][split]["sweep"]] if r else None for r in runs
                    ]
                    entry["at"] = {
                        _num(t): mean_std([metric_at_speedup(c, t) if c else None for c in curves])
                        for t in cfg.speedups
                    }
                    entry["max_speedup"] = mean_std([max(p[0] for p in c) if c else None for c in curves])
                speed[split][pooling][method] = entry
    cost: dict = {}
    for pooling in cfg.poolings:
        cost[pooling] = {}
        for method in cfg.all_methods:
            runs = [by.get((pooling, method, s)) for s in cfg.seeds]
            if not any(runs):
                continue
            stage_names = next(r for r in runs if r)["stage_seconds_per_epoch"].keys()
            ratios = []
            for seed, r in zip(cfg.seeds, runs):
                base = by.get((pooling, PLAIN, seed))  # same pooling and seed: the fairest pairing
                ratios.append(r["seconds_per_epoch"] / base["seconds_per_epoch"] if r and base else None)
            cost[pooling][method] = {
                "seconds_per_epoch": mean_std([r["seconds_per_epoch"] if r else None for r in runs]),
                "stages": {
                    name: mean_std([r["stage_seconds_per_epoch"].get(name) if r else None for r in runs])
                    for name in stage_names
                },
                "ratio_to_plain": mean_std(ratios),
                "train_seconds": mean_std([r["train_seconds"] if r else None for r in runs]),
            }
    return {"per_exit": per_exit, "speedup": speed, "training_cost": cost}


# ----------------------------------------------------------------------------------------------
# environment and command
def _num(x: float) -> str:
    """A number as the shortest text that reads back the same: 2 -> "2", 1.5 -> "1.5", 2e-05."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


# TrainingArguments options a comparison sets per run, or not at all (checkpoints are deleted).
COMPARE_VARIES = ("output_dir", "method", "seed", "pooling", "save_steps", "save_total_limit")


def full_command(cfg: CompareConfig) -> str:
    """A ``romebert compare`` command line with every setting spelled out (defaults may change later)."""
    a = ["romebert", "compare", *command_args(cfg.data)]
    a += ["--methods", ",".join(cfg.methods), "--seeds", ",".join(map(str, cfg.seeds))]
    a += ["--poolings", ",".join(cfg.poolings)]
    if not cfg.include_plain:
        a += ["--no-include-plain"]
    a += command_args(cfg.training, skip=COMPARE_VARIES)
    a += ["--speedups", ",".join(_num(s) for s in cfg.speedups)]
    if [float(t) for t in cfg.thresholds] != list(COMPARE_THRESHOLDS):
        a += ["--thresholds", ",".join(_num(t) for t in cfg.thresholds)]
    a += ["--device", cfg.device, "--eval-batch-size", str(cfg.eval_batch_size), "-o", cfg.output_dir]
    return shlex.join(a)


# ----------------------------------------------------------------------------------------------
# report
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
    if ms is None or ms["mean"] is None:
        return "n/a"
    s = f"{ms['mean']:{fmt}}{suffix}"
    if ms["std"] is not None:
        s += f" ± {ms['std']:{fmt}}"
    return s


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _figure_names(splits: list[str], split: str) -> dict[str, str]:
    suffix = "" if len(splits) == 1 else f"-{split}"
    return {"per_exit": f"per_exit{suffix}.png", "speedup": f"speedup{suffix}.png"}


def write_report(comp: Comparison, records: list[dict], env: dict, wall: float) -> dict[str, Any]:
    """report.json, report.md and the figures; returns the JSON object."""
    from romebert.reports import write_atomic, write_json

    cfg, out, task = comp.cfg, comp.out, comp.task
    agg = aggregate(comp, records)
    figures = {split: _figure_names(comp.splits, split) for split in comp.splits}
    for split in comp.splits:
        names = figures[split]
        plot_per_exit_panels(out / names["per_exit"], comp, agg, split)
        plot_speedup_panels(out / names["speedup"], comp, agg, records, split)
    notes = Path(cfg.notes).read_text(encoding="utf-8") if cfg.notes else None
    report = {
        "format": "romebert-compare/1",
        "created": _now(),
        "command": full_command(cfg),
        "invocation": cfg.invocation,
        "wall_seconds": wall,
        "environment": env,
        "settings": {
            "task": task.name,
            "metric": task.metric,
            "splits": comp.splits,
            "backbone": backbone_label(comp.backbone),
            "methods": cfg.all_methods,
            "poolings": cfg.poolings,
            "seeds": cfg.seeds,
            "training": {
                f.name: getattr(cfg.training, f.name)
                for f in option_fields(TrainingArguments)
                if f.name not in COMPARE_VARIES
            }
            | {"gr_anchor": comp.gr_anchor},
            "data": asdict(cfg.data),
            "thresholds": cfg.thresholds,
            "speedups": cfg.speedups,
        },
        **agg,
        "figures": figures,
        "runs": records,
        "notes": notes,
    }
    write_json(out / "report.json", report)
    write_atomic(out / "report.md", render_markdown(comp, report))
    print(
        f"report: {out / 'report.md'}, {out / 'report.json'}, figures "
        + ", ".join(str(out / n) for names in figures.values() for n in names.values())
    )
    return report


def render_markdown(comp: Comparison, rep: dict[str, Any]) -> str:
    """The Markdown report from the JSON object (so report.md and report.json always agree)."""
    cfg, task, env, st = comp.cfg, comp.task, rep["environment"], rep["settings"]
    metric = task.metric
    runs = rep["runs"]
    done = [r for r in runs if r["status"] != "missing"]
    missing = [r for r in runs if r["status"] == "missing"]
    counts = {s: sum(r["status"] == s for r in runs) for s in ("trained", "evaluated", "reused", "missing")}
    L: list[str] = [f"# Comparison of multi-exit training methods: {task.name}", ""]
    L.append(
        f"Generated {rep['created']} by romebert {env['romebert']} in {rep['wall_seconds']:.0f} s: "
        f"{len(runs)} runs ({counts['trained']} trained now, {counts['evaluated']} evaluated now, "
        f"{counts['reused']} reused, {counts['missing']} missing)."
    )
    if missing:
        L.append(
            "Missing runs (not finished; rerun the command without --report-only): "
            + ", ".join(f"{r['pooling']}/{r['method']}/seed{r['seed']}" for r in missing)
            + "."
        )
    L += ["", "## Command", "", "```bash", rep["command"], "```", ""]
    if rep["invocation"] and rep["invocation"] != rep["command"]:
        L += ["As typed:", "", "```bash", rep["invocation"], "```", ""]
    n_train = sorted({r["num_train_examples"] for r in done if r.get("num_train_examples") is not None})
    n_dev = {
        s: sorted({r["splits"][s]["examples"] for r in done if r["splits"][s]["examples"] is not None})
        for s in comp.splits
    }
    tr = st["training"]
    L += [
        "## Setup",
        "",
        f"- Task: {task.name}, dev split(s) {', '.join(comp.splits)}, metric `{metric}`; "
        f"train examples: {', '.join(map(str, n_train)) or 'n/a'}"
        + (
            f" (seeded subset, subset seed {cfg.data.subset_seed}, the same for every run)"
            if cfg.data.max_train_examples
            else ""
        )
        + "; dev examples: "
        + ", ".join(f"{s} {', '.join(map(str, v)) or 'n/a'}" for s, v in n_dev.items())
        + ".",
        f"- Backbone: `{st['backbone']}`; max sequence length {cfg.data.max_seq_length}.",
        f"- Methods: {', '.join(st['methods'])}; exit pooling: {', '.join(st['poolings'])}; "
        f"seeds: {', '.join(map(str, st['seeds']))} (a seed sets initialisation, dropout and batch order).",
        "- Training: "
        + ", ".join(
            f"{k} {_num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v}" for k, v in tr.items()
        )
        + " (unset values: the reference defaults).",
        f"- Thresholds swept on dev: {len(st['thresholds'])} values from {_num(min(st['thresholds']))} "
        f"to {_num(max(st['thresholds']))}; all numbers below are dev numbers (no test set is used).",
        f"- Versions: romebert {env['romebert']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"numpy {env['numpy']}, Python {env['python']}.",
        f"- Machine: {env['cpu']}, {env['cpu_count']} logical CPUs ({env['cpus_usable']} usable, "
        f"{env['torch_threads']} torch threads), device {env['device']}"
        + (f" ({env['gpu']})" if env.get("gpu") else "")
        + f"; {env['platform']}.",
    ]
    other_env = {json.dumps(r["environment"], sort_keys=True) for r in done if r.get("environment")}
    if len(other_env) > 1 or (other_env and json.dumps(env, sort_keys=True) not in other_env):
        L.append(
            "- Note: some runs were trained in another environment (see `runs[].environment` in "
            "report.json); compare their timings with care."
        )
    L.append("")

    seeds_n = len(cfg.seeds)
    L += [f"## Per-exit dev {metric} (%, mean ± std over {seeds_n} seed{'s' * (seeds_n > 1)})", ""]
    L.append(
        "Every example leaves at that exit. `plain` trains only the last layer's classifier, so only its "
        "last exit is shown. `(k/n)`: only k of n seeds finished."
    )
    for split in comp.splits:
        for pooling in cfg.poolings:
            table = rep["per_exit"][split].get(pooling, {})
            if not table:
                continue
            n_layers = max(len(v) for v in table.values())
            L += ["", f"### {split}, {pooling} pooling", ""]
            L += _table(
                ["method", *[f"exit {i}" for i in range(1, n_layers + 1)]],
                [[m, *[_pct(c) for c in col]] for m, col in table.items()],
            )
    L.append("")

    targets = [_num(t) for t in cfg.speedups]
    L += [f"## Dev {metric} at fixed layer speed-ups (%, mean ± std over seeds)", ""]
    L.append(
        "Layer speed-up = L / mean exit layer. For each seed, the threshold sweep gives points "
        "(speed-up, metric); they are sorted by speed-up, where several thresholds give the same speed-up "
        "the best metric is kept (same cost; a threshold picked on dev would take the better one), and the "
        "metric at a target is read off the piecewise-linear curve through them. A target beyond a seed's "
        "largest speed-up has no value (n/a; `(k/n)` when only k seeds reach it). `final` is the last "
        "exit (no early exit, 1x); for `plain` it is the only number."
    )
    for split in comp.splits:
        rows = []
        for pooling in cfg.poolings:
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
        L += ["", f"### {split}", ""]
        L += _table(["pooling", "method", "final (1x)", *[f"{t}x" for t in targets], "max speed-up"], rows)
    L.append("")

    L += ["## Training cost", ""]
    L.append(
        "Seconds per epoch = wall time of the training loop (all its stages) / epochs, from each run's "
        "train_summary.json (it includes saving the per-epoch checkpoint); runs are trained one after another in "
        "one process. `× plain`: per seed, divided "
        "by the `plain` run of the same pooling and seed (one classifier on the last layer, DeeBERT's stage "
        "one alone), then mean ± std over seeds. DeeBERT's two stages are listed separately; `romebert-sdgr` "
        "pays a second backward pass for the gradient projection. Wall time includes everything else "
        "running on the machine."
    )
    rows = []
    for pooling in cfg.poolings:
        for m, c in rep["training_cost"].get(pooling, {}).items():
            stages = " + ".join(f"{name} {_plain(ms)}" for name, ms in c["stages"].items())
            rows.append(
                [
                    pooling,
                    m,
                    _plain(c["seconds_per_epoch"]),
                    stages,
                    _plain(c["ratio_to_plain"], ".2f"),
                    _plain(c["train_seconds"], ".0f"),
                ]
            )
    L += [""] + _table(["pooling", "method", "s / epoch", "per stage (s / epoch)", "× plain", "train_run s"], rows)
    L.append("")

    L += [
        "## Runs",
        "",
        "Wall time of every run: `train_run s` is the whole training job (data, model load, "
        "training, saving), `eval s` the evaluation (one pass per dev split, sweep, plots).",
        "",
    ]
    rows = []
    for r in runs:
        if r["status"] == "missing":
            rows.append([r["pooling"], r["method"], str(r["seed"]), "missing", "", "", "", "", f"`{r['dir']}`"])
            continue
        steps = " + ".join(str(s["steps"]) for s in r["stages"])
        ev = r.get("eval_wall_seconds")
        rows.append(
            [
                r["pooling"],
                r["method"],
                str(r["seed"]),
                r["status"],
                f"{r['train_seconds']:.1f}",
                " + ".join(f"{s['seconds']:.1f}" for s in r["stages"]),
                steps,
                f"{ev:.1f}" if ev is not None else "n/a",
                f"`{r['dir']}`",
            ]
        )
    L += _table(["pooling", "method", "seed", "status", "train_run s", "stage s", "steps", "eval s", "folder"], rows)
    L.append("")

    L += ["## Figures", ""]
    for split, names in rep["figures"].items():
        L += [
            f"{split}: {metric} of every exit, and {metric} against layer speed-up (mean over seeds, band ± std; "
            "markers at the target speed-ups; ★ plain's last layer).",
            "",
            f"![per-exit {metric}, {split}]({names['per_exit']})",
            "",
            f"![{metric} against layer speed-up, {split}]({names['speedup']})",
            "",
        ]

    L += ["## Reading", ""]
    if rep["notes"]:
        L.append(rep["notes"].rstrip())
    else:
        L.append(
            "_Not written yet. Add it with the same command plus `--report-only --notes FILE` "
            "(FILE: Markdown appended here; nothing is retrained)._"
        )
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------------------
# figures: one panel per pooling, one colour per method (the same in both figures)
def _styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    from romebert.plots import _MARKERS

    styles = {}
    for k, m in enumerate(x for x in methods if x != PLAIN):
        styles[m] = {"color": f"C{k % 10}", "marker": _MARKERS[k % len(_MARKERS)]}
    styles[PLAIN] = {"color": "black", "marker": "*"}
    return styles


def _panels(n: int, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(0.8 + 5.0 * n, 4.6), dpi=120)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    fig.suptitle(title)
    return fig, axes


def plot_per_exit_panels(path: Path, comp: Comparison, agg: dict, split: str) -> None:
    """Metric of every exit, mean ± std over seeds, one line per method, one panel per pooling."""
    from romebert.plots import _save

    cfg, metric = comp.cfg, comp.task.metric
    styles = _styles(cfg.all_methods)
    fig, axes = _panels(len(cfg.poolings), f"{comp.task.name} {split}: {metric} of every exit")
    for ax, pooling in zip(axes, cfg.poolings):
        table = agg["per_exit"][split].get(pooling, {})
        n_layers = max((len(v) for v in table.values()), default=1)
        for m, col in table.items():
            s = styles[m]
            if m == PLAIN:
                last = col[-1]
                if last and last["mean"] is not None:
                    _plain_star(ax, n_layers, last["mean"])
                continue
            xs = np.arange(1, len(col) + 1)
            ys = np.array([100 * c["mean"] if c and c["mean"] is not None else np.nan for c in col])
            es = np.array([100 * c["std"] if c and c["std"] is not None else 0.0 for c in col])
            ax.plot(xs, ys, marker=s["marker"], markersize=4, color=s["color"], label=m)
            # a band rather than error bars: four methods' bars on the same exits are unreadable
            ax.fill_between(xs, ys - es, ys + es, color=s["color"], alpha=0.12, linewidth=0)
        ax.set_title(f"{pooling} pooling")
        ax.set_xlabel("exit layer")
        ax.set_xticks(range(1, n_layers + 1) if n_layers <= 24 else ax.get_xticks())
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"{metric} (%)")
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _plain_star(ax, x: float, value: float) -> None:
    """The plain classifier (last layer only) as one black star at ``x``; ``value`` a fraction."""
    ax.plot(
        [x],
        [100 * value],
        linestyle="none",
        marker="*",
        markersize=12,
        color="black",
        label="plain (last layer)",
        zorder=5,
    )


def plot_speedup_panels(path: Path, comp: Comparison, agg: dict, records: list[dict], split: str) -> None:
    """Metric against layer speed-up: each seed's curve interpolated on a common grid, mean ± std band."""
    from romebert.plots import _save

    cfg, metric = comp.cfg, comp.task.metric
    styles = _styles(cfg.all_methods)
    fig, axes = _panels(len(cfg.poolings), f"{comp.task.name} {split}: {metric} against layer speed-up")
    for ax, pooling in zip(axes, cfg.poolings):
        for t in cfg.speedups:
            ax.axvline(t, color="0.8", linewidth=0.8, linestyle=":", zorder=0)
        for m in cfg.all_methods:
            s = styles[m]
            if m == PLAIN:
                e = agg["speedup"][split].get(pooling, {}).get(PLAIN)
                if e and e["final"]["mean"] is not None:
                    _plain_star(ax, 1.0, e["final"]["mean"])
                continue
            curves = [
                speedup_curve([(p["speedup"], p["metric"]) for p in r["splits"][split]["sweep"]])
                for r in records
                if r["status"] != "missing" and r["pooling"] == pooling and r["method"] == m
            ]
            curves = [c for c in curves if c]
            if not curves:
                continue
            lo, hi = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
            # every seed is defined on [lo, hi]: the mean there averages the same number of seeds everywhere
            grid = np.unique(np.concatenate([np.linspace(lo, hi, 80), [t for t in cfg.speedups if lo <= t <= hi]]))
            ys = np.array([np.interp(grid, [p[0] for p in c], [p[1] for p in c]) for c in curves]) * 100
            mean = ys.mean(axis=0)
            at = [t for t in cfg.speedups if lo <= t <= hi]
            marks = [int(np.searchsorted(grid, t)) for t in at]  # markers at the target speed-ups only
            ax.plot(grid, mean, color=s["color"], marker=s["marker"], markersize=5, markevery=marks, label=m)
            if len(curves) > 1:
                std = ys.std(axis=0, ddof=1)
                ax.fill_between(grid, mean - std, mean + std, color=s["color"], alpha=0.15, linewidth=0)
        ax.set_title(f"{pooling} pooling")
        ax.set_xlabel("layer speed-up (x)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"{metric} (%)")
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Train / reuse every run and write the report; returns report.json's content."""
    comp = Comparison(cfg)
    try:
        return comp.run()
    except KeyboardInterrupt:
        print(
            "romebert compare: interrupted; rerun the same command to continue (finished runs are kept)",
            file=sys.stderr,
        )
        raise
