"""The GLUE task table: every per-task fact (file layouts, labels, metrics, submission names) lives here.

Column layouts are those written by ``download_glue_data.py`` (the classic ``<TASK>/{train,dev,test}.tsv``
layout); they were checked against the real SST-2, MRPC, RTE, WNLI, QNLI and diagnostic files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from romebert.core.errors import RomebertError

# Metric key groups: the main metric of a task decides which keys are reported alongside it.
_CLASSIFICATION_GROUPS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "f1": ("accuracy", "f1", "acc_and_f1"),
    "acc_and_f1": ("accuracy", "f1", "acc_and_f1"),
    "mcc": ("mcc",),
}
_REGRESSION_GROUPS: dict[str, tuple[str, ...]] = {
    "pearson": ("pearson", "spearman", "corr"),
    "spearman": ("pearson", "spearman", "corr"),
    "corr": ("pearson", "spearman", "corr"),
}


@dataclass(frozen=True)
class SplitSpec:
    """How one file of a task is laid out (column indices are 0-based; ``-1`` means the last column)."""

    file: str
    text_a: int
    text_b: int | None
    label: int | None  # None for unlabeled (test) files
    header: bool  # CoLA train/dev have no header row
    min_columns: int  # rows with fewer tab-separated columns are malformed


@dataclass(frozen=True)
class TaskSpec:
    """Everything romebert needs to know about one task."""

    name: str
    directory: str
    labels: tuple[str, ...] | None  # None => regression; strings exactly as written in the files
    metric: str
    metrics: tuple[str, ...]
    splits: dict[str, SplitSpec]
    eval_splits: tuple[str, ...]
    test_files: tuple[tuple[str, str], ...]
    hub_name: str | None
    # Text columns of the task in the HF "nyu-mll/glue" dataset (they differ from the TSV headers).
    hub_columns: tuple[str, str | None] = ("sentence", None)
    # RomeBERT SD+GR: which loss is the anchor A that is kept as is ("exits" or "final"); the
    # reference anchors on the final loss for MNLI and QQP and on the exit losses elsewhere.
    gr_anchor: str = "exits"

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        """True when examples have a second text (sentence-pair task)."""
        return self.hub_columns[1] is not None

    def split(self, split: str) -> SplitSpec:
        """The layout of ``split``; unknown split -> RomebertError listing the known ones."""
        try:
            return self.splits[split]
        except KeyError:
            known = ", ".join(self.splits) or "none"
            raise RomebertError(f"unknown split '{split}' for task {self.name} (known: {known})") from None

    def split_path(self, data_dir: str | Path, split: str) -> Path:
        """Where ``split`` lives under a GLUE root ``data_dir`` (``<data_dir>/<directory>/<file>``)."""
        return Path(data_dir) / self.directory / self.split(split).file


def _train_dev(
    text_a: int, text_b: int | None, label: int, min_columns: int, header: bool = True
) -> dict[str, SplitSpec]:
    """Labeled train.tsv and dev.tsv of one layout."""
    return {s: SplitSpec(f"{s}.tsv", text_a, text_b, label, header, min_columns) for s in ("train", "dev")}


def _test(text_a: int, text_b: int | None, min_columns: int, file: str = "test.tsv") -> SplitSpec:
    return SplitSpec(file, text_a, text_b, label=None, header=True, min_columns=min_columns)


# "index s1 s2 label" is shared by QNLI, RTE and WNLI (and, without the label, by AX and their tests).
_PAIR4 = {**_train_dev(1, 2, 3, 4), "test": _test(1, 2, 3)}

_NLI_LABELS = ("entailment", "not_entailment")
# Order matches the integer labels of the hub dataset (0 entailment, 1 neutral, 2 contradiction).
_MNLI_LABELS = ("entailment", "neutral", "contradiction")


def _mnli(split: str) -> SplitSpec:
    # train has 12 columns, dev 16 (label1..label5); gold_label is always the last column (-1).
    # Test files have the first 10 columns only.
    if split.startswith("test"):
        return _test(8, 9, 10, file=f"{split}.tsv")
    return SplitSpec(f"{split}.tsv", text_a=8, text_b=9, label=-1, header=True, min_columns=12)


_TASK_LIST: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="CoLA",
        directory="CoLA",
        labels=("0", "1"),
        metric="mcc",
        metrics=("mcc",),
        splits={
            # train/dev have no header: source, label, original label, sentence.
            **_train_dev(3, None, 1, 4, header=False),
            "test": _test(1, None, 2),
        },
        eval_splits=("dev",),
        test_files=(("test", "CoLA.tsv"),),
        hub_name="cola",
    ),
    TaskSpec(
        name="SST-2",
        directory="SST-2",
        labels=("0", "1"),
        metric="accuracy",
        metrics=("accuracy",),
        splits={
            **_train_dev(0, None, 1, 2),
            "test": _test(1, None, 2),
        },
        eval_splits=("dev",),
        test_files=(("test", "SST-2.tsv"),),
        hub_name="sst2",
    ),
    TaskSpec(
        name="MRPC",
        directory="MRPC",
        labels=("0", "1"),
        metric="f1",
        metrics=("accuracy", "f1", "acc_and_f1"),
        splits={
            **_train_dev(3, 4, 0, 5),
            "test": _test(3, 4, 5),
        },
        eval_splits=("dev",),
        test_files=(("test", "MRPC.tsv"),),
        hub_name="mrpc",
        hub_columns=("sentence1", "sentence2"),
    ),
    TaskSpec(
        name="STS-B",
        directory="STS-B",
        labels=None,
        metric="spearman",
        metrics=("pearson", "spearman", "corr"),
        splits={
            # The score is the last column (as in the reference processors).
            **_train_dev(7, 8, -1, 10),
            "test": _test(7, 8, 9),
        },
        eval_splits=("dev",),
        test_files=(("test", "STS-B.tsv"),),
        hub_name="stsb",
        hub_columns=("sentence1", "sentence2"),
    ),
    TaskSpec(
        name="QQP",
        directory="QQP",
        labels=("0", "1"),
        metric="f1",
        metrics=("accuracy", "f1", "acc_and_f1"),
        splits={
            **_train_dev(3, 4, 5, 6),
            "test": _test(1, 2, 3),
        },
        eval_splits=("dev",),
        test_files=(("test", "QQP.tsv"),),
        hub_name="qqp",
        hub_columns=("question1", "question2"),
        gr_anchor="final",
    ),
    TaskSpec(
        name="MNLI",
        directory="MNLI",
        labels=_MNLI_LABELS,
        metric="accuracy",
        metrics=("accuracy",),
        splits={
            split: _mnli(split)
            for split in ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")
        },
        eval_splits=("dev_matched", "dev_mismatched"),
        test_files=(("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv")),
        hub_name="mnli",
        hub_columns=("premise", "hypothesis"),
        gr_anchor="final",
    ),
    TaskSpec(
        name="QNLI",
        directory="QNLI",
        labels=_NLI_LABELS,
        metric="accuracy",
        metrics=("accuracy",),
        splits=dict(_PAIR4),
        eval_splits=("dev",),
        test_files=(("test", "QNLI.tsv"),),
        hub_name="qnli",
        hub_columns=("question", "sentence"),
    ),
    TaskSpec(
        name="RTE",
        directory="RTE",
        labels=_NLI_LABELS,
        metric="accuracy",
        metrics=("accuracy",),
        splits=dict(_PAIR4),
        eval_splits=("dev",),
        test_files=(("test", "RTE.tsv"),),
        hub_name="rte",
        hub_columns=("sentence1", "sentence2"),
    ),
    TaskSpec(
        name="WNLI",
        directory="WNLI",
        labels=("0", "1"),
        metric="accuracy",
        metrics=("accuracy",),
        splits=dict(_PAIR4),
        eval_splits=("dev",),
        test_files=(("test", "WNLI.tsv"),),
        hub_name="wnli",
        hub_columns=("sentence1", "sentence2"),
    ),
    # AX (the diagnostic set) has no training data and no labels: a model trained on MNLI predicts it,
    # so its label set is MNLI's. GLUE scores it with Matthews correlation.
    TaskSpec(
        name="AX",
        directory="diagnostic",
        labels=_MNLI_LABELS,
        metric="mcc",
        metrics=("mcc",),
        splits={"test": _test(1, 2, 3, file="diagnostic.tsv")},
        eval_splits=(),
        test_files=(("test", "AX.tsv"),),
        hub_name="ax",
        hub_columns=("premise", "hypothesis"),
    ),
)

TASKS: dict[str, TaskSpec] = {task.name: task for task in _TASK_LIST}


def _normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _build_aliases() -> dict[str, str]:
    """Every accepted spelling, normalized: canonical name, directory and hub config name."""
    aliases: dict[str, str] = {}
    for task in _TASK_LIST:
        for alias in (task.name, task.directory, task.hub_name or task.name):
            aliases[_normalize(alias)] = task.name
    return aliases


_ALIASES = _build_aliases()


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, ignoring case and punctuation ("sst2", "SST-2", "sts-b", "mnli", "ax")."""
    canonical = _ALIASES.get(_normalize(name))
    if canonical is None:
        raise RomebertError(f"unknown task '{name}' (known tasks: {', '.join(TASKS)})")
    return TASKS[canonical]


def metric_names(metric: str, regression: bool) -> tuple[str, ...]:
    """All metric keys reported together with main metric ``metric``."""
    groups = _REGRESSION_GROUPS if regression else _CLASSIFICATION_GROUPS
    if metric not in groups:
        kind = "regression" if regression else "classification"
        raise RomebertError(f"metric '{metric}' is not available for {kind} (choose from: {', '.join(groups)})")
    return groups[metric]


CUSTOM_TASK = "custom"  # the name of a TaskSpec made for the user's own data


def custom_task(
    labels: tuple[str, ...] | None,
    name: str = CUSTOM_TASK,
    metric: str | None = None,
    pair: bool = False,
) -> TaskSpec:
    """A TaskSpec for the user's own data (read with ``read_custom``); it has no GLUE files.

    ``labels=None`` makes a regression task. ``metric`` defaults to "accuracy" (classification) or
    "spearman" (regression); "f1" needs exactly two labels (the second one is the positive class).
    """
    if labels is not None:
        labels = tuple(str(label) for label in labels)
        if len(labels) < 2:
            raise RomebertError(f"task {name}: a classification task needs at least 2 labels, got {list(labels)}")
        if len(set(labels)) != len(labels):
            raise RomebertError(f"task {name}: duplicate labels in {list(labels)}")
    regression = labels is None
    metric = metric or ("spearman" if regression else "accuracy")
    metrics = metric_names(metric, regression)
    if "f1" in metrics and labels is not None and len(labels) != 2:
        raise RomebertError(f"task {name}: metric '{metric}' needs exactly 2 labels, got {len(labels)}")
    return TaskSpec(
        name=name,
        directory=name,
        labels=labels,
        metric=metric,
        metrics=metrics,
        splits={},
        eval_splits=(),
        test_files=(),
        hub_name=None,
        hub_columns=("text_a", "text_b" if pair else None),
    )
