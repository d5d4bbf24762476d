"""The offline threshold sweep's speed on a 10,000-example dev set, for every criterion, against another
revision of the code measured in the same run (the sweep must not get more than 2x slower when the
engine's policies decide for it).

    git worktree add /tmp/romebert-before 11b40b0      # the revision before the single decision path
    python benchmarks/sweep_speed.py --baseline-src /tmp/romebert-before/src

Logits are synthetic (seeded): 6 exits x 2 classes whose confidence grows with depth, as a trained
model's do. Each revision runs in its own process; the median of ``--repeats`` sweeps is reported.
Writes results/sweep_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = {  # each criterion's usual grid
    "entropy": [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    "maxprob": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
    "patience": [1, 2, 3, 4, 5],
    "patience-confidence": [0.05, 0.1, 0.2, 0.3],
}


def measure(examples: int, layers: int, repeats: int) -> dict[str, float]:
    """Median seconds of one sweep per criterion, with whatever ``romebert`` is importable."""
    import numpy as np

    from romebert.data.tasks import get_task
    from romebert.evaluation.exits import sweep

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, examples)
    margin = np.linspace(0.3, 3.0, layers)[:, None] * rng.uniform(0.2, 1.5, (1, examples))  # [L, N]
    sign = np.where(rng.random((layers, examples)) < 0.8, 1.0, -1.0) * np.where(labels == 1, 1.0, -1.0)
    logits = np.stack([-margin * sign / 2, margin * sign / 2], axis=-1).astype(np.float32)  # [L, N, 2]
    task = get_task("SST-2")
    out = {}
    for criterion, grid in THRESHOLDS.items():
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            sweep(logits, labels, task, grid, criterion=criterion, policy_kwargs={"patience": 2}
                  if criterion == "patience-confidence" else None)  # fmt: skip
            times.append(time.perf_counter() - t0)
        out[criterion] = float(np.median(times[1:]))
    return out


def run_in(src: Path, args) -> dict[str, float]:
    code = f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import sweep_speed as s; " \
           f"print(json.dumps(s.measure({args.examples}, {args.layers}, {args.repeats})))"  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=10_000)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--baseline-src", help="the src/ folder of the revision to compare against")
    p.add_argument("--out", default="results/sweep_speed")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from romebert.core.environment import environment, now
    from romebert.core.files import write_atomic

    report = {"created": now(), "environment": environment(), "examples": args.examples, "layers": args.layers,
              "command": shlex.join(["python", "benchmarks/sweep_speed.py", *(argv if argv is not None else
                                    sys.argv[1:])]).replace(str(args.baseline_src), "BASELINE/src"),
              "current": run_in(ROOT / "src", args)}  # fmt: skip
    if args.baseline_src:
        report["baseline"] = run_in(Path(args.baseline_src), args)
        report["ratio"] = {k: report["current"][k] / report["baseline"][k] for k in report["current"]}
    lines = [f"# Threshold sweep speed ({args.examples:,} examples, {args.layers} exits)", "",
             f"Measured {report['created']} on {report['environment']['cpu']} with `{report['command']}`.", "",
             "| criterion | thresholds | this revision, ms | baseline, ms | ratio |",
             "|---|---|---|---|---|"]  # fmt: skip
    for k, v in report["current"].items():
        base = report.get("baseline", {}).get(k)
        ratio = "n/a" if base is None else f"{v / base:.2f}"
        lines.append(f"| {k} | {len(THRESHOLDS[k])} | {1e3 * v:.1f} | {'n/a' if base is None else f'{1e3 * base:.1f}'} "
                     f"| {ratio} |")  # fmt: skip
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), md)
    print(md)
    return report


if __name__ == "__main__":
    main()
