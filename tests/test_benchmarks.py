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
    kinds = {(rt, k) for rt in ("torch", "ort-fp32", "ort-int8") for k in ("full", "engine")}
    assert {(r["runtime"], r["kind"]) for r in rows} == kinds | {("ort-int8", "full-alt")}
    # per runtime four thresholds; ONNX Runtime's full graph under two session settings; int8 also runs
    # its <=1pt threshold at batch size 1 through the per-layer graphs and through the one graph without
    # spinning, and its full graph as romebert exports and runs graphs (reported, not the baseline)
    assert len(rows) == 5 + 6 + 9
    fp32 = rows[0]["metric"]  # the PyTorch full model: the model the user trained
    for r in rows:
        assert r["ms"]["1"] > 0 and 0.0 <= r["metric"] <= 1.0 and r["fp32_metric"] == fp32
        assert len(r["passes"]["1"]) == 1 and r["vs_ort_int8"]["1"] > 0
        assert 1.0 <= r["mean_exit_layer"] <= 3.0
        if not r["settings"].endswith("at bs 1"):
            assert r["ms"]["32"] > 0 and r["vs_ort_int8"]["32"] > 0
    full = [r for r in rows if r["kind"] == "full"]
    assert {r["settings"] for r in full} == {"", "spinning", "no spinning"}
    for bs in ("1", "32"):  # the baseline is the faster session setting of the full int8 graph
        assert max(r["vs_ort_int8"][bs] for r in full if r["runtime"] == "ort-int8") == 1.0
    # the fp32 export predicts as the PyTorch model does: the same dev metric for the full model
    assert full[0]["metric"] == full[1]["metric"]
    within = [r for r in rows if r["target"] == "<=1pt"]
    assert len(within) == 5 and all(r["fp32_metric"] == fp32 for r in within)
    # within 1 point of fp32 (int8's own batches give its rows slightly other logits than the choice saw)
    assert all(fp32 - r["metric"] <= 0.01 + 1e-9 for r in within if r["runtime"] != "ort-int8")
    one_graph, *others = (r for r in within if r["runtime"] == "ort-int8")
    assert all(r["threshold"] == one_graph["threshold"] and r["metric"] == one_graph["metric"] for r in others)
    # the batch-size-1 ratio is set against the layer speed-up of the inputs timed there (3 of them, 3 layers)
    for r in (r for r in rows if r["kind"] == "engine"):  # 3 layers / (the 3 inputs' summed exits / 3)
        assert 3 <= 9 / r["bs1_layer_speedup"] <= 9 and 9 / r["bs1_layer_speedup"] == pytest.approx(
            round(9 / r["bs1_layer_speedup"])
        )
    assert all(r["bs1_layer_speedup"] is None and r["bs1_ideal_speedup"] is None for r in rows if r["kind"] != "engine")
    # a zero-overhead early exit's speed-up on the same inputs: between 1 and 3x (3 layers)
    ideal = [r["bs1_ideal_speedup"] for r in rows if r["kind"] == "engine"]
    assert all(1.0 - 1e-9 <= x <= 3.0 + 1e-9 for x in ideal), ideal
    assert all(r["bs1_layer_speedup"] == one_graph["bs1_layer_speedup"] for r in others)  # the same decisions
    ratio = next(t for t in report["targets"]["SST-2"] if t["target"].startswith("SST-2: engine <=1pt / ort-int8,"))
    assert ratio["got"] == pytest.approx(one_graph["vs_ort_int8"]["1"] / one_graph["bs1_layer_speedup"])
    assert report["targets"]["SST-2"] and "SST-2" in report["breakdown"]
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == rows
    md = out.with_suffix(".md").read_text()
    assert "| engine <=1pt / ort-int8 |" in md and "Against the targets" in md
    assert "engine <=1pt / ort-int8, batch size 1, speed-up over full ORT int8 / a zero-overhead" in md
    assert "| engine <=1pt / ort-int8 (per-layer graphs at bs 1) |" in md and "min / median / max" in md
    assert "| engine <=1pt / ort-int8 (one graph without spinning at bs 1) |" in md
    assert "Baseline (full ORT int8, best session setting): batch size 1: " in md
    # each pass starts after an idle pause (the previous path's spinning threads stopped), stated
    assert report["settle_seconds"] > 0 and f"each pass after {report['settle_seconds']:g} s idle" in md
    alt = next(r for r in rows if r["kind"] == "full-alt")
    assert alt["settings"] == "spinning, romebert's fusions" and alt["ms"]["32"] > 0
    assert f"- for comparison: engine <=1pt / ort-int8 against {alt['path']}" in md
    assert str(Path.home()) not in md and "site-packages" not in md  # no machine paths


def test_peak_rss_of_the_onnx_path_is_measured_without_torch(tiny_run, tmp_path):
    work = tmp_path / "work"
    inference_speed.prepare(tiny_run, work)
    row = R.Row("SST-2", "engine <=1pt / ort-int8", "ort-int8", "engine", "<=1pt", 0.3, 0.5, 2.0, 1.5)
    inference_speed.measure_rss(tiny_run, work, [row], threads=1)
    assert 20 < row.peak_rss_mib < 2000


def test_the_load_test_measures_every_service_and_compares_them(tiny_run, tmp_path):
    import serve_load

    from romebert.cli import main

    export = tmp_path / "export"
    assert main(["export", str(tiny_run), "-o", str(export), "--threshold", "0.5", "--full-graph"]) == 0
    out = tmp_path / "load"
    report = serve_load.main(["--export", str(export), "--rates", "5,10", "--duration", "1", "--repeats", "2",
                              "--examples", "8", "--out", str(out)])  # fmt: skip
    assert list(report["services"]) == ["early_exit", "full_depth", "plain_model"]
    for service in report["services"].values():
        assert [r["offered"] for r in service["rows"]] == [5.0, 10.0]
        assert all(r["answered"] == r["sent"] and r["p50"] <= r["p95"] <= r["p99"] for r in service["rows"])
        assert all(len(r["p95_of_repeats"]) == 2 and r["p95"] in r["p95_of_repeats"] for r in service["rows"])
    for key in ("full_depth", "plain_model"):
        a = report["against"][key]
        assert a["throughput_at_p95_50ms"]["baseline"] > 0 or a["throughput_at_p95_50ms"]["ratio"] is None
        assert all(x["ratio"] > 0 for x in a["p95_ratio_below_saturation"])
    md = out.with_suffix(".md").read_text()
    assert "| 10 | plain model (one graph) |" in md and "Against full depth" in md
    assert "site-packages" not in md  # the export's source is named by run and package, not by path


def test_load_test_pairs_only_loads_where_both_services_kept_up():
    import serve_load

    def row(offered, throughput, p95, statuses=None):
        return {"offered": offered, "throughput": throughput, "p95": p95, "statuses": statuses or {"200": 1}}

    early = [row(10, 10, 0.02), row(20, 20, 0.03), row(40, 40, 0.04)]
    base = [row(10, 10, 0.04), row(20, 15, 0.9), row(40, 30, 5.0, {"200": 1, "503": 3})]
    a = serve_load.against(early, base)
    assert a["p95_ratio_below_saturation"] == [{"offered": 10, "ratio": 0.5}]
    assert a["throughput_at_p95_50ms"] == {"early_exit": 40, "baseline": 10, "ratio": 4.0}


def test_load_sweep_stops_at_saturation_and_bisects_the_50ms_knee():
    import serve_load

    calls = []

    def load(rate, searched):  # a service whose p95 passes 50 ms at 130/s and that saturates at 300/s
        calls.append((rate, searched))
        thr = min(rate, 300.0)
        return {"offered": rate, "throughput": thr, "p95": 0.01 if rate < 130 else 0.2, "statuses": {"200": 1}}

    rows = serve_load.sweep(load, [50, 100, 200, 400, 800], steps=3)
    assert [r for r, s in calls if not s] == [50, 100, 200, 400]  # 400 saturated: 800 never runs
    assert [r for r, s in calls if s] == [150.0, 125.0, 137.5]  # between 100 (within) and 200 (over)
    assert [r["offered"] for r in rows] == sorted(r for r, _ in calls)
    assert serve_load.best_within_budget(rows) == 125.0


def test_the_predict_memory_benchmark_measures_each_run_in_its_own_torch_free_process(tiny_run, tmp_path):
    import predict_memory

    from romebert.cli import main

    from glue_fixtures import write_glue_fixture

    write_glue_fixture(tmp_path / "glue", "SST-2", n=16)
    export = tmp_path / "export"
    assert main(["export", str(tiny_run), "-o", str(export), "--threshold", "0.3"]) == 0
    out = tmp_path / "pm"
    args = ["--export", str(export), "--glue", str(tmp_path / "glue"), "--rows", "30,60", "--arena-rows", "30",
            "--batch-rows", "", "--out", str(out)]  # fmt: skip
    report = predict_memory.main(args)
    runs = report["runs"]
    assert [(r["rows"], r["arena"], r["batch_size"]) for r in runs] == [
        (30, False, 64),
        (30, True, 64),
        (60, False, 64),
    ]
    assert all(r["peak_rss_mib"] > 0 and r["rows_per_s"] > 0 for r in runs) and report["baseline_rss_mib"] > 0
    assert json.loads(out.with_suffix(".json").read_text())["runs"] == runs
    md = out.with_suffix(".md").read_text()
    assert "| 60 | off (now) | 64 |" in md and str(tmp_path) not in md  # no machine paths in the report
    report = predict_memory.main([*args[:4], "--rows", "40", "--arena-rows", "", "--batch-rows", "", "--merge",
                                  "--out", str(out)])  # fmt: skip
    assert [r["rows"] for r in report["runs"]] == [30, 30, 40, 60] and len(report["commands"]) == 2


def test_the_burst_benchmark_checks_every_answer_and_reads_rss(tiny_run, tmp_path):
    import serve_burst

    from romebert.cli import main

    export = tmp_path / "export"
    assert main(["export", str(tiny_run), "-o", str(export), "--threshold", "0.5"]) == 0
    out = tmp_path / "burst"
    report = serve_burst.main(["--export", str(export), "--requests", "40", "--sizes", "1,8,64", "--bursts", "2",
                               "--pause", "1.2", "--serve-args", "--max-queue 64 --max-inputs 64",
                               "--out", str(out)])  # fmt: skip
    assert report["max_queue"] == 64 and [r["burst"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert sum(row["statuses"].values()) == 40 and set(row["statuses"]) <= {"200", "503"}
        assert row["wrong_answers"] == 0 and row["rss_bytes"] > 20 * 2**20
        assert row["statuses"].get("200", 0) == 0 or row["same_as_offline"] == 1.0  # an fp32 export: exact
    v = report["verdict"]
    assert v["answers_ok"] and v["accepted_allowed_s"] >= 2.0
    assert v["rss_growth_after_first"] == report["rows"][1]["rss_bytes"] / report["rows"][0]["rss_bytes"] - 1
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == report["rows"]
    md = out.with_suffix(".md").read_text()
    assert "| 2 |" in md and "Against the targets" in md and "site-packages" not in md
    assert report["python_allocator"] == "PYTHONMALLOC=malloc" and "Python objects: PYTHONMALLOC=malloc" in md


def test_the_guard_benchmark_measures_each_setting_on_a_shifted_stream(tiny_run, tmp_path):
    import serve_guard

    from romebert.cli import main

    assert serve_guard.flip_negation("the film is not good") == "the film is good"
    assert serve_guard.flip_negation("it is n't funny") == "it is funny"
    assert serve_guard.flip_negation("the cat was big") == "the cat was not big"
    export = tmp_path / "export"  # every input leaves at exit 1: the guard has work
    assert main(["export", str(tiny_run), "-o", str(export), "--threshold", "0.6931472"]) == 0  # over ln 2
    out = tmp_path / "guard"
    report = serve_guard.main(["--export", str(export), "--shift-from", "dev", "--rates", "0.5",
                               "--max-disagreement", "0.2", "--window", "8", "--request-size", "4",
                               "--out", str(out)])  # fmt: skip
    assert report["shift_inputs"] > 0 and list(report["settings"]) == ["fixed", "guard_0.5"]
    fixed, guard = report["settings"]["fixed"], report["settings"]["guard_0.5"]
    assert 0 <= fixed["disagreement"] <= 1 and "extra_work" not in fixed
    assert guard["scrapes"][-1]["guard_watched_total"] > 0 and guard["extra_work"] > 0
    assert len(guard["final_thresholds"]) == report["export"]["layers"] - 1
    md = out.with_suffix(".md").read_text()
    assert "| guard R = 50 % |" in md and "Windows of the shifted part" in md
    fast = serve_guard.main(["--export", str(export), "--shift-from", "dev", "--throughput", "--duration", "0.5",
                             "--clients", "2", "--request-size", "4", "--out", str(tmp_path / "speed")])  # fmt: skip
    assert set(fast["throughput"]) == {"fixed", "guard_cost", "guard"}
    assert fast["throughput"]["fixed"]["against_fixed"] == 1.0
    assert "| guard R = 2 %, never moving |" in (tmp_path / "speed.md").read_text()


def test_the_one_graph_costs_benchmark_times_each_rewrite_of_the_exported_graph(tiny_run, tmp_path):
    import one_graph_costs

    out = tmp_path / "costs"
    args = ["--run", str(tiny_run), "--work", str(tmp_path / "work"), "--threshold", "0.5", "--examples", "3",
            "--repeats", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    report = one_graph_costs.main(args)
    changed = report["changed"]
    # every rewrite found what it rewrites in the default export's graph (the tiny run has 3 layers)
    assert changed["default"] == {} and changed["weights per tensor"]["per_tensor"] == 3 * 4
    assert changed["no activation scaling"]["no_scaling"] >= 3  # at least the attention's smoothing per layer
    assert changed["GELU's other form"]["swap_gelu"] == 3
    assert [t["threshold"] for t in report["thresholds"]] == [0.5, 0.0]
    for t in report["thresholds"]:
        assert [r["path"] for r in t["rows"]] == ["baseline", *one_graph_costs.VARIANTS]
        assert all(r["us_median"] > 0 for r in t["rows"])
        default = t["rows"][1]
        assert default["same_exits"] == 1.0 and 1.0 <= default["mean_exit_layer"] <= 3.0
    assert all(r["mean_exit_layer"] == 3.0 for r in report["thresholds"][1]["rows"][1:])  # full depth
    md = out.with_suffix(".md").read_text()
    assert "## every input to the last layer" in md and "| GELU's other form |" in md
    assert str(Path.home()) not in md and "site-packages" not in md
