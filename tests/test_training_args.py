"""Options declared once (TrainingArguments / DataSpec fields), the presets, and flags built from them."""

from __future__ import annotations

import dataclasses

import pytest

from romebert.cli.commands import _data_spec, _training_arguments, compare_config
from romebert.cli.parser import build_parser
from romebert.core import options
from romebert.core.errors import RomebertError
from romebert.data.spec import DataSpec
from romebert.training.training_args import PRESETS, TrainingArguments

# What the reference code does (method.md), spelled out here independently of PRESETS.
REFERENCE = {
    "method": "romebert-sdgr",
    "pooling": "cls",
    "group_by_length": False,
    "clip_frozen_gradients": True,
    "decay_bias_and_norm": False,
    "epochs": 3.0,
    "learning_rate": 2e-5,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "weight_decay": 0.0,
    "adam_epsilon": 1e-8,
    "warmup_ratio": 0.0,
    "max_grad_norm": 1.0,
    "seed": 42,
    "gamma": 0.9,
    "temperature": 3.0,
    "kd_reduction": "mean",
    "gr_anchor": "auto",
}


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_the_reference_preset_sets_every_option_it_names():
    assert {k: v for k, v in PRESETS["reference"].items() if k != "max_seq_length"} == REFERENCE
    ns = _parse("train", "--task", "RTE", "--data-dir", ".", "-o", "x", "--preset", "reference")
    args = _training_arguments(ns)
    for name, value in REFERENCE.items():
        assert getattr(args, name) == value, name
    assert args.preset == "reference"
    assert _data_spec(ns).max_seq_length == 128


def test_the_preset_differs_from_the_defaults_where_the_project_does():
    default = TrainingArguments(output_dir="x")
    preset = TrainingArguments.from_preset("reference", output_dir="x")
    changed = {f.name for f in dataclasses.fields(default) if getattr(default, f.name) != getattr(preset, f.name)}
    assert changed == {"preset", "method", "pooling", "group_by_length", "clip_frozen_gradients"}


def test_flags_given_with_a_preset_take_precedence():
    ns = _parse("train", "--task", "RTE", "--data-dir", ".", "-o", "x", "--preset", "reference",
                "--pooling", "mean", "--lr", "5e-5", "--max-seq-length", "64")  # fmt: skip
    args = _training_arguments(ns)
    assert (args.pooling, args.learning_rate, args.group_by_length) == ("mean", 5e-5, False)
    assert _data_spec(ns).max_seq_length == 64


def test_compare_takes_the_preset_and_its_pooling():
    ns = _parse("compare", "--task", "MRPC", "--data-dir", ".", "-o", "cmp", "--preset", "reference")
    cfg = compare_config(ns)
    assert cfg.poolings == ["cls"] and cfg.training.preset == "reference"
    assert not cfg.training.group_by_length and cfg.training.clip_frozen_gradients
    plain = compare_config(_parse("compare", "--task", "MRPC", "--data-dir", ".", "-o", "c"))
    assert plain.poolings == ["mean", "cls"]


def test_every_option_field_has_a_flag_with_its_help_and_default():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    flags = {s for a in train._actions for s in a.option_strings}
    helps = {a.dest: a.help for a in train._actions}
    for cls in (TrainingArguments, DataSpec):
        for f in options.option_fields(cls):
            assert options.flag_of(f) in flags, f.name
            assert helps[f.name] and f.metadata["romebert_option"]["help"] in helps[f.name]


def test_command_args_rebuild_the_same_arguments():
    args = TrainingArguments.from_preset("reference", output_dir="run", method="deebert", learning_rate=3e-5)
    ns = _parse("train", "--task", "RTE", "--data-dir", ".", *options.command_args(args))
    assert _training_arguments(ns) == dataclasses.replace(args, device="auto", progress=True)


def test_bad_values_give_one_line_errors():
    with pytest.raises(RomebertError, match="unknown preset 'paper'"):
        TrainingArguments.from_preset("paper", output_dir="x")
    with pytest.raises(RomebertError, match="kd_reduction must be one of"):
        TrainingArguments(output_dir="x", kd_reduction="sum")
    with pytest.raises(RomebertError, match="pooling must be one of"):
        TrainingArguments(output_dir="x", pooling="max")
    with pytest.raises(SystemExit):
        _parse("train", "--task", "RTE", "-o", "x", "--preset", "paper")
