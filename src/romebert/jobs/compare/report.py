"""The report of a comparison: report.json (every number, the settings and the environment), report.md
rendered from it, and the two figures per dev split. No path of the machine goes into either file."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from romebert.core.environment import backbone_label, now
from romebert.core.options import default_of, option_fields
from romebert.jobs.compare.config import COMPARE_VARIES, full_command, shown_data, shown_invocation
from romebert.jobs.compare.curves import aggregate
from romebert.jobs.compare.markdown import render_markdown
from romebert.training.training_args import TrainingArguments

if TYPE_CHECKING:
    from romebert.data.tasks import TaskSpec
    from romebert.jobs.compare.config import CompareConfig


class Compared(Protocol):
    """What a report reads of a comparison (``runs.Comparison`` is one)."""

    cfg: CompareConfig
    task: TaskSpec
    splits: list[str]
    backbone: str
    gr_anchor: str
    out: Path


FORMAT = "romebert-compare/1"


def figure_names(splits: list[str], split: str) -> dict[str, str]:
    """File names of a split's two figures: per_exit.png and speedup.png, suffixed when there are several splits."""
    suffix = "" if len(splits) == 1 else f"-{split}"
    return {"per_exit": f"per_exit{suffix}.png", "speedup": f"speedup{suffix}.png"}


# settings a comparison may grow or change without making its finished runs other runs
_PLAN_SETTINGS = ("methods", "poolings", "seeds", "speedups", "criteria", "max_metric_drop", "confidence")


def report_settings(comp: Compared) -> dict[str, Any]:
    """report.json's "settings": what every run was trained and evaluated with, and the plan."""
    cfg, task = comp.cfg, comp.task
    training = {f.name: getattr(cfg.training, f.name) for f in option_fields(TrainingArguments)}
    if training.get("backbone") is not None:  # as settings.backbone: named, never a machine path
        training["backbone"] = backbone_label(training["backbone"])
    return {
        "task": task.name,
        "metric": task.metric,
        "splits": comp.splits,
        "backbone": backbone_label(comp.backbone),
        "methods": cfg.all_methods,
        "poolings": cfg.poolings,
        "seeds": cfg.seeds,
        "training": {k: v for k, v in training.items() if k not in COMPARE_VARIES} | {"gr_anchor": comp.gr_anchor},
        "data": asdict(shown_data(cfg.data)),
        "thresholds": cfg.thresholds,
        "speedups": cfg.speedups,
        "criteria": cfg.criteria,
        "max_metric_drop": cfg.max_metric_drop,
        "confidence": cfg.risk_confidence,
    }


def comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """The part of report settings that two reports must share for one's runs to belong in the other. A
    training option that a report does not name (it was written before the option existed) counts as
    its default, so that adding an option does not orphan every committed comparison."""
    out = {k: v for k, v in settings.items() if k not in _PLAN_SETTINGS}
    if isinstance(out.get("training"), dict):
        defaults = {f.name: default_of(f) for f in option_fields(TrainingArguments) if f.name not in COMPARE_VARIES}
        out["training"] = {**defaults, **out["training"]}
    return out


def build_report(comp: Compared, records: list[dict], env: dict, wall: float) -> dict[str, Any]:
    """report.json's content from the run records (``Comparison.read_run``'s)."""
    cfg = comp.cfg
    notes = Path(cfg.notes).read_text(encoding="utf-8") if cfg.notes else None
    return {
        "format": FORMAT,
        "created": now(),
        "command": full_command(cfg),
        "invocation": shown_invocation(cfg.invocation),
        "wall_seconds": wall,
        "environment": env,
        "settings": report_settings(comp),
        **aggregate(cfg, comp.splits, records),
        "figures": {split: figure_names(comp.splits, split) for split in comp.splits},
        "runs": records,
        "notes": notes,
    }


def write_report(comp: Compared, records: list[dict], env: dict, wall: float, final: bool = True) -> dict[str, Any]:
    """report.json, report.md and the figures; returns the JSON object. ``final=False``: report.json only,
    written after each run so that an interrupted comparison's report holds every run finished so far."""
    from romebert.core.files import write_atomic, write_json
    from romebert.jobs.compare.figures import comparison_figures  # matplotlib only when a report is drawn

    out = comp.out
    report = build_report(comp, records, env, wall)
    if not final:
        write_json(out / "report.json", report)
        return report
    comparison_figures(out, report)
    write_json(out / "report.json", report)
    write_atomic(out / "report.md", render_markdown(report))
    print(
        f"report: {out / 'report.md'}, {out / 'report.json'}, figures "
        + ", ".join(str(out / n) for names in report["figures"].values() for n in names.values())
    )
    return report
