"""Early exit on ONNX Runtime, without torch: an export's segments as ``engine.Segments``.

Needs only onnxruntime, tokenizers and numpy (``pip install romebert[runtime]``). The engine loop, the
policies and the batching are the ones the PyTorch path uses (``engine.py``, ``policies.py``); this
module runs the graphs of ``romebert export`` between the engine's decisions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.artefacts import ExportManifest
from romebert.runtime.encoding import mean_pool_weights


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RomebertError("ONNX Runtime is not installed: pip install 'romebert[runtime]'") from exc
    return onnxruntime


def default_threads() -> int:
    """Intra-op threads by default: the cores this process may use (ONNX Runtime's own default counts
    the machine's, which oversubscribes a process pinned to fewer)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def session_options(intra_op_threads: int | None = None, inter_op_threads: int = 1, spinning: bool = True,
                    memory_arena: bool = True):  # fmt: skip
    """ONNX Runtime session options.

    ``spinning``: worker threads spin briefly after a call, waiting for the next one. Good for a single
    graph called again and again (ONNX Runtime's default); bad for an engine, which calls one session
    per layer in turn: each session's threads spin on after its call and steal the cores from the next
    session (docs/inference.md has the figures). ``OrtSegments`` turns it off.
    ``memory_arena``: ONNX Runtime's CPU arena (its default). It keeps the memory of the largest batch
    each session has seen, and it grows as batch shapes vary; a service turns it off so its memory goes
    back to the system between bursts (docs/serving.md).
    """
    ort = _ort()
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = memory_arena
    so.intra_op_num_threads = intra_op_threads or default_threads()
    so.inter_op_num_threads = inter_op_threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT's warnings are about its own optimizer
    return so


@dataclass
class OrtState:
    """Rows between two segments: the named graph inputs of the next one, all [b, t, ...]."""

    arrays: dict[str, np.ndarray]


class OrtSegments:
    """The graphs of an export, run one segment per layer (``engine.Segments``).

    ``one_graph``: the export's whole-model graph instead (``export --full-graph``), as a single
    "layer" whose exit is the final head: the plain model, run by the same code.
    """

    def __init__(
        self,
        folder: str | Path,
        manifest: ExportManifest | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int = 1,
        spinning: bool = False,
        one_graph: bool = False,
        memory_arena: bool = True,
    ) -> None:
        ort = _ort()
        self.folder = Path(folder)
        self.manifest = manifest or ExportManifest.load(self.folder)
        graphs = self.manifest.graphs
        if one_graph:
            if self.manifest.full_graph is None:
                raise RomebertError(f"{self.folder}: has no whole-model graph (export it with --full-graph)")
            graphs = [self.manifest.full_graph]
        self.num_layers = len(graphs)
        self.exit_layers = [self.manifest.num_layers] if one_graph else list(range(1, self.num_layers + 1))
        self.num_labels = self.manifest.num_labels
        self.regression = self.manifest.regression
        so = session_options(intra_op_threads, inter_op_threads, spinning, memory_arena)
        self.sessions = []
        for g in graphs:
            try:
                sess = ort.InferenceSession(str(self.folder / g.file), so, providers=["CPUExecutionProvider"])
            except Exception as exc:  # ORT raises its own exception types for unreadable graphs
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise RomebertError(f"{self.folder / g.file}: ONNX Runtime cannot load it ({msg})") from None
            got = [i.name for i in sess.get_inputs()]
            if got != g.inputs:
                raise RomebertError(f"{self.folder / g.file}: inputs {got}, the manifest says {g.inputs}")
            self.sessions.append(sess)
        self._inputs = [g.inputs for g in graphs]
        self._mean = "pool_weights" in self._inputs[0]

    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None) -> OrtState:
        check_lengths(input_ids, self.manifest.max_seq_length)
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask}
        arrays["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        if self._mean:
            arrays["pool_weights"] = mean_pool_weights(attention_mask)
        return OrtState(arrays)

    def layer(self, index: int, state: OrtState) -> tuple[OrtState, np.ndarray]:
        a = state.arrays
        outs = self.sessions[index].run(None, {name: a[name] for name in self._inputs[index]})
        if len(outs) == 1:  # the last segment: logits only
            return state, outs[0]
        nxt = {"state": outs[0], "attention_mask": a["attention_mask"]}
        if self._mean:
            nxt["pool_weights"] = a["pool_weights"]
        return OrtState(nxt), outs[1]

    def select(self, state: OrtState, rows: np.ndarray, cols: int) -> OrtState:
        return OrtState({k: np.ascontiguousarray(v[rows, :cols]) for k, v in state.arrays.items()})

    def merge(self, states: Sequence[OrtState], cols: int) -> OrtState:
        keys = states[0].arrays
        return OrtState({k: np.concatenate([_width(s.arrays[k], cols) for s in states]) for k in keys})


def _width(x: np.ndarray, cols: int) -> np.ndarray:
    """``x`` [g, t, ...] cut or zero-padded (padding is masked out) to ``cols`` columns."""
    t = x.shape[1]
    if t >= cols:
        return x[:, :cols]
    pad = [(0, 0), (0, cols - t)] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, pad)


def check_lengths(input_ids: np.ndarray, max_seq_length: int) -> None:
    """An input longer than the export's maximum length is refused (it was trained and checked up to it)."""
    if input_ids.shape[1] > max_seq_length:
        raise RomebertError(
            f"an input of {input_ids.shape[1]} tokens is longer than the exported maximum of {max_seq_length}"
        )
