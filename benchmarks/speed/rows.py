"""Result rows of the inference benchmark, their ratios, the targets, and the Markdown report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

TARGETS = {
    "int8_bs1": 2.0,  # within 1 dev point: engine on ORT int8 vs the full model on ORT int8, batch size 1
    "int8_bs32": 1.8,  # the same at batch size 32
    "ratio_bs1": 0.9,  # batch size 1: (speed-up over the same runtime's full model) / layer speed-up
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
    mean_exit_layer: float
    layer_speedup: float
    ms: dict[str, float] = field(default_factory=dict)  # batch size ("1", "32") -> ms per example
    peak_rss_mib: float | None = None
    vs_same_runtime: dict[str, float] = field(default_factory=dict)  # bs -> full (same runtime) ms / this ms
    vs_ort_int8: dict[str, float] = field(default_factory=dict)  # bs -> full ORT int8 ms / this ms

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_ratios(rows: list[Row]) -> None:
    """Speed-ups against the full model on the same runtime and against the full model on ORT int8."""
    for r in rows:
        full = next(x for x in rows if x.task == r.task and x.kind == "full" and x.runtime == r.runtime)
        int8 = next((x for x in rows if x.task == r.task and x.kind == "full" and x.runtime == "ort-int8"), None)
        for bs, ms in r.ms.items():
            r.vs_same_runtime[bs] = full.ms[bs] / ms
            if int8 is not None:
                r.vs_ort_int8[bs] = int8.ms[bs] / ms


def targets(rows: list[Row], task: str) -> list[dict[str, Any]]:
    """Each target with its measured figure and whether it is met (a missed one is said so)."""
    out = []
    best = [r for r in rows if r.task == task and r.runtime == "ort-int8" and r.target == "<=1pt"]
    for bs, key in (("1", "int8_bs1"), ("32", "int8_bs32")):
        for r in best:
            got = r.vs_ort_int8[bs]
            name = f"{task}: engine on ORT int8 within 1 dev point, batch size {bs}, vs full ORT int8"
            out.append({"target": name, "needed": TARGETS[key], "got": got, "met": got >= TARGETS[key]})
    for r in rows:
        if r.task == task and r.kind == "engine" and "1" in r.ms:
            got = r.vs_same_runtime["1"] / r.layer_speedup
            name = f"{task}: {r.path}, batch size 1, speed-up / layer speed-up"
            out.append({"target": name, "needed": TARGETS["ratio_bs1"], "got": got, "met": got >= TARGETS["ratio_bs1"]})
    return out


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


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
        "optimizer applied, then int8 dynamic quantization for `ort-int8`) or one PyTorch forward. The engine runs "
        "the export's per-layer graphs.",
        "- Thresholds are chosen on dev for each runtime's own model (entropy): the least aggressive reaching "
        "1.5x / 2x / 3x layer speed-up, and `<=1pt`, the fastest within 1 dev point of that runtime's full model.",
        f"- ms/example: median of {report['repeats']} passes, the paths interleaved. Busy cores outside the "
        f"benchmark before it started: {report['busy_before']:.2f}.",
        "",
    ]
    for task in report["tasks"]:
        rows = [Row(**r) for r in report["rows"] if r["task"] == task]
        lines += [f"## {task}", "", "| path | threshold | dev metric | mean exit layer | layer speed-up | "
                  "ms/ex bs 1 | ms/ex bs 32 | x same-runtime full (bs 1 / 32) | x full ORT int8 (bs 1 / 32) | "
                  "peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            thr = "" if r.threshold is None else f"{r.threshold:.4g}"
            lines.append(
                f"| {r.path} | {thr} | {100 * r.metric:.2f} | {r.mean_exit_layer:.2f} | {r.layer_speedup:.2f} | "
                f"{_f(r.ms.get('1'))} | {_f(r.ms.get('32'))} | {_f(r.vs_same_runtime.get('1'))} / "
                f"{_f(r.vs_same_runtime.get('32'))} | {_f(r.vs_ort_int8.get('1'))} / {_f(r.vs_ort_int8.get('32'))} | "
                f"{_f(r.peak_rss_mib, '.0f')} |"
            )
        lines += ["", "### Against the targets", ""]
        for t in report["targets"][task]:
            lines.append(f"- {'met' if t['met'] else 'MISSED'}: {t['target']}: {t['got']:.2f} (needed {t['needed']})")
        b = report["breakdown"].get(task)
        if b:
            lines += ["", "### Where the engine's time goes (ORT int8, batch size 1)", ""]
            lines += [f"- {k}: {v}" for k, v in b.items()]
        lines.append("")
    return "\n".join(lines)
