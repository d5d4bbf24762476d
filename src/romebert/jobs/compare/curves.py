"""The arithmetic of a comparison: speed-up curves, the metric at a target speed-up, mean / std over seeds,
and the report's tables built from the run records (pure functions, tested against hand-computed values)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from romebert.jobs.compare.config import PLAIN, CompareConfig, num


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


def aggregate(cfg: CompareConfig, splits: Sequence[str], records: list[dict]) -> dict[str, Any]:
    """Per-exit, speed-up and training-cost tables (mean / std over seeds) from the run records
    (``Comparison.read_run``'s; metric values are fractions)."""
    by = {(r["pooling"], r["method"], r["seed"]): r for r in records if r["status"] != "missing"}
    per_exit: dict = {}
    speed: dict = {}
    for split in splits:
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
                speed[split][pooling][method] = _speedup_entry(cfg, method, runs, vals, split)
    return {"per_exit": per_exit, "speedup": speed, "training_cost": _training_cost(cfg, by)}


def _speedup_entry(cfg: CompareConfig, method: str, runs: list, vals: list, split: str) -> dict[str, Any]:
    """The last exit, and (not for plain) the metric at every target speed-up and the largest speed-up."""
    entry: dict[str, Any] = {"final": mean_std([v[-1] if v else None for v in vals])}
    if method != PLAIN:
        curves = [[(p["speedup"], p["metric"]) for p in r["splits"][split]["sweep"]] if r else None for r in runs]
        entry["at"] = {num(t): mean_std([metric_at_speedup(c, t) if c else None for c in curves]) for t in cfg.speedups}
        entry["max_speedup"] = mean_std([max(p[0] for p in c) if c else None for c in curves])
        entry["criteria"] = _criteria_entry(cfg, runs, split)
    return entry


def _criteria_entry(cfg: CompareConfig, runs: list, split: str) -> dict[str, Any]:
    """Per criterion: the metric at every target speed-up, and what its guaranteed threshold gave (mean / std
    over the seeds whose records hold it)."""
    out: dict[str, Any] = {}
    records = [(r["splits"][split].get("criteria") or {}) if r else {} for r in runs]
    for name in cfg.criteria:
        curves = [rec[name]["sweep"] if name in rec else None for rec in records]
        if not any(curves):
            continue
        entry: dict[str, Any] = {
            "at": {num(t): mean_std([metric_at_speedup(c, t) if c else None for c in curves]) for t in cfg.speedups}
        }
        guarantees = [rec.get(name, {}).get("guarantee") for rec in records]
        if any(guarantees):
            ok = [g if g and g.get("certified") else None for g in guarantees]
            entry["guarantee"] = {
                "certified": sum(g is not None for g in ok),
                "speedup": mean_std([g["speedup"] if g else None for g in ok]),
                "report_metric_drop": mean_std([g["report_metric_drop"] if g else None for g in ok]),
                "share_over": mean_std([g["check"]["share_disagreement_over_epsilon"] if g else None for g in ok]),
            }
        out[name] = entry
    return out


def _ratio(run: dict | None, base: dict | None, key: str) -> float | None:
    """``run[key] / base[key]``; None when either run or value is missing (CPU time of older runs)."""
    a, b = (x.get(key) if x else None for x in (run, base))
    return a / b if a and b else None


def _training_cost(cfg: CompareConfig, by: dict[tuple, dict]) -> dict[str, Any]:
    """Seconds per epoch (whole and per stage), the ratio to plain and train_run seconds, per pooling and method."""
    cost: dict = {}
    for pooling in cfg.poolings:
        cost[pooling] = {}
        for method in cfg.all_methods:
            runs = [by.get((pooling, method, s)) for s in cfg.seeds]
            if not any(runs):
                continue
            stage_names = next(r for r in runs if r)["stage_seconds_per_epoch"].keys()
            bases = [by.get((pooling, PLAIN, seed)) for seed in cfg.seeds]  # same pooling and seed: the fairest
            ratios = [_ratio(r, base, "seconds_per_epoch") for r, base in zip(runs, bases)]
            cpu_ratios = [_ratio(r, base, "cpu_seconds_per_epoch") for r, base in zip(runs, bases)]
            cost[pooling][method] = {
                "seconds_per_epoch": mean_std([r["seconds_per_epoch"] if r else None for r in runs]),
                "stages": {
                    name: mean_std([r["stage_seconds_per_epoch"].get(name) if r else None for r in runs])
                    for name in stage_names
                },
                "ratio_to_plain": mean_std(ratios),
                "cpu_seconds_per_epoch": mean_std([r.get("cpu_seconds_per_epoch") if r else None for r in runs]),
                "cpu_ratio_to_plain": mean_std(cpu_ratios),
                "train_seconds": mean_std([r["train_seconds"] if r else None for r in runs]),
            }
    return cost
