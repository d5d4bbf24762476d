"""Where a run's examples come from: :class:`DataSpec`, a GLUE task (a TSV folder or the hub) or the user's
own files, with the checks that read every input before any long work starts."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from romebert.core.errors import RomebertError
from romebert.core.files import write_json
from romebert.core.options import option
from romebert.data.custom import read_custom
from romebert.data.examples import Example, label_ids, label_set
from romebert.data.glue import load_hub_glue, read_split
from romebert.data.tasks import TaskSpec, custom_task, get_task


@dataclass
class DataSpec:
    """Where a run's examples come from: a GLUE task (TSV folder or the hub) or the user's own files."""

    task: str | None = option(None, "GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI")
    data_dir: str | None = option(None, "GLUE folder in the classic layout (<dir>/<TASK>/train.tsv ...)")
    hub: bool = option(False, "load GLUE from the Hugging Face hub (needs romebert[hub] and a network)")
    train_file: str | None = option(None, "your own train file: CSV, TSV or JSON Lines")
    dev_file: str | None = option(None, "your own dev file: CSV, TSV or JSON Lines")
    test_file: str | None = option(None, "your own test file: CSV, TSV or JSON Lines")
    text_a: str | None = option(None, "custom data: column of the (first) text", flag="--text-column")
    text_b: str | None = option(None, "custom data: column of the second text, if any", flag="--text-pair-column")
    label_column: str | None = option(None, "custom data: column of the label")
    labels: list[str] | None = option(None, "custom data: the label set (default: read from the train file)")
    regression: bool = option(False, "custom data: the label is a number")
    metric: str | None = option(None, "custom data: accuracy, f1, mcc, pearson or spearman")
    max_seq_length: int = option(128, "tokens per input (pairs truncated longest-first)")
    max_train_examples: int | None = option(None, "train on a seeded random subset of this many examples")
    subset_seed: int = option(0, "seed of that subset")
    extra: dict = option(default_factory=dict, cli=False)

    @property
    def is_custom(self) -> bool:
        return self.task is None

    def validate(self) -> None:
        if self.is_custom:
            if not self.train_file and not self.dev_file and not self.test_file:
                raise RomebertError("give --task (a GLUE task) or --train-file/--dev-file/--test-file (your own data)")
            if not self.text_a:
                raise RomebertError("custom data needs --text-column naming the text column")
        else:
            get_task(self.task)
            if self.data_dir is None and not self.hub:
                raise RomebertError(f"task {self.task}: give --data-dir (GLUE TSV folder) or --hub")
            if self.data_dir is not None and not Path(self.data_dir).is_dir():
                raise RomebertError(f"--data-dir {self.data_dir}: no such folder")

    def task_spec(self) -> TaskSpec:
        if not self.is_custom:
            return get_task(self.task)
        labels = None
        if not self.regression:
            labels = tuple(self.labels) if self.labels else label_set(self._custom_examples(self.train_file))
        return custom_task(labels, metric=self.metric, pair=self.text_b is not None)

    def replaced(self, override: dict[str, Any] | None) -> DataSpec:
        """A copy with the fields of ``override`` that are not None (data flags given to evaluate / predict)."""
        if not override:
            return self
        return DataSpec(**{**asdict(self), **{k: v for k, v in override.items() if v is not None}})

    def task_for(self, trained_task: str | None, trained_labels: Sequence[str] | None, num_labels: int) -> TaskSpec:
        """The task of a model trained for ``trained_task`` with ``trained_labels`` (None: regression) on
        this data; a model of another task or label set is refused in one line. For custom data the
        label set is the one the model was trained on."""
        trained = list(trained_labels) if trained_labels is not None else None
        if self.is_custom:
            return custom_task(tuple(trained) if trained else None, metric=self.metric, pair=self.text_b is not None)
        task = get_task(self.task)
        expected = list(task.labels) if task.labels is not None else None
        if num_labels != task.num_labels or (trained is not None and trained != expected):
            raise RomebertError(
                f"the model was trained for {trained_task or 'another task'} with labels {trained} "
                f"({num_labels} outputs); task {task.name} needs {expected} ({task.num_labels} outputs)"
            )
        return task

    def _custom_examples(self, path: str | None) -> list[Example]:
        if path is None:
            raise RomebertError("no file given for this split")
        return read_custom(path, self.text_a, self.text_b, self.label_column)

    def examples(self, split: str) -> list[Example]:
        if self.is_custom:
            path = {"train": self.train_file, "dev": self.dev_file, "test": self.test_file}.get(split)
            if path is None:
                raise RomebertError(f"no --{split}-file given")
            rows = read_custom(path, self.text_a, self.text_b, None if split == "test" else self.label_column)
        elif self.hub:
            rows = load_hub_glue(get_task(self.task), split)
        else:
            rows = read_split(get_task(self.task), self.data_dir, split)
        if split == "train" and self.max_train_examples and self.max_train_examples < len(rows):
            rows = random.Random(self.subset_seed).sample(rows, self.max_train_examples)
        return rows

    def check_inputs(self, splits: Sequence[str], with_tests: bool = False) -> dict[str, list[Example]]:
        """Read every split a job will use (and, ``with_tests``, every submission input) now, so that a
        missing file, a missing column or a label outside the task's set fails in one line before any
        training rather than after it. Returns the examples of ``splits``, for the caller to use."""
        self.validate()
        task = self.task_spec()
        read: dict[str, list[Example]] = {}
        for split in splits:
            examples = self.examples(split)
            if not examples:
                raise RomebertError(f"the {split} split has no examples")
            try:
                label_ids(examples, task.labels)
            except RomebertError as exc:
                if self.is_custom:
                    raise  # the message names the file and line
                raise RomebertError(f"{self.describe(split)}: {exc}") from None
            read[split] = examples
        if with_tests:
            for test_task, split, _ in self.test_files():
                if test_task is None or test_task.name == task.name:
                    self.examples(split)
                elif self.data_dir is not None:  # AX for MNLI: another task's folder
                    read_split(test_task, self.data_dir, split)
        return read

    def describe(self, split: str) -> str:
        """Where ``split`` comes from, for messages."""
        if self.is_custom:
            return str({"train": self.train_file, "dev": self.dev_file, "test": self.test_file}.get(split))
        return f"{self.task} {split} ({'the hub' if self.hub else self.data_dir})"

    def eval_splits(self) -> list[str]:
        if self.is_custom:
            return ["dev"] if self.dev_file else []
        return list(get_task(self.task).eval_splits)

    def test_files(self) -> list[tuple[TaskSpec | None, str, str]]:
        """(task whose files to read, split, output file name) for every submission file.

        The task is None for custom data: its labels come from the trained model (``run_task``).
        """
        if self.is_custom:
            return [(None, "test", "predictions.tsv")] if self.test_file else []
        task = get_task(self.task)
        out = [(task, split, name) for split, name in task.test_files]
        if task.name == "MNLI":  # GLUE's diagnostic set is predicted by the MNLI model
            out += [(get_task("AX"), split, name) for split, name in get_task("AX").test_files]
        return out

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> DataSpec:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
        except FileNotFoundError:
            raise RomebertError(f"{path}: not found (is this a run folder made by 'romebert train'?)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RomebertError(f"{path}: not a valid run file ({exc})") from None
        return cls(**data)
