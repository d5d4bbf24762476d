"""Parity of the ONNX export with the PyTorch engine on real dev sets, and what int8 changes.

    python benchmarks/export_parity.py --runs runs/quickstart-sst2,runs/quickstart-mrpc

For each run, on its whole dev split:
- fp32 export against PyTorch: the engine (batch 32, refill) on both, for every criterion at the
  threshold PyTorch's dev logits give 2x layer speed-up (patience-confidence: patience 2); rows whose
  (label, exit layer) differ are counted, and each is checked for a near-tie: an exit score within
  ``--tol`` of the threshold, or two classes within ``--tol`` in probability, at some layer the row
  passed. The largest probability difference over every exit is reported.
- int8 against fp32: per-exit dev metrics, the metric and mean exit layer at a threshold chosen on dev
  for each precision (``--max-metric-drop``), and the exit-layer distribution of both.
Exports are read from (or built into) ``--work``/<run name>/segments-{fp32,int8}, as the speed
benchmark builds them. Writes results/export_parity.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

CRITERIA = ("entropy", "maxprob", "patience", "patience-confidence")


def near_tie(all_logits: np.ndarray, rows: np.ndarray, upto: np.ndarray, policy, tol: float) -> np.ndarray:
    """Rows that pass within ``tol`` of a decision at some layer < ``upto`` (1-based exits)."""
    from romebert.runtime.scores import entropy, maxprob, softmax

    lg = all_logits[:, rows]  # [L, r, C]
    p = softmax(lg)
    top2 = np.sort(p, axis=-1)[..., -2:]
    close = (top2[..., 1] - top2[..., 0]) < tol  # [L, r]: the label (or an agreement) could flip
    t = float(policy.threshold) if np.ndim(policy.threshold) == 0 else None
    if t is not None and policy.name in ("entropy", "maxprob", "patience-confidence"):
        score = maxprob(lg) if policy.name == "maxprob" else entropy(lg)
        close |= np.abs(score - t) < tol
    layer = np.arange(lg.shape[0])[:, None]
    return (close & (layer < upto[None, :])).any(axis=0)


def parity(run: Path, work: Path, tol: float, drop: float) -> dict:
    import torch  # noqa: F401
    from inference_speed import metric_of, prepare

    from romebert.data.spec import DataSpec
    from romebert.evaluation.exits import choose_threshold, per_exit_metrics
    from romebert.model.loading import load_run
    from romebert.runtime.encoding import Collator, encode
    from romebert.runtime.engine import EarlyExitEngine, dataset_exit_logits
    from romebert.runtime.onnx_runtime import OrtSegments
    from romebert.runtime.policies import get_policy

    files = prepare(run, work)
    model, tok, data = load_run(run, "cpu")
    data = DataSpec.load(run / "run.json")
    task = data.task_spec()
    dataset = encode(data.examples(data.eval_splits()[0]), tok, task.labels, data.max_seq_length)
    collate = Collator(tok, return_tensors="np")
    labels = np.asarray([f["labels"] for f in dataset.features])
    segs = {"torch": model.segments(), "fp32": OrtSegments(files["ort-fp32"]), "int8": OrtSegments(files["ort-int8"])}
    logits = {k: dataset_exit_logits(s, dataset, collate) for k, s in segs.items()}  # [L, N, C] each
    from romebert.runtime.scores import softmax

    out: dict = {"task": task.name, "examples": int(labels.size), "tolerance": tol,
                 "max_prob_diff_fp32_vs_torch": float(np.abs(softmax(logits["fp32"]) - softmax(logits["torch"])).max()),
                 "criteria": []}  # fmt: skip
    for name in CRITERIA:  # each at the threshold that PyTorch's dev logits give 2x layer speed-up
        t, _ = choose_threshold(logits["torch"], labels, task, name, target_speedup=2.0, patience=2)
        t = float(t) if name != "patience" else int(t)
        policy = get_policy(name, t, patience=2)
        res = {k: EarlyExitEngine(segs[k], policy).run_dataset(dataset, collate, 32) for k in ("torch", "fp32")}
        lab = {k: r.logits.argmax(-1) for k, r in res.items()}
        differ = np.flatnonzero((lab["torch"] != lab["fp32"]) | (res["torch"].exit_layer != res["fp32"].exit_layer))
        upto = np.maximum(res["torch"].exit_layer, res["fp32"].exit_layer)[differ]
        explained = near_tie(logits["torch"], differ, upto, policy, tol) if differ.size else np.zeros(0, bool)
        out["criteria"].append({"criterion": name, "threshold": t, "mismatched_rows": int(differ.size),
                                "near_ties": int(explained.sum()), "unexplained": int((~explained).sum()),
                                "mean_exit_torch": float(res["torch"].exit_layer.mean()),
                                "mean_exit_fp32": float(res["fp32"].exit_layer.mean())})  # fmt: skip
    L = logits["fp32"].shape[0]
    out["per_exit"] = {k: [float(m[task.metric]) for m in per_exit_metrics(logits[k], labels, task)]
                       for k in ("fp32", "int8")}  # fmt: skip
    out["chosen"] = {}
    for k in ("fp32", "int8"):
        t, _ = choose_threshold(logits[k], labels, task, max_metric_drop=drop)
        engine = EarlyExitEngine(segs[k], get_policy("entropy", t)).run_dataset(dataset, collate, 32)
        hist = np.bincount(engine.exit_layer, minlength=L + 1)[1:]
        out["chosen"][k] = {"threshold": float(t), "metric": 100 * metric_of(task, engine.logits, labels),
                            "mean_exit": float(engine.exit_layer.mean()),
                            "exit_share": [float(x) for x in hist / hist.sum()]}  # fmt: skip
    return out


def markdown(rep: dict) -> str:
    env = rep["environment"]
    lines = ["# ONNX export parity: fp32 against PyTorch, int8 against fp32", "",
             f"Measured {rep['created']} with `{rep['command']}` on {env['cpu']}; onnxruntime {env['onnxruntime']}.",
             ""]  # fmt: skip
    for r in rep["tasks"]:
        lines += [f"## {r['task']} dev ({r['examples']} examples)", "",
                  f"fp32 export against PyTorch, engine at batch size 32 with refill. Largest probability "
                  f"difference over every exit and row: {r['max_prob_diff_fp32_vs_torch']:.2e}. A mismatch is a row "
                  f"whose label or exit layer differs; a near tie has an exit score within {r['tolerance']:g} of the "
                  f"threshold, or two classes within {r['tolerance']:g} in probability, at a layer it passed.", "",
                  "| criterion | threshold | mismatched rows | near ties | unexplained | mean exit torch / fp32 |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for c in r["criteria"]:
            lines.append(f"| {c['criterion']} | {c['threshold']:g} | {c['mismatched_rows']} | {c['near_ties']} | "
                         f"{c['unexplained']} | {c['mean_exit_torch']:.3f} / {c['mean_exit_fp32']:.3f} |")  # fmt: skip
        pe = r["per_exit"]
        lines += ["", "int8 against fp32: per-exit dev metric", "",
                  "| precision | " + " | ".join(f"exit {i + 1}" for i in range(len(pe["fp32"]))) + " |",
                  "|---|" + "---|" * len(pe["fp32"])]  # fmt: skip
        for k in ("fp32", "int8"):
            lines.append(f"| {k} | " + " | ".join(f"{100 * v:.2f}" for v in pe[k]) + " |")
        lines += ["", "Each precision's threshold chosen on dev (entropy, within 1 point of its final exit):", "",
                  "| precision | threshold | dev metric | mean exit | share exiting at each layer |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for k, c in r["chosen"].items():
            lines.append(f"| {k} | {c['threshold']:.4g} | {c['metric']:.2f} | {c['mean_exit']:.2f} | "
                         + " / ".join(f"{100 * s:.0f}%" for s in c["exit_share"]) + " |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/quickstart-sst2,runs/quickstart-mrpc")
    p.add_argument("--work", default="runs/bench-work")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-metric-drop", type=float, default=0.01)
    p.add_argument("--out", default="results/export_parity")
    args = p.parse_args(argv)
    from romebert.core.environment import environment, now
    from romebert.core.files import write_atomic

    rep = {"created": now(), "environment": environment(),
           "command": shlex.join(["python", "benchmarks/export_parity.py", *(sys.argv[1:] if argv is None else argv)]),
           "tasks": [parity(Path(r), Path(args.work) / Path(r).name, args.tol, args.max_metric_drop)
                     for r in args.runs.split(",") if r]}  # fmt: skip
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(rep, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(rep) + "\n")
    print(markdown(rep))
    return rep


if __name__ == "__main__":
    main()
