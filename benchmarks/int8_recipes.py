"""int8 recipes compared on dev: every exit's metric against the fp32 model, per recipe, per task.

    python benchmarks/int8_recipes.py --runs runs/quickstart-sst2,runs/quickstart-mrpc

For each run and each recipe of ``romebert.deploy.quantize.RECIPES``, the run is exported in int8 by that
recipe (calibrated on the same training sentences) and its dev logits are compared with the fp32 model's
(the run's evaluation cache, or one PyTorch pass): per-exit differences of every metric, the rows whose
prediction changed, export seconds and graph size. A recipe passes when no exit of any metric falls more
than ``--tolerance`` (0.3 points) below fp32. Accuracy, not timing: it may run on a busy machine.

Writes results/int8_recipes.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def evaluate_recipes(run: Path, work: Path, names: list[str], seeds: list[int], dev_batches: list[int] = (),
                     batch_size: int = 64) -> dict:  # fmt: skip
    """Every recipe of ``names`` on the run's dev split (in batches of ``batch_size``); the default recipe
    again with each calibration seed of ``seeds`` (how much the figures move with the sentences drawn) and
    its dev logits in batches of each of ``dev_batches`` (how much they move with the batching)."""
    from romebert.core.runs import RunFolder
    from romebert.deploy.export import export_model
    from romebert.deploy.export_dev import fp32_dev_logits
    from romebert.deploy.quantize import DEFAULT_INT8, calibration_batches, recipe
    from romebert.evaluation.exits import per_exit_metrics
    from romebert.evaluation.logits import dataset_labels
    from romebert.model.loading import load_run
    from romebert.runtime.encoding import Collator, encode
    from romebert.runtime.engine import dataset_exit_logits
    from romebert.runtime.onnx_runtime import OrtSegments

    model, tokenizer, data = load_run(run, "cpu")
    task = data.task_spec()
    split = data.eval_splits()[0]
    dataset = encode(data.examples(split), tokenizer, task.labels, data.max_seq_length)
    labels = dataset_labels(dataset)
    collator = Collator(tokenizer, return_tensors="np")
    fp32 = fp32_dev_logits(model, RunFolder(run), split, dataset, labels, collator, batch_size)
    ref = per_exit_metrics(fp32, labels, task)
    train = data.examples("train")
    calibrations: dict[
        tuple[int, int], list
    ] = {}  # each recipe's own number of sentences, drawn as the exporter draws them
    out = {"task": task.name, "split": split, "examples": int(len(labels)), "metric": task.metric, "fp32": ref,
           "recipes": []}  # fmt: skip
    entries = [("fp32 export", 0), *((n, 0) for n in names), *((DEFAULT_INT8, s) for s in seeds if s)]
    for name, seed in entries:
        rows = recipe(name).calibration_examples if name != "fp32 export" else 0
        if (rows, seed) not in calibrations:
            calibrations[rows, seed] = (calibration_batches(train, tokenizer, data.max_seq_length, rows, seed=seed)
                                        if rows else [])  # fmt: skip
        calibration = calibrations[rows, seed]
        folder = work / run.name / f"{name.replace(' ', '-')}-{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        precision = "fp32" if name == "fp32 export" else "int8"
        manifest = export_model(model, run / "model", folder, precision=precision, max_seq_length=data.max_seq_length,
                                int8_recipe=name if precision == "int8" else "dynamic", calibration=calibration,
                                single_row=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        q = manifest.quantization or {}
        segments = OrtSegments(folder, manifest)
        # int8 quantizes activations with one scale per batch: the dev figures move with how dev is batched
        for bs in [batch_size] + [
            b for b in (dev_batches if name == DEFAULT_INT8 and not seed else []) if b != batch_size
        ]:
            logits = dataset_exit_logits(segments, dataset, collator, bs)
            got = per_exit_metrics(logits, labels, task)
            label = (
                name
                + (f" (calibration seed {seed})" if seed else "")
                + (f" (dev in batches of {bs})" if bs != batch_size else "")
            )
            out["recipes"].append({
                "recipe": label,
                "settings": q.get("settings"),
                "deltas": {k: [100 * (g[k] - r[k]) for r, g in zip(ref, got, strict=True)] for k in ref[0]},
                "changed_rows": [int(c) for c in (logits.argmax(-1) != fp32.argmax(-1)).sum(-1)],
                "calibration_rows": q.get("calibration_rows", 0),
                # encoder products kept fp32 (the outliers' small side products, named .../Fp32, are counted apart)
                "fp32_products": sum(not n.endswith("/Fp32") for v in q.get("fp32_nodes", {}).values() for n in v),
                "outlier_products": sum(len(v) for v in q.get("outliers", {}).values()),
                "export_seconds": seconds,
                "graph_mib": sum(f.stat().st_size for f in folder.glob("segment_*.onnx")) / 2**20,
            })  # fmt: skip
            deltas = out["recipes"][-1]["deltas"]
            text = "; ".join(f"{k} " + " ".join(f"{d:+.2f}" for d in v) for k, v in deltas.items())
            print(f"{task.name} {label}: {text}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    return out


def passes(entry: dict, tolerance: float, keys: list[str]) -> bool:
    return all(min(entry["deltas"][k]) >= -tolerance - 1e-9 for k in keys)


def markdown(report: dict) -> str:
    env = report["environment"]
    tol = report["tolerance"]
    lines = [
        "# int8 recipes: every exit's dev metric against the fp32 model",
        "",
        f"Measured {report['created']} with `{report['command']}`.",
        "",
        f"- Machine: {env['cpu']}, {env['cpu_count']} logical CPUs. Versions: romebert {env['romebert']}, "
        f"onnxruntime {env['onnxruntime']}, onnx {env.get('onnx')}, torch {env['torch']}.",
        f"- Models: {', '.join(report['models'])}.",
        "- Each recipe exports the run in int8 (deploy/quantize.py; the recipes that calibrate draw their training "
        "sentences with seed 0, as the exporter does) and runs the dev split through the exported segments, 64 rows "
        "a batch. Figures are int8 minus fp32 in points, exits 1..L; fp32 = the trained model's own dev logits. "
        'Changed rows: dev rows whose predicted class differs from fp32. "(calibration seed s)": the default '
        "recipe calibrated on another draw of training sentences: how much the figures move with the draw. "
        '"(dev in batches of b)": the same export\'s dev logits computed b rows a batch (dynamic int8 takes one '
        "activation scale per batch, so a row's logits depend on the rows batched with it).",
        f"- A recipe passes when no exit of any listed metric is more than {tol} points below fp32. One dev row is "
        + ", ".join(f"{100 / t['examples']:.3f} points on {t['task']}" for t in report["tasks"])
        + ".",
        "- Not timed here (a busy machine): speed is the benchmark's (benchmarks/inference_speed.py).",
        "",
    ]
    for t in report["tasks"]:
        keys = report["keys"][t["task"]]
        lines += [f"## {t['task']} ({t['examples']} dev rows; fp32 final exit "
                  + ", ".join(f"{k} {100 * t['fp32'][-1][k]:.2f}" for k in keys) + ")", "",
                  "| recipe | " + " | ".join(f"{k}, exits 1..L" for k in keys)
                  + " | changed rows per exit | fp32 products | outlier products | passes | export s |",
                  "|---|" + "---|" * len(keys) + "---|---|---|---|---|"]  # fmt: skip
        for r in t["recipes"]:
            cells = [" ".join(f"{d:+.2f}" for d in r["deltas"][k]) for k in keys]
            ok = "yes" if passes(r, tol, keys) else "no"
            changed = " ".join(map(str, r["changed_rows"]))
            lines.append(f"| {r['recipe']} | " + " | ".join(cells) + f" | {changed} | {r['fp32_products']} | "
                         f"{r['outlier_products']} | {ok} | {r['export_seconds']:.0f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from romebert.core.environment import backbone_label, environment, now
    from romebert.core.files import write_atomic
    from romebert.deploy.quantize import RECIPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/quickstart-sst2,runs/quickstart-mrpc", help="comma-separated run folders")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    p.add_argument("--work", default="runs/int8-work", help="where the exports are built (removed after each)")
    p.add_argument("--out", default="results/int8_recipes", help="writes OUT.md and OUT.json")
    p.add_argument("--tolerance", type=float, default=0.3, help="points an exit may fall below fp32")
    p.add_argument(
        "--seeds", default="1,2", help="the default recipe again with these calibration seeds (0 is its own)"
    )
    p.add_argument("--dev-batches", default="1,32", help="the default recipe's dev logits also in batches of these")
    args = p.parse_args(argv)
    import onnx

    env = {**environment(), "onnx": onnx.__version__}
    command = shlex.join(["python", "benchmarks/int8_recipes.py", *(argv if argv is not None else sys.argv[1:])])
    report = {"created": now(), "command": command, "environment": env, "tolerance": args.tolerance,
              "models": [], "tasks": [], "keys": {}}  # fmt: skip
    for run in [Path(r) for r in args.runs.split(",") if r]:
        seeds = [int(x) for x in args.seeds.split(",") if x]
        dev_batches = [int(x) for x in args.dev_batches.split(",") if x]
        t = evaluate_recipes(run, Path(args.work), [n for n in args.recipes.split(",") if n], seeds, dev_batches)
        info = json.loads((run / "run.json").read_text())
        method = json.loads((run / "training_args.json").read_text()).get("method")
        report["models"].append(f"{t['task']}: run {run.name} ({method}, {info.get('pooling')} pooling, "
                                f"{backbone_label(info.get('backbone'))})")  # fmt: skip
        # the task's main metric and accuracy (MRPC: F1 and accuracy); the averaged ones add nothing
        report["keys"][t["task"]] = [k for k in t["fp32"][0] if k in (t["metric"], "accuracy", "f1")]
        report["tasks"].append(t)
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
