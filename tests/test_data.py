"""Reading GLUE fixtures / malformed files / custom files / the hub, encoding, collation and sampling."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from romebert.core.errors import RomebertError
from romebert.data.custom import read_custom
from romebert.data.examples import Example, label_ids, label_set
from romebert.data.glue import load_hub_glue, read_split
from romebert.data.tasks import get_task
from romebert.runtime.encoding import Collator, EncodedDataset, encode
from romebert.training.batching import LengthGroupedSampler, make_dataloader, set_epoch

from glue_fixtures import TASK_NAMES, fixture_splits, real_glue_dir, sentence, write_glue_fixture
from tiny import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------------- GLUE fixtures


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_reads_every_split_of_every_fixture(tmp_path: Path, task_name: str) -> None:
    write_glue_fixture(tmp_path, task_name, n=6)
    task = get_task(task_name)
    assert set(fixture_splits(task_name)) == set(task.splits)
    for split in task.splits:
        examples = read_split(task, tmp_path, split)
        assert [ex.guid for ex in examples] == [f"{split}-{i}" for i in range(6)]
        for ex in examples:
            assert ex.text_a.strip().endswith(" .") and "\ufeff" not in ex.text_a
            assert (ex.text_b is None) == (not task.is_pair)
            if split.startswith("test"):
                assert ex.label is None
            elif task.is_regression:
                assert isinstance(ex.label, float) and 0.0 <= ex.label <= 5.0
            else:
                assert ex.label in task.labels
        if not split.startswith("test") and task.labels is not None:
            assert len({ex.label for ex in examples}) == min(task.num_labels, 6)  # every class occurs


def test_fixture_text_and_label_columns(tmp_path: Path) -> None:
    write_glue_fixture(tmp_path, "MNLI", n=4)
    write_glue_fixture(tmp_path, "CoLA", n=4)
    mnli = get_task("mnli")
    dev = read_split(mnli, tmp_path, "dev_matched")  # 16 columns: gold_label is the last one
    assert [ex.label for ex in dev] == ["entailment", "neutral", "contradiction", "entailment"]
    assert dev[0].text_a == sentence(100) and dev[0].text_b == sentence(150)
    train = read_split(mnli, tmp_path, "train")  # 12 columns
    assert [ex.label for ex in train][:3] == ["entailment", "neutral", "contradiction"]
    cola = read_split(get_task("cola"), tmp_path, "train")  # no header: the first line is data
    assert cola[0].text_a == sentence(0) and [ex.label for ex in cola] == ["0", "1", "0", "1"]


def test_data_dir_may_be_the_task_folder(tmp_path: Path) -> None:
    folder = write_glue_fixture(tmp_path, "RTE", n=3)
    assert len(read_split(get_task("rte"), folder, "dev")) == 3


# ------------------------------------------------------------------------------------ malformed


def test_missing_file_names_expected_path(tmp_path: Path) -> None:
    expected = re.escape(str(tmp_path / "SST-2" / "dev.tsv"))
    with pytest.raises(RomebertError, match=f"SST-2 dev file not found: expected {expected}"):
        read_split(get_task("sst2"), tmp_path, "dev")


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(RomebertError, match=r"unknown split 'dev' for task MNLI \(known: train, dev_matched"):
        read_split(get_task("mnli"), tmp_path, "dev")


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    sst2 = get_task("sst2")
    _write(tmp_path / "SST-2" / "dev.tsv", "")
    with pytest.raises(RomebertError, match=r"dev\.tsv: file is empty"):
        read_split(sst2, tmp_path, "dev")
    _write(tmp_path / "SST-2" / "dev.tsv", "\ufeffsentence\tlabel\n\n\n")
    with pytest.raises(RomebertError, match=r"dev\.tsv: file has a header row but no data rows"):
        read_split(sst2, tmp_path, "dev")
    _write(tmp_path / "CoLA" / "dev.tsv", "\n")  # CoLA has no header
    with pytest.raises(RomebertError, match=r"dev\.tsv: file is empty"):
        read_split(get_task("cola"), tmp_path, "dev")


def test_too_few_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood film\t1\nno label here\n")
    message = re.escape(f"{path}:3: expected at least 2 tab-separated columns, got 1")
    with pytest.raises(RomebertError, match=message):
        read_split(get_task("sst2"), tmp_path, "train")
    # A blank line in the middle is malformed too (only trailing blank lines are skipped).
    path = _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n\n0\ta\tb\tentailment\n")
    with pytest.raises(RomebertError, match=re.escape(f"{path}:2: expected at least 4 tab-separated columns, got 0")):
        read_split(get_task("rte"), tmp_path, "dev")
    # MNLI dev rows need the 12 columns up to the gold label.
    header = "\t".join(f"c{i}" for i in range(16))
    path = _write(tmp_path / "MNLI" / "dev_matched.tsv", header + "\n" + "\t".join(["x"] * 10) + "\n")
    with pytest.raises(RomebertError, match=re.escape(f"{path}:2: expected at least 12 tab-separated")):
        read_split(get_task("mnli"), tmp_path, "dev_matched")


def test_bad_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ngood\t1\nbad\tx\n")
    message = re.escape(f"{path}:3: label 'x' is not one of ['0', '1'] for task SST-2")
    with pytest.raises(RomebertError, match=message):
        read_split(get_task("sst2"), tmp_path, "dev")
    path = _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n")
    with pytest.raises(RomebertError, match=re.escape(f"{path}:2: label 'neutral' is not one of")):
        read_split(get_task("rte"), tmp_path, "train")


@pytest.mark.parametrize("score", ["high", "nan", ""])
def test_non_numeric_stsb_score(tmp_path: Path, score: str) -> None:
    write_glue_fixture(tmp_path, "STS-B", n=3)
    path = tmp_path / "STS-B" / "dev.tsv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\t" + score
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RomebertError, match=re.escape(f"{path}:3: score '{score}' is not a number for task STS-B")):
        read_split(get_task("stsb"), tmp_path, "dev")


def test_non_utf8_reports_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "SST-2" / "train.tsv", b"sentence\tlabel\nfine\t1\ncaf\xe9 bad\t0\n")
    with pytest.raises(RomebertError, match=re.escape(f"{path}:3: file is not valid UTF-8")):
        read_split(get_task("sst2"), tmp_path, "train")


def test_bom_crlf_quotes_and_trailing_blank_lines(tmp_path: Path) -> None:
    text = '\ufeffsentence\tlabel\r\n" a quoted start\t1\r\nit \'s "odd\t0\r\n\r\n  \n'
    _write(tmp_path / "SST-2" / "dev.tsv", text)
    examples = read_split(get_task("sst2"), tmp_path, "dev")
    assert [(ex.text_a, ex.label) for ex in examples] == [('" a quoted start', "1"), ("it 's \"odd", "0")]
    # A BOM on a headerless CoLA file must not leak into the first row; no final newline is fine.
    _write(tmp_path / "CoLA" / "train.tsv", "\ufeffgj04\t1\t\tA fine sentence .")
    (cola,) = read_split(get_task("cola"), tmp_path, "train")
    assert (cola.text_a, cola.label) == ("A fine sentence .", "1")


# ------------------------------------------------------------------------------------ custom files


def test_read_custom_csv_and_tsv(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "mine.csv", '\ufeffid,review,verdict\n1,"good, really",pos\n\n2,"say ""hi""",neg\n')
    examples = read_custom(csv_path, text_a="review", label="verdict")
    assert [(ex.text_a, ex.text_b, ex.label) for ex in examples] == [
        ("good, really", None, "pos"),
        ('say "hi"', None, "neg"),
    ]
    assert examples[0].guid == "mine-0"
    tsv_path = _write(tmp_path / "pairs.tsv", 'a\tb\n"left\tright "x\n')
    (pair,) = read_custom(tsv_path, text_a="a", text_b="b")
    assert (pair.text_a, pair.text_b, pair.label) == ('"left', 'right "x', None)
    semi = _write(tmp_path / "semi.txt", "t;y\nhello;0.5\n")
    assert read_custom(semi, "t", label="y", delimiter=";")[0].label == "0.5"


def test_read_custom_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.csv", "review,verdict\ngood,pos\n")
    message = re.escape(f"{path}: column 'text' (for text_a) not found; available columns: ['review', 'verdict']")
    with pytest.raises(RomebertError, match=message):
        read_custom(path, text_a="text")
    with pytest.raises(RomebertError, match="column 'label'"):
        read_custom(path, text_a="review", label="label")
    with pytest.raises(RomebertError, match=r"cannot tell the format from the extension '\.json'"):
        read_custom(tmp_path / "x.json", text_a="a")
    with pytest.raises(RomebertError, match="file not found"):
        read_custom(tmp_path / "absent.csv", text_a="a")
    short = _write(tmp_path / "short.csv", "a,b\n1,2\n3\n")
    with pytest.raises(RomebertError, match=re.escape(f"{short}:3: expected at least 2 columns, got 1")):
        read_custom(short, text_a="a", label="b")
    only_header = _write(tmp_path / "h.tsv", "a\tb\n")
    with pytest.raises(RomebertError, match="header row but no data rows"):
        read_custom(only_header, text_a="a")
    with pytest.raises(RomebertError, match="file is empty"):
        read_custom(_write(tmp_path / "e.csv", ""), text_a="a")


def test_read_custom_json_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.jsonl", '{"id": 7, "review": "good, \\"really\\"", "stars": 5}\n\n'
                  '{"id": 8, "review": "bad", "stars": 1, "extra": [1]}\n')  # fmt: skip
    examples = read_custom(path, text_a="review", label="stars")
    assert [(ex.text_a, ex.label, ex.where) for ex in examples] == [
        ('good, "really"', "5", f"{path}:1"),
        ("bad", "1", f"{path}:3"),
    ]
    with pytest.raises(RomebertError, match=re.escape(f"{path}:1: no 'text' field (for text_a)")):
        read_custom(path, text_a="text")
    broken = _write(tmp_path / "broken.jsonl", '{"t": "a", "y": "0"}\n{"t": "b", "y"\n')
    with pytest.raises(RomebertError, match=re.escape(f"{broken}:2: not a JSON object")):
        read_custom(broken, text_a="t", label="y")
    listed = _write(tmp_path / "listed.jsonl", '["a", "0"]\n')
    with pytest.raises(RomebertError, match=re.escape(f"{listed}:1: not a JSON object (a list)")):
        read_custom(listed, text_a="t")


GOOD_JSONL = '{"review": "good", "sentiment": "positive"}\n'
EMPTY_LABELS = {
    "csv": ("train.csv", 'id,review,sentiment\n1,"good, really",positive\n999,"no label here",\n3,bad,negative\n', 3),
    "tsv": ("train.tsv", "id\treview\tsentiment\n1\tgood\tpositive\n2\tbad\t  \n", 3),
    "jsonl (empty)": ("train.jsonl", GOOD_JSONL + '{"review": "x", "sentiment": ""}\n', 2),
    "jsonl (null)": ("train.jsonl", GOOD_JSONL + '{"review": "x", "sentiment": null}\n', 2),
    "jsonl (missing)": ("train.jsonl", GOOD_JSONL + '{"review": "x"}\n', 2),
}


@pytest.mark.parametrize("case", list(EMPTY_LABELS))
def test_an_empty_or_missing_label_is_refused_with_its_line(tmp_path: Path, case: str) -> None:
    name, text, line = EMPTY_LABELS[case]
    path = _write(tmp_path / name, text)
    with pytest.raises(RomebertError, match=rf"^{re.escape(str(path))}:{line}: (empty label in column|no) 'sentiment'"):
        read_custom(path, text_a="review", label="sentiment")
    assert read_custom(path, text_a="review")  # without a label column (a test file) the row is fine


# ---------------------------------------------------------------------------------------- hub


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, rows: list[dict], calls: list) -> None:
    module = types.ModuleType("datasets")

    def load_dataset(path: str, name: str, split: str) -> list[dict]:
        calls.append((path, name, split))
        if name == "broken":
            raise ConnectionError("no network\nat all")
        return rows

    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_load_hub_glue_maps_splits_and_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    rows = [
        {"premise": "p0", "hypothesis": "h0", "label": 2, "idx": 0},
        {"premise": "p1", "hypothesis": "h1", "label": 0, "idx": 1},
        {"premise": "p2", "hypothesis": "h2", "label": -1, "idx": 2},
    ]
    _fake_datasets(monkeypatch, rows, calls)
    examples = load_hub_glue(get_task("mnli"), "dev_mismatched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert [(e.guid, e.text_a, e.text_b, e.label) for e in examples] == [
        ("dev_mismatched-0", "p0", "h0", "contradiction"),
        ("dev_mismatched-1", "p1", "h1", "entailment"),
        ("dev_mismatched-2", "p2", "h2", None),
    ]
    _fake_datasets(monkeypatch, [{"sentence": "s", "label": 1, "idx": 0}], calls)
    assert load_hub_glue(get_task("sst2"), "dev")[0].label == "1"
    assert calls[-1] == ("nyu-mll/glue", "sst2", "validation")
    _fake_datasets(monkeypatch, [{"sentence1": "a", "sentence2": "b", "label": 3.2, "idx": 0}], calls)
    assert load_hub_glue(get_task("stsb"), "train")[0].label == pytest.approx(3.2)


def test_load_hub_glue_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RomebertError, match=re.escape("pip install romebert[hub]")):
        load_hub_glue(get_task("rte"), "train")
    calls: list = []
    _fake_datasets(monkeypatch, [], calls)
    broken = get_task("rte").__class__(**{**get_task("rte").__dict__, "hub_name": "broken"})
    with pytest.raises(RomebertError, match="cannot load nyu-mll/glue/broken split train: no network at all$"):
        load_hub_glue(broken, "train")
    with pytest.raises(RomebertError, match="unknown split 'dev'"):
        load_hub_glue(get_task("ax"), "dev")


# --------------------------------------------------------------------------------------- labels


def test_label_ids_and_label_set() -> None:
    examples = [Example("a", "x", None, "neg"), Example("b", "y", None, "pos"), Example("c", "z", None, None)]
    assert label_ids(examples, ("neg", "pos")) == [0, 1, None]
    with pytest.raises(RomebertError, match=re.escape("example b: label 'pos' is not one of ['neg', 'n']")):
        label_ids(examples, ("neg", "n"))
    assert label_ids([Example("a", "x", None, "2.5"), Example("b", "y", None, 1.0)], None) == [2.5, 1.0]
    with pytest.raises(RomebertError, match="score 'neg' is not a number"):
        label_ids(examples, None)
    numeric = [Example(str(i), "t", None, label) for i, label in enumerate(["10", "9", "2", "9"])]
    assert label_set(numeric) == ("2", "9", "10")
    assert label_set(examples) == ("neg", "pos")


# ------------------------------------------------------------------------------ encode / collate


def test_encode_single_and_pair(tokenizer, tmp_path: Path) -> None:
    write_glue_fixture(tmp_path, "SST-2", n=6)
    write_glue_fixture(tmp_path, "RTE", n=6)
    sst2, rte = get_task("sst2"), get_task("rte")
    single = encode(read_split(sst2, tmp_path, "train"), tokenizer, sst2.labels, max_seq_length=128)
    assert len(single) == 6 and single.has_labels
    first = single[0]
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert first["input_ids"][0] == tokenizer.cls_token_id and first["input_ids"][-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in first["input_ids"]  # fixture words are in the tiny vocabulary
    assert single.lengths == [len(f["input_ids"]) for f in single.features]
    assert len(set(single.lengths)) > 1  # not padded
    assert [f["labels"] for f in single.features] == [0, 1, 0, 1, 0, 1]

    pairs = encode(read_split(rte, tmp_path, "dev"), tokenizer, rte.labels, max_seq_length=8)
    assert max(pairs.lengths) == 8
    assert all(1 in f["token_type_ids"] for f in pairs.features)  # both segments survive truncation
    test = encode(read_split(rte, tmp_path, "test"), tokenizer, rte.labels)
    assert not test.has_labels and "labels" not in test[0]
    mixed = [Example("a", "x", None, None), Example("b", "x", "y", None), Example("c", "y", None, None)]
    got = encode(mixed, tokenizer, None).features  # singles and pairs together, each encoded as alone
    alone = [encode([ex], tokenizer, None).features[0] for ex in mixed]
    assert got == alone and got[0] != got[1]


def test_encode_regression(tokenizer, tmp_path: Path) -> None:
    write_glue_fixture(tmp_path, "STS-B", n=4)
    stsb = get_task("stsb")
    encoded = encode(read_split(stsb, tmp_path, "train"), tokenizer, stsb.labels)
    labels = [f["labels"] for f in encoded.features]
    assert all(isinstance(v, float) for v in labels) and labels[1] == pytest.approx(1.375)


def test_collator_pads_to_longest(tokenizer) -> None:
    features = [
        {"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 0], "labels": 1},
        {
            "input_ids": [2, 5, 6, 7, 3],
            "attention_mask": [1] * 5,
            "token_type_ids": [0, 0, 0, 1, 1],
            "labels": 0,
        },
    ]
    batch = Collator(tokenizer)(features)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].tolist() == [[2, 5, 3, 0, 0], [2, 5, 6, 7, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    multiple = Collator(tokenizer, pad_to_multiple_of=8)(features)
    assert multiple["input_ids"].shape == (2, 8)
    left = Collator(pad_token_id=9, padding_side="left")([{"input_ids": [1]}, {"input_ids": [1, 2]}])
    assert left["input_ids"].tolist() == [[9, 1], [1, 2]] and set(left) == {"input_ids"}
    regression = Collator(tokenizer)([{"input_ids": [2, 3], "labels": 2.5}, {"input_ids": [2], "labels": 1.0}])
    assert regression["labels"].dtype == torch.float32
    with pytest.raises(RomebertError, match="mixes labeled and unlabeled"):
        Collator(tokenizer)([{"input_ids": [2], "labels": 1}, {"input_ids": [2]}])


# -------------------------------------------------------------------------------------- batching


def _lengths(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(5, 129, size=n).tolist()


def test_length_grouped_sampler_is_a_deterministic_permutation() -> None:
    lengths = _lengths(1003)
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=7, mega_batch_mult=4)
    first = list(sampler)
    assert len(sampler) == 1003 and sorted(first) == list(range(1003))
    assert list(LengthGroupedSampler(lengths, batch_size=16, seed=7, mega_batch_mult=4)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(1003)) and second != first
    assert list(LengthGroupedSampler(lengths, 16, seed=8, mega_batch_mult=4)) != first
    # The one short batch (1003 = 62 * 16 + 11) comes last, so batch_size runs stay aligned.
    assert len(first[62 * 16 :]) == 11


def test_length_grouped_batches_have_small_length_spread() -> None:
    lengths = np.array(_lengths(4000))
    order = np.array(list(LengthGroupedSampler(lengths.tolist(), batch_size=32, seed=1)))
    grouped = lengths[order].reshape(-1, 32)[:-1]  # drop the partial batch (4000 = 125 * 32: none)
    shuffled = lengths[np.random.default_rng(1).permutation(4000)].reshape(-1, 32)

    def spread(batches: np.ndarray) -> float:
        return float(np.mean(batches.max(axis=1) - batches.min(axis=1)))

    assert spread(grouped) < 0.2 * spread(shuffled)


def test_make_dataloader_orders(tokenizer) -> None:
    features = [{"input_ids": [2] + [5] * (i % 7) + [3], "labels": i} for i in range(40)]
    dataset = EncodedDataset(features)
    collator = Collator(tokenizer)
    eval_loader = make_dataloader(dataset, 8, collator, shuffle=False)
    assert torch.cat([b["labels"] for b in eval_loader]).tolist() == list(range(40))  # file order

    def epoch_order(loader, epoch: int) -> list[int]:
        set_epoch(loader, epoch)
        return torch.cat([b["labels"] for b in loader]).tolist()

    for group in (True, False):
        loader = make_dataloader(dataset, 8, collator, shuffle=True, seed=3, group_by_length=group)
        e0, e1 = epoch_order(loader, 0), epoch_order(loader, 1)
        assert sorted(e0) == list(range(40)) and e0 != e1 and e0 != list(range(40))
        assert epoch_order(loader, 0) == e0
    set_epoch(eval_loader, 3)  # harmless on a sequential loader


# ------------------------------------------------------------------------------------ real files

REAL_COUNTS = {
    ("SST-2", "train"): 67349, ("SST-2", "dev"): 872, ("SST-2", "test"): 1821,
    ("MRPC", "train"): 3668, ("MRPC", "dev"): 408, ("MRPC", "test"): 1725,
    ("RTE", "train"): 2490, ("RTE", "dev"): 277, ("RTE", "test"): 3000,
    ("WNLI", "train"): 635, ("WNLI", "dev"): 71, ("WNLI", "test"): 146,
    ("QNLI", "dev"): 5463, ("QNLI", "test"): 5463,
    ("AX", "test"): 1104,
}  # fmt: skip


@pytest.mark.parametrize(("task_name", "split"), list(REAL_COUNTS))
def test_reads_real_glue_files(task_name: str, split: str) -> None:
    root = real_glue_dir()
    if root is None:
        pytest.skip("real GLUE data (../shared/glue or $ROMEBERT_GLUE_DIR) is absent")
    task = get_task(task_name)
    examples = read_split(task, root, split)
    assert len(examples) == REAL_COUNTS[(task_name, split)]
    labels = {ex.label for ex in examples}
    if split == "test":
        assert labels == {None}
    else:
        assert labels == set(task.labels)
    assert all(ex.text_a for ex in examples)


def test_real_mrpc_first_row_keeps_quotes() -> None:
    root = real_glue_dir()
    if root is None:
        pytest.skip("real GLUE data (../shared/glue or $ROMEBERT_GLUE_DIR) is absent")
    first = read_split(get_task("mrpc"), root, "train")[0]
    assert first.label == "1"
    assert first.text_a.startswith("Amrozi accused his brother") and '" the witness "' in first.text_a
