"""The real backbone (packaged all-MiniLM-L6-v2) on the real GLUE files: asserts a learned result."""

import json

import pytest

from romebert.cli import main

from glue_fixtures import real_glue_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def glue():
    path = real_glue_dir()
    if path is None:
        pytest.skip("real GLUE files not found (../shared/glue or $ROMEBERT_GLUE_DIR)")
    return path


def test_short_sst2_finetune_beats_the_majority_class(glue, tmp_path):
    out = tmp_path / "sst2"
    rc = main(
        [
            "run",
            "--task",
            "SST-2",
            "--data-dir",
            str(glue),
            "--method",
            "romebert-sdgr",
            "--max-train-examples",
            "1600",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--lr",
            "5e-5",
            "-o",
            str(out),
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    per_exit = json.loads((out / "eval" / "dev" / "per_exit.json").read_text())
    majority = 444 / 872  # SST-2 dev: 444 positive, 428 negative
    assert len(per_exit) == 6
    assert per_exit[-1]["accuracy"] > majority + 0.15, per_exit
    sweep = json.loads((out / "eval" / "dev" / "sweep.json").read_text())
    assert sweep[0]["metric"] == per_exit[-1]["accuracy"]  # threshold 0: everything leaves at the final head
    rows = (out / "predictions" / "SST-2.tsv").read_text().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 1 + 1821
