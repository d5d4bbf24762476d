"""A comparison built by hand, for tests of the report, its figures and its arithmetic that need no training:
plain + deebert, mean pooling, seeds 1 and 2, three exits, RTE on a 12-example fixture.

Import from tests as ``from compare_fixtures import hand_comparison, hand_records``.
``assert_no_machine_paths`` checks a rendered report.
"""

from __future__ import annotations

import json
from pathlib import Path

from romebert.data.spec import DataSpec
from romebert.jobs.compare import CompareConfig, Comparison
from romebert.training.training_args import TrainingArguments

from glue_fixtures import write_glue_fixture

ENV = {
    "romebert": "0.1.0",
    "torch": "2.0",
    "transformers": "5.0",
    "onnxruntime": None,
    "numpy": "2.0",
    "python": "3.11.7",
    "platform": "Linux-6.0-x86_64-with-glibc2.36",
    "cpu": "Test CPU",
    "cpu_count": 2,
    "cpus_usable": 2,
    "torch_threads": 2,
    "device": "cpu",
    "gpu": None,
}
# (method, seed) -> per-exit accuracy, sweep points (speed-up, accuracy), training seconds per epoch
RUNS = {
    ("plain", 1): ([0.5, 0.5, 0.70], [(1.0, 0.70)], 2.0),
    ("plain", 2): ([0.5, 0.5, 0.80], [(1.0, 0.80)], 3.0),
    ("deebert", 1): ([0.6, 0.7, 0.80], [(1.0, 0.80), (2.0, 0.60)], 4.0),
    ("deebert", 2): ([0.6, 0.8, 0.90], [(1.0, 0.90), (3.0, 0.60)], 6.0),
}


def hand_comparison(root: Path, backbone: str = "org/hub-model", **settings) -> Comparison:
    """A :class:`Comparison` over a fixture folder under ``root`` (``settings``: CompareConfig overrides)."""
    data = root / "glue"
    write_glue_fixture(data, "RTE", n=12)
    cfg = CompareConfig(
        data=DataSpec(task="RTE", data_dir=str(data)),
        output_dir=str(root / "cmp"),
        training=TrainingArguments(output_dir=".", backbone=backbone, epochs=1.0),
        methods=["deebert"],
        seeds=[1, 2],
        poolings=["mean"],
    )
    for k, v in settings.items():
        setattr(cfg, k, v)
    return Comparison(cfg)


def hand_records(missing: tuple[tuple[str, int], ...] = ()) -> list[dict]:
    """Run records as ``Comparison.read_run`` returns them; the (method, seed) pairs in ``missing`` are missing."""
    records = []
    for (method, seed), (per_exit, sweep, seconds) in RUNS.items():
        rec = {"pooling": "mean", "method": method, "seed": seed, "dir": f"runs/mean/{method}/seed{seed}"}
        if (method, seed) in missing:
            records.append({**rec, "status": "missing"})
            continue
        stages = [{"stage": "finetune", "seconds": seconds, "steps": 2}]
        points = [
            {"threshold": 0.1 * k, "speedup": s, "metric": m, "layer_ratio": 1 / s, "counts": [0, 0, 12]}
            for k, (s, m) in enumerate(sweep)
        ]
        split = {
            "per_exit": per_exit,
            "per_exit_all": [{"exit": i + 1, "accuracy": v} for i, v in enumerate(per_exit)],
            "sweep": points,
            "examples": 12,
            "full_pass_seconds": 0.1,
        }
        records.append(
            {
                **rec,
                "status": "trained",
                "epochs": 1.0,
                "num_train_examples": 12,
                "train_seconds": seconds + 1.0,
                "stages": stages,
                "seconds_per_epoch": seconds,
                "stage_seconds_per_epoch": {"finetune": seconds},
                # CPU time half the wall time, as in a run paused half the time; deebert seed 2 was
                # written before romebert recorded CPU time
                "cpu_seconds_per_epoch": None if (method, seed) == ("deebert", 2) else seconds / 2,
                "eval_wall_seconds": 0.5,
                "finished_at": "2026-01-01T00:00:00+00:00",
                "environment": ENV,
                "splits": {"dev": split},
            }
        )
    return records


def assert_no_machine_paths(markdown: str, report: dict, *folders: Path) -> None:
    """Neither file names a folder of this machine: no temp or site-packages path, none of ``folders``, and
    no string in the JSON that starts with "/"."""
    for text in (markdown, json.dumps(report)):
        for bad in ("/tmp/", "site-packages", *map(str, folders)):
            assert bad not in text, bad

    def strings(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x

    assert not [s for s in strings(report) if s.startswith("/")]
