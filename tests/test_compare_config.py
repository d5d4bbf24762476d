"""``romebert.jobs.compare.config``: the full command reads back as the same comparison, and shows no machine path."""

from __future__ import annotations

import shlex
from dataclasses import asdict

from romebert.cli.commands import compare_config
from romebert.cli.parser import build_parser
from romebert.core.environment import default_backbone
from romebert.jobs.compare import COMPARE_VARIES, full_command
from romebert.jobs.compare.config import shown_invocation

from compare_fixtures import hand_comparison


def _parsed(command: str):
    words = shlex.split(command)
    assert words[:2] == ["romebert", "compare"]
    return compare_config(build_parser().parse_args(words[1:]))


def test_full_command_reads_back_as_the_same_comparison(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = hand_comparison(tmp_path, speedups=[1.5, 2.5], thresholds=[0.1, 0.2], include_plain=False).cfg
    again = _parsed(full_command(cfg))
    assert again.data == cfg.data.replaced({"data_dir": "glue"})
    for name in ("methods", "seeds", "poolings", "include_plain", "speedups", "thresholds", "device"):
        assert getattr(again, name) == getattr(cfg, name), name
    assert again.output_dir == "cmp"  # given absolute under the current folder: shown relative
    keep = {k: v for k, v in asdict(cfg.training).items() if k not in COMPARE_VARIES}
    assert {k: v for k, v in asdict(again.training).items() if k not in COMPARE_VARIES} == keep


def test_full_command_leaves_the_packaged_backbone_to_the_default(tmp_path):
    cfg = hand_comparison(tmp_path, backbone=default_backbone()).cfg
    command = full_command(cfg)
    assert "--model" not in command and "site-packages" not in command
    assert _parsed(command).training.backbone is None
    assert "--model org/hub-model" in full_command(hand_comparison(tmp_path / "hub").cfg)


def test_shown_invocation_keeps_what_names_no_machine_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    typed = "romebert compare --task RTE --data-dir ../glue --model org/m -o cmp --report-only"
    assert shown_invocation(typed) is typed and shown_invocation(None) is None
    packaged = default_backbone()
    line = shlex.join(["romebert", "compare", f"--model={packaged}", "-o", str(tmp_path / "out" / "x y")])
    assert shown_invocation(line) == "romebert compare -o 'out/x y'"
