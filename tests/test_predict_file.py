"""``romebert predict MODEL --input FILE`` and ``EarlyExitClassifier.predict_file``: any model (a run, a
classifier folder, an export; trained on GLUE or on custom data), CSV / TSV / JSON Lines in and the same
format out, exact content, one-line errors, atomic output, --resume, --shard, and rows streamed a chunk
at a time."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from romebert.cli import main
from romebert.core.errors import RomebertError
from romebert.core.progress import Progress
from romebert.data import custom
from romebert.deploy.classifier import EarlyExitClassifier
from romebert.deploy.file_scoring import RowScorer
from romebert.deploy.predict_file import merge_outputs, parse_shard, shard_range
from romebert.runtime.scores import entropy

from glue_fixtures import sentence
from tiny import TINY

# The texts to score: plain sentences, then a quoted comma, a field over two lines and an emoji.
SPECIAL = ["the cat, the dog and a bird .", "the movie was good\nand very fun .", "it is not bad 😍 !"]


def _texts(n: int = 19) -> list[str]:
    return [sentence(i) for i in range(n - len(SPECIAL))] + SPECIAL


def _write_input(path, texts, text_column="review", ids=None, pair=None):
    """``texts`` as a CSV, TSV or JSON Lines file (by extension) with an ``id`` and a ``topic`` column."""
    ids = ids or [f"r{i:03d}" for i in range(len(texts))]
    rows = [{"id": ids[i], text_column: t, "topic": "films"} for i, t in enumerate(texts)]
    if pair is not None:
        for row, p in zip(rows, pair):
            row["second"] = p
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, "w", encoding="utf-8", newline="") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        writer = csv.DictWriter(f, list(rows[0]), delimiter=delimiter, quoting=quoting)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read_output(path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        return list(csv.DictReader(f, delimiter=delimiter, quoting=quoting))


def _custom_files(folder):
    """Train / dev CSVs of the user's own data: column ``review``, labels ``neg`` / ``pos``."""
    rows = ["id,review,label"] + [f'{i},"{sentence(i)}",{("neg", "pos")[i % 2]}' for i in range(16)]
    for split in ("train", "dev"):
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "train.csv", folder / "dev.csv"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sst2_run, tiny_backbone_dir):
    """{(kind, trained_on): folder} for kind in run / folder / export, trained on GLUE SST-2 or custom CSVs."""
    tmp = tmp_path_factory.mktemp("models")
    train, dev = _custom_files(tmp)
    custom_run = tmp / "custom-run"
    assert (
        main(
            [
                "train",
                "--train-file",
                str(train),
                "--dev-file",
                str(dev),
                "--text-column",
                "review",
                "--label-column",
                "label",
                "--model",
                str(tiny_backbone_dir),
                "-o",
                str(custom_run),
                *TINY,
            ]
        )
        == 0
    )
    out = {}
    for trained, run in (("glue", tiny_sst2_run), ("custom", custom_run)):
        out["run", trained] = run
        EarlyExitClassifier.from_run(run, "cpu").save_pretrained(tmp / f"folder-{trained}")
        out["folder", trained] = tmp / f"folder-{trained}"
        assert main(["export", str(run), "-o", str(tmp / f"export-{trained}"), "--threshold", "0.5"]) == 0
        out["export", trained] = tmp / f"export-{trained}"
    return out


@pytest.mark.parametrize("kind", ["run", "folder", "export"])
@pytest.mark.parametrize("trained", ["glue", "custom"])
def test_predict_any_file_with_any_model(models, kind, trained, tmp_path):
    """The output holds the input's ids in order, the engine's labels, exit layers and probabilities (as
    written: 6 significant digits) of the same texts, in the input's own format."""
    model = models[kind, trained]
    clf = EarlyExitClassifier.from_pretrained(model, "cpu")
    texts = _texts()
    # a threshold that half of the rows meet at the first exit: real early exits and full-depth rows
    first = clf.predict_with_exits(texts, criterion="entropy", threshold=10.0, batch_size=64).logits
    threshold = float(np.median(entropy(first)))
    expected = clf.predict_with_exits(texts, criterion="entropy", threshold=threshold, batch_size=64)
    assert expected.exit_layers.min() == 1 and expected.exit_layers.max() > 1
    names = clf.label_names
    assert names == (["0", "1"] if trained == "glue" else ["neg", "pos"])
    # a GLUE model names no column of the user's file; a custom one reads its own by default
    column = ["--text-column", "review"] if trained == "glue" else []
    for ext in ("csv", "tsv", "jsonl"):
        given = texts if ext != "tsv" else [t.replace("\n", " ") for t in texts]  # TSV has no quoting
        if ext == "tsv":
            expected = clf.predict_with_exits(given, criterion="entropy", threshold=threshold, batch_size=64)
        src = _write_input(tmp_path / f"in.{ext}", given)
        out = tmp_path / f"out.{ext}"
        argv = ["predict", str(model), "--input", str(src), "--output", str(out), "--id-column", "id", *column,
                "--criterion", "entropy", "--threshold", repr(threshold), "--device", "cpu", "--quiet"]  # fmt: skip
        assert main(argv) == 0
        rows = _read_output(out)
        assert list(rows[0]) == ["id", "prediction", *[f"prob_{n}" for n in names], "exit_layer"]
        assert [r["id"] for r in rows] == [f"r{i:03d}" for i in range(len(texts))]
        assert [r["prediction"] for r in rows] == expected.labels
        assert [int(r["exit_layer"]) for r in rows] == expected.exit_layers.tolist()
        for r, probs in zip(rows, expected.probabilities):
            if ext == "jsonl":
                assert [r[f"prob_{n}"] for n in names] == [float(f"{p:.6g}") for p in probs]
            else:
                assert [r[f"prob_{n}"] for n in names] == [f"{p:.6g}" for p in probs]
            assert abs(sum(float(r[f"prob_{n}"]) for n in names) - 1.0) < 1e-5


def test_keep_columns_and_the_default_row_column(models, tmp_path):
    model = models["export", "custom"]
    src = _write_input(tmp_path / "in.csv", _texts())
    assert main(["predict", str(model), "--input", str(src), "-o", str(tmp_path / "kept.csv"), "--keep-columns",
                 "--quiet"]) == 0  # fmt: skip
    kept = _read_output(tmp_path / "kept.csv")
    assert list(kept[0])[:3] == ["id", "review", "topic"]
    assert [r["review"] for r in kept] == _texts()  # quoted comma, line break and emoji come back intact
    src = _write_input(tmp_path / "j.jsonl", _texts(), ids=list(range(19)))
    assert main(["predict", str(model), "--input", str(src), "-o", str(tmp_path / "j.out.jsonl"),
                 "--keep-columns", "--quiet"]) == 0  # fmt: skip
    first = _read_output(tmp_path / "j.out.jsonl")[0]
    assert first["id"] == 0 and first["topic"] == "films"  # JSON Lines keeps the value types
    # no --id-column: a 0-based data-row number; the default output name is <stem>.predictions.<ext> here
    src = _write_input(tmp_path / "plain.csv", _texts())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert main(["predict", str(model), "--input", str(src), "--quiet"]) == 0
    rows = _read_output(tmp_path / "plain.predictions.csv")
    assert [r["row"] for r in rows] == [str(i) for i in range(19)]
    assert list(rows[0]) == ["row", "prediction", "prob_neg", "prob_pos", "exit_layer"]


def test_a_regression_model_writes_the_value(tiny_backbone_dir, tmp_path):
    rows = ["text,score"] + [f'"{sentence(i)}",{i % 5 * 0.25}' for i in range(12)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "reg"
    assert main(["train", "--train-file", str(tmp_path / "train.csv"), "--text-column", "text", "--label-column",
                 "score", "--regression", "--model", str(tiny_backbone_dir), "-o", str(run), *TINY]) == 0  # fmt: skip
    out = EarlyExitClassifier.from_run(run, "cpu").predict_file(tmp_path / "train.csv", tmp_path / "p.csv")
    got = _read_output(out.output)
    assert list(got[0]) == ["row", "prediction", "exit_layer"] and out.rows == 12
    values = EarlyExitClassifier.from_run(run, "cpu").predict([sentence(i) for i in range(12)], batch_size=64)
    assert [r["prediction"] for r in got] == [f"{v:.6g}" for v in values]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [],
            "give --text-column naming the text column (the model was trained on GLUE SST-2); the file's "
            "columns: ['id', 'review', 'topic']",
        ),  # fmt: skip
        (["--text-column", "body"], "no column 'body' (--text-column); the file's columns: ['id', 'review', 'topic']"),
        (["--text-column", "review", "--id-column", "key"], "no column 'key' (--id-column)"),
        (["--text-column", "review", "--text-pair-column", "topic"], "trained on single texts"),
        (["--text-column", "review", "--task", "SST-2"], "--task: not used with --input"),
        (["--text-column", "review", "--shard", "2/2"], "--shard 2/2: need 0 <= K < N"),
        (["--text-column", "review", "--shard", "half"], "--shard must be K/N"),
        (["--text-column", "review", "--chunk-rows", "0"], "chunk_rows must be >= 1"),
    ],
)
def test_bad_columns_and_flags_are_one_line_errors(models, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # where the default output would go
    src = _write_input(tmp_path / "in.csv", _texts())
    assert main(["predict", str(models["export", "glue"]), "--input", str(src), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.glob("in.predictions*")) and not list(tmp_path.glob(".in.predictions*"))


def test_the_old_flags_point_to_input_and_bad_rows_name_their_line(models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default output goes
    src = _write_input(tmp_path / "reviews.csv", _texts())
    glue = str(models["export", "glue"])
    # the command: a GLUE model ignored --test-file and failed on its task's missing test file
    assert main(["predict", glue, "--test-file", str(src), "--text-column", "review"]) == 2
    err = capsys.readouterr().err
    assert "--test-file, --text-column:" in err and "--input FILE" in err and err.count("\n") == 1
    assert main(["predict", glue, "--output", "x.csv"]) == 2
    assert "--output applies to --input FILE only" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"review": "the cat ."}\n{"review": null}\n', encoding="utf-8")
    assert main(["predict", glue, "--input", str(bad), "--text-column", "review", "--quiet"]) == 2
    assert f"{bad}:2: 'review' is null" in capsys.readouterr().err
    assert main(["predict", glue, "--input", str(tmp_path / "absent.csv"), "--text-column", "review"]) == 2
    assert "absent.csv: file not found" in capsys.readouterr().err


def _interrupt_after(monkeypatch, chunks: int):
    """Make the scorer fail on chunk ``chunks + 1`` (an exception mid-way, as a crash would be)."""
    score, calls = RowScorer.score, []

    def failing(self, rows, first_row=0):
        calls.append(len(rows))
        if len(calls) > chunks:
            raise KeyboardInterrupt
        return score(self, rows, first_row)

    monkeypatch.setattr(RowScorer, "score", failing)


def test_an_interrupted_run_leaves_no_output_and_resumes_to_the_same_file(models, tmp_path, monkeypatch, capsys):
    clf = EarlyExitClassifier.from_pretrained(models["export", "custom"])
    src = _write_input(tmp_path / "in.csv", _texts(30))
    whole = clf.predict_file(src, tmp_path / "whole.csv", chunk_rows=4, id_column="id")
    assert whole.rows == 30 and whole.resumed_rows == 0
    out = tmp_path / "out.csv"
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 2)
        with pytest.raises(KeyboardInterrupt):
            clf.predict_file(src, out, chunk_rows=4, id_column="id")
    assert not out.exists()  # nothing that looks complete
    partial = tmp_path / ".out.csv.partial"
    assert len(_read_output(partial)) == 8  # two chunks kept for --resume
    with pytest.raises(RomebertError, match="other settings \\(chunk_rows differ\\); run again without --resume"):
        clf.predict_file(src, out, chunk_rows=5, id_column="id", resume=True)
    resumed = clf.predict_file(src, out, chunk_rows=4, id_column="id", resume=True)
    assert resumed.resumed_rows == 8 and resumed.rows == 30
    assert out.read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert not partial.exists() and not (tmp_path / ".out.csv.partial.json").exists()


def test_a_killed_torch_free_run_resumes_to_the_same_file(models, tmp_path):
    """SIGKILL mid-way (no cleanup runs): no output file, and --resume finishes it as if never stopped."""
    export = models["export", "custom"]
    src = _write_input(tmp_path / "big.csv", _texts(19) * 150)
    out = tmp_path / "big.predictions.csv"
    argv = ["predict", str(export), "--input", str(src), "-o", str(out), "--chunk-rows", "7", "--quiet"]
    code = ("import sys\nfor name in ('torch', 'transformers', 'scipy'): sys.modules[name] = None\n"
            f"from romebert.cli import main\nsys.exit(main({argv!r}))\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    state = tmp_path / ".big.predictions.csv.partial.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text() or "{}").get("rows", 0) >= 14:
            break
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    assert proc.returncode == -9, err[-2000:]  # killed mid-way, not finished or failed
    assert not out.exists()
    assert main([*argv, "--resume"]) == 0
    assert main(["predict", str(export), "--input", str(src), "-o", str(tmp_path / "whole.csv"), "--chunk-rows",
                 "7", "--quiet"]) == 0  # fmt: skip
    assert out.read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert len(_read_output(out)) == 19 * 150


def test_shards_concatenate_to_the_unsharded_output(models, tmp_path):
    assert parse_shard("1/3") == (1, 3)
    assert [shard_range(10, k, 3, 4) for k in range(3)] == [(0, 4), (4, 8), (8, 10)]  # 3 chunks of 4: one each
    assert [shard_range(5, k, 3, 4) for k in range(3)] == [(0, 0), (0, 4), (4, 5)]  # 2 chunks: one shard is empty
    model = models["export", "glue"]
    for ext in ("csv", "jsonl"):
        src = _write_input(tmp_path / f"in.{ext}", _texts(23))
        base = ["predict", str(model), "--input", str(src), "--text-column", "review", "--chunk-rows", "4", "--quiet"]
        assert main([*base, "-o", str(tmp_path / f"whole.{ext}")]) == 0
        parts = []
        for k in range(3):
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(tmp_path)
                assert main([*base, "--shard", f"{k}/3"]) == 0
            parts.append(tmp_path / f"in.predictions.shard-{k}-of-3.{ext}")
        counts = [len(_read_output(p)) for p in parts]
        assert counts == [8, 8, 7]  # 6 chunks of 4 (the last of 3), 2 per shard
        merged = merge_outputs(parts, tmp_path / f"merged.{ext}")
        assert merged.read_bytes() == (tmp_path / f"whole.{ext}").read_bytes()
    with pytest.raises(RomebertError, match="header differs"):
        merge_outputs([tmp_path / "whole.csv", _write_input(tmp_path / "other.csv", _texts())], tmp_path / "m.csv")


def test_rows_are_read_scored_and_written_a_chunk_at_a_time(models, tmp_path, monkeypatch):
    """What keeps memory flat: the reader is a generator consumed one chunk ahead of the scorer at most,
    the engine never sees more than a chunk, and each chunk is in the output before the next is read."""
    clf = EarlyExitClassifier.from_pretrained(models["export", "custom"])
    src = _write_input(tmp_path / "in.csv", _texts(19) * 3)  # 57 rows
    read = []
    rows = custom.Records.rows

    def counted(self):
        for item in rows(self):
            read.append(item[0])
            yield item

    seen = []
    predict_examples = clf.predict_examples
    partial = tmp_path / ".out.csv.partial"

    def spy(examples, engine, batch_size):
        written = len(_read_output(partial)) if partial.exists() else 0
        seen.append((len(examples), len(read), written))
        return predict_examples(examples, engine, batch_size)

    monkeypatch.setattr(custom.Records, "rows", counted)
    monkeypatch.setattr(clf, "predict_examples", spy)
    clf.predict_file(src, tmp_path / "out.csv", chunk_rows=10)
    assert [n for n, _, _ in seen] == [10, 10, 10, 10, 10, 7]
    for k, (_, rows_read, written) in enumerate(seen):
        assert rows_read <= (k + 1) * 10 + 1  # the reader is never ahead by more than a row
        assert written == k * 10  # the previous chunks are on disk already
    assert len(_read_output(tmp_path / "out.csv")) == 57


def test_iter_predictions_yields_chunks_in_file_order(models, tmp_path):
    clf = EarlyExitClassifier.from_pretrained(models["export", "custom"])
    src = _write_input(tmp_path / "in.tsv", [t.replace("\n", " ") for t in _texts()])
    chunks = list(clf.iter_predictions(src, chunk_rows=8, batch_size=64))
    assert [len(c) for c in chunks] == [8, 8, 3] and [c.first_row for c in chunks] == [0, 8, 16]
    assert [row["id"] for c in chunks for _, row in c.rows] == [f"r{i:03d}" for i in range(19)]
    labels = [label for c in chunks for label in c.predictions.labels]
    clf.predict_file(src, tmp_path / "o.tsv", chunk_rows=8)
    assert labels == [r["prediction"] for r in _read_output(tmp_path / "o.tsv")]
    assert all(np.allclose(c.predictions.probabilities.sum(1), 1.0) for c in chunks)


def test_the_progress_line_shows_rows_per_second():
    import io

    stream = io.StringIO()
    bar = Progress("predict x.csv", total=10, stream=stream, log_every=0.0, initial=4)
    bar.update(6)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("predict x.csv: 10/10 rows, ") and lines[0].endswith(" rows/s")
    assert Progress("x", enabled=False, stream=stream).line() == "x: 0 rows, 0 rows/s"


def test_predict_help_lists_the_file_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--input", "--output", "-o", "--id-column", "--keep-columns", "--chunk-rows", "--resume", "--shard",
                 "--text-column", "--text-pair-column"):  # fmt: skip
        assert f"{flag} " in text or f"{flag}," in text
