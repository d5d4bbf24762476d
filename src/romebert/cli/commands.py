"""What each ``romebert`` command does with its parsed flags: build the job's settings from the
dataclasses the flags came from, run the job (``jobs``, ``deploy``) and print where its outputs went."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from romebert.cli.parser import CommonOptions
from romebert.core import options
from romebert.core.errors import RomebertError
from romebert.data.spec import DataSpec
from romebert.runtime.exit_policy import PolicyOptions
from romebert.runtime.policies import criterion_class, get_policy
from romebert.training.training_args import TrainingArguments, preset_values


def _common(ns: argparse.Namespace) -> CommonOptions:
    return CommonOptions(**options.values(ns, CommonOptions))


def _data_spec(ns: argparse.Namespace) -> DataSpec:
    return DataSpec(**{**preset_values(getattr(ns, "preset", None), DataSpec), **options.values(ns, DataSpec)})


def _data_override(ns: argparse.Namespace) -> dict:
    """Data flags given to evaluate / predict replace what the run was trained with."""
    return options.values(ns, DataSpec)


def _training_arguments(ns: argparse.Namespace) -> TrainingArguments:
    common = _common(ns)
    given = options.values(ns, TrainingArguments)
    preset = given.pop("preset", None)
    return TrainingArguments.from_preset(preset, **given, device=common.device, progress=not common.quiet)


def _policy_options(ns: argparse.Namespace) -> dict[str, Any]:
    return options.values(ns, PolicyOptions)


def _criterion(ns: argparse.Namespace) -> str:
    return getattr(ns, "criterion", None) or "entropy"


def _rule(ns: argparse.Namespace):
    """A policy from --criterion / --threshold, or None when neither is given (the classifier's own exit
    config: an export's was chosen on dev, a run's is the reference's entropy 0.15)."""
    if getattr(ns, "criterion", None) is None and getattr(ns, "threshold", None) is None:
        return None
    criterion = _criterion(ns)
    threshold = ns.threshold if ns.threshold is not None else criterion_class(criterion).default_threshold
    return get_policy(criterion, threshold, **_policy_options(ns))


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
        f = r["files"]
        names = ", ".join(p.name for p in (f.per_exit, f.per_exit_csv, f.sweep, f.sweep_csv, f.logits))
        print(f"[{split}] written to {r['dir']}/ ({names}, {f.per_exit_plot.name}, {f.speedup_plot.name})")


def train(ns: argparse.Namespace, then_evaluate: bool = False):
    from romebert.jobs.pipeline import train_run

    trained = train_run(_data_spec(ns), _training_arguments(ns), ns.resume, then_evaluate)
    s = trained.summary
    if trained.is_main_process:
        print(f"trained {s['method']} on {s['num_train_examples']} examples in {s['seconds']:.0f} s; "
              f"model in {trained.run.model}/, loss log in {trained.run.train_log}")  # fmt: skip
    return trained


def evaluate(ns: argparse.Namespace, source: Any = None) -> dict:
    from romebert.jobs.pipeline import evaluate_run

    common = _common(ns)
    results = evaluate_run(source or ns.run, ns.thresholds, common.eval_batch_size, common.device,
                           _data_override(ns) if source is None else None, _criterion(ns),
                           _policy_options(ns))  # fmt: skip
    _print_eval(results)
    return results


def sweep(ns: argparse.Namespace) -> dict:
    from romebert.core.runs import RunFolder
    from romebert.evaluation.evaluate import sweep_cached
    from romebert.model.modeling import CONFIG_NAME, MultiExitConfig

    run = RunFolder(ns.run)
    data = DataSpec.load(run.run_file)
    cfg = MultiExitConfig.load(run.model / CONFIG_NAME)
    task = data.task_for(cfg.task, cfg.labels, cfg.num_labels)
    if not data.eval_splits():
        raise RomebertError(f"{run.root}: nothing to sweep: its data has no dev split")
    results = {split: sweep_cached(run.eval(split), task, ns.thresholds, _criterion(ns), _policy_options(ns))
               for split in data.eval_splits()}  # fmt: skip
    _print_eval(results)
    return results


def _runtime(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(ns, k) for k in ("intra_op_threads", "inter_op_threads") if getattr(ns, k, None)}


def predict(ns: argparse.Namespace, source: Any = None) -> Any:
    from romebert.jobs.predict import predict_run

    if getattr(ns, "input", None) is not None:
        return predict_input(ns)
    if source is None:
        for name in ("output", "id_column", "keep_columns", "chunk_rows", "resume", "shard"):
            if hasattr(ns, name):
                raise RomebertError(f"--{name.replace('_', '-')} applies to --input FILE only")
    common = _common(ns)
    runtime = _runtime(ns)
    written = predict_run(source or ns.run, _rule(ns), common.eval_batch_size, common.device,
                          _data_override(ns) if source is None else None, getattr(ns, "predictions_dir", None),
                          **runtime)  # fmt: skip
    for w in written:
        rule = ", ".join(f"{k} {v}" for k, v in w["policy"].items())
        print(f"test predictions ({rule}): {w['file']} ({w['rows']} rows, "
              f"mean exit layer {w['mean_exit_layer']:.2f})")  # fmt: skip
    return written


def predict_input(ns: argparse.Namespace):
    """``predict MODEL --input FILE``: one output file in the input's format."""
    from romebert.deploy.predict_file import FileOptions
    from romebert.jobs.predict import predict_input

    data = _data_override(ns)
    ignored = [k for k in data if k not in ("text_a", "text_b")]
    if ignored or getattr(ns, "predictions_dir", None):
        flags = [f"--{k.replace('_', '-')}" for k in ignored] + ["--predictions-dir"] * bool(ns.predictions_dir)
        raise RomebertError(f"{', '.join(flags)}: not used with --input (it scores FILE; only --text-column and "
                            "--text-pair-column name its columns)")  # fmt: skip
    common = _common(ns)
    opts = FileOptions(**options.values(ns, FileOptions))
    s = predict_input(ns.run, opts, data.get("text_a"), data.get("text_b"), _rule(ns), common.eval_batch_size,
                      common.device, not common.quiet, **_runtime(ns))  # fmt: skip
    rule = ", ".join(f"{k} {v}" for k, v in s.policy.items())
    layer = f", mean exit layer {s.mean_exit_layer:.2f}" if s.mean_exit_layer is not None else ""
    resumed = f", {s.resumed_rows} of them from the interrupted run" if s.resumed_rows else ""
    print(f"predictions ({rule}): {s.output} ({s.rows} rows{resumed}{layer}; {s.rows_per_second:.0f} rows/s)")
    return s


def serve(ns: argparse.Namespace) -> None:
    from romebert.deploy.guard import GuardOptions
    from romebert.deploy.service import ServeConfig, serve

    cfg = ServeConfig(
        ns.source, guard=GuardOptions(**options.values(ns, GuardOptions)), **options.values(ns, ServeConfig)
    )
    if ns.own_process and cfg.system_allocator:
        from romebert.deploy.memory import restart_on_c_heap

        restart_on_c_heap()  # returns only where there is nothing to restart for
    print(f"serving {ns.source} on http://{ns.host}:{ns.port} ({ns.workers} worker(s)); Ctrl-C stops", flush=True)
    serve(cfg, ns.host, ns.port, ns.workers)


def export(ns: argparse.Namespace) -> None:
    from romebert.deploy.export import export_run
    from romebert.deploy.export_dev import dev_delta_lines
    from romebert.deploy.export_options import ExportOptions

    opts = ExportOptions(**options.values(ns, ExportOptions))
    m = export_run(ns.run, ns.output, opts, _criterion(ns), _policy_options(ns), _common(ns).eval_batch_size)
    ee = m.early_exit
    chosen = ee.chosen or {}
    print(f"exported {m.num_layers} segments ({m.precision}, opset {m.opset}) to {ns.output}/")
    for i, f in enumerate(m.fusions, start=1):
        print(f"  segment {i}: fused {', '.join(f'{k} x{v}' for k, v in f.items()) or 'nothing'}")
    q = m.quantization
    if q:
        fp32 = sum(len(v) for v in q["fp32_nodes"].values())
        outliers = sum(len(v) for v in q["outliers"].values())
        calib = f"calibrated on {q['calibration_rows']} training sentences, " if q["calibration_rows"] else ""
        treated = "split" if q["settings"].get("split") else "in fp32 on the side"
        print(f"  int8 recipe {q['recipe']}: {calib}{outliers} products with outlier channels {treated}, "
              f"{fp32} fp32 nodes (docs/inference.md)")  # fmt: skip
        for note in q.get("quantizer_notes", [])[:1]:
            print(f"  ONNX Runtime's quantizer said: {note}")
    for line in dev_delta_lines(m):
        print(line)
    if m.full_graph is not None:
        print(f"  whole model as one graph: {m.full_graph.file} (serve --full-graph)")
    if m.single_row_graph is not None:
        print(f"  one input at a time: {m.single_row_graph.file} (the whole early exit in one graph)")
    line = f"  exit: {ee.criterion} threshold {ee.threshold}"
    if "speedup" in chosen:
        name = chosen["metric_name"]
        line += f", chosen on {chosen['split']}: {name} {100 * chosen['metric']:.2f} at {chosen['speedup']:.2f}x layer "
        line += f"speed-up; final exit: {m.precision} {100 * chosen['final_metric']:.2f}"
        if "fp32_final_metric" in chosen:
            line += f", fp32 {100 * chosen['fp32_final_metric']:.2f}"
        if "max_metric_drop" in chosen:
            ref = "the fp32 model" if chosen.get("reference") == "fp32" else f"the {m.precision} export"
            line += f"; drop of at most {100 * chosen['max_metric_drop']:g} points counted against {ref}"
    print(line)


def run(ns: argparse.Namespace) -> None:
    """train, then evaluate and predict the model just trained (in memory: nothing is read back)."""
    from romebert.deploy.classifier import EarlyExitClassifier

    t0 = time.perf_counter()
    trained = train(ns, then_evaluate=True)
    if not trained.is_main_process:
        return  # other ranks of a multi-process launch only help train; rank 0 evaluates
    results = evaluate(ns, trained)
    written = []
    if trained.data.test_files():
        clf = EarlyExitClassifier.from_model(trained.model, trained.tokenizer, trained.data, trained.run)
        written = predict(ns, clf)
    print(f"done in {time.perf_counter() - t0:.0f} s. Outputs:")
    print(f"  model:        {trained.run.model}/")
    print(f"  training log: {trained.run.train_log}")
    for split, r in results.items():
        f = r["files"]
        print(f"  {split}: per-exit {f.per_exit}, sweep {f.sweep_csv}, plots {f.per_exit_plot} {f.speedup_plot}")
    for w in written:
        print(f"  test file:    {w['file']}")


def compare(ns: argparse.Namespace) -> dict:
    from romebert.jobs.compare import run_compare

    return run_compare(compare_config(ns))


def compare_config(ns: argparse.Namespace):
    """The :class:`~romebert.jobs.compare.CompareConfig` that ``romebert compare``'s flags ask for."""
    from romebert.jobs.compare import CompareConfig
    from romebert.jobs.compare.config import COMPARE_VARIES, DEFAULT_POOLINGS

    common = _common(ns)
    given = options.values(ns, TrainingArguments, exclude=COMPARE_VARIES)
    preset = given.pop("preset", None)
    training = TrainingArguments.from_preset(preset, output_dir=".", **given)
    chosen = options.values(ns, CompareConfig)
    if "poolings" not in chosen:
        chosen["poolings"] = [training.pooling] if preset else list(DEFAULT_POOLINGS)
    chosen["methods"] = [m.lower() for m in chosen.get("methods", CompareConfig.__dataclass_fields__["methods"]
                                                     .default_factory())]  # fmt: skip
    prog = Path(sys.argv[0]).name if sys.argv else ""
    return CompareConfig(
        data=_data_spec(ns),
        training=training,
        eval_batch_size=common.eval_batch_size,
        device=common.device,
        progress=not common.quiet,
        # only a real command line is worth recording (not pytest's when main() is called in a test)
        invocation=shlex.join(["romebert", *sys.argv[1:]]) if prog in ("romebert", "__main__.py") else None,
        **chosen,
    )


COMMANDS = {
    "train": train,
    "evaluate": evaluate,
    "sweep": sweep,
    "predict": predict,
    "serve": serve,
    "export": export,
    "run": run,
    "compare": compare,
}
