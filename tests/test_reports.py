"""JSON / CSV / GLUE submission writers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from romebert.core.errors import RomebertError
from romebert.core.files import write_json
from romebert.evaluation.reports import submission_files, write_per_exit_csv, write_submission, write_sweep_csv

from fakes import FakeTask

SST2 = FakeTask(name="SST-2", labels=("0", "1"), test_files=(("test", "SST-2.tsv"),))
MNLI = FakeTask(
    name="MNLI",
    labels=("contradiction", "entailment", "neutral"),
    test_files=(("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv")),
)
STSB = FakeTask(name="STS-B", labels=None, test_files=(("test", "STS-B.tsv"),))


def _no_temp_left(d: Path) -> None:
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]


def test_write_json_numpy_and_nan(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "res.json"
    write_json(
        out,
        {
            "a": np.float32(0.5),
            "b": np.int64(3),
            "c": np.arange(3),
            "d": (1, np.bool_(True)),
            "e": float("nan"),
            "f": tmp_path,
            7: None,
        },
    )
    assert json.loads(out.read_text()) == {
        "a": 0.5,
        "b": 3,
        "c": [0, 1, 2],
        "d": [1, True],
        "e": None,
        "f": str(tmp_path),
        "7": None,
    }
    write_json(out, [1, 2])  # overwrite in place
    assert json.loads(out.read_text()) == [1, 2]
    _no_temp_left(out.parent)
    with pytest.raises(RomebertError):
        write_json(out, {"x": object()})
    assert json.loads(out.read_text()) == [1, 2]  # failed write leaves the old file intact
    _no_temp_left(out.parent)


def test_write_submission_classification(tmp_path: Path) -> None:
    out = tmp_path / "SST-2.tsv"
    write_submission(out, np.array([1, 0, 1]), SST2)
    assert out.read_text() == "index\tprediction\n0\t1\n1\t0\n2\t1\n"
    _no_temp_left(tmp_path)


def test_write_submission_mnli_labels(tmp_path: Path) -> None:
    out = tmp_path / "MNLI-m.tsv"
    write_submission(out, [2, 0, 1, 1], MNLI)
    assert out.read_text() == ("index\tprediction\n0\tneutral\n1\tcontradiction\n2\tentailment\n3\tentailment\n")
    with pytest.raises(RomebertError):
        write_submission(out, [3], MNLI)
    with pytest.raises(RomebertError):
        write_submission(out, [0.5], MNLI)


def test_write_submission_regression(tmp_path: Path) -> None:
    out = tmp_path / "STS-B.tsv"
    write_submission(out, np.array([-0.2, 2.34567, 5.7, 4.0], dtype=np.float32), STSB)
    assert out.read_text() == "index\tprediction\n0\t0.000\n1\t2.346\n2\t5.000\n3\t4.000\n"
    with pytest.raises(RomebertError):
        write_submission(out, [math.nan], STSB)


def test_submission_files() -> None:
    assert submission_files(MNLI) == [("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv")]


def test_write_sweep_csv(tmp_path: Path) -> None:
    rows = [
        {
            "threshold": 0.0,
            "acc": 0.9,
            "metric": 0.9,
            "counts": [0, 0, 4],
            "layer_ratio": 1.0,
            "saving": 0.0,
            "speedup": 1.0,
        },
        {
            "threshold": 0.5,
            "acc": np.float64(0.75),
            "metric": 0.75,
            "counts": np.array([2, 1, 1]),
            "layer_ratio": 7 / 12,
            "saving": 5 / 12,
            "speedup": 12 / 7,
            "wall_s": 1.5,
        },
    ]
    out = tmp_path / "sweep.csv"
    write_sweep_csv(out, rows)
    with out.open() as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == [
        "threshold",
        "acc",
        "metric",
        "exit_1",
        "exit_2",
        "exit_3",
        "layer_ratio",
        "saving",
        "speedup",
        "wall_s",
    ]
    assert [r["exit_1"] for r in got] == ["0", "2"]
    assert float(got[1]["layer_ratio"]) == 7 / 12  # full precision round-trips
    assert got[0]["wall_s"] == "" and got[1]["wall_s"] == "1.5"
    _no_temp_left(tmp_path)


def test_write_per_exit_csv(tmp_path: Path) -> None:
    out = tmp_path / "per_exit.csv"
    write_per_exit_csv(out, [{"acc": 0.5, "f1": 0.4}, {"acc": 0.75, "f1": np.float32(0.5)}])
    assert out.read_text() == "exit,acc,f1\n1,0.5,0.4\n2,0.75,0.5\n"


def test_write_submission_with_real_task_table(tmp_path: Path) -> None:
    tasks = pytest.importorskip("romebert.data.tasks")
    mnli = tasks.get_task("MNLI")
    assert [name for _, name in submission_files(mnli)] == ["MNLI-m.tsv", "MNLI-mm.tsv"]
    out = tmp_path / "MNLI-m.tsv"
    write_submission(out, np.arange(mnli.num_labels), mnli)
    expected = "".join(f"{i}\t{label}\n" for i, label in enumerate(mnli.labels))
    assert out.read_text() == "index\tprediction\n" + expected
    stsb = tasks.get_task("STS-B")
    write_submission(out, [7.0], stsb)
    assert out.read_text() == "index\tprediction\n0\t5.000\n"
