"""What the benchmark times: the full model and the early-exit engine, on PyTorch and ONNX Runtime.

A *path* runs pre-tokenized batches (tokenization is left out of every path alike) and gives its dev
predictions. Full-model paths run the final head only, as a plain classifier would; an ONNX Runtime full
graph is timed under each session setting (spinning threads on and off), the benchmark's baseline being
the faster. Engine paths run ``EarlyExitEngine`` (``run`` per batch at batch size 1, which takes the
export's one-graph early exit where it applies; ``run_stream`` with refill above, as ``predict`` does) at
a threshold chosen on dev for that path's own model. A ``variant`` runs batch size 1 otherwise, for
comparison: through the per-layer graphs (the path before the one-graph early exit), or through the one
graph with spinning threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from romebert.runtime.engine import EarlyExitEngine, dataset_exit_logits
from romebert.runtime.exit_policy import ExitPolicy
from romebert.runtime.onnx_runtime import OrtSegments, session_options

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]
RUNTIMES = ("torch", "ort-fp32", "ort-int8")


@dataclass
class Path_:
    """One timed path. ``run_one(batch)`` serves a batch; ``run_many(batches, bs)`` serves a data set."""

    name: str
    runtime: str
    kind: str  # "full" | "engine"
    run_one: Callable[[Batch], np.ndarray]  # -> logits [b, C] (engine: the chosen exit's)
    run_many: Callable[[Sequence[Batch], int], Any]
    target: str = ""  # engine: what its threshold was chosen for ("1.5x", "2x", "3x", "<=1pt")
    policy: ExitPolicy | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ runtimes
class Runtime:
    """A runtime's two models: the full model (one graph / one forward; one callable per session setting,
    labelled) and the segments (``per_layer``: the same export without its one-graph early exit)."""

    def __init__(self, name: str, segments: Any, fulls: dict[str, Callable[[Batch], np.ndarray]],
                 variants: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.name, self.segments, self.fulls = name, segments, fulls
        self.variants = variants or {}  # label -> the same export run otherwise at batch size 1

    @property
    def per_layer(self) -> Any:
        return self.variants.get(PER_LAYER)

    @property
    def full(self) -> Callable[[Batch], np.ndarray]:
        return next(iter(self.fulls.values()))

    def dev_logits(self, dataset, collator, batch_size: int = 64) -> np.ndarray:
        return dataset_exit_logits(self.segments, dataset, collator, batch_size)


def torch_runtime(model) -> Runtime:
    import torch

    model.eval()

    @torch.inference_mode()
    def full(batch: Batch) -> np.ndarray:
        ids, mask, types = (torch.from_numpy(a) for a in batch)
        hidden = model.embed(ids, types, mask)
        inputs = model.layer_inputs(hidden, mask)
        for i in range(model.num_layers):
            hidden = model.run_layer(i, hidden, inputs)
        return model.exits[-1](model.exit_input(hidden), mask).numpy()

    return Runtime("torch", model, {"": full})


FULL_SETTINGS = {"spinning": True, "no spinning": False}  # the full graph's session settings tried
PER_LAYER = "per-layer graphs at bs 1"  # batch size 1 through the per-layer graphs, as before the one graph
NO_SPIN = "one graph without spinning at bs 1"  # the one graph's other session setting


def ort_runtime(name: str, segments_dir: Path, full_graph: Path, threads: int | None) -> Runtime:
    """The full graph under each of ``FULL_SETTINGS`` (ONNX Runtime's default spins its threads: best for
    one graph called again and again, but not always), and the export's segments as ``OrtSegments`` runs
    them (no spinning between per-layer graphs; the one-graph early exit spins, see OrtSegments)."""
    import onnxruntime as ort

    fulls = {}
    for label, spinning in FULL_SETTINGS.items():
        sess = ort.InferenceSession(str(full_graph), session_options(threads, 1, spinning),
                                    providers=["CPUExecutionProvider"])  # fmt: skip
        fulls[label] = _full_call(sess)
    variants = {PER_LAYER: OrtSegments(segments_dir, intra_op_threads=threads, single_row=False),
                NO_SPIN: OrtSegments(segments_dir, intra_op_threads=threads, single_row_spinning=False)}  # fmt: skip
    return Runtime(name, OrtSegments(segments_dir, intra_op_threads=threads), fulls, variants)


ROMEBERT_FUSIONS = "spinning, romebert's fusions"  # the label of the full graph run as romebert runs graphs


# ------------------------------------------------------------------------------------------ paths
def romebert_fusions_path(runtime: str, graph: Path, threads: int | None) -> Path_:
    """The full graph (exported without SkipLayerNormalization) in a session as romebert opens them
    (``onnx_runtime.new_session``), threads spinning. Kind ``full-alt``: reported, never the baseline."""
    from romebert.runtime.onnx_runtime import new_session

    full = _full_call(new_session(str(graph), session_options(threads, 1, True)))
    return Path_(f"full / {runtime} ({ROMEBERT_FUSIONS})", runtime, "full-alt", full, _many(full),
                 extra={"settings": ROMEBERT_FUSIONS})  # fmt: skip


def full_paths(rt: Runtime) -> list[Path_]:
    """One path per session setting of the runtime's full model."""
    paths = []
    for label, fn in rt.fulls.items():
        name = f"full / {rt.name}" + (f" ({label})" if label else "")
        paths.append(Path_(name, rt.name, "full", fn, _many(fn), extra={"settings": label}))
    return paths


def _full_call(sess: Any) -> Callable[[Batch], np.ndarray]:
    """A full graph's session as a callable on one batch -> logits."""

    def full(batch: Batch) -> np.ndarray:
        ids, mask, types = batch
        return sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]

    return full


def _many(full: Callable[[Batch], np.ndarray]) -> Callable[[Sequence[Batch], int], np.ndarray]:
    """A full model over a data set: its batches one by one, logits concatenated."""

    def many(batches: Sequence[Batch], bs: int) -> np.ndarray:
        return np.concatenate([full(b) for b in batches])

    return many


def engine_path(rt: Runtime, policy: ExitPolicy, target: str, variant: str = "") -> Path_:
    """The engine at a threshold; ``variant``: one of the runtime's other ways to run batch size 1."""
    engine = EarlyExitEngine(rt.variants[variant] if variant else rt.segments, policy)

    def one(batch: Batch) -> np.ndarray:
        return engine.run(*batch).logits

    def many(batches: Sequence[Batch], bs: int):
        return engine.run_stream(batches, bs)

    def exit_layer(batch: Batch) -> int:  # the exit a batch of one row leaves at, run as timed
        return int(engine.run(*batch).exit_layer[0])

    name = f"engine {target} / {rt.name}" + (f" ({variant})" if variant else "")
    return Path_(name, rt.name, "engine", one, many, target, policy, {"variant": variant, "exit_layer": exit_layer})


class TimedSegments:
    """``OrtSegments`` that add up the seconds spent inside the graph calls (the rest of an engine's
    time is host work: decisions, compaction, bookkeeping)."""

    def __init__(self, segments: OrtSegments) -> None:
        self.inner = segments
        self.num_layers, self.num_labels, self.regression, self.exit_layers = (
            segments.num_layers,
            segments.num_labels,
            segments.regression,
            segments.exit_layers,
        )
        self.graph_seconds = 0.0
        self.calls = 0

    def start(self, *a):
        return self.inner.start(*a)

    def layer(self, index, state):
        t0 = time.perf_counter()
        out = self.inner.layer(index, state)
        self.graph_seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def select(self, *a):
        return self.inner.select(*a)

    def merge(self, *a):
        return self.inner.merge(*a)
