"""Early exit against the full model, on PyTorch, ONNX Runtime fp32 and ONNX Runtime int8 (one run, the
same trained weights behind every path): ms/example at batch sizes 1 and 32, dev metric (and the fp32
model's, which thresholds count against), mean exit layer, layer speed-up and peak RSS, with speed-ups
against the same runtime's full model and against the full model on ONNX Runtime int8 (what a user would
deploy instead, under its best session setting; its spread over passes is reported).

    python benchmarks/inference_speed.py --runs runs/quickstart-sst2,runs/quickstart-mrpc --threads 2

Writes results/inference_speed.{md,json}. Keep other work off the CPU while it runs (``--wait-idle``).
The harness is in benchmarks/speed/ (paths, timing, rows); tests/test_benchmarks.py runs it on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from speed import paths as P  # noqa: E402
from speed import rows as R  # noqa: E402
from speed import timing as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEEDUPS = (1.5, 2.0, 3.0)
# the baseline's graph and recipe with romebert's fusions and sessions (no SkipLayerNormalization): timed to
# show how much of the engine's speed-up the kernel choice gives, which a plain model could have too
FUSIONS = "full-ort-int8-romebert-fusions"


def prepare(run: Path, work: Path) -> dict[str, Path]:
    """The run's fp32 and int8 exports (int8: the default recipe, calibrated on training sentences) and the
    full-model graphs (int8: ``quantize_dynamic`` with its defaults, the baseline), built once into ``work``."""
    from romebert.deploy.export import export_full_model, export_model
    from romebert.deploy.quantize import BASELINE_INT8, DEFAULT_INT8, calibration_batches, recipe
    from romebert.model.loading import load_run
    from romebert.runtime.artefacts import ExportManifest

    work.mkdir(parents=True, exist_ok=True)
    files = {"ort-fp32": work / "segments-fp32", "ort-int8": work / "segments-int8",
             "full-ort-fp32": work / "full-fp32.onnx", "full-ort-int8": work / "full-int8.onnx",
             FUSIONS: work / "full-int8-romebert-fusions.onnx"}  # fmt: skip
    model, tok, data = load_run(run, "cpu")
    calibration = calibration_batches(data.examples("train"), tok, data.max_seq_length,
                                      recipe(DEFAULT_INT8).calibration_examples)  # fmt: skip
    for precision in ("fp32", "int8"):
        folder = files[f"ort-{precision}"]
        current = (folder / "manifest.json").is_file() and _current(folder, ExportManifest.load(folder, verify=False))
        if not current:  # an export of an older romebert or recipe is built again
            export_model(model, run / "model", folder, precision=precision, max_seq_length=data.max_seq_length,
                         calibration=calibration)  # fmt: skip
        if not files[f"full-ort-{precision}"].is_file():  # the optimizer's default fusions, as optimum applies them
            export_full_model(model, files[f"full-ort-{precision}"], precision, int8_recipe=BASELINE_INT8,
                              skip_layer_norm=True)  # fmt: skip
    if not files[FUSIONS].is_file():
        export_full_model(model, files[FUSIONS], "int8", int8_recipe=BASELINE_INT8)
    return files


def _current(folder: Path, m) -> bool:
    """Whether the export in ``folder`` is what this romebert builds: the default recipe, and the one graph
    as its builder makes it from those segments (built again here and compared)."""
    import tempfile

    from romebert.core.files import sha256
    from romebert.deploy.quantize import DEFAULT_INT8, recipe
    from romebert.deploy.single_row import build_single_row

    if m.single_row_graph is None:
        return False
    if m.precision != "fp32" and m.quantization.get("settings") != recipe(DEFAULT_INT8).settings():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        build_single_row(folder, m, Path(tmp) / m.single_row_graph.file)
        return sha256(Path(tmp) / m.single_row_graph.file) == m.single_row_graph.sha256


def dev_data(run: Path, bs1_examples: int):
    """(task, labels, all dev batches length-sorted by 32 with their order, bs-1 batches, the dataset)."""
    from romebert.data.spec import DataSpec
    from romebert.model.loading import load_tokenizer
    from romebert.runtime.encoding import Collator, encode

    data = DataSpec.load(run / "run.json")
    task = data.task_spec()
    tok = load_tokenizer(str(run / "model"))
    dataset = encode(data.examples(data.eval_splits()[0]), tok, task.labels, data.max_seq_length)
    collate = Collator(tok, return_tensors="np")
    labels = np.asarray([f["labels"] for f in dataset.features])
    order = np.argsort(np.asarray(dataset.lengths), kind="stable")
    sorted32 = []
    for s in range(0, len(order), 32):
        b = collate([dataset[int(i)] for i in order[s : s + 32]])
        sorted32.append((b["input_ids"], b["attention_mask"], b.get("token_type_ids", np.zeros_like(b["input_ids"]))))
    one = []
    for i in range(min(bs1_examples, len(dataset))):
        b = collate([dataset[i]])
        one.append((b["input_ids"], b["attention_mask"], b.get("token_type_ids", np.zeros_like(b["input_ids"]))))
    return task, labels, sorted32, order, one, dataset, collate


def metric_of(task, logits: np.ndarray, labels: np.ndarray) -> float:
    from romebert.data.metrics import compute_metrics, main_metric

    preds = logits[:, 0] if task.is_regression else logits.argmax(-1)
    return float(main_metric(task, compute_metrics(task, preds, labels)))


def bench_task(run: Path, work: Path, args) -> tuple[list[R.Row], dict, str]:
    from romebert.evaluation.exits import choose_threshold
    from romebert.model.loading import load_run
    from romebert.runtime.policies import get_policy

    files = prepare(run, work)
    task, labels, sorted32, order, one, dataset, collate = dev_data(run, args.bs1_examples)
    model = load_run(run, "cpu")[0]
    import torch

    torch.set_num_threads(args.threads)
    runtimes = [P.torch_runtime(model)] + [
        P.ort_runtime(name, files[name], files[f"full-{name}"], args.threads) for name in ("ort-fp32", "ort-int8")
    ]
    fp32_logits = runtimes[0].dev_logits(dataset, collate)  # the trained model: what "within 1 point" counts against
    fp32_metric = metric_of(task, fp32_logits[-1], labels)
    paths: list[P.Path_] = []
    for rt in runtimes:  # thresholds chosen on dev with each runtime's own logits, 32 rows a batch as timed
        logits = fp32_logits if rt.name == "torch" else rt.dev_logits(dataset, collate, 32)
        paths += P.full_paths(rt)
        if rt.name == "ort-int8":
            paths.append(P.romebert_fusions_path(rt.name, files[FUSIONS], args.threads))
        for s in SPEEDUPS:
            t, _ = choose_threshold(logits, labels, task, target_speedup=s)
            paths.append(P.engine_path(rt, get_policy("entropy", t), f"{s:g}x"))
        t, _ = choose_threshold(logits, labels, task, max_metric_drop=0.01, reference_metric=fp32_metric)
        paths.append(P.engine_path(rt, get_policy("entropy", t), "<=1pt"))
        if rt.name == "ort-int8":  # the same threshold, batch size 1 run the other ways
            paths += [P.engine_path(rt, get_policy("entropy", t), "<=1pt", v) for v in (P.PER_LAYER, P.NO_SPIN)]
    rows = []
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    for p in paths:  # dev metric and exit layers of each path's own predictions (whole dev split)
        out = p.run_many(sorted32, 32)
        logits = (out if isinstance(out, np.ndarray) else out.logits)[inverse]
        layers = np.full(len(labels), model.num_layers) if isinstance(out, np.ndarray) else out.exit_layer
        settings = p.extra.get("settings") or p.extra.get("variant", "")
        rows.append(R.Row(task.name, p.name, p.runtime, p.kind, p.target,
                          None if p.policy is None else p.policy.threshold, metric_of(task, logits, labels),
                          float(np.mean(layers)), model.num_layers / float(np.mean(layers)), fp32_metric=fp32_metric,
                          settings=settings))  # fmt: skip
    exits1 = {}  # engine path -> exit layer of each input timed at batch size 1, run as timed
    for p, r in zip(paths, rows, strict=True):
        if "exit_layer" in p.extra:
            exits1[p.name] = np.array([p.extra["exit_layer"](b) for b in one])
            r.bs1_layer_speedup = model.num_layers / float(np.mean(exits1[p.name]))
    busy = T.busy_cores()
    bs1 = T.interleaved({p.name: (lambda p=p: [p.run_one(b) for b in one]) for p in paths}, args.repeats)
    batched = [p for p in paths if not p.extra.get("variant")]  # (the variants differ at batch size 1 only)
    bs32 = T.interleaved({p.name: (lambda p=p: p.run_many(sorted32, 32)) for p in batched}, args.repeats)
    for r in rows:
        R.set_times(r, "1", bs1[r.path], len(one))
        if r.path in bs32:
            R.set_times(r, "32", bs32[r.path], len(labels))
    # what a zero-overhead early exit would reach on those inputs: each one's time in the baseline, cut to
    # exit / L of it (inputs that leave later can be longer or shorter than the rest)
    base = R.fastest_full(rows, task.name, "ort-int8", "1")
    full_one = next(p for p in paths if p.name == base.path).run_one
    per_input = np.array([min(T.seconds(lambda b=b: full_one(b)) for _ in range(5)) for b in one])
    for r in rows:
        if r.path in exits1:
            r.bs1_ideal_speedup = float(per_input.sum() / (per_input * exits1[r.path] / model.num_layers).sum())
    breakdown = _breakdown(runtimes[-1], one, paths, args.repeats)
    breakdown["busy cores during the run (other processes)"] = f"{busy:.2f}"
    return rows, breakdown, task.name


def _breakdown(rt: P.Runtime, one, paths, repeats: int) -> dict:
    """At batch size 1, at the <=1pt threshold: the one-graph early exit against the per-layer graphs (and
    how much of the latter is inside the graphs); at full depth (threshold 0: no row leaves early): what the
    exits cost on top of the plain model, in the one graph and cut into per-layer graphs."""
    from romebert.runtime.engine import EarlyExitEngine
    from romebert.runtime.policies import get_policy

    best = next(p for p in paths if p.runtime == rt.name and p.target == "<=1pt" and not p.extra.get("variant"))
    timed = P.TimedSegments(rt.per_layer)
    engine = EarlyExitEngine(timed, best.policy)
    zero = get_policy("entropy", 0.0)  # entropy is never below 0: every row runs every layer
    deep_one, deep_layers = EarlyExitEngine(rt.segments, zero), EarlyExitEngine(rt.per_layer, zero)
    full = next(iter(rt.fulls.values()))
    times = T.interleaved({"one graph": lambda: [best.run_one(b) for b in one],
                           "per-layer": lambda: [engine.run(*b) for b in one],
                           "deep one graph": lambda: [deep_one.run(*b) for b in one],
                           "deep per-layer": lambda: [deep_layers.run(*b) for b in one],
                           "full": lambda: [full(b) for b in one]}, repeats)  # fmt: skip
    n = len(one)
    per = {k: 1e3 * T.median(v) / n for k, v in times.items()}
    calls = timed.calls / (repeats + 1) / n  # graph calls per input (warm-up included in the counts)
    graph_ms = 1e3 * timed.graph_seconds / (repeats + 1) / n
    layers = rt.segments.num_layers
    return {
        "<=1pt at batch size 1, ms per input": f"one-graph early exit {per['one graph']:.3f}; per-layer graphs "
        f"{per['per-layer']:.3f}, of which inside the graphs {graph_ms:.3f} ({calls:.2f} graph calls per input)",
        "full depth (no row leaves early), ms per input": f"one-graph early exit {per['deep one graph']:.3f}, "
        f"per-layer graphs {per['deep per-layer']:.3f}, the full graph ({next(iter(rt.fulls))}) {per['full']:.3f}: "
        f"{(per['deep one graph'] - per['full']) / layers * 1e3:.0f} us per layer for the exits in the one graph, "
        f"{(per['deep per-layer'] - per['full']) / layers * 1e3:.0f} us per layer cut into {layers} graphs",
    }


def rss_probe(spec: dict) -> float:
    """Peak RSS of one path kind in a fresh process (ORT paths never import torch)."""
    import resource

    run = Path(spec["run"])
    if spec["runtime"] == "torch":
        from romebert.model.loading import load_run

        model = load_run(run, "cpu")[0]
        rt = P.torch_runtime(model)
    else:
        rt = P.ort_runtime(spec["runtime"], Path(spec["segments"]), Path(spec["full"]), spec["threads"])
    from romebert.data.spec import DataSpec
    from romebert.runtime.encoding import Collator, FastTokenizer, encode
    from romebert.runtime.policies import get_policy

    data = DataSpec.load(run / "run.json")
    if spec["runtime"] == "torch":
        from romebert.model.loading import load_tokenizer

        tok = load_tokenizer(str(run / "model"))
        pad = tok.pad_token_id
    else:
        from romebert.runtime.artefacts import ExportManifest

        pad = ExportManifest.load(spec["segments"], verify=False).pad_token_id
        tok = FastTokenizer(run / "model" / "tokenizer.json", pad)
    dataset = encode(data.examples(data.eval_splits()[0]), tok, None, data.max_seq_length)
    collate = Collator(pad_token_id=pad, return_tensors="np")
    batches = []
    for s in range(0, len(dataset), 32):
        b = collate([dataset[i] for i in range(s, min(s + 32, len(dataset)))])
        batches.append((b["input_ids"], b["attention_mask"], b.get("token_type_ids", np.zeros_like(b["input_ids"]))))
    path = (
        P.full_paths(rt)[0]
        if spec["kind"] == "full"
        else P.engine_path(rt, get_policy("entropy", spec["threshold"]), "")
    )
    path.run_many(batches, 32)
    if spec["runtime"] != "torch":
        assert "torch" not in sys.modules, "the ONNX Runtime path imported torch"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_rss(run: Path, work: Path, rows: list[R.Row], threads: int) -> None:
    seen = set()
    for r in rows:
        if r.settings or (r.kind == "engine" and r.target != "<=1pt") or (r.runtime, r.kind) in seen:
            continue  # one full and one engine row per runtime: memory depends on neither threshold nor setting
        seen.add((r.runtime, r.kind))
        precision = r.runtime[4:]  # ort-fp32 -> fp32
        spec = {"run": str(run), "runtime": r.runtime, "kind": r.kind, "threshold": r.threshold, "threads": threads}
        spec.update(segments=str(work / f"segments-{precision}"), full=str(work / f"full-{precision}.onnx"))
        out = subprocess.run([sys.executable, __file__, "--rss-probe", json.dumps(spec)], capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})  # fmt: skip
        r.peak_rss_mib = float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/quickstart-sst2,runs/quickstart-mrpc", help="comma-separated run folders")
    p.add_argument("--work", default="runs/bench-work", help="where the exports are built (reused)")
    p.add_argument("--out", default="results/inference_speed", help="writes OUT.md and OUT.json")
    p.add_argument("--bs1-examples", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="threads of every runtime (default: the usable cores)")
    p.add_argument("--wait-idle", type=float, default=0.0, help="wait up to this many seconds for a quiet machine")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--rss-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_probe:
        print(rss_probe(json.loads(args.rss_probe)))
        return {}
    from romebert.core.environment import backbone_label, environment, now
    from romebert.core.files import write_atomic
    from romebert.runtime.onnx_runtime import default_threads

    args.threads = args.threads or default_threads()
    busy = T.wait_idle(args.wait_idle) if args.wait_idle else T.busy_cores()
    command = shlex.join(["python", "benchmarks/inference_speed.py", *(argv if argv is not None else sys.argv[1:])])
    report = {"created": now(), "command": command,
              "environment": environment(), "threads": args.threads, "bs1_examples": args.bs1_examples,
              "settle_seconds": T.SETTLE_SECONDS,
              "repeats": args.repeats, "busy_before": busy, "rows": [], "targets": {}, "breakdown": {}, "tasks": [],
              "models": []}  # fmt: skip
    for run in [Path(r) for r in args.runs.split(",") if r]:
        work = Path(args.work) / run.name
        rows, breakdown, task = bench_task(run, work, args)
        R.add_ratios(rows)
        if not args.no_rss:
            measure_rss(run, work, rows, args.threads)
        info = json.loads((run / "run.json").read_text())
        method = json.loads((run / "training_args.json").read_text()).get("method")
        report["models"].append(f"{task}: run {run.name} ({method}, {info.get('pooling')} pooling, "
                                f"{backbone_label(info.get('backbone'))})")  # fmt: skip
        report["tasks"].append(task)
        report["rows"] += [r.as_dict() for r in rows]
        report["targets"][task] = R.targets(rows, task)
        report["breakdown"][task] = breakdown
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), R.markdown(report) + "\n")
    print(R.markdown(report))
    return report


if __name__ == "__main__":
    main()
