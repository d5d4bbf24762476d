"""The inference benchmark runs end to end on a tiny trained run (a smoke test of the harness; its
figures mean nothing at this size)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import inference_speed  # noqa: E402
from speed import rows as R  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tiny_sst2_run):
    return tiny_sst2_run


def test_the_benchmark_runs_and_reports_every_path(tiny_run, tmp_path):
    out = tmp_path / "speed"
    report = inference_speed.main(["--runs", str(tiny_run), "--work", str(tmp_path / "work"), "--out", str(out),
                                   "--bs1-examples", "3", "--repeats", "1", "--threads", "1", "--no-rss"])  # fmt: skip
    rows = report["rows"]
    assert {(r["runtime"], r["kind"]) for r in rows} == {(rt, k) for rt in ("torch", "ort-fp32", "ort-int8")
                                                         for k in ("full", "engine")}  # fmt: skip
    assert len(rows) == 3 * 5  # per runtime: the full model and four thresholds
    for r in rows:
        assert r["ms"]["1"] > 0 and r["ms"]["32"] > 0 and 0.0 <= r["metric"] <= 1.0
        assert r["vs_same_runtime"]["1"] > 0 and r["vs_ort_int8"]["32"] > 0
        assert 1.0 <= r["mean_exit_layer"] <= 3.0
    full = [r for r in rows if r["kind"] == "full"]
    assert all(r["vs_same_runtime"]["1"] == 1.0 for r in full)
    # the fp32 export predicts as the PyTorch model does: the same dev metric for the full model
    assert full[0]["metric"] == full[1]["metric"]
    assert report["targets"]["SST-2"] and "SST-2" in report["breakdown"]
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == rows
    md = out.with_suffix(".md").read_text()
    assert "| engine <=1pt / ort-int8 |" in md and "Against the targets" in md
    assert str(Path.home()) not in md and "site-packages" not in md  # no machine paths


def test_peak_rss_of_the_onnx_path_is_measured_without_torch(tiny_run, tmp_path):
    work = tmp_path / "work"
    inference_speed.prepare(tiny_run, work)
    row = R.Row("SST-2", "engine <=1pt / ort-int8", "ort-int8", "engine", "<=1pt", 0.3, 0.5, 2.0, 1.5)
    inference_speed.measure_rss(tiny_run, work, [row], threads=1)
    assert 20 < row.peak_rss_mib < 2000
