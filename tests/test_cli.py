import csv

"""Every CLI command end to end on a tiny random backbone and small GLUE-format fixtures."""

import json

import numpy as np
import pytest

from romebert.cli import main
from romebert.model.modeling import MultiExitModel

from glue_fixtures import write_glue_fixture
from pictures import assert_draws_series
from tiny import TINY


def _train(tmp_path, backbone, task, method, *extra):
    data = tmp_path / "glue"
    write_glue_fixture(data, task, n=12)
    out = tmp_path / f"run-{task}-{method}"
    rc = main(
        [
            "train",
            "--task",
            task,
            "--data-dir",
            str(data),
            "--model",
            str(backbone),
            "--method",
            method,
            "-o",
            str(out),
            *TINY,
            *extra,
        ]
    )
    assert rc == 0
    return data, out


@pytest.mark.parametrize("method", ["deebert", "deebert-sd", "romebert-sd", "romebert-sdgr"])
def test_train_every_method_then_evaluate(tmp_path, tiny_backbone_dir, method, capsys):
    _, run = _train(tmp_path, tiny_backbone_dir, "SST-2", method)
    model = MultiExitModel.from_pretrained(run / "model")
    assert model.num_layers == 3 and model.config.task == "SST-2"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in log}
    assert stages == ({"finetune", "exits"} if method.startswith("deebert") else {"joint"})
    if method == "romebert-sdgr":
        assert all("gr_angle_deg" in r and "gr_norm_a" in r for r in log)
    assert main(["evaluate", str(run), "--thresholds", "0,0.3,10", "--device", "cpu"]) == 0
    per_exit = json.loads((run / "eval" / "dev" / "per_exit.json").read_text())
    assert [r["exit"] for r in per_exit] == [1, 2, 3]
    sweep = json.loads((run / "eval" / "dev" / "sweep.json").read_text())
    assert [r["threshold"] for r in sweep] == [0.0, 0.3, 10.0]
    assert sweep[0]["counts"] == [0, 0, 12] and sweep[0]["speedup"] == 1.0
    assert sweep[-1]["counts"] == [12, 0, 0] and sweep[-1]["speedup"] == pytest.approx(3.0)
    dev = run / "eval" / "dev"
    table = list(csv.DictReader((dev / "per_exit.csv").open()))
    assert [int(r["exit"]) for r in table] == [1, 2, 3]
    assert [float(r["accuracy"]) for r in table] == pytest.approx([r["accuracy"] for r in per_exit])
    rows = list(csv.DictReader((dev / "sweep.csv").open()))
    assert [(float(r["threshold"]), int(r["exit_1"]), int(r["exit_3"])) for r in rows] == [
        (0.0, 0, 12), (0.3, *(sweep[1]["counts"][i] for i in (0, 2))), (10.0, 12, 0)]  # fmt: skip
    logits = np.load(dev / "logits.npy")
    assert logits.shape == (3, 12, 2) and logits.dtype == np.float32
    assert np.array_equal(np.load(dev / "labels.npy"), [int(line.split("\t")[1]) for line in
                          (tmp_path / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:]])  # fmt: skip
    assert [r["accuracy"] for r in per_exit] == pytest.approx(
        [float((logits[i].argmax(-1) == np.load(dev / "labels.npy")).mean()) for i in range(3)])  # fmt: skip
    for name in ("per_exit.png", "speedup.png"):
        assert_draws_series(dev / name, 1)
    assert "per-exit dev metrics" in capsys.readouterr().out


def test_sweep_command_reuses_cached_logits(tmp_path, tiny_backbone_dir):
    _, run = _train(tmp_path, tiny_backbone_dir, "MRPC", "romebert-sd")
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    (run / "model" / "model.safetensors").unlink()  # the sweep must not need the model
    assert main(["sweep", str(run), "--thresholds", "0.05,0.5"]) == 0
    rows = json.loads((run / "eval" / "dev" / "sweep.json").read_text())
    assert [r["threshold"] for r in rows] == [0.05, 0.5]
    assert {"f1", "accuracy", "acc_and_f1", "metric"} <= set(rows[0])


def test_predict_writes_glue_submission_files(tmp_path, tiny_backbone_dir):
    data, run = _train(tmp_path, tiny_backbone_dir, "SST-2", "romebert-sdgr")
    assert main(["predict", str(run), "--threshold", "0.15", "--device", "cpu"]) == 0
    lines = (run / "predictions" / "SST-2.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert len(lines) == 1 + 12
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(12)]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


def test_mnli_matched_and_mismatched_and_ax(tmp_path, tiny_backbone_dir):
    data, run = _train(tmp_path, tiny_backbone_dir, "MNLI", "romebert-sdgr")
    write_glue_fixture(data, "AX", n=12)
    assert json.loads((run / "training_args.json").read_text())["gr_anchor"] == "final"  # reference default
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    matched = np.load(run / "eval" / "dev_matched" / "logits.npy")
    mismatched = np.load(run / "eval" / "dev_mismatched" / "logits.npy")
    assert matched.shape[0] == 3 and matched.shape[2] == 3 and mismatched.shape[2] == 3
    assert main(["predict", str(run), "--device", "cpu"]) == 0
    for name in ("MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"):
        rows = (run / "predictions" / name).read_text().splitlines()[1:]
        assert rows and {r.split("\t")[1] for r in rows} <= {"entailment", "neutral", "contradiction"}


@pytest.mark.parametrize("method", ["deebert-sd", "romebert-sdgr"])
def test_regression_sts_b(tmp_path, tiny_backbone_dir, method):
    _, run = _train(tmp_path, tiny_backbone_dir, "STS-B", method)
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    per_exit = json.loads((run / "eval" / "dev" / "per_exit.json").read_text())
    assert {"pearson", "spearman", "corr"} <= set(per_exit[0])
    assert main(["predict", str(run), "--device", "cpu"]) == 0
    values = [float(r.split("\t")[1]) for r in (run / "predictions" / "STS-B.tsv").read_text().splitlines()[1:]]
    assert values and all(0.0 <= v <= 5.0 for v in values)


def test_run_command_does_everything(tmp_path, tiny_backbone_dir, capsys):
    data = tmp_path / "glue"
    write_glue_fixture(data, "RTE", n=12)
    out = tmp_path / "run"
    assert (
        main(
            ["run", "--task", "RTE", "--data-dir", str(data), "--model", str(tiny_backbone_dir), "-o", str(out), *TINY]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for path in ("per_exit.png", "speedup.png", "sweep.csv", "RTE.tsv"):
        assert path in printed
    submission = (out / "predictions" / "RTE.tsv").read_text().splitlines()
    test_rows = (data / "RTE" / "test.tsv").read_text().splitlines()[1:]
    assert submission[0] == "index\tprediction" and len(submission) == len(test_rows) + 1
    assert [line.split("\t")[0] for line in submission[1:]] == [str(i) for i in range(len(test_rows))]
    assert {line.split("\t")[1] for line in submission[1:]} <= {"entailment", "not_entailment"}
    assert_draws_series(out / "eval" / "dev" / "per_exit.png", 1)
    assert not (out / "checkpoints").exists()


def test_custom_csv_data(tmp_path, tiny_backbone_dir):
    rows = ["text,other,label"] + [
        f'"the movie was {w}, very {w}",x,{lab}' for w, lab in [("good", "pos"), ("bad", "neg")] * 6
    ]
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = [
        "run",
        "--train-file",
        str(tmp_path / "train.csv"),
        "--dev-file",
        str(tmp_path / "dev.csv"),
        "--test-file",
        str(tmp_path / "test.csv"),
        "--text-column",
        "text",
        "--label-column",
        "label",
        "--model",
        str(tiny_backbone_dir),
        "-o",
        str(out),
        *TINY,
    ]
    assert main(args) == 0
    assert MultiExitModel.from_pretrained(out / "model").config.labels == ["neg", "pos"]
    preds = (out / "predictions" / "predictions.tsv").read_text().splitlines()
    assert len(preds) == 13 and {p.split("\t")[1] for p in preds[1:]} <= {"neg", "pos"}


def test_a_finished_run_keeps_its_model_and_drops_its_checkpoints(tmp_path, tiny_backbone_dir, capsys):
    data, run = _train(tmp_path, tiny_backbone_dir, "SST-2", "romebert-sd")
    assert sorted(p.name for p in run.iterdir()) == [
        "model", "run.json", "train_log.jsonl", "train_summary.json", "training_args.json"]  # fmt: skip
    argv = ["train", "--task", "SST-2", "--data-dir", str(data), "--model", str(tiny_backbone_dir),
            "--method", "romebert-sd", "-o", str(run), *TINY, "--resume"]  # fmt: skip
    assert main(argv) == 2
    assert "already trained, and its checkpoints were deleted" in capsys.readouterr().err


def test_resume_continues_from_the_newest_checkpoint(tmp_path, tiny_backbone_dir):
    data, run = _train(tmp_path, tiny_backbone_dir, "SST-2", "romebert-sd", "--epochs", "2", "--keep-checkpoints")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["stage0-step0000003", "stage0-step0000006"]
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    (run / "train_log.jsonl").unlink()
    rc = main(
        [
            "train",
            "--task",
            "SST-2",
            "--data-dir",
            str(data),
            "--model",
            str(tiny_backbone_dir),
            "--method",
            "romebert-sd",
            "-o",
            str(run),
            *TINY,
            "--epochs",
            "2",
            "--resume",
        ]
    )
    assert rc == 0 and steps
    # both epochs were complete: the resumed run has nothing left to train
    assert not (run / "train_log.jsonl").exists() or not (run / "train_log.jsonl").read_text().strip()


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--task", "NOPE", "--data-dir", ".", "-o", "x"], "unknown task"),
        (["train", "--task", "SST-2", "-o", "x"], "give --data-dir"),
        (["evaluate", "/nonexistent/run"], "not found"),
        (["train", "--train-file", "t.csv", "-o", "x"], "--text-column"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("romebert: error:") and message in err and "\n" not in err


def test_malformed_tsv_names_file_and_line(tmp_path, tiny_backbone_dir, capsys):
    data = tmp_path / "glue"
    train = write_glue_fixture(data, "SST-2", n=12) / "train.tsv"
    train.write_text(train.read_text() + "only-one-column-and-no-tab\n")
    rc = main(
        [
            "train",
            "--task",
            "SST-2",
            "--data-dir",
            str(data),
            "--model",
            str(tiny_backbone_dir),
            "-o",
            str(tmp_path / "run"),
            *TINY,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "train.tsv:14:" in err and "columns" in err


@pytest.mark.parametrize("criterion", ["entropy", "patience"])
def test_predict_runs_real_early_exit_with_the_offline_decisions(tmp_path, tiny_backbone_dir, criterion):
    """`predict` runs each input only up to its exit; its labels and exit layers equal the offline
    decisions taken from every exit's cached logits."""
    from transformers import AutoTokenizer

    from romebert.data.glue import read_split
    from romebert.data.tasks import get_task
    from romebert.evaluation.exits import predictions
    from romebert.evaluation.logits import collect_logits
    from romebert.runtime.encoding import Collator, encode
    from romebert.runtime.policies import get_policy
    from romebert.runtime.scores import entropy

    data, run = _train(tmp_path, tiny_backbone_dir, "SST-2", "romebert-sd")
    task = get_task("SST-2")
    model = MultiExitModel.from_pretrained(run / "model")
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    dataset = encode(read_split(task, data, "test"), tokenizer, None, 32)
    logits = collect_logits(model, dataset, Collator(tokenizer), 5)  # [L, N, C], every exit
    # entropy: a threshold between the exit-1 entropies, so some rows leave at layer 1 and some do not
    threshold = float(np.median(entropy(logits[0]))) if criterion == "entropy" else 2.0
    preds, offline_layers = predictions(logits, get_policy(criterion, threshold), task)

    argv = ["predict", str(run), "--criterion", criterion, "--threshold", repr(threshold), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    written = (run / "predictions" / "SST-2.tsv").read_text().splitlines()[1:]
    layers = np.load(run / "predictions" / "SST-2.exit_layers.npy")
    assert layers.tolist() == offline_layers.tolist()
    assert [line.split("\t")[1] for line in written] == [task.labels[int(i)] for i in preds]
    if criterion == "entropy":
        assert 1 in layers and layers.max() > 1
