"""``romebert compare`` end to end on a tiny random backbone and a 12-example fixture task: training, reuse,
resuming, report-only and the report it writes (the arithmetic and the sections: test_compare_curves/report)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from romebert.cli import main
from romebert.jobs import pipeline
from romebert.jobs.compare import metric_at_speedup
from romebert.training.methods import METHODS

from compare_fixtures import assert_no_machine_paths
from glue_fixtures import write_glue_fixture
from tiny import TINY

METHODS_UNDER_TEST = ["deebert", "romebert-sd"]  # two stages and one joint stage
SEEDS = [1, 2]

TINY6 = [*TINY, "--batch-size", "6"]  # batches of 6: the 12-row fixtures split evenly


def _compare_args(data: Path, backbone: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compare",
        "--task",
        "RTE",
        "--data-dir",
        str(data),
        "--model",
        str(backbone),
        "--methods",
        ",".join(METHODS_UNDER_TEST),
        "--seeds",
        ",".join(map(str, SEEDS)),
        "--poolings",
        "mean",
        "-o",
        str(out),
        *TINY6,
        *extra,
    ]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, tiny_backbone_dir):
    """One finished comparison: plain + 2 methods x 2 seeds, mean pooling (6 runs)."""
    root = tmp_path_factory.mktemp("compare")
    data = root / "glue"
    write_glue_fixture(data, "RTE", n=12)
    out = root / "cmp"
    assert main(_compare_args(data, tiny_backbone_dir, out)) == 0
    return data, out


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _count_train_runs(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = pipeline.train_run

    def counting(data, args, *a, **k):
        calls.append(str(Path(args.output_dir)))
        return real(data, args, *a, **k)

    monkeypatch.setattr(pipeline, "train_run", counting)
    return calls


# ----------------------------------------------------------------------------------------------
def test_plain_is_one_finetuning_stage():
    (stage,) = METHODS["plain"]
    assert stage.trains == "backbone+final" and stage.final_loss and not stage.exit_loss


# ----------------------------------------------------------------------------------------------
def test_compare_writes_every_table_and_figure(comparison):
    _, out = comparison
    md = (out / "report.md").read_text()
    for heading in (
        "## Command",
        "## Setup",
        "## Per-exit dev accuracy",
        "### dev, mean pooling",
        "## Dev accuracy at fixed layer speed-ups",
        "## Training cost",
        "## Runs",
        "## Figures",
        "## Reading",
    ):
        assert heading in md, heading
    assert "romebert compare --task RTE" in md and "torch " in md and "transformers " in md
    assert "| method | exit 1 | exit 2 | exit 3 |" in md
    assert "| pooling | method | final (1x) | 1.5x | 2x | 3x | max speed-up |" in md
    assert "![per-exit accuracy, dev](per_exit.png)" in md and "(speedup.png)" in md
    for name in ("per_exit.png", "speedup.png"):
        assert _png_size(out / name)[0] > 0

    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["methods"] == ["plain", *METHODS_UNDER_TEST]
    assert rep["environment"]["torch"] and rep["environment"]["transformers"] and rep["environment"]["cpu"]
    table = rep["per_exit"]["dev"]["mean"]
    assert set(table) == {"plain", *METHODS_UNDER_TEST}
    assert table["plain"][:2] == [None, None] and table["plain"][2]["n"] == 2  # only its last exit counts
    assert all(len(col) == 3 and col[0]["n"] == 2 for m, col in table.items() if m != "plain")
    speed = rep["speedup"]["dev"]["mean"]
    assert set(speed["deebert"]["at"]) == {"1.5", "2", "3"} and "at" not in speed["plain"]
    cost = rep["training_cost"]["mean"]
    assert cost["plain"]["ratio_to_plain"]["mean"] == pytest.approx(1.0)
    assert set(cost["deebert"]["stages"]) == {"finetune", "exits"} and set(cost["romebert-sd"]["stages"]) == {"joint"}
    assert cost["romebert-sd"]["ratio_to_plain"]["n"] == 2 and cost["romebert-sd"]["seconds_per_epoch"]["mean"] > 0

    runs = rep["runs"]
    assert len(runs) == 6 and {r["status"] for r in runs} == {"trained"}
    for r in runs:
        assert r["train_seconds"] > 0 and r["eval_wall_seconds"] > 0 and r["environment"]["torch"]
        assert (out / r["dir"] / "train_summary.json").is_file()
        assert (out / r["dir"] / "eval" / "dev" / "sweep.json").is_file()
        assert not (out / r["dir"] / "checkpoints").exists()  # only --resume needs them; a comparison retrains
        assert f"`{r['dir']}`" in md  # every run's wall time is in the Markdown table


def test_speedup_table_is_the_mean_of_each_seeds_interpolation(comparison):
    _, out = comparison
    rep = json.loads((out / "report.json").read_text())
    per_seed = []
    for seed in SEEDS:
        sweep = out / "runs" / "mean" / "romebert-sd" / f"seed{seed}" / "eval" / "dev" / "sweep.json"
        rows = json.loads(sweep.read_text())
        per_seed.append(metric_at_speedup([(r["speedup"], r["metric"]) for r in rows], 2.0))
    entry = rep["speedup"]["dev"]["mean"]["romebert-sd"]["at"]["2"]
    assert entry["values"] == pytest.approx(per_seed)
    assert entry["mean"] == pytest.approx(sum(per_seed) / len(per_seed))


def test_compare_resumes_where_it_stopped(comparison, tiny_backbone_dir, monkeypatch):
    data, out = comparison
    runs = out / "runs" / "mean"
    deleted = runs / "deebert" / "seed2"  # gone entirely
    half = runs / "plain" / "seed1"  # interrupted during training: no train_summary.json
    unevaluated = runs / "romebert-sd" / "seed1"  # trained, interrupted during evaluation
    untouched = [runs / "deebert" / "seed1", runs / "romebert-sd" / "seed2", runs / "plain" / "seed2"]
    mtimes = {p: (p / "train_summary.json").stat().st_mtime_ns for p in untouched}
    shutil.rmtree(deleted)
    (out / "report.json").unlink()  # interrupted before its first report (with one, "deleted" is reused from it)
    (half / "train_summary.json").unlink()
    (unevaluated / "eval" / "dev" / "sweep.json").unlink()
    calls = _count_train_runs(monkeypatch)

    assert main(_compare_args(data, tiny_backbone_dir, out)) == 0

    assert sorted(calls) == sorted([str(half), str(deleted)])
    assert all((p / "train_summary.json").stat().st_mtime_ns == mtimes[p] for p in untouched)
    status = {r["dir"]: r["status"] for r in json.loads((out / "report.json").read_text())["runs"]}
    assert status[str(deleted.relative_to(out))] == "trained" and status[str(half.relative_to(out))] == "trained"
    assert status[str(unevaluated.relative_to(out))] == "evaluated"
    assert sum(s == "reused" for s in status.values()) == 3
    assert (unevaluated / "eval" / "dev" / "sweep.json").is_file()


def test_report_only_adds_notes_and_draws_one_panel_per_pooling(comparison, tiny_backbone_dir, tmp_path, monkeypatch):
    data, src = comparison
    out = tmp_path / "cmp"
    shutil.copytree(src, out)
    # a cls-pooled copy of every run (relabelled), so two poolings can be reported without training
    shutil.copytree(out / "runs" / "mean", out / "runs" / "cls")
    for run_file in (out / "runs" / "cls").glob("*/seed*/run.json"):
        info = json.loads(run_file.read_text())
        run_file.write_text(json.dumps({**info, "pooling": "cls"}))
    shutil.rmtree(out / "runs" / "cls" / "deebert" / "seed1")
    notes = tmp_path / "notes.md"
    notes.write_text("RomeBERT's early exits beat DeeBERT's here.\n")
    calls = _count_train_runs(monkeypatch)
    args = _compare_args(data, tiny_backbone_dir, out, "--report-only", "--notes", str(notes))
    args[args.index("--poolings") + 1] = "mean,cls"

    assert main(args) == 0

    assert calls == []
    md = (out / "report.md").read_text()
    assert md.rstrip().endswith("RomeBERT's early exits beat DeeBERT's here.")
    assert "### dev, cls pooling" in md and "(1/2)" in md  # one cls deebert seed is missing
    assert "Missing runs" in md and "cls/deebert/seed1" in md
    rep = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in rep["runs"]].count("missing") == 1
    assert _png_size(out / "per_exit.png")[0] > 1.5 * _png_size(src / "per_exit.png")[0]  # two panels


def test_reusing_runs_trained_with_other_settings_is_an_error(comparison, tiny_backbone_dir, monkeypatch, capsys):
    data, out = comparison
    calls = _count_train_runs(monkeypatch)
    assert main(_compare_args(data, tiny_backbone_dir, out, "--lr", "1e-3")) == 2
    err = capsys.readouterr().err
    assert "trained with other settings" in err and "learning_rate" in err and calls == []


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "deebert,nope"], "unknown method"),
        (["--poolings", "max"], "--poolings"),
        (["--notes", "/nonexistent/notes.md"], "no such file"),
    ],
)
def test_bad_compare_arguments_give_one_line_errors(tmp_path, tiny_backbone_dir, extra, message, capsys):
    data = tmp_path / "glue"
    write_glue_fixture(data, "RTE", n=12)
    args = _compare_args(data, tiny_backbone_dir, tmp_path / "cmp")
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("romebert: error:") and message in err and "\n" not in err


def test_a_missing_dev_file_fails_before_any_run_trains(tmp_path, tiny_backbone_dir, capsys, monkeypatch):
    from romebert.jobs import pipeline

    data = tmp_path / "glue"
    write_glue_fixture(data, "RTE", n=12)
    (data / "RTE" / "dev.tsv").unlink()
    calls = []
    monkeypatch.setattr(pipeline, "train_run", lambda *a, **k: calls.append(a))
    assert main(_compare_args(data, tiny_backbone_dir, tmp_path / "cmp")) == 2
    err = capsys.readouterr().err.strip()
    assert "dev.tsv" in err and "\n" not in err and calls == []


def test_report_names_no_folder_of_the_machine(comparison, tiny_backbone_dir, tmp_path, monkeypatch):
    data, src = comparison
    # everything given as an absolute path under the current folder: the report shows it relative
    shutil.copytree(src, tmp_path / "cmp")
    shutil.copytree(data, tmp_path / "glue")
    (tmp_path / "tiny").symlink_to(tiny_backbone_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    args = _compare_args(tmp_path / "glue", tmp_path / "tiny", tmp_path / "cmp", "--report-only")

    assert main(args) == 0

    md = (tmp_path / "cmp" / "report.md").read_text()
    rep = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert_no_machine_paths(md, rep, tmp_path, tiny_backbone_dir)
    assert "--data-dir glue" in rep["command"] and "--model tiny" in rep["command"]
    assert rep["command"].endswith(" -o cmp") and rep["settings"]["data"]["data_dir"] == "glue"
    assert rep["settings"]["backbone"] == "local folder tiny"


def _interrupted(tmp_path, backbone, monkeypatch, method: str, interrupt: str, *extra: str) -> list[str]:
    """A comparison of ``plain`` and ``method`` (seed 1) stopped right after ``interrupt``'s first checkpoint;
    returns its arguments (without ``extra``) and records, from then on, the resume flag of every training."""
    from romebert.training.trainer import Trainer

    data, out = tmp_path / "glue", tmp_path / "cmp"
    write_glue_fixture(data, "RTE", n=12)
    args = _compare_args(data, backbone, out)
    args[args.index("--methods") + 1], args[args.index("--seeds") + 1] = method, "1"
    real_save = Trainer._save

    def save_then_stop(self, *a, **k):
        real_save(self, *a, **k)
        if self.args.method == interrupt:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", save_then_stop)
    assert main([*args, *extra]) == 130
    monkeypatch.setattr(Trainer, "_save", real_save)
    real_train = pipeline.train_run
    resumes: list[bool] = []

    def recording(d, a, resume=False, **k):
        resumes.append(resume)
        return real_train(d, a, resume=resume, **k)

    monkeypatch.setattr(pipeline, "train_run", recording)
    return args, resumes


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, tiny_backbone_dir, monkeypatch):
    # Interrupted right after deebert's first checkpoint (its stage two's: stage one came from plain): the
    # rerun continues that run (its summary still holds both stages and their times), retrains nothing
    # else, and drops the checkpoints, plain's included.
    args, resumes = _interrupted(tmp_path, tiny_backbone_dir, monkeypatch, "deebert", "deebert")
    run = tmp_path / "cmp" / "runs" / "mean" / "deebert" / "seed1"
    assert (run / "checkpoints").is_dir() and not (run / "train_summary.json").exists()
    so_far = json.loads((tmp_path / "cmp" / "report.json").read_text())  # written after each finished run
    assert {r["method"]: r["status"] for r in so_far["runs"]} == {"plain": "trained", "deebert": "missing"}

    assert main(args) == 0

    assert resumes == [True]  # plain finished before the interruption; deebert continued
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from_step"]["stage"] == "exits"
    assert [s["stage"] for s in summary["stages"]] == ["finetune", "exits"]
    assert json.loads((run / "compare_run.json").read_text())["first_stage_from"] == "plain"
    assert not (tmp_path / "cmp" / "runs" / "mean" / "plain" / "seed1" / "checkpoints").exists()
    assert all(s["seconds"] > 0 and s["steps"] > 0 for s in summary["stages"])
    assert json.loads((run / "compare_run.json").read_text())["resumed_from_step"] == summary["resumed_from_step"]
    assert not (run / "checkpoints").exists()


def test_an_interrupted_run_with_other_settings_is_retrained(tmp_path, tiny_backbone_dir, monkeypatch):
    args, resumes = _interrupted(tmp_path, tiny_backbone_dir, monkeypatch, "romebert-sd", "plain", "--epochs", "2")

    assert main(args) == 0  # 1 epoch now: the 2-epoch checkpoint must not be continued

    assert resumes == [False, False]  # plain retrained from scratch, then romebert-sd
    summary = json.loads((tmp_path / "cmp" / "runs" / "mean" / "plain" / "seed1" / "train_summary.json").read_text())
    assert summary["resumed_from_step"] is None


def test_a_checkpoint_without_stage_times_is_not_resumed(tmp_path, tiny_backbone_dir, monkeypatch):
    # written by a romebert that did not keep stage times: resuming would leave the training cost unknown
    args, resumes = _interrupted(tmp_path, tiny_backbone_dir, monkeypatch, "romebert-sd", "romebert-sd")
    run = tmp_path / "cmp" / "runs" / "mean" / "romebert-sd" / "seed1"
    for state_file in (run / "checkpoints").glob("*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        del state["seconds"], state["finished"]
        state_file.write_text(json.dumps(state))

    assert main(args) == 0

    assert resumes == [False]
    assert json.loads((run / "train_summary.json").read_text())["stages"][0]["seconds"] > 0


def _weights(run: Path) -> dict:
    from safetensors.numpy import load_file

    (path,) = (run / "model").glob("*.safetensors")
    return load_file(path)


def test_two_stage_methods_continue_from_plains_fine_tuning(tmp_path, tiny_backbone_dir, monkeypatch):
    # DeeBERT's stage one is plain fine-tuning: a comparison trains it once per seed, and every two-stage
    # method continues from plain's checkpoint, ending with the weights a training from scratch gives.
    data, out = tmp_path / "glue", tmp_path / "cmp"
    write_glue_fixture(data, "RTE", n=12)
    args = _compare_args(data, tiny_backbone_dir, out)
    args[args.index("--methods") + 1], args[args.index("--seeds") + 1] = "deebert,romebert-sd,mixed", "1"
    from romebert.training.trainer import Trainer

    stages_run: list[tuple[str, str]] = []
    real_stage = Trainer._train_stage

    def recording(self, stage, *a, **k):
        stages_run.append((self.args.method, stage.name))
        return real_stage(self, stage, *a, **k)

    monkeypatch.setattr(Trainer, "_train_stage", recording)

    assert main(args) == 0

    assert stages_run == [("plain", "finetune"), ("deebert", "exits"), ("romebert-sd", "joint"), ("mixed", "joint")]
    runs = out / "runs" / "mean"
    plain = json.loads((runs / "plain" / "seed1" / "train_summary.json").read_text())["stages"][0]
    for method in ("deebert", "mixed"):
        summary = json.loads((runs / method / "seed1" / "train_summary.json").read_text())
        # the cost is still counted: plain's stage time up to its last checkpoint (the save itself not included,
        # which on a tiny model can be most of it, so no lower bound beyond "counted")
        assert 0 < summary["stages"][0]["seconds"] <= plain["seconds"]
        assert summary["stages"][0]["steps"] == plain["steps"] and summary["stages"][1]["seconds"] > 0
        assert json.loads((runs / method / "seed1" / "compare_run.json").read_text())["first_stage_from"] == "plain"
        log = [json.loads(line) for line in (runs / method / "seed1" / "train_log.jsonl").read_text().splitlines()]
        assert {r["stage"] for r in log} == {"finetune", summary["stages"][1]["stage"]}
    assert not (runs / "plain" / "seed1" / "checkpoints").exists()  # dropped once every method has it
    rep = json.loads((out / "report.json").read_text())
    assert {r["method"]: r["first_stage_from"] for r in rep["runs"]}["deebert"] == "plain"

    # the same training from scratch, outside a comparison: bit-identical weights
    alone = tmp_path / "alone"
    extra = ["--model", str(tiny_backbone_dir), "--pooling", "mean", "--seed", "1", "-o", str(alone), *TINY6]
    assert main(["train", "--task", "RTE", "--data-dir", str(data), "--method", "deebert", *extra]) == 0
    mine, theirs = _weights(runs / "deebert" / "seed1"), _weights(alone)
    assert mine.keys() == theirs.keys() and all((mine[k] == theirs[k]).all() for k in mine)


def test_a_comparison_continues_from_its_report_where_the_run_folders_are_gone(
    comparison, tiny_backbone_dir, tmp_path, monkeypatch, capsys
):
    # Run folders (the models) are not committed, report.json is: on another machine the same command with
    # one more seed trains that seed's runs only, and reports the recorded ones with their numbers.
    data, src = comparison
    out = tmp_path / "cmp"
    out.mkdir()
    shutil.copy2(src / "report.json", out / "report.json")
    before = {(r["method"], r["seed"]): r for r in json.loads((src / "report.json").read_text())["runs"]}
    calls = _count_train_runs(monkeypatch)
    args = _compare_args(data, tiny_backbone_dir, out)
    args[args.index("--seeds") + 1] = "1,2,3"

    assert main(args) == 0

    assert sorted(calls) == sorted(str(out / "runs" / "mean" / m / "seed3") for m in ["plain", *METHODS_UNDER_TEST])
    rep = json.loads((out / "report.json").read_text())
    after = {(r["method"], r["seed"]): r for r in rep["runs"]}
    for key, old in before.items():
        assert after[key]["status"] == "reused"
        assert after[key]["splits"]["dev"]["per_exit"] == old["splits"]["dev"]["per_exit"]
    assert {after[(m, 3)]["status"] for m in ["plain", *METHODS_UNDER_TEST]} == {"trained"}
    assert rep["per_exit"]["dev"]["mean"]["deebert"][0]["n"] == 3
    capsys.readouterr()

    # other training settings: the recorded runs are other runs, and the command says so
    calls.clear()
    assert main([*_compare_args(data, tiny_backbone_dir, out, "--lr", "1e-3"), "--report-only"]) == 2
    out_err = capsys.readouterr()
    assert "made with other settings (training); its runs are not reused" in out_err.out
    assert "no finished runs to report on" in out_err.err and calls == []


def test_criteria_and_guaranteed_thresholds_come_from_the_cached_logits(comparison, tiny_backbone_dir, tmp_path):
    import numpy as np

    from romebert.data.tasks import get_task
    from romebert.evaluation.exits import choose_threshold, sweep
    from romebert.runtime.policies import candidate_thresholds, get_policy

    data, src = comparison
    out = tmp_path / "cmp"
    shutil.copytree(src, out)
    extra = ["--report-only", "--criteria", "entropy,energy,agreement", "--max-metric-drop", "0.4",
             "--confidence", "0.6"]  # fmt: skip
    assert main(_compare_args(data, tiny_backbone_dir, out, *extra)) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["criteria"] == ["entropy", "energy", "agreement"] and rep["settings"]["confidence"] == 0.6
    run = next(r for r in rep["runs"] if r["method"] == "romebert-sd" and r["seed"] == 1)
    logits = np.load(out / run["dir"] / "eval" / "dev" / "logits.npy")
    labels = np.load(out / run["dir"] / "eval" / "dev" / "labels.npy")
    task = get_task("RTE")
    energy = run["splits"]["dev"]["criteria"]["energy"]
    rows = sweep(
        logits, labels, task, [get_policy("energy", t) for t in candidate_thresholds("energy", logits, num=100)]
    )
    assert energy["sweep"] == [[r["speedup"], r["metric"]] for r in rows]  # the same sweep, recomputed here
    g = energy["guarantee"]
    if g["certified"]:
        threshold, row = choose_threshold(logits, labels, task, "energy", max_metric_drop=0.4, confidence=0.6)
        assert (g["threshold"], g["speedup"]) == (threshold, row["speedup"])
        assert 0.0 <= g["check"]["share_disagreement_over_epsilon"] <= 1.0
    md = (out / "report.md").read_text()
    assert "## Exit criteria" in md and "| mean | romebert-sd | agreement |" in md
    assert "## Thresholds with a guarantee (disagreement with the final exit <= 0.4, confidence 0.6)" in md
    assert "--criteria entropy,energy,agreement --max-metric-drop 0.4 --confidence 0.6" in rep["command"]
