"""Every kind of bad input ends in one clear line naming the file / field, and nothing half-written."""

import json
import re

import pytest

from romebert.cli import main

from glue_fixtures import write_glue_fixture
from tiny import TINY


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("romebert: error:") and "\n" not in err and "Traceback" not in err
    return err


def _corrupt(task_dir, split, text=None, data=None):
    path = task_dir / f"{split}.tsv"
    if data is not None:
        path.write_bytes(data)
    else:
        path.write_text(text, encoding="utf-8")
    return path


CASES = {
    "empty file": ("SST-2", "train", "", r"train\.tsv: file is empty"),
    "header only": ("SST-2", "train", "sentence\tlabel\n", r"train\.tsv: file has a header row but no data rows"),
    "too few columns": (
        "RTE",
        "train",
        "index\tsentence1\tsentence2\tlabel\n0\tonly two\n",
        r"train\.tsv:2: expected at least 4 tab-separated columns, got 2",
    ),
    "label outside the set": (
        "SST-2",
        "train",
        "sentence\tlabel\nthe cat\t7\n",
        r"train\.tsv:2: label '7' is not one of \['0', '1'\]",
    ),
    "non-numeric STS-B score": (
        "STS-B",
        "train",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tg\tf\t2012\t0\ts\ts\tthe cat\tthe dog\thigh\n",
        r"train\.tsv:2: .*high",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_training_files(tmp_path, tiny_backbone_dir, capsys, case):
    task, split, text, message = CASES[case]
    task_dir = write_glue_fixture(tmp_path / "glue", task, n=8)
    _corrupt(task_dir, split, text)
    out = tmp_path / "run"
    err = _error(
        capsys,
        [
            "train",
            "--task",
            task,
            "--data-dir",
            str(tmp_path / "glue"),
            "--model",
            str(tiny_backbone_dir),
            "-o",
            str(out),
            *TINY,
        ],
    )
    assert re.search(message, err), err
    assert not (out / "model").exists()  # nothing that looks like a finished run


def test_non_utf8_bytes_name_the_line(tmp_path, tiny_backbone_dir, capsys):
    task_dir = write_glue_fixture(tmp_path / "glue", "SST-2", n=8)
    _corrupt(task_dir, "train", data=b"sentence\tlabel\nthe cat\t1\nbad \xff\xfe byte\t0\n")
    err = _error(
        capsys,
        [
            "train",
            "--task",
            "SST-2",
            "--data-dir",
            str(tmp_path / "glue"),
            "--model",
            str(tiny_backbone_dir),
            "-o",
            str(tmp_path / "run"),
            *TINY,
        ],
    )
    assert "train.tsv" in err and "UTF-8" in err and ":3" in err


@pytest.fixture
def trained_run(tmp_path, tiny_backbone_dir):
    write_glue_fixture(tmp_path / "glue", "MNLI", n=12)
    write_glue_fixture(tmp_path / "glue", "MRPC", n=12)
    out = tmp_path / "mnli-run"
    assert (
        main(
            [
                "train",
                "--task",
                "MNLI",
                "--data-dir",
                str(tmp_path / "glue"),
                "--model",
                str(tiny_backbone_dir),
                "--method",
                "romebert-sd",
                "-o",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    return out


def test_model_of_another_task_or_label_count(trained_run, capsys):
    err = _error(capsys, ["evaluate", str(trained_run), "--task", "MRPC", "--device", "cpu"])
    assert "trained for MNLI" in err and "MRPC" in err
    err = _error(capsys, ["predict", str(trained_run), "--task", "MRPC", "--device", "cpu"])
    assert "trained for MNLI" in err


def test_config_from_a_newer_format_version(trained_run, capsys):
    cfg_path = trained_run / "model" / "romebert_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["format_version"] = 7
    cfg_path.write_text(json.dumps(cfg))
    err = _error(capsys, ["evaluate", str(trained_run), "--device", "cpu"])
    assert "romebert_config.json" in err and "newer than this romebert" in err


def test_truncated_model_weights(trained_run, capsys):
    weights = trained_run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    err = _error(capsys, ["predict", str(trained_run), "--device", "cpu"])
    assert "model.safetensors" in err and "corrupt or truncated" in err


def test_custom_file_missing_column(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("review,stars\ngood,5\n")
    err = _error(
        capsys,
        [
            "train",
            "--train-file",
            str(tmp_path / "train.csv"),
            "--text-column",
            "text",
            "--label-column",
            "stars",
            "-o",
            str(tmp_path / "run"),
        ],
    )
    assert "train.csv" in err and "'text'" in err and "review" in err


RUN_CASES = {
    # what is broken -> (set-up, expected message); each would only have failed after training before
    "missing dev file": (lambda d: (d / "SST-2" / "dev.tsv").unlink(), r"dev\.tsv"),
    "corrupt dev file": (
        lambda d: _corrupt(d / "SST-2", "dev", "sentence\tlabel\nthe cat\t9\n"),
        r"dev\.tsv:2: label '9'",
    ),  # fmt: skip
    "missing test file": (lambda d: (d / "SST-2" / "test.tsv").unlink(), r"test\.tsv"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_run_checks_every_input_before_training(tmp_path, tiny_backbone_dir, capsys, case):
    setup, message = RUN_CASES[case]
    write_glue_fixture(tmp_path / "glue", "SST-2", n=8)
    setup(tmp_path / "glue")
    out = tmp_path / "run"
    argv = ["run", "--task", "SST-2", "--data-dir", str(tmp_path / "glue"), "--model", str(tiny_backbone_dir),
            "-o", str(out), *TINY]  # fmt: skip
    err = _error(capsys, argv)
    assert re.search(message, err), err
    assert not (out / "model").exists() and not (out / "train_log.jsonl").exists()  # no training started


def test_custom_dev_label_outside_the_training_set_fails_before_training(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    (tmp_path / "dev.csv").write_text("text,label\nfine,neutral\n")
    out = tmp_path / "run"
    argv = ["run", "--train-file", str(tmp_path / "train.csv"), "--dev-file", str(tmp_path / "dev.csv"),
            "--text-column", "text", "--label-column", "label", "-o", str(out), *TINY]  # fmt: skip
    err = _error(capsys, argv)
    assert f"{tmp_path / 'dev.csv'}:2: label 'neutral' is not one of ['neg', 'pos']" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_dev_only_label_is_accepted_when_labels_name_it(tmp_path, tiny_backbone_dir):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n")
    (tmp_path / "dev.csv").write_text("text,label\nfine,neutral\ngood,pos\n")
    out = tmp_path / "run"
    argv = ["train", "--train-file", str(tmp_path / "train.csv"), "--dev-file", str(tmp_path / "dev.csv"),
            "--text-column", "text", "--label-column", "label", "--labels", "neg,neutral,pos",
            "--model", str(tiny_backbone_dir), "-o", str(out), *TINY]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "model" / "romebert_config.json").read_text())["labels"] == ["neg", "neutral", "pos"]


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl"])
def test_an_empty_training_label_fails_before_training(tmp_path, capsys, suffix):
    rows = [("good", "positive"), ("no label here", ""), ("bad", "negative")]
    if suffix == "jsonl":
        text = "".join(json.dumps({"review": r, "sentiment": y}) + "\n" for r, y in rows)
    else:
        sep = "," if suffix == "csv" else "\t"
        text = f"review{sep}sentiment\n" + "".join(f"{r}{sep}{y}\n" for r, y in rows)
    path = tmp_path / f"train.{suffix}"
    path.write_text(text)
    out = tmp_path / "run"
    argv = ["train", "--train-file", str(path), "--text-column", "review", "--label-column", "sentiment",
            "-o", str(out), *TINY]  # fmt: skip
    line = 2 if suffix == "jsonl" else 3
    assert _error(capsys, argv) == f"romebert: error: {path}:{line}: empty label in column 'sentiment'"
    assert not (out / "model").exists()


def test_no_pickle_loading_anywhere():
    """Weights come from safetensors and configs from JSON; torch.load only with weights_only=True."""
    from pathlib import Path

    import romebert

    files = list(Path(romebert.__file__).parent.rglob("*.py"))
    assert any(p.parent.name == "compare" for p in files) and len(files) > 50  # every subpackage is read
    for path in files:
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
