"""What the default int8 recipe's parts cost the one-graph early exit at batch size 1: the export's
``early_exit.onnx`` against variants of it, each rewritten for timing only (their accuracy is not the
recipe's; results/int8_recipes.md has the recipes' dev figures):

- ``weights per tensor``: every encoder product's per-column int8 weights requantized with one scale;
- ``no activation scaling``: the recipe's per-channel activation scaling removed (SmoothQuant's on the
  attention's input, the folded outlier split's on the feed-forward products' inputs);
- both of these, which is what a recipe without per-column or per-channel work would run;
- ``GELU's other form``: the exact (erf) GELU kernel where the export computes the tanh form (the default
  recipe's ``gelu_tanh``), the tanh form where it computes the exact one.

Every variant runs through ``EarlyExitEngine`` from an export folder of its own, in one process with the
baseline (the full model, ``quantize_dynamic``'s int8, threads spinning), passes interleaved:

    python benchmarks/one_graph_costs.py --run runs/quickstart-sst2 --threshold 0.5195

(``--threshold``: the entropy threshold; the full depth, every input to the last layer, is timed too.)
Writes results/one_graph_costs.{md,json}. Keep other work off the CPU while it runs (``--wait-idle``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from inference_speed import ROOT, dev_data, prepare  # noqa: E402
from speed import timing as T  # noqa: E402

VARIANTS = {
    "default": (),
    "weights per tensor": ("per_tensor",),
    "no activation scaling": ("no_scaling",),
    "weights per tensor, no activation scaling": ("per_tensor", "no_scaling"),
    "GELU's other form": ("swap_gelu",),
}


# ------------------------------------------------------------------------------------- the rewrites
def _graphs(graph):
    """``graph`` and every graph nested in its nodes' attributes (the If branches)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from _graphs(a.g)


def per_tensor(model) -> int:
    """Requantize every per-column int8 weight of the encoder products (QAttention, MatMulInteger; not the
    exits' poolers) with one scale, the largest |w| / 127; returns how many matrices changed."""
    from onnx import numpy_helper

    inits = {t.name: t for g in _graphs(model.graph) for t in g.initializer}
    done = set()
    for g in _graphs(model.graph):
        for n in g.node:
            if n.op_type == "QAttention":
                weight, scale = n.input[1], n.input[4]
            elif n.op_type == "MatMulInteger" and "/exit/" not in n.name:  # (not the exits' poolers)
                # quantize_dynamic's names: W_quantized, W_scale
                weight = n.input[1]
                scale = weight.removesuffix("_quantized") + "_scale"
            else:
                continue
            if weight in done or scale not in inits or weight not in inits:
                continue
            s = numpy_helper.to_array(inits[scale]).astype(np.float64)
            if s.size == 1:
                continue
            w = numpy_helper.to_array(inits[weight]).astype(np.float64) * s  # [K, N] * [N]
            step = np.abs(w).max() / 127
            q = np.clip(np.round(w / step), -127, 127).astype(np.int8)
            inits[weight].CopyFrom(numpy_helper.from_array(q, weight))
            inits[scale].CopyFrom(numpy_helper.from_array(np.array(step, np.float32), scale))
            done.add(weight)
    return len(done)


def no_scaling(model) -> int:
    """Remove the recipe's activation-scaling ``Mul`` nodes (their consumers read the unscaled input);
    returns how many went."""
    from romebert.deploy.quantize import SMOOTH_NODE, SPLIT_NODE

    scaling = (f"/{SMOOTH_NODE}", f"/{SPLIT_NODE}")  # as deploy/quantize.py's rewrite names them
    renamed = {}
    for g in _graphs(model.graph):
        keep = []
        for n in g.node:
            if n.op_type == "Mul" and n.name.endswith(scaling):
                renamed[n.output[0]] = n.input[0]
            else:
                keep.append(n)
        del g.node[:]
        g.node.extend(keep)
    for g in _graphs(model.graph):
        for n in g.node:
            for i, name in enumerate(n.input):
                n.input[i] = renamed.get(name, name)
    return len(renamed)


def swap_gelu(model) -> int:
    """ONNX Runtime's exact GELU kernels <-> its tanh form (``quantize.TANH_GELU``: the same inputs, the bias
    added first); returns how many nodes changed."""
    from romebert.deploy.quantize import TANH_GELU

    count = 0
    for g in _graphs(model.graph):
        for n in g.node:
            if n.domain != "com.microsoft":
                continue
            if n.op_type in TANH_GELU:
                n.op_type = TANH_GELU[n.op_type]
            elif n.op_type == "FastGelu":
                n.op_type = "BiasGelu" if len(n.input) > 1 and n.input[1] else "Gelu"
            else:
                continue
            count += 1
    return count


REWRITES = {"per_tensor": per_tensor, "no_scaling": no_scaling, "swap_gelu": swap_gelu}


def variant_export(export: Path, rewrites: tuple[str, ...], folder: Path) -> dict[str, int]:
    """A copy of ``export`` whose one graph has ``rewrites`` applied (the manifest's checksum updated);
    returns what each rewrite changed."""
    import onnx

    from romebert.core.files import sha256
    from romebert.runtime.artefacts import ExportManifest

    shutil.copytree(export, folder)
    if not rewrites:
        return {}
    manifest = ExportManifest.load(folder, verify=False)
    path = folder / manifest.single_row_graph.file
    model = onnx.load(str(path))
    changed = {r: REWRITES[r](model) for r in rewrites}
    onnx.save(model, str(path))
    manifest.single_row_graph.sha256 = sha256(path)
    manifest.save(folder)
    return changed


# ----------------------------------------------------------------------------------------- timing
def measure(run: Path, work: Path, thresholds: list[float], examples: int, repeats: int, threads: int) -> dict:
    from romebert.runtime.engine import EarlyExitEngine
    from romebert.runtime.onnx_runtime import OrtSegments, new_session, session_options
    from romebert.runtime.policies import get_policy

    files = prepare(run, work)
    task, _, _, _, one, _, _ = dev_data(run, examples)
    full = new_session(str(files["full-ort-int8"]), session_options(threads, 1, True))
    feeds = [{"input_ids": i, "attention_mask": m, "token_type_ids": t} for i, m, t in one]
    out = {"task": task.name, "examples": len(one), "thresholds": []}
    with tempfile.TemporaryDirectory() as tmp:
        changed = {}
        folders = {}
        for name, rewrites in VARIANTS.items():
            folders[name] = Path(tmp) / name.replace(" ", "-").replace(",", "")
            changed[name] = variant_export(files["ort-int8"], rewrites, folders[name])
        out["changed"] = changed
        for threshold in thresholds:
            policy = get_policy("entropy", threshold)
            engines = {n: EarlyExitEngine(OrtSegments(f, intra_op_threads=threads), policy) for n, f in folders.items()}
            exits = {n: np.array([int(e.run(*b).exit_layer[0]) for b in one]) for n, e in engines.items()}
            work_fns = {"baseline": lambda: [full.run(None, f) for f in feeds]}
            for n, e in engines.items():
                work_fns[n] = lambda e=e: [e.run(*b) for b in one]
            times = T.interleaved(work_fns, repeats)
            per_input = {n: [s / len(one) * 1e6 for s in v] for n, v in times.items()}
            base = T.median(per_input["baseline"])
            layers = engines["default"].num_layers
            rows = []
            for n in ["baseline", *engines]:
                us = per_input[n]
                row = {"path": n, "us_median": T.median(us), "us_min": min(us), "us_max": max(us)}
                if n != "baseline":
                    mean_exit = float(exits[n].mean())
                    row.update(mean_exit_layer=mean_exit, same_exits=float((exits[n] == exits["default"]).mean()),
                               ratio=base / T.median(us) / (layers / mean_exit))  # fmt: skip
                rows.append(row)
            out["thresholds"].append({"threshold": threshold, "rows": rows})
    return out


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# What the int8 recipe's parts cost the one-graph early exit at batch size 1",
        "",
        f"Measured {report['created']} with `{report['command']}`.",
        "",
        f"- Machine: {env['cpu']}, {env['cpu_count']} logical CPUs; {report['threads']} threads; busy cores before "
        f"the run: {report['busy_before']:.2f}. Versions: onnxruntime {env['onnxruntime']}.",
        f"- Model: {report['model']}; task {report['task']}, the first {report['examples']} dev inputs, one at a "
        f"time; median (min-max) of {report['repeats']} interleaved passes, each after "
        f"{T.SETTLE_SECONDS:g} s idle.",
        "- Baseline: the full model, ONNX Runtime's `quantize_dynamic` int8 (optimum's recipe), threads "
        "spinning. Every other row is the default export's one graph through `EarlyExitEngine`, as exported or "
        "rewritten for timing only (the rewrites change the numbers the graph computes; see the docstring).",
        "- ratio: speed-up over the baseline / layer speed-up (layers / the row's own mean exit layer); "
        '"same exits": share of inputs leaving where the default export\'s graph lets them leave.',
        "- What the rewrites changed: "
        + "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for n, c in report["changed"].items() if c)
        + ".",
        "",
    ]
    for t in report["thresholds"]:
        depth = "every input to the last layer" if t["threshold"] <= 0 else f"entropy threshold {t['threshold']:g}"
        lines += [f"## {depth}", "", "| path | us per input | mean exit layer | same exits | ratio |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in t["rows"]:
            us = f"{r['us_median']:.0f} ({r['us_min']:.0f}-{r['us_max']:.0f})"
            if r["path"] == "baseline":
                lines.append(f"| baseline | {us} | | | |")
            else:
                lines.append(f"| {r['path']} | {us} | {r['mean_exit_layer']:.2f} | {r['same_exits']:.2f} | "
                             f"{r['ratio']:.3f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "quickstart-sst2")
    ap.add_argument("--work", type=Path, default=None, help="exports (default: runs/bench-work/<run name>)")
    ap.add_argument("--threshold", type=float, required=True, help="entropy threshold (full depth is timed too)")
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-idle", type=float, default=0.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "one_graph_costs")
    args = ap.parse_args(argv)
    from romebert.core.environment import backbone_label, environment, now
    from romebert.core.files import write_atomic

    busy = T.wait_idle(args.wait_idle) if args.wait_idle else T.busy_cores()
    work = args.work or ROOT / "runs" / "bench-work" / args.run.name
    report = measure(args.run, work, [args.threshold, 0.0], args.examples, args.repeats, args.threads)
    info = json.loads((args.run / "run.json").read_text())
    report.update(created=now(), busy_before=busy, environment=environment(), threads=args.threads,
                  repeats=args.repeats, model=f"run {args.run.name} ({backbone_label(info.get('backbone'))})",
                  command=shlex.join(["python", "benchmarks/one_graph_costs.py",
                                      *(argv if argv is not None else sys.argv[1:])]))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(args.out.with_suffix(".md"), markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
