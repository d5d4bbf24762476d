"""``romebert compare``: train several methods x exit poolings x seeds on one task, evaluate every exit,
sweep thresholds, and write one report (Markdown + JSON + two figures).

Layout of a comparison folder::

    <out>/runs/<pooling>/<method>/seed<k>/   an ordinary run folder (see romebert.core.runs), plus compare_run.json
    <out>/report.md, <out>/report.json        tables, settings, environment, wall time of every run
    <out>/per_exit.png, <out>/speedup.png     one panel per pooling, one line per method
                                              (tasks with several dev splits: per_exit-<split>.png, ...)

A run is finished when ``train_summary.json`` and ``eval/<split>/sweep.json`` of every dev split exist;
finished runs are reused, so rerunning the same command continues an interrupted comparison. A run
that was trained but not evaluated is only evaluated; one interrupted in training resumes from its last
checkpoint when it was started with the same settings (else it is trained again); a finished training's
checkpoints are deleted (``model/`` is kept). A run whose folder is absent but whose record is in an
earlier ``report.json`` of the same settings is reused from that record: run folders (the models) are not
committed, the report is, so a comparison can continue on another machine or in another session.

The two-stage methods (``deebert``, ``deebert-sd``, ``mixed``) begin with plain fine-tuning, the same
seed, data order and initialisation as ``plain``: they continue from plain's end-of-training checkpoint
(bit-identical to training that stage again), and their first stage's time is plain's.

``plain`` (one classifier on the last layer, DeeBERT's stage one alone) is trained next to the methods
as the training-cost baseline; only its last exit means anything.

The modules, in the order they depend on each other:

- ``config``: :class:`CompareConfig`, the defaults, :func:`full_command` (and how reports show paths);
- ``curves``: speed-up curves, mean / std over seeds, :func:`aggregate` (pure arithmetic);
- ``markdown``: report.md from report.json, one function per section;
- ``report``: report.json's content, writing both files and the figures (``romebert.evaluation.plots``);
- ``runs``: :class:`RunKey`, :class:`Comparison` (train, evaluate or reuse each run) and :func:`run_compare`.
"""

from romebert.jobs.compare.config import (
    COMPARE_THRESHOLDS,
    COMPARE_VARIES,
    DEFAULT_METHODS,
    DEFAULT_POOLINGS,
    DEFAULT_SEEDS,
    DEFAULT_SPEEDUPS,
    PLAIN,
    CompareConfig,
    full_command,
)
from romebert.jobs.compare.curves import aggregate, mean_std, metric_at_speedup, speedup_curve
from romebert.jobs.compare.markdown import render_markdown
from romebert.jobs.compare.report import build_report, write_report
from romebert.jobs.compare.runs import Comparison, RunKey, run_compare

__all__ = [
    "COMPARE_THRESHOLDS",
    "COMPARE_VARIES",
    "DEFAULT_METHODS",
    "DEFAULT_POOLINGS",
    "DEFAULT_SEEDS",
    "DEFAULT_SPEEDUPS",
    "PLAIN",
    "Comparison",
    "CompareConfig",
    "RunKey",
    "aggregate",
    "build_report",
    "full_command",
    "mean_std",
    "metric_at_speedup",
    "render_markdown",
    "run_compare",
    "speedup_curve",
    "write_report",
]
