"""Tiny GLUE fixtures in the real column layouts of download_glue_data.py, plus the real-data location.

Import from tests as ``from glue_fixtures import write_glue_fixture`` (pytest puts tests/ on sys.path).
Everything is deterministic: the same (task, n) always writes the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

# Every word used in fixture text; tests/tiny.py's vocabulary contains them all (no [UNK] tokens).
WORDS = (
    "the", "cat", "dog", "sat", "on", "a", "mat", "movie", "was", "good", "bad", "very", "not", "it",
    "is", "fun", "man", "saw", "bird", "big", "small", "red", "house", "ran",
)  # fmt: skip

TASK_NAMES = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI", "AX")
_MNLI_LABELS = ("entailment", "neutral", "contradiction")
_NLI_LABELS = ("entailment", "not_entailment")


def sentence(i: int, length: int | None = None) -> str:
    """A deterministic sentence of fixture words; its length varies with ``i`` (3..10 words)."""
    length = length if length is not None else 3 + (i * 5) % 8
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length)) + " ."


def real_glue_dir() -> Path | None:
    """The real GLUE copy: $ROMEBERT_GLUE_DIR, else <repo>/../shared/glue; None when absent."""
    override = os.environ.get("ROMEBERT_GLUE_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "glue"
    return path if path.is_dir() else None


def _write(path: Path, header: str | None, rows: list[list[str]], bom: bool = False) -> None:
    lines = ([header] if header is not None else []) + ["\t".join(row) for row in rows]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)


def _binary(i: int) -> str:
    return str(i % 2)


def _rows(task: str, split: str, n: int) -> tuple[str | None, list[list[str]], bool]:
    """(header, rows, bom) of one fixture file."""
    labeled = not split.startswith("test")
    off = {"train": 0, "dev": 100, "dev_matched": 100, "dev_mismatched": 200}.get(split, 300)
    a = [sentence(off + i) for i in range(n)]
    b = [sentence(off + i + 50) for i in range(n)]
    idx = [str(i) for i in range(n)]
    if task == "CoLA":
        if labeled:  # no header: source, label, original label ("*" marks unacceptable), sentence
            rows = [["gj04", _binary(i), "" if i % 2 else "*", a[i]] for i in range(n)]
            return None, rows, False
        return "index\tsentence", [[idx[i], a[i]] for i in range(n)], False
    if task == "SST-2":
        if labeled:
            return "sentence\tlabel", [[a[i] + " ", _binary(i)] for i in range(n)], False
        return "index\tsentence", [[idx[i], a[i]] for i in range(n)], False
    if task == "MRPC":
        ids = [[str(1000 + 2 * i), str(1001 + 2 * i)] for i in range(n)]
        if labeled:  # the real train/dev header starts with a UTF-8 BOM
            rows = [[_binary(i), *ids[i], a[i], b[i]] for i in range(n)]
            return "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", rows, True
        rows = [[idx[i], *ids[i], a[i], b[i]] for i in range(n)]
        return "index\t#1 ID\t#2 ID\t#1 String\t#2 String", rows, False
    if task == "STS-B":
        header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
        meta = [[idx[i], "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none"] for i in range(n)]
        if labeled:
            rows = [[*meta[i], a[i], b[i], f"{(i * 1.375) % 5:.3f}"] for i in range(n)]
            return header + "\tscore", rows, False
        return header, [[*meta[i], a[i], b[i]] for i in range(n)], False
    if task == "QQP":
        if labeled:
            rows = [[idx[i], str(2 * i), str(2 * i + 1), a[i], b[i], _binary(i)] for i in range(n)]
            return "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", rows, False
        return "id\tquestion1\tquestion2", [[idx[i], a[i], b[i]] for i in range(n)], False
    if task == "MNLI":
        header = (
            "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse"
            "\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2"
        )
        meta = [
            [idx[i], str(31193 + i), f"{31193 + i}n", "government", f"( {a[i]} )", f"( {b[i]} )",
             f"(ROOT {a[i]})", f"(ROOT {b[i]})", a[i], b[i]]
            for i in range(n)
        ]  # fmt: skip
        gold = [_MNLI_LABELS[i % 3] for i in range(n)]
        if split == "train":  # 12 columns: label1, gold_label
            return header + "\tlabel1\tgold_label", [[*meta[i], gold[i], gold[i]] for i in range(n)], False
        if labeled:  # dev: 16 columns: label1..label5, gold_label
            votes = [[gold[i], gold[i], _MNLI_LABELS[(i + 1) % 3], gold[i], gold[i]] for i in range(n)]
            header += "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
            return header, [[*meta[i], *votes[i], gold[i]] for i in range(n)], False
        return header, meta, False
    if task in ("QNLI", "RTE", "WNLI"):
        first = "question\tsentence" if task == "QNLI" else "sentence1\tsentence2"
        if labeled:
            labels = [_binary(i) if task == "WNLI" else _NLI_LABELS[i % 2] for i in range(n)]
            return f"index\t{first}\tlabel", [[idx[i], a[i], b[i], labels[i]] for i in range(n)], False
        return f"index\t{first}", [[idx[i], a[i], b[i]] for i in range(n)], False
    if task == "AX":
        return "index\tsentence1\tsentence2", [[idx[i], a[i], b[i]] for i in range(n)], False
    raise KeyError(f"unknown fixture task {task!r}")


def fixture_splits(task: str) -> dict[str, str]:
    """split name -> file name written for ``task``."""
    if task == "MNLI":
        names = ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")
        return {name: f"{name}.tsv" for name in names}
    if task == "AX":
        return {"test": "diagnostic.tsv"}
    return {name: f"{name}.tsv" for name in ("train", "dev", "test")}


def write_glue_fixture(root: Path, task: str, n: int = 8) -> Path:
    """Write ``n``-row train/dev/test files of ``task`` (canonical name) under ``root``; returns the task
    folder (``root/<TASK>``, or ``root/diagnostic`` for AX). Classification labels alternate / cycle."""
    folder = Path(root) / ("diagnostic" if task == "AX" else task)
    folder.mkdir(parents=True, exist_ok=True)
    for split, file in fixture_splits(task).items():
        header, rows, bom = _rows(task, split, n)
        _write(folder / file, header, rows, bom)
    return folder


def write_all_glue_fixtures(root: Path, n: int = 8) -> Path:
    """Write every task (and AX) under ``root``; returns ``root``."""
    for task in TASK_NAMES:
        write_glue_fixture(root, task, n)
    return Path(root)
