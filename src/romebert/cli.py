"""``romebert`` command line: train, evaluate, sweep, predict, and run (all of them in one go)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from romebert import __version__
from romebert.errors import RomebertError
from romebert.exits import REFERENCE_THRESHOLDS
from romebert.methods import METHODS

DEFAULT_THRESHOLD = 0.15
# romebert.policies.CRITERIA, spelled out so that building the parser does not import torch.
CRITERIA = ("entropy", "maxprob", "patience", "patience-confidence")
# --threshold when none is given: entropy's reference value, and a comparable point for the others.
DEFAULT_THRESHOLDS = {"entropy": DEFAULT_THRESHOLD, "maxprob": 0.9, "patience": 2.0, "patience-confidence": 0.3}


def _thresholds(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--thresholds must be comma-separated numbers, got {text!r}") from None


def _add_data_args(p: argparse.ArgumentParser, for_training: bool) -> None:
    g = p.add_argument_group("data (a GLUE task, or your own CSV/TSV files)")
    g.add_argument("--task", help="GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI")
    g.add_argument("--data-dir", help="GLUE folder in the classic layout (<dir>/<TASK>/train.tsv ...)")
    g.add_argument("--hub", action="store_true", help="load GLUE from the Hugging Face hub (needs romebert[hub])")
    for split in ("train", "dev", "test"):
        g.add_argument(f"--{split}-file", help=f"your own {split} CSV/TSV with a header row")
    g.add_argument("--text-column", dest="text_a", help="custom data: column of the (first) text")
    g.add_argument("--text-pair-column", dest="text_b", help="custom data: column of the second text, if any")
    g.add_argument("--label-column", help="custom data: column of the label")
    g.add_argument("--labels", help="custom data: comma-separated label set (default: read from the train file)")
    g.add_argument("--regression", action="store_true", help="custom data: the label is a number")
    g.add_argument("--metric", help="custom data: accuracy, f1, mcc, pearson or spearman")
    if for_training:
        g.add_argument("--max-seq-length", type=int, default=128)
        g.add_argument("--max-train-examples", type=int, help="train on a seeded random subset of this many examples")
        g.add_argument("--subset-seed", type=int, default=0)


def _data_spec(ns: argparse.Namespace):
    from romebert.pipeline import DataSpec

    return DataSpec(
        task=ns.task,
        data_dir=ns.data_dir,
        hub=ns.hub,
        train_file=ns.train_file,
        dev_file=ns.dev_file,
        test_file=ns.test_file,
        text_a=ns.text_a,
        text_b=ns.text_b,
        label_column=ns.label_column,
        labels=ns.labels.split(",") if ns.labels else None,
        regression=ns.regression,
        metric=ns.metric,
        max_seq_length=getattr(ns, "max_seq_length", 128),
        max_train_examples=getattr(ns, "max_train_examples", None),
        subset_seed=getattr(ns, "subset_seed", 0),
    )


def _data_override(ns: argparse.Namespace) -> dict:
    """Data flags given to evaluate / predict replace what the run was trained with."""
    keys = ("task", "data_dir", "train_file", "dev_file", "test_file")
    out = {k: getattr(ns, k) for k in keys if getattr(ns, k, None) is not None}
    if getattr(ns, "hub", False):
        out["hub"] = True
    return out


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from romebert.trainer import TrainingArguments as T

    d = T.__dataclass_fields__
    g = p.add_argument_group("training (defaults are the reference's)")
    g.add_argument("--output-dir", "-o", required=True, help="run folder (created)")
    g.add_argument("--method", default=d["method"].default, choices=sorted(METHODS))
    g.add_argument(
        "--model", dest="backbone", help="backbone: hub name or local folder (default: packaged all-MiniLM-L6-v2)"
    )
    g.add_argument(
        "--pooling",
        default="mean",
        choices=["cls", "mean"],
        help="what each exit pools: first token (the reference) or masked mean (default)",
    )
    g.add_argument("--epochs", type=float, default=d["epochs"].default)
    g.add_argument("--learning-rate", "--lr", type=float, default=d["learning_rate"].default)
    g.add_argument("--batch-size", type=int, default=d["batch_size"].default)
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"].default)
    g.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"].default)
    g.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"].default)
    g.add_argument("--seed", type=int, default=d["seed"].default)
    g.add_argument("--gamma", type=float, default=d["gamma"].default, help="distillation weight")
    g.add_argument("--temperature", type=float, default=d["temperature"].default)
    g.add_argument(
        "--kd-reduction",
        default="mean",
        choices=["mean", "batchmean"],
        help="KL reduction: element-wise mean (reference) or batch mean (textbook)",
    )
    g.add_argument(
        "--gr-anchor",
        default="auto",
        choices=["auto", "exits", "final"],
        help="GR anchor loss A (auto: final for MNLI/QQP, exits otherwise, as the reference)",
    )
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false")
    g.add_argument("--log-every", type=int, default=d["log_every"].default)
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    g.add_argument("--save-steps", type=int, default=0, help="also checkpoint every N optimizer steps")
    g.add_argument(
        "--save-total-limit", type=int, default=d["save_total_limit"].default, help="complete checkpoints to keep"
    )


def _add_criterion_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("exit criterion")
    g.add_argument(
        "--criterion",
        default="entropy",
        choices=CRITERIA,
        help="entropy < t (reference), maxprob >= t, patience (t = k agreeing exits, PABEE), "
        "patience-confidence (k = --patience agreeing exits with entropy < t)",
    )
    g.add_argument("--patience", type=int, default=2, help="patience-confidence: agreeing confident exits needed")
    g.add_argument(
        "--tolerance", type=float, default=0.1, help="patience on regression: a change below this counts as agreement"
    )


def _policy_kwargs(ns: argparse.Namespace) -> dict:
    return {"patience": getattr(ns, "patience", 2), "tolerance": getattr(ns, "tolerance", 0.1)}


def _criterion_thresholds(ns: argparse.Namespace) -> list | None:
    """--thresholds as policies of --criterion (entropy: plain numbers, the original behaviour)."""
    criterion = getattr(ns, "criterion", "entropy")
    if criterion == "entropy":
        return ns.thresholds
    from romebert.policies import default_thresholds, get_policy

    grid = ns.thresholds or default_thresholds(criterion, _num_layers(ns.run))
    return [get_policy(criterion, t, **_policy_kwargs(ns)) for t in grid]


def _criterion_threshold(ns: argparse.Namespace):
    """--threshold, or a policy of --criterion at that threshold."""
    criterion = getattr(ns, "criterion", "entropy")
    if ns.threshold is None:
        ns.threshold = DEFAULT_THRESHOLDS[criterion]
    if criterion == "entropy":
        return ns.threshold
    from romebert.policies import get_policy

    return get_policy(criterion, ns.threshold, **_policy_kwargs(ns))


def _num_layers(run: str) -> int | None:
    """Depth of a run's model, read from its backbone config (no model load)."""
    import json

    try:
        cfg = json.loads((Path(run) / "model" / "config.json").read_text(encoding="utf-8"))
        return int(cfg["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        raise RomebertError(f"{run}/model/config.json: cannot read the number of layers") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _training_arguments(ns: argparse.Namespace):
    from romebert.trainer import TrainingArguments

    return TrainingArguments(
        output_dir=ns.output_dir,
        method=ns.method,
        epochs=ns.epochs,
        learning_rate=ns.learning_rate,
        batch_size=ns.batch_size,
        gradient_accumulation_steps=ns.gradient_accumulation_steps,
        weight_decay=ns.weight_decay,
        warmup_ratio=ns.warmup_ratio,
        max_grad_norm=ns.max_grad_norm,
        seed=ns.seed,
        gamma=ns.gamma,
        temperature=ns.temperature,
        kd_reduction=ns.kd_reduction,
        gr_anchor=ns.gr_anchor,
        group_by_length=ns.group_by_length,
        log_every=ns.log_every,
        save_steps=ns.save_steps,
        save_total_limit=ns.save_total_limit,
        device=ns.device,
        progress=not ns.quiet,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="romebert", description=__doc__)
    parser.add_argument("--version", action="version", version=f"romebert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a multi-exit model with one of the four methods")
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

    p = sub.add_parser("predict", help="GLUE test-submission files at an entropy threshold")
    p.add_argument("run")
    p.add_argument("--threshold", type=float, help=f"default: {DEFAULT_THRESHOLD} for entropy (see --criterion)")
    _add_criterion_args(p)
    _add_data_args(p, for_training=False)
    _add_common(p)

    p = sub.add_parser("run", help="train, evaluate every exit, sweep, plot and write test files")
    _add_data_args(p, for_training=True)
    _add_train_args(p)
    _add_common(p)
    p.add_argument("--thresholds", type=_thresholds)
    p.add_argument("--threshold", type=float, help=f"threshold for the test files (entropy: {DEFAULT_THRESHOLD})")
    _add_criterion_args(p)

    from romebert.compare import add_compare_args

    p = sub.add_parser("compare", help="train methods x poolings x seeds on one task and write one report")
    _add_data_args(p, for_training=True)
    add_compare_args(p)
    _add_common(p)
    return parser


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


def _cmd_train(ns) -> dict:
    from romebert.pipeline import train_run

    summary = train_run(_data_spec(ns), _training_arguments(ns), ns.backbone, ns.pooling, ns.resume)
    if not summary["is_main_process"]:
        return summary
    print(
        f"trained {ns.method} on {summary['num_train_examples']} examples in {summary['seconds']:.0f} s; "
        f"model in {summary['model_dir']}/, loss log in {Path(ns.output_dir) / 'train_log.jsonl'}"
    )
    return summary


def _cmd_evaluate(ns) -> dict:
    from romebert.pipeline import evaluate_run

    thresholds = _criterion_thresholds(ns)
    results = evaluate_run(ns.run, thresholds, ns.eval_batch_size, ns.device, _data_override(ns))
    _print_eval(results)
    return results


def _cmd_sweep(ns) -> dict:
    from romebert.modeling import CONFIG_NAME, MultiExitConfig
    from romebert.pipeline import RUN_FILE, DataSpec, sweep_cached
    from romebert.tasks import custom_task, get_task

    data = DataSpec.load(Path(ns.run) / RUN_FILE)
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
    from romebert.pipeline import predict_run

    threshold = _criterion_threshold(ns)
    written = predict_run(ns.run, threshold, ns.eval_batch_size, ns.device, _data_override(ns))
    for w in written:
        print(
            f"test predictions at {getattr(ns, 'criterion', 'entropy')} threshold {ns.threshold}: "
            f"{w['file']} ({w['rows']} rows, "
            f"mean exit layer {w['mean_exit_layer']:.2f})"
        )
    return written


def _cmd_run(ns) -> None:
    t0 = time.perf_counter()
    if not _cmd_train(ns)["is_main_process"]:
        return  # other ranks of a multi-process launch only help train; rank 0 evaluates
    ns.run = ns.output_dir
    for key in ("task", "data_dir", "train_file", "dev_file", "test_file"):
        setattr(ns, key, None)  # evaluate / predict read the data description the run saved
    ns.hub = False
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
    from romebert.pipeline import RUN_FILE, DataSpec

    return bool(DataSpec.load(Path(run) / RUN_FILE).test_files())


def _cmd_compare(ns) -> dict:
    from romebert.compare import config_from_args, run_compare

    return run_compare(config_from_args(ns, _data_spec(ns)))


COMMANDS = {
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
