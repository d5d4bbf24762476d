"""Result rows of the inference benchmark, their ratios, the targets, and the Markdown report."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

TARGETS = {
    "int8_bs1": 2.0,  # within 1 dev point of fp32: engine on ORT int8 vs the full model on ORT int8, batch size 1
    "int8_bs32": 1.8,  # the same at batch size 32
    "ratio_bs1": 0.9,  # batch size 1: (speed-up over the full ORT int8 model) / layer speed-up of the inputs timed
}


@dataclass
class Row:
    task: str
    path: str
    runtime: str
    kind: str
    target: str
    threshold: Any
    metric: float  # dev metric of this path's own predictions (fraction)
    mean_exit_layer: float  # over the whole dev split, as run in batches of 32
    layer_speedup: float
    ms: dict[str, float] = field(default_factory=dict)  # batch size ("1", "32") -> ms per example, median pass
    peak_rss_mib: float | None = None
    vs_same_runtime: dict[str, float] = field(default_factory=dict)  # bs -> fastest full (same runtime) ms / this ms
    vs_ort_int8: dict[str, float] = field(default_factory=dict)  # bs -> fastest full ORT int8 ms / this ms
    fp32_metric: float | None = None  # the fp32 (PyTorch) full model's dev metric: what the user trained
    passes: dict[str, list[float]] = field(default_factory=dict)  # bs -> ms per example of every pass
    settings: str = ""  # full graphs: the session setting; engines: "per-layer graphs at bs 1" or ""
    # engines: the layer speed-up of the inputs timed at batch size 1 (a subset of dev), each run alone as timed:
    # what the batch-size-1 speed-up is set against (the dev split's own can differ: other inputs, other exits)
    bs1_layer_speedup: float | None = None
    # engines: a zero-overhead early exit's speed-up on those inputs (each one's baseline time x exit / L)
    bs1_ideal_speedup: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_times(row: Row, bs: str, seconds: list[float], examples: int) -> None:
    row.passes[bs] = [1e3 * s / examples for s in seconds]
    row.ms[bs] = statistics.median(row.passes[bs])


def fastest_full(rows: list[Row], task: str, runtime: str, bs: str) -> Row | None:
    """The full-model row of ``runtime`` with the lowest median at ``bs`` (its best session setting)."""
    full = [r for r in rows if r.task == task and r.kind == "full" and r.runtime == runtime and bs in r.ms]
    return min(full, key=lambda r: r.ms[bs]) if full else None


def add_ratios(rows: list[Row]) -> None:
    """Speed-ups against the same runtime's full model and against the full model on ORT int8, each
    under its best session setting at that batch size."""
    for r in rows:
        for bs, ms in r.ms.items():
            same = fastest_full(rows, r.task, r.runtime, bs)
            int8 = fastest_full(rows, r.task, "ort-int8", bs)
            r.vs_same_runtime[bs] = same.ms[bs] / ms
            if int8 is not None:
                r.vs_ort_int8[bs] = int8.ms[bs] / ms


def targets(rows: list[Row], task: str) -> list[dict[str, Any]]:
    """Each target with its measured figure and whether it is met (a missed one is said so). All are
    against the full ORT int8 model at its best session setting."""
    out = []
    best = _within_1pt(rows, task)
    for bs, key in (("1", "int8_bs1"), ("32", "int8_bs32")):
        for r in best:
            got = r.vs_ort_int8[bs]
            name = f"{task}: engine on ORT int8 within 1 dev point of fp32, batch size {bs}, vs full ORT int8"
            out.append({"target": name, "needed": TARGETS[key], "got": got, "met": got >= TARGETS[key]})
    for r in rows:
        if r.task == task and r.runtime == "ort-int8" and r.kind == "engine" and "1" in r.ms:
            got = r.vs_ort_int8["1"] / r.bs1_layer_speedup
            name = f"{task}: {r.path}, batch size 1, speed-up over full ORT int8 / layer speed-up (same inputs)"
            out.append({"target": name, "needed": TARGETS["ratio_bs1"], "got": got, "met": got >= TARGETS["ratio_bs1"]})
    return out


def _within_1pt(rows: list[Row], task: str) -> list[Row]:
    """The engine's ORT int8 row at the <=1pt threshold, run its default way (no variant)."""
    return [r for r in rows if r.task == task and r.runtime == "ort-int8" and r.target == "<=1pt" and not r.settings]


def against_romebert_fusions(rows: list[Row], task: str) -> list[str]:
    """The <=1pt engine against the full model run with romebert's fusions (the ``full-alt`` row): the part
    of the speed-up that is early exit alone. Reported, not a target."""
    alt = [r for r in rows if r.task == task and r.kind == "full-alt"]
    best = _within_1pt(rows, task)
    out = []
    for a in alt:
        for r in best:
            got = " / ".join(f"{a.ms[bs] / r.ms[bs]:.2f}" if bs in a.ms and bs in r.ms else "n/a" for bs in ("1", "32"))
            out.append(f"{r.path} against {a.path} (not the baseline; batch size 1 / 32): {got}")
    return out


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _spread(r: Row, bs: str) -> str:
    p = r.passes.get(bs)
    return "" if not p else f"{min(p):.2f} / {statistics.median(p):.2f} / {max(p):.2f}"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Inference speed: early exit against the full model, on PyTorch and ONNX Runtime",
        "",
        f"Measured {report['created']} with `{report['command']}`.",
        "",
        f"- Machine: {env['cpu']}, {env['cpu_count']} logical CPUs ({env['cpus_usable']} usable); "
        f"{report['threads']} threads for every runtime. Versions: romebert {env['romebert']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, onnxruntime {env['onnxruntime']}, numpy {env['numpy']}.",
        f"- Models: {', '.join(report['models'])}.",
        "- Inputs are tokenized beforehand; no path's time includes tokenization. Batch size 1: the first "
        f"{report['bs1_examples']} dev inputs in file order, one per call. Batch size 32: the whole dev split, "
        "length-sorted; the engine refills batches across layers (`run_stream`, as `predict` does).",
        "- Full model = every layer and the final head only, in one ONNX graph (ONNX Runtime's transformer "
        "optimizer applied; for `ort-int8` then `quantize_dynamic` with its defaults, optimum's recipe) or one "
        "PyTorch forward. ONNX Runtime full graphs are timed with spinning threads and without; the baseline of "
        "every ratio is the faster of the two at each batch size (its best session setting). Their spread over "
        'passes is given as min / median / max. The row marked "romebert\'s fusions" is the same graph and '
        "recipe exported and run as romebert runs its graphs (no SkipLayerNormalization, whose CPU kernel is "
        "slow); it is not the baseline, and shows how much of the engine's speed-up a plain model could also have.",
        "- The engine runs the export (`ort-int8`: the default int8 recipe, docs/inference.md). At batch size 1 it "
        "takes the one-graph early exit (`early_exit.onnx`, one session call per input, threads spinning, as in "
        'the full graph\'s best setting); the rows marked "per-layer graphs at bs 1" and "one graph without '
        'spinning at bs 1" run the same threshold those ways instead.',
        "- Layer speed-up: the number of layers over the mean exit layer, on the whole dev split in batches of "
        '32, and ("bs 1 inputs") on the inputs timed at batch size 1, each run alone as timed; a batch-size-1 '
        "speed-up is set against the latter, since those inputs exit at other layers than the split's mean.",
        "- Thresholds are chosen on dev for each runtime's own model (entropy): the least aggressive reaching "
        "1.5x / 2x / 3x layer speed-up, and `<=1pt`, the fastest within 1 dev point of the fp32 model's final "
        "exit (the model the user trained), on dev logits computed 32 rows a batch. Every row shows that fp32 metric "
        "and its own difference from it; an int8 row's own metric can differ from the one its threshold was chosen "
        "with, since int8 takes one activation scale per batch and the engine's batches differ.",
        f"- ms/example: median of {report['repeats']} passes, the paths interleaved, each pass after "
        f"{report.get('settle_seconds', 0):g} s idle (a session whose threads spin keeps them spinning some 20-30 ms "
        "after its last call, which would slow the next path's first calls). Busy cores outside the "
        f"benchmark before it started: {report['busy_before']:.2f}.",
        "",
    ]
    for task in report["tasks"]:
        rows = [Row(**r) for r in report["rows"] if r["task"] == task]
        header = ("| path | threshold | dev metric | fp32 full metric (diff) | mean exit layer | layer speed-up | "
                  "layer speed-up, bs 1 inputs | ms/ex bs 1 | ms/ex bs 32 | x same-runtime full (bs 1 / 32) | "
                  "x full ORT int8 (bs 1 / 32) | peak RSS MiB |")  # fmt: skip
        lines += [f"## {task}", "", header, "|---" * 12 + "|"]
        for r in rows:
            thr = "" if r.threshold is None else f"{r.threshold:.4g}"
            diff = "" if r.fp32_metric is None else f" ({100 * (r.metric - r.fp32_metric):+.2f})"
            fp32 = "" if r.fp32_metric is None else f"{100 * r.fp32_metric:.2f}{diff}"
            lines.append(
                f"| {r.path} | {thr} | {100 * r.metric:.2f} | {fp32} | {r.mean_exit_layer:.2f} | "
                f"{r.layer_speedup:.2f} | {_f(r.bs1_layer_speedup)} | {_f(r.ms.get('1'))} | {_f(r.ms.get('32'))} | "
                f"{_f(r.vs_same_runtime.get('1'))} / {_f(r.vs_same_runtime.get('32'))} | "
                f"{_f(r.vs_ort_int8.get('1'))} / {_f(r.vs_ort_int8.get('32'))} | {_f(r.peak_rss_mib, '.0f')} |"
            )
        full = [r for r in rows if r.kind in ("full", "full-alt")]
        lines += ["", "Full models, ms/example over the passes (min / median / max):", "",
                  "| path | bs 1 | bs 32 |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {r.path} | {_spread(r, '1')} | {_spread(r, '32')} |" for r in full]
        base = {bs: fastest_full(rows, task, "ort-int8", bs) for bs in ("1", "32")}
        said = [f"batch size {bs}: {b.settings} ({b.ms[bs]:.2f} ms/ex)" for bs, b in base.items() if b is not None]
        lines += ["", "Baseline (full ORT int8, best session setting): " + ", ".join(said) + "."]
        lines += ["", "### Against the targets", ""]
        for t in report["targets"][task]:
            lines.append(f"- {'met' if t['met'] else 'MISSED'}: {t['target']}: {t['got']:.2f} (needed {t['needed']})")
        lines += [f"- for comparison: {line}" for line in against_romebert_fusions(rows, task)]
        lines += [f"- for comparison: {r.path}, batch size 1, speed-up over full ORT int8 / a zero-overhead early "
                  f"exit's on the same inputs (each input's baseline time x its exit / L; "
                  f"{r.bs1_ideal_speedup:.2f}x): {r.vs_ort_int8['1'] / r.bs1_ideal_speedup:.2f}"
                  for r in rows if r.runtime == "ort-int8" and r.bs1_ideal_speedup and not r.settings]  # fmt: skip
        b = report["breakdown"].get(task)
        if b:
            lines += ["", "### Where the engine's time goes (ORT int8, batch size 1)", ""]
            lines += [f"- {k}: {v}" for k, v in b.items()]
        lines.append("")
    return "\n".join(lines)
