"""Early exit against the full model, on PyTorch, ONNX Runtime fp32 and ONNX Runtime int8 (one run, the
same trained weights behind every path): ms/example at batch sizes 1 and 32, dev metric, mean exit
layer, layer speed-up and peak RSS, with speed-ups against the same runtime's full model and against
the full model on ONNX Runtime int8 (what a user would deploy instead).

    python benchmarks/inference_speed.py --runs runs/quickstart-sst2,runs/quickstart-mrpc

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


def prepare(run: Path, work: Path) -> dict[str, Path]:
    """The run's fp32 and int8 exports and full-model graphs, built once into ``work``."""
    from romebert.deploy.export import export_full_model, export_model
    from romebert.model.loading import load_run

    work.mkdir(parents=True, exist_ok=True)
    files = {"ort-fp32": work / "segments-fp32", "ort-int8": work / "segments-int8",
             "full-ort-fp32": work / "full-fp32.onnx", "full-ort-int8": work / "full-int8.onnx"}  # fmt: skip
    model, _, data = load_run(run, "cpu")
    for precision in ("fp32", "int8"):
        if not (files[f"ort-{precision}"] / "manifest.json").is_file():
            export_model(model, run / "model", files[f"ort-{precision}"], precision=precision,
                         max_seq_length=data.max_seq_length)  # fmt: skip
        if not files[f"full-ort-{precision}"].is_file():
            export_full_model(model, files[f"full-ort-{precision}"], precision)
    return files


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
    paths: list[P.Path_] = []
    for rt in runtimes:  # thresholds chosen on dev with each runtime's own logits
        logits = rt.dev_logits(dataset, collate)
        paths.append(P.full_path(rt))
        for s in SPEEDUPS:
            t, _ = choose_threshold(logits, labels, task, target_speedup=s)
            paths.append(P.engine_path(rt, get_policy("entropy", t), f"{s:g}x"))
        t, _ = choose_threshold(logits, labels, task, max_metric_drop=0.01)
        paths.append(P.engine_path(rt, get_policy("entropy", t), "<=1pt"))
    rows = []
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    for p in paths:  # dev metric and exit layers of each path's own predictions (whole dev split)
        out = p.run_many(sorted32, 32)
        logits = (out if isinstance(out, np.ndarray) else out.logits)[inverse]
        layers = np.full(len(labels), model.num_layers) if isinstance(out, np.ndarray) else out.exit_layer
        rows.append(R.Row(task.name, p.name, p.runtime, p.kind, p.target,
                          None if p.policy is None else p.policy.threshold, metric_of(task, logits, labels),
                          float(np.mean(layers)), model.num_layers / float(np.mean(layers))))  # fmt: skip
    busy = T.busy_cores()
    bs1 = T.interleaved({p.name: (lambda p=p: [p.run_one(b) for b in one]) for p in paths}, args.repeats)
    bs32 = T.interleaved({p.name: (lambda p=p: p.run_many(sorted32, 32)) for p in paths}, args.repeats)
    for r in rows:
        r.ms = {"1": 1e3 * T.median(bs1[r.path]) / len(one), "32": 1e3 * T.median(bs32[r.path]) / len(labels)}
    breakdown = _breakdown(runtimes[-1], one, paths, args.repeats)
    breakdown["busy cores during the run (other processes)"] = f"{busy:.2f}"
    return rows, breakdown, task.name


def _breakdown(rt: P.Runtime, one, paths, repeats: int) -> dict:
    """Where the int8 engine's time goes at batch size 1: graph calls against host work, and what cutting
    the model into per-layer graphs costs by itself (every row at full depth, against the one graph)."""
    from romebert.runtime.engine import EarlyExitEngine
    from romebert.runtime.policies import get_policy

    best = next(p for p in paths if p.runtime == rt.name and p.target == "<=1pt")
    timed = P.TimedSegments(rt.segments)
    engine = EarlyExitEngine(timed, best.policy)
    deep = EarlyExitEngine(rt.segments, get_policy("entropy", 0.0))  # threshold 0: every row runs every layer
    times = T.interleaved({"engine": lambda: [engine.run(*b) for b in one],
                           "deep": lambda: [deep.run(*b) for b in one],
                           "full": lambda: [rt.full(b) for b in one]}, repeats)  # fmt: skip
    n = len(one)
    per = {k: 1e3 * T.median(v) / n for k, v in times.items()}
    calls = timed.calls / (repeats + 1) / n  # graph calls per input (warm-up included in the counts)
    graph_ms = 1e3 * timed.graph_seconds / (repeats + 1) / n
    layers = rt.segments.num_layers
    return {
        "engine <=1pt, ms per input": f"{per['engine']:.3f}, of which inside the graphs {graph_ms:.3f} "
        f"({calls:.2f} graph calls per input) and host work (policy, bookkeeping, compaction) "
        f"{per['engine'] - graph_ms:.3f}",
        "full depth through the segments vs the one graph, ms per input": f"{per['deep']:.3f} vs {per['full']:.3f}: "
        f"{(per['deep'] - per['full']) / layers * 1e3:.0f} us per layer for cutting the model into {layers} graphs "
        "(a call, the repeated LayerNorm, the decision)",
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
        P.full_path(rt) if spec["kind"] == "full" else P.engine_path(rt, get_policy("entropy", spec["threshold"]), "")
    )
    path.run_many(batches, 32)
    if spec["runtime"] != "torch":
        assert "torch" not in sys.modules, "the ONNX Runtime path imported torch"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_rss(run: Path, work: Path, rows: list[R.Row], threads: int) -> None:
    for r in rows:
        precision = r.runtime[4:]  # ort-fp32 -> fp32
        spec = {"run": str(run), "runtime": r.runtime, "kind": r.kind, "threshold": r.threshold, "threads": threads}
        spec.update(segments=str(work / f"segments-{precision}"), full=str(work / f"full-{precision}.onnx"))
        if r.kind == "engine" and r.target != "<=1pt":
            continue  # one engine row per runtime: memory does not depend on the threshold
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
