"""The task table: names, aliases, metrics, split layouts (checked against real headers when present)."""

from __future__ import annotations

import re

import pytest

from romebert.core.errors import RomebertError
from romebert.data.tasks import TASKS, custom_task, get_task

from glue_fixtures import real_glue_dir

ALL = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI", "AX")


def test_table_has_every_task_under_its_canonical_name() -> None:
    assert tuple(TASKS) == ALL
    for name, task in TASKS.items():
        assert task.name == name


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("sst2", "SST-2"), ("SST-2", "SST-2"), ("sst-2", "SST-2"), ("Sst_2", "SST-2"),
        ("mnli", "MNLI"), ("MNLI", "MNLI"), ("sts-b", "STS-B"), ("stsb", "STS-B"), ("STS_B", "STS-B"),
        ("cola", "CoLA"), ("mrpc", "MRPC"), ("qqp", "QQP"), ("qnli", "QNLI"), ("rte", "RTE"),
        ("wnli", "WNLI"), ("ax", "AX"), ("AX", "AX"), ("diagnostic", "AX"),
    ],
)  # fmt: skip
def test_get_task_ignores_case_and_punctuation(alias: str, name: str) -> None:
    assert get_task(alias).name == name


def test_unknown_task_lists_known_tasks() -> None:
    with pytest.raises(RomebertError, match=r"unknown task 'imdb' \(known tasks: CoLA, SST-2, .*AX\)"):
        get_task("imdb")


def test_labels_metrics_and_regression() -> None:
    assert get_task("sts-b").is_regression and get_task("sts-b").num_labels == 1
    assert get_task("sts-b").metrics == ("pearson", "spearman", "corr")
    assert get_task("mnli").num_labels == 3
    assert get_task("cola").metric == "mcc"
    assert get_task("mrpc").metrics == ("accuracy", "f1", "acc_and_f1")
    assert get_task("qqp").metrics == ("accuracy", "f1", "acc_and_f1")
    # Label strings exactly as written in the files.
    assert get_task("sst2").labels == ("0", "1")
    assert get_task("rte").labels == ("entailment", "not_entailment")
    assert get_task("qnli").labels == ("entailment", "not_entailment")
    assert get_task("wnli").labels == ("0", "1")
    for task in TASKS.values():
        assert task.metric in task.metrics
        assert task.is_regression == (task.labels is None)
        if task.labels is not None:
            assert task.num_labels == len(task.labels) >= 2


def test_split_structure_is_consistent() -> None:
    for task in TASKS.values():
        assert set(task.eval_splits) <= set(task.splits)
        for split, _file in task.test_files:
            assert task.splits[split].label is None
        for split, spec in task.splits.items():
            assert (spec.label is None) == split.startswith("test")
            used = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None and c >= 0]
            assert max(used) < spec.min_columns
            assert spec.header == (task.name != "CoLA" or split == "test")
            assert (spec.text_b is None) == (not task.is_pair)


def test_mnli_and_ax() -> None:
    mnli, ax = get_task("mnli"), get_task("ax")
    assert tuple(mnli.splits) == ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")
    assert mnli.eval_splits == ("dev_matched", "dev_mismatched")
    assert mnli.test_files == (("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv"))
    assert mnli.splits["train"].label == -1 and mnli.splits["dev_matched"].label == -1  # gold_label is last
    assert (mnli.splits["test_matched"].text_a, mnli.splits["test_matched"].text_b) == (8, 9)
    assert ax.directory == "diagnostic" and tuple(ax.splits) == ("test",)
    assert ax.splits["test"].file == "diagnostic.tsv"
    assert ax.test_files == (("test", "AX.tsv"),) and ax.labels == mnli.labels
    assert get_task("sst2").test_files == (("test", "SST-2.tsv"),)


def test_hub_names() -> None:
    hub = {task.name: task.hub_name for task in TASKS.values()}
    assert hub == {
        "CoLA": "cola", "SST-2": "sst2", "MRPC": "mrpc", "STS-B": "stsb", "QQP": "qqp", "MNLI": "mnli",
        "QNLI": "qnli", "RTE": "rte", "WNLI": "wnli", "AX": "ax",
    }  # fmt: skip


def test_unknown_split() -> None:
    with pytest.raises(RomebertError, match=r"unknown split 'dev' for task AX \(known: test\)"):
        get_task("ax").split("dev")


def test_custom_task() -> None:
    cls = custom_task(("neg", "pos"))
    assert (cls.metric, cls.metrics, cls.num_labels, cls.splits) == ("accuracy", ("accuracy",), 2, {})
    reg = custom_task(None, name="scores")
    assert (reg.name, reg.metric, reg.metrics, reg.num_labels) == ("scores", "spearman", reg.metrics, 1)
    assert reg.metrics == ("pearson", "spearman", "corr")
    assert custom_task(("a", "b"), metric="f1").metrics == ("accuracy", "f1", "acc_and_f1")
    assert custom_task(("a", "b", "c"), metric="mcc").metrics == ("mcc",)
    with pytest.raises(RomebertError, match="needs exactly 2 labels"):
        custom_task(("a", "b", "c"), metric="f1")
    with pytest.raises(RomebertError, match="metric 'spearman' is not available for classification"):
        custom_task(("a", "b"), metric="spearman")
    with pytest.raises(RomebertError, match="at least 2 labels"):
        custom_task(("a",))
    with pytest.raises(RomebertError, match="duplicate labels"):
        custom_task(("a", "a"))


# Header names at the text_a / text_b / label columns of the real files (None: no such column).
REAL_HEADERS = {
    ("SST-2", "train"): ("sentence", None, "label"),
    ("SST-2", "dev"): ("sentence", None, "label"),
    ("SST-2", "test"): ("sentence", None, None),
    ("MRPC", "train"): ("#1 String", "#2 String", "Quality"),
    ("MRPC", "dev"): ("#1 String", "#2 String", "Quality"),
    ("MRPC", "test"): ("#1 String", "#2 String", None),
    ("RTE", "train"): ("sentence1", "sentence2", "label"),
    ("RTE", "dev"): ("sentence1", "sentence2", "label"),
    ("RTE", "test"): ("sentence1", "sentence2", None),
    ("WNLI", "train"): ("sentence1", "sentence2", "label"),
    ("WNLI", "dev"): ("sentence1", "sentence2", "label"),
    ("WNLI", "test"): ("sentence1", "sentence2", None),
    ("QNLI", "dev"): ("question", "sentence", "label"),
    ("QNLI", "test"): ("question", "sentence", None),
    ("AX", "test"): ("sentence1", "sentence2", None),
}


@pytest.mark.parametrize(("task_name", "split"), list(REAL_HEADERS))
def test_layout_matches_real_file_headers(task_name: str, split: str) -> None:
    root = real_glue_dir()
    if root is None:
        pytest.skip("real GLUE data (../shared/glue or $ROMEBERT_GLUE_DIR) is absent")
    task = get_task(task_name)
    spec = task.splits[split]
    with open(task.split_path(root, split), encoding="utf-8-sig") as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
    assert len(header) >= spec.min_columns
    names = tuple(None if col is None else header[col] for col in (spec.text_a, spec.text_b, spec.label))
    assert names == REAL_HEADERS[(task_name, split)], re.escape(str(header))
