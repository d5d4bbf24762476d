"""PNG figures are written atomically and show what they were given: one line per series, each in its
own colour, and nothing else in the series colours."""

from __future__ import annotations

from pathlib import Path

import pytest

from romebert.core.errors import RomebertError
from romebert.evaluation.plots import plot_per_exit, plot_speedup
from romebert.jobs.compare import build_report
from romebert.jobs.compare.figures import comparison_figures

from compare_fixtures import ENV, hand_comparison, hand_records
from pictures import assert_draws_series, colour_pixels, pixels


def _check_png(path: Path, series: int) -> None:
    assert_draws_series(path, series)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_plot_per_exit(tmp_path: Path) -> None:
    out = tmp_path / "figs" / "per_exit.png"
    plot_per_exit(
        out,
        {
            "DeeBERT": [0.746, 0.79, 0.8, 0.8, 0.804, 0.818, 0.853, 0.882, 0.912, 0.93, 0.933, 0.929],
            "RomeBERT": [0.829, 0.856, 0.87, 0.883, 0.889, 0.897, 0.911, 0.912, 0.919, 0.92, 0.921, 0.921],
        },
        "accuracy",
        title="SST-2 dev",
    )
    _check_png(out, series=2)


def test_plot_speedup(tmp_path: Path) -> None:
    out = tmp_path / "speedup.png"
    plot_speedup(
        out,
        {
            "RomeBERT": [(1.0, 0.921), (2.5, 0.9), (1.4, 0.918), (4.0, 0.85)],
            "DeeBERT": [(1.0, 0.929), (1.8, 0.91), (3.1, 0.8), (1.2, float("nan"))],
        },
        "accuracy",
    )
    _check_png(out, series=2)


def test_plot_empty_raises(tmp_path: Path) -> None:
    with pytest.raises(RomebertError):
        plot_per_exit(tmp_path / "x.png", {}, "acc")
    with pytest.raises(RomebertError):
        plot_speedup(tmp_path / "x.png", {}, "acc")


def test_comparison_figures_draw_both_figures_of_every_split(tmp_path: Path) -> None:
    comp = hand_comparison(tmp_path, poolings=["mean", "cls"])  # cls has no runs: an empty panel
    report = build_report(comp, hand_records(missing=(("deebert", 2),)), ENV, 1.0)
    out = tmp_path / "figs"
    out.mkdir()
    comparison_figures(out, report)
    assert sorted(p.name for p in out.iterdir()) == ["per_exit.png", "speedup.png"]
    for name in ("per_exit.png", "speedup.png"):
        _check_png(out / name, series=1)  # deebert in C0; plain is a black star
        img = pixels(out / name)
        assert colour_pixels(img, "#000000", tolerance=20) > 100  # plain's star, the axes and the text
