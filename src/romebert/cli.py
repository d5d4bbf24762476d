"""``romebert`` command line: train, evaluate, sweep, predict, and run (all of them in one go)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from romebert import __version__
from romebert.core import options
from romebert.core.errors import RomebertError
from romebert.runtime.policies import REFERENCE_THRESHOLDS

DEFAULT_THRESHOLD = 0.15
# romebert.runtime.policies.CRITERIA, spelled out so that building the parser does not import torch.
CRITERIA = ("entropy", "maxprob", "patience", "patience-confidence")
# --threshold when none is given: entropy's reference value, and a comparable point for the others.
DEFAULT_THRESHOLDS = {"entropy": DEFAULT_THRESHOLD, "maxprob": 0.9, "patience": 2.0, "patience-confidence": 0.3}


def _thresholds(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--thresholds must be comma-separated numbers, got {text!r}") from None


# Data options that only training uses (evaluate and predict read them from the run).
_TRAINING_DATA = ("max_seq_length", "max_train_examples", "subset_seed")


def _add_data_args(p: argparse.ArgumentParser, for_training: bool) -> None:
    from romebert.data.spec import DataSpec

    g = p.add_argument_group("data (a GLUE task, or your own CSV/TSV files)")
    options.add_arguments(g, DataSpec, exclude=() if for_training else _TRAINING_DATA)


def _data_spec(ns: argparse.Namespace):
    from romebert.data.spec import DataSpec
    from romebert.training.training_args import preset_values

    return DataSpec(**{**preset_values(getattr(ns, "preset", None), DataSpec), **options.values(ns, DataSpec)})


def _data_override(ns: argparse.Namespace) -> dict:
    """Data flags given to evaluate / predict replace what the run was trained with."""
    from romebert.data.spec import DataSpec

    return options.values(ns, DataSpec)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from romebert.training.training_args import TrainingArguments

    g = p.add_argument_group("training (defaults are the reference's, except pooling and group-by-length)")
    options.add_arguments(g, TrainingArguments)
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")


def _add_criterion_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("exit criterion")
    g.add_argument(
        "--criterion",
        choices=CRITERIA,
        help="entropy < t (reference; the default), maxprob >= t, patience (t = k agreeing exits, PABEE), "
        "patience-confidence (k = --patience agreeing exits with entropy < t)",
    )
    g.add_argument("--patience", type=int, default=2, help="patience-confidence: agreeing confident exits needed")
    g.add_argument(
        "--tolerance", type=float, default=0.1, help="patience on regression: a change below this counts as agreement"
    )


def _policy_kwargs(ns: argparse.Namespace) -> dict:
    return {"patience": getattr(ns, "patience", 2), "tolerance": getattr(ns, "tolerance", 0.1)}


def _criterion_thresholds(ns: argparse.Namespace) -> list | None:
    """--thresholds as policies of --criterion (plain numbers are entropy thresholds)."""
    criterion = getattr(ns, "criterion", None) or "entropy"
    if criterion == "entropy":
        return ns.thresholds
    from romebert.runtime.policies import default_thresholds, get_policy

    grid = ns.thresholds or default_thresholds(criterion, _num_layers(ns.run))
    return [get_policy(criterion, t, **_policy_kwargs(ns)) for t in grid]


def _criterion_threshold(ns: argparse.Namespace):
    """A policy from --criterion / --threshold, or None when neither is given (the classifier's own
    exit config: an export's was chosen on dev, a run's is the reference's entropy 0.15)."""
    criterion = getattr(ns, "criterion", None)
    if criterion is None and ns.threshold is None:
        return None
    criterion = criterion or "entropy"
    threshold = ns.threshold if ns.threshold is not None else DEFAULT_THRESHOLDS[criterion]
    from romebert.runtime.policies import get_policy

    return get_policy(criterion, threshold, **_policy_kwargs(ns))


def _num_layers(run: str) -> int | None:
    """Depth of a run's model, read from its backbone config (no model load)."""
    import json

    try:
        cfg = json.loads((Path(run) / "model" / "config.json").read_text(encoding="utf-8"))
        return int(cfg["num_hidden_layers"] if "num_hidden_layers" in cfg else cfg["n_layers"])  # DistilBERT: n_layers
    except (OSError, ValueError, KeyError, TypeError):
        raise RomebertError(f"{run}/model/config.json: cannot read the number of layers") from None


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ONNX Runtime (exports only)")
    g.add_argument("--intra-op-threads", type=int, help="threads per graph call (default: the usable cores)")
    g.add_argument("--inter-op-threads", type=int, help="threads across graph nodes (default: 1)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _training_arguments(ns: argparse.Namespace):
    from romebert.training.training_args import TrainingArguments

    given = options.values(ns, TrainingArguments)
    preset = given.pop("preset", None)
    return TrainingArguments.from_preset(preset, **given, device=ns.device, progress=not ns.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="romebert", description=__doc__)
    parser.add_argument("--version", action="version", version=f"romebert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a multi-exit model with one of the training methods")
    _add_data_args(p, for_training=True)
    _add_train_args(p)
    _add_common(p)

    for name, text in (
        ("evaluate", "per-exit metrics and an entropy-threshold sweep on dev (one pass)"),
        ("sweep", "re-sweep thresholds from the logits 'evaluate' cached (no model pass)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("run", help="run folder written by 'romebert train'")
        p.add_argument("--thresholds", type=_thresholds, help="comma-separated (default: the reference grid)")
        _add_criterion_args(p)
        if name == "evaluate":
            _add_data_args(p, for_training=False)
            _add_common(p)

    p = sub.add_parser("predict", help="GLUE test-submission files by real early exit (a run or an export)")
    p.add_argument("run", help="run folder, classifier folder or ONNX export")
    p.add_argument(
        "--threshold",
        type=float,
        help=f"default: the export's own (chosen on dev); for a run {DEFAULT_THRESHOLD} (entropy, see --criterion)",
    )
    p.add_argument("--predictions-dir", help="where the files go (default: <run>/predictions, else ./predictions)")
    _add_criterion_args(p)
    _add_runtime_args(p)
    _add_data_args(p, for_training=False)
    _add_common(p)

    p = sub.add_parser("serve", help="HTTP service with continuous early-exit batching (an export, or a run)")
    p.add_argument("source", help="ONNX export (ONNX Runtime, no torch), classifier folder or run folder (PyTorch)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    from romebert.deploy.service import ServeConfig

    options.add_arguments(p.add_argument_group("service"), ServeConfig)

    p = sub.add_parser("export", help="ONNX export: one graph per layer with its exit, for the torch-free runtime")
    p.add_argument("run", help="a finished run folder")
    p.add_argument("--output", "-o", required=True, help="export folder (written atomically)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"], help="int8: dynamic quantization")
    p.add_argument("--threshold", type=float, help="use this threshold as it is (no choice on dev)")
    p.add_argument("--target-speedup", type=float, help="choose on dev: the least aggressive threshold reaching it")
    p.add_argument(
        "--max-metric-drop",
        type=float,
        help="choose on dev: the fastest threshold within this drop of the final exit's metric "
        "(default 0.01 when no other choice is given)",
    )
    p.add_argument("--calibrated", action="store_true", help="use <run>/calibration.json's temperatures")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--full-graph", action="store_true",
                   help="also write the whole model as one graph (full.onnx), for `serve --full-graph`: the "
                   "plain-model baseline")  # fmt: skip
    _add_criterion_args(p)
    _add_common(p)

    p = sub.add_parser("run", help="train, evaluate every exit, sweep, plot and write test files")
    _add_data_args(p, for_training=True)
    _add_train_args(p)
    _add_common(p)
    p.add_argument("--thresholds", type=_thresholds)
    p.add_argument("--threshold", type=float, help=f"threshold for the test files (entropy: {DEFAULT_THRESHOLD})")
    _add_criterion_args(p)

    p = sub.add_parser("compare", help="train methods x poolings x seeds on one task and write one report")
    _add_data_args(p, for_training=True)
    _add_compare_args(p)
    _add_common(p)
    return parser


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``romebert compare`` other than the data and common ones."""
    from romebert.jobs import compare as c
    from romebert.training.training_args import TrainingArguments

    g = p.add_argument_group("comparison")
    g.add_argument("--output-dir", "-o", required=True, help="comparison folder (runs/, report.md, ...)")
    g.add_argument(
        "--methods",
        type=options.csv(str, "--methods"),
        default=list(c.DEFAULT_METHODS),
        help=f"comma-separated (default: {','.join(c.DEFAULT_METHODS)})",
    )
    g.add_argument(
        "--seeds",
        type=options.csv(int, "--seeds"),
        default=list(c.DEFAULT_SEEDS),
        help=f"comma-separated training seeds (default: {','.join(map(str, c.DEFAULT_SEEDS))})",
    )
    g.add_argument(
        "--poolings",
        type=options.csv(str, "--poolings"),
        help=f"exit poolings to compare (default: {','.join(c.DEFAULT_POOLINGS)}; with --preset, the preset's)",
    )
    g.add_argument(
        "--include-plain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train plain fine-tuning, the training-cost baseline (default: on)",
    )
    g.add_argument(
        "--speedups",
        type=options.csv(float, "--speedups"),
        default=list(c.DEFAULT_SPEEDUPS),
        help="layer speed-ups at which to read the metric (default: 1.5,2,3)",
    )
    g.add_argument(
        "--thresholds",
        type=options.csv(float, "--thresholds"),
        default=None,
        help="entropy thresholds to sweep (default: the reference grid plus a 0.025 grid up to 1.2)",
    )
    g.add_argument("--notes", help="Markdown file for the report's 'Reading' section")
    g.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs; train nothing")
    t = p.add_argument_group("training (every run; defaults are the reference's, except pooling and grouping)")
    options.add_arguments(t, TrainingArguments, exclude=c.COMPARE_VARIES)


def _compare_config(ns: argparse.Namespace):
    """A :class:`~romebert.jobs.compare.CompareConfig` from parsed ``romebert compare`` arguments."""
    import shlex

    from romebert.jobs import compare as c
    from romebert.training.training_args import TrainingArguments

    given = options.values(ns, TrainingArguments, exclude=c.COMPARE_VARIES)
    preset = given.pop("preset", None)
    training = TrainingArguments.from_preset(preset, output_dir=".", **given)
    poolings = ns.poolings or ([training.pooling] if preset else list(c.DEFAULT_POOLINGS))
    prog = Path(sys.argv[0]).name if sys.argv else ""
    return c.CompareConfig(
        data=_data_spec(ns),
        output_dir=ns.output_dir,
        training=training,
        methods=[m.lower() for m in ns.methods],
        seeds=ns.seeds,
        poolings=poolings,
        include_plain=ns.include_plain,
        thresholds=ns.thresholds if ns.thresholds is not None else list(c.COMPARE_THRESHOLDS),
        speedups=ns.speedups,
        eval_batch_size=ns.eval_batch_size,
        device=ns.device,
        progress=not ns.quiet,
        notes=ns.notes,
        report_only=ns.report_only,
        # only a real command line is worth recording (not pytest's when main() is called in a test)
        invocation=shlex.join(["romebert", *sys.argv[1:]]) if prog in ("romebert", "__main__.py") else None,
    )


def _print_eval(results: dict) -> None:
    for split, r in results.items():
        metric_rows = r["per_exit"]
        keys = [k for k in metric_rows[0] if k != "exit"]
        print(f"[{split}] per-exit dev metrics ({', '.join(keys)}):")
        for row in metric_rows:
            print(f"  exit {row['exit']:>2}: " + "  ".join(f"{k}={100 * row[k]:.2f}" for k in keys))
        criterion = r["sweep"][0].get("criterion", "entropy") if r["sweep"] else "entropy"
        print(f"[{split}] threshold sweep ({criterion}):")
        for row in r["sweep"]:
            print(
                f"  threshold {row['threshold']:<6} metric={100 * row['metric']:.2f}  "
                f"layer speed-up={row['speedup']:.2f}x  exits={row['counts']}"
            )
        print(f"[{split}] written to {r['dir']}/ (per_exit.json/.csv/.png, sweep.json/.csv, speedup.png, logits.npy)")


def _cmd_train(ns, then_evaluate: bool = False) -> dict:
    from romebert.jobs.pipeline import train_run

    summary = train_run(_data_spec(ns), _training_arguments(ns), ns.resume, then_evaluate)
    if not summary["is_main_process"]:
        return summary
    print(
        f"trained {summary['method']} on {summary['num_train_examples']} examples in {summary['seconds']:.0f} s; "
        f"model in {summary['model_dir']}/, loss log in {Path(summary['model_dir']).parent / 'train_log.jsonl'}"
    )
    return summary


def _cmd_evaluate(ns) -> dict:
    from romebert.jobs.pipeline import evaluate_run

    thresholds = _criterion_thresholds(ns)
    results = evaluate_run(ns.run, thresholds, ns.eval_batch_size, ns.device, _data_override(ns))
    _print_eval(results)
    return results


def _cmd_sweep(ns) -> dict:
    from romebert.core.runs import RunFolder
    from romebert.data.spec import DataSpec
    from romebert.data.tasks import custom_task, get_task
    from romebert.evaluation.evaluate import sweep_cached
    from romebert.model.modeling import CONFIG_NAME, MultiExitConfig

    data = DataSpec.load(RunFolder(ns.run).run_file)
    if data.is_custom:
        cfg = MultiExitConfig.load(Path(ns.run) / "model" / CONFIG_NAME)
        task = custom_task(tuple(cfg.labels) if cfg.labels else None, metric=data.metric, pair=data.text_b is not None)
    else:
        task = get_task(data.task)
    thresholds = _criterion_thresholds(ns) or list(REFERENCE_THRESHOLDS)
    results = {split: sweep_cached(Path(ns.run) / "eval" / split, task, thresholds) for split in data.eval_splits()}
    _print_eval(results)
    return results


def _cmd_predict(ns) -> list:
    from romebert.jobs.predict import predict_run

    runtime = {k: getattr(ns, k) for k in ("intra_op_threads", "inter_op_threads") if getattr(ns, k, None)}
    written = predict_run(ns.run, _criterion_threshold(ns), ns.eval_batch_size, ns.device, _data_override(ns),
                          getattr(ns, "predictions_dir", None), **runtime)  # fmt: skip
    for w in written:
        rule = ", ".join(f"{k} {v}" for k, v in w["policy"].items())
        print(f"test predictions ({rule}): {w['file']} ({w['rows']} rows, "
              f"mean exit layer {w['mean_exit_layer']:.2f})")  # fmt: skip
    return written


def _cmd_serve(ns) -> None:
    from romebert.deploy.service import ServeConfig, serve

    cfg = ServeConfig(ns.source, **options.values(ns, ServeConfig))
    print(f"serving {ns.source} on http://{ns.host}:{ns.port} ({ns.workers} worker(s)); Ctrl-C stops", flush=True)
    serve(cfg, ns.host, ns.port, ns.workers)


def _cmd_export(ns) -> None:
    from romebert.deploy.export import export_run

    threshold = ns.threshold
    if threshold is None and ns.target_speedup is None and ns.max_metric_drop is None:
        ns.max_metric_drop = 0.01
    m = export_run(
        ns.run,
        ns.output,
        quantize=ns.quantize,
        criterion=ns.criterion or "entropy",
        threshold=threshold,
        target_speedup=ns.target_speedup,
        max_metric_drop=ns.max_metric_drop,
        calibrated=ns.calibrated,
        patience=ns.patience,
        tolerance=ns.tolerance,
        opset=ns.opset,
        batch_size=ns.eval_batch_size,
        full_graph=ns.full_graph,
    )
    ee = m.early_exit
    chosen = ee.chosen or {}
    print(f"exported {m.num_layers} segments ({m.precision}, opset {m.opset}) to {ns.output}/")
    for i, f in enumerate(m.fusions, start=1):
        print(f"  segment {i}: fused {', '.join(f'{k} x{v}' for k, v in f.items()) or 'nothing'}")
    if m.full_graph is not None:
        print(f"  whole model as one graph: {m.full_graph.file} (serve --full-graph)")
    line = f"  exit: {ee.criterion} threshold {ee.threshold}"
    if "speedup" in chosen:
        line += f", chosen on {chosen['split']}: {chosen['metric_name']} {100 * chosen['metric']:.2f} "
        line += f"(final exit {100 * chosen['final_metric']:.2f}) at {chosen['speedup']:.2f}x layer speed-up"
    print(line)


def _cmd_run(ns) -> None:
    t0 = time.perf_counter()
    if not _cmd_train(ns, then_evaluate=True)["is_main_process"]:
        return  # other ranks of a multi-process launch only help train; rank 0 evaluates
    from romebert.data.spec import DataSpec

    ns.run = ns.output_dir
    for f in options.option_fields(DataSpec):  # evaluate / predict read the data description the run saved
        if hasattr(ns, f.name):
            delattr(ns, f.name)
    results = _cmd_evaluate(ns)
    written = _cmd_predict(ns) if _has_test(ns.run) else []
    print(f"done in {time.perf_counter() - t0:.0f} s. Outputs:")
    print(f"  model:        {Path(ns.output_dir) / 'model'}/")
    print(f"  training log: {Path(ns.output_dir) / 'train_log.jsonl'}")
    for split, r in results.items():
        print(
            f"  {split}: per-exit {r['dir']}/per_exit.json, sweep {r['dir']}/sweep.csv, "
            f"plots {r['dir']}/per_exit.png {r['dir']}/speedup.png"
        )
    for w in written:
        print(f"  test file:    {w['file']}")


def _has_test(run: str) -> bool:
    from romebert.core.runs import RunFolder
    from romebert.data.spec import DataSpec

    return bool(DataSpec.load(RunFolder(run).run_file).test_files())


def _cmd_compare(ns) -> dict:
    from romebert.jobs.compare import run_compare

    return run_compare(_compare_config(ns))


# A missing module -> the extra that installs it (the base install serves ONNX exports only).
_EXTRAS = {name: "train" for name in ("torch", "transformers", "safetensors", "scipy", "matplotlib", "tqdm")}
_EXTRAS.update(onnx="export", onnxruntime="runtime", starlette="serve", uvicorn="serve", prometheus_client="serve")

COMMANDS = {
    "export": _cmd_export,
    "serve": _cmd_serve,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "sweep": _cmd_sweep,
    "predict": _cmd_predict,
    "run": _cmd_run,
    "compare": _cmd_compare,
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = build_parser().parse_args(argv)
    try:
        COMMANDS[ns.command](ns)
    except RomebertError as exc:
        print(f"romebert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("romebert: interrupted; the newest complete checkpoint is kept (rerun with --resume)", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"romebert: error: '{ns.command}' needs {exc.name}: pip install 'romebert[{extra}]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
