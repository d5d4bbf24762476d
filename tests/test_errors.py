"""The one-line error paths of the jobs that had none of their own tests: each is hit through the command
line, as a user would, and must end in exactly one ``romebert: error:`` line that says what to do."""

from __future__ import annotations

import pytest

from romebert.cli import main

from tiny import TINY


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("romebert: error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def train_only_run(tmp_path_factory, tiny_backbone_dir):
    """A run on a custom file with no dev and no test split."""
    tmp = tmp_path_factory.mktemp("train-only")
    rows = "".join(f"{w} movie,{'pos' if i % 2 else 'neg'}\n" for i, w in enumerate(["good", "bad", "fun", "dull"] * 3))
    (tmp / "train.csv").write_text("text,label\n" + rows)
    out = tmp / "run"
    argv = ["train", "--train-file", str(tmp / "train.csv"), "--text-column", "text", "--label-column", "label",
            "--model", str(tiny_backbone_dir), "-o", str(out), *TINY]  # fmt: skip
    assert main(argv) == 0
    return out


def test_evaluating_a_run_without_a_dev_split(train_only_run, capsys):
    err = _error(capsys, ["evaluate", str(train_only_run), "--device", "cpu"])
    assert "nothing to evaluate: this data has no dev split (give --dev-file)" in err


def test_sweeping_a_run_without_a_dev_split(train_only_run, capsys):
    assert "nothing to sweep: its data has no dev split" in _error(capsys, ["sweep", str(train_only_run)])


def test_sweeping_a_run_that_was_never_evaluated(tiny_sst2_run, capsys):
    err = _error(capsys, ["sweep", str(tiny_sst2_run)])
    assert "no cached logits; run 'romebert evaluate' first" in err


def test_predicting_a_run_without_a_test_split(train_only_run, capsys):
    err = _error(capsys, ["predict", str(train_only_run), "--device", "cpu"])
    assert "nothing to predict: this data has no test split (give --test-file)" in err


def test_exporting_with_nothing_to_choose_a_threshold_on(train_only_run, tmp_path, capsys):
    err = _error(capsys, ["export", str(train_only_run), "-o", str(tmp_path / "e")])
    assert "no dev split to choose a threshold on: give --threshold" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--max-queue", "-3"], "--max-queue must be at least 1, got -3"),
        (["--max-wait-ms", "-1"], "--max-wait-ms must not be negative, got -1.0"),
        (["--intra-op-threads", "0"], "--intra-op-threads must be at least 1, got 0"),
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--max-pending-bytes", "0"], "--max-pending-bytes must be at least 1, got 0"),
        (["--worker-nice", "20"], "--worker-nice must lie in 0..19, got 20"),
        (["--guard-rate", "2"], "--guard-rate must lie in [0, 1], got 2.0"),
        (["--guard-rate", "0.1", "--full-depth"], "a --full-depth or --full-graph service has none"),
    ],
)
def test_a_bad_serve_configuration(tiny_sst2_run, capsys, flags, message):
    assert message in _error(capsys, ["serve", str(tiny_sst2_run), *flags])


def test_serving_a_folder_that_is_not_a_model(tmp_path, capsys):
    err = _error(capsys, ["serve", str(tmp_path / "nothing")])
    assert "no such export, classifier or run folder" in err


def test_exporting_with_a_guarantee_that_too_few_dev_examples_cannot_give(tiny_sst2_run, tmp_path, capsys):
    err = _error(capsys, ["export", str(tiny_sst2_run), "-o", str(tmp_path / "e"), "--max-metric-drop", "0.01",
                          "--confidence", "0.9"])  # fmt: skip
    assert "no entropy threshold is certified to disagree with the final exit on at most 0.01" in err
    assert not (tmp_path / "e").exists()
    err = _error(capsys, ["export", str(tiny_sst2_run), "-o", str(tmp_path / "e"), "--threshold", "0.3",
                          "--confidence", "0.9"])  # fmt: skip
    assert "--confidence certifies a threshold chosen on dev" in err
