"""Early exit on ONNX Runtime, without torch: an export's segments as ``engine.Segments``.

Needs only onnxruntime, tokenizers and numpy (``pip install romebert[runtime]``). The engine loop, the
policies and the batching are the ones the PyTorch path uses (``engine.py``, ``policies.py``); this
module runs the graphs of ``romebert export`` between the engine's decisions.

A batch of one row takes the export's one-graph early exit instead (``early_exit.onnx``, built by
``deploy/single_row.py``) when the rule is one the graph holds (entropy or maxprob, classification):
one session call instead of one per layer. Its decisions are the engine's (see :meth:`OrtSegments.one_row`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.artefacts import ExportManifest
from romebert.runtime.encoding import mean_pool_weights, unpadded_row
from romebert.runtime.exit_policy import ExitPolicy, threshold_vector
from romebert.runtime.policies import POLICIES

# The one-graph early exit stops a row at exit k when margin >= -GUARD and the host accepts it when
# margin > GUARD (margin: the signed distance of the exit score from the threshold, in float32; with two
# classes the graph tests the gap and the host takes the margin from it, see SINGLE_ROW_GAP_OUTPUTS). Within
# GUARD the host decides with the engine's own float64 numpy scores: the graph's float32 scores (and
# thresholds) are within about 1e-7 of them, far below GUARD.
SINGLE_ROW_GUARD = 1e-5
# the one graph's per-exit parameters, in one input vector EXIT_PARAMS [len(params) * L] in this order (the
# graph cuts it into each exit's scalars: one input and one Split per call). More than two classes: the
# softmax rule's, and USE_MAXPROB [1] bool; two classes: the limit of the test on the logits' gap.
EXIT_PARAMS = "exit_params"
SOFTMAX_PARAMS = ("temperatures", "exit_bias")
GAP_PARAMS = ("exit_limit",)
USE_MAXPROB = "use_maxprob"
SINGLE_ROW_OUTPUTS = ["logits", "exit_layer", "margin"]
# A two-class graph returns exit k's raw logits and raw |z_1 - z_0| (inf at the last exit); the host divides
# by T_k and takes the margin, |gap| / T_k - d_k: the branches hold no arithmetic, and the Split makes L
# scalars, not 3 L. Older two-class exports (their manifest lists no outputs for the graph) take
# GAP_PARAMS_BEFORE and return SINGLE_ROW_OUTPUTS; older still, the parameters were separate inputs and the
# graph also returned the state: the runner feeds and asks by name.
SINGLE_ROW_GAP_OUTPUTS = ["logits", "exit_layer", "abs_gap"]
GAP_PARAMS_BEFORE = (*SOFTMAX_PARAMS, "exit_limit")
# the largest gap between two classes' logits searched for the gap from which a rule takes a row: beyond
# it softmax is 1 and 0 in float64, so a rule that takes no row there takes none at all
_MAX_GAP = 1e3
SINGLE_ROW_CRITERIA = ("entropy", "maxprob")
# ONNX Runtime's session-time fusions that romebert's sessions leave out: its CPU SkipLayerNormalization
# kernel is slower than the residual Add and LayerNormalization it would replace (the export does not fuse
# them either, see deploy/export.py; benchmarks/inference_speed.py times the full model both ways).
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


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

    ``memory_arena``: ONNX Runtime's CPU arena and memory patterns (its defaults) keep the blocks of past
    calls for reuse. An engine calls each graph with ever new shapes (rows leave, batches are trimmed to
    their longest row), so the arenas only grow: peak memory then rises with the number of rows scored
    (results/predict_memory.md). ``OrtSegments`` turns them off, for plain allocations freed after each call.
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
    so.enable_cpu_mem_arena = memory_arena
    so.enable_mem_pattern = memory_arena
    return so


@dataclass
class OrtState:
    """Rows between two segments: the named graph inputs of the next one, all [b, t, ...]."""

    arrays: dict[str, np.ndarray]


class OrtSegments:
    """The graphs of an export, run one segment per layer (``engine.Segments``).

    ``one_graph``: the export's whole-model graph instead (``export --full-graph``), as a single
    "layer" whose exit is the final head: the plain model, run by the same code. ``single_row``: load the
    export's one-graph early exit for batches of one row (a second copy of the weights in memory);
    ``single_row_spinning``: its threads spin briefly between calls, as ONNX Runtime's default does for
    any session: one graph called again and again, like the plain model, is fastest so (docs/inference.md
    has the figures); off, they sleep at once, which leaves the cores to other work on a shared machine.
    ``memory_arena``: see :func:`session_options` (off: memory does not grow with the rows scored). The
    one-row graph always keeps its arena: its calls differ only in the row's length, so the arena holds at
    most one row at the maximum length, and reusing its blocks makes each call faster (docs/inference.md).
    """

    def __init__(
        self,
        folder: str | Path,
        manifest: ExportManifest | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int = 1,
        spinning: bool = False,
        one_graph: bool = False,
        memory_arena: bool = False,
        single_row: bool = True,
        single_row_spinning: bool = True,
    ) -> None:
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
            sess = _load(self.folder / g.file, so)
            got = [i.name for i in sess.get_inputs()]
            if got != g.inputs:
                raise RomebertError(f"{self.folder / g.file}: inputs {got}, the manifest says {g.inputs}")
            self.sessions.append(sess)
        self._runs = [unchecked_run(sess) for sess in self.sessions]
        self._inputs = [g.inputs for g in graphs]
        outputs = [[o.name for o in sess.get_outputs()] for sess in self.sessions]
        # CAP's nsp where every graph gives it (exports made before it existed do not); asked for only when
        # a criterion needs it
        self.features = ("nsp",) if all("nsp" in o for o in outputs) else ()
        plain = [[o for o in names if o != "nsp"] for names in outputs]
        self._outputs = {False: plain, True: [o + ["nsp"] for o in plain]}  # what layer() asks, by `features`
        self._mean = "pool_weights" in self._inputs[0]
        self._unpadded_pool: dict[int, np.ndarray] = {}  # one unpadded row's pool weights, by length
        # the one-row graph, loaded when a batch of one row first comes: a second copy of the weights that
        # a service or a file scored in batches never needs
        self._single: tuple[Any, list[str], Callable] | None = None  # session, input names, run
        self._single_file, self._single_options = None, None
        g = self.manifest.single_row_graph
        if single_row and not one_graph and g is not None and not self.regression:
            self._single_file = self.folder / g.file
            self._single_options = (intra_op_threads, inter_op_threads, single_row_spinning, True)

    def _single_session(self) -> tuple[Callable, list[str]]:
        """(the one-row graph's ``run``, see :func:`unchecked_run`; its input names), loaded on first use."""
        if self._single is None:
            sess = _load(self._single_file, session_options(*self._single_options))
            self._single = sess, [i.name for i in sess.get_inputs()], unchecked_run(sess)
        return self._single[2], self._single[1]

    def one_row(self, policy: ExitPolicy, temperatures: Sequence[float] | None):
        """A runner for batches of one row under ``policy`` through the one-graph early exit, or None when
        the export has none or the rule is not one it holds (then the engine runs the segments).

        ``runner(state) -> (logits [1, C], exit layer)``, or None when the row stopped within
        ``SINGLE_ROW_GUARD`` of a threshold: the graph's float32 score cannot tell that decision, and the
        engine runs the row through the segments, deciding with the policy itself. The row must be unpadded
        (the graph attends to every token): the engine runs any other through the segments.
        """
        name = policy.name
        if self._single_file is None or name not in SINGLE_ROW_CRITERIA or type(policy) is not POLICIES[name]:
            return None
        n = self.num_layers
        temps = np.asarray(temperatures if temperatures is not None else np.ones(n), np.float64)
        gap = USE_MAXPROB not in self.manifest.single_row_graph.inputs  # two classes: the test on the logits' gap
        if gap:
            d = stopping_gaps(policy, n)
            # relative: the gap's float32 rounding grows with it (an exit that takes no row needs none)
            guard = SINGLE_ROW_GUARD * (1.0 + np.abs(np.where(np.isinf(d), 0.0, d)))
            per_exit = {"exit_bias": -d, "exit_limit": temps * (d - guard)}
            gaps = d.tolist()  # Python floats, for the host's margin (see SINGLE_ROW_GAP_OUTPUTS)
            feed = {}
        else:
            guard = np.full(n, SINGLE_ROW_GUARD)
            per_exit = {"exit_bias": threshold_vector(policy.threshold, n) * (-1.0 if name == "maxprob" else 1.0)}
            feed = {USE_MAXPROB: np.array([name == "maxprob"])}
            gaps = []
        # (the final exit's entries, maybe inf, are never read: it takes every row left)
        feed.update({k: v.astype(np.float32) for k, v in {**per_exit, "temperatures": temps}.items()})
        raw = gap and SINGLE_ROW_GAP_OUTPUTS[-1] in self.manifest.single_row_graph.outputs  # see GAP_PARAMS
        params = (GAP_PARAMS if raw else GAP_PARAMS_BEFORE) if gap else SOFTMAX_PARAMS
        feed[EXIT_PARAMS] = np.concatenate([feed[k] for k in params])
        outputs = SINGLE_ROW_GAP_OUTPUTS if raw else SINGLE_ROW_OUTPUTS
        # Python floats: no numpy scalar arithmetic between two graph calls
        guards, ts = guard.tolist(), temps.tolist()
        scales = [np.float32(t) for t in ts] if raw and temperatures is not None else None  # as the engine's

        def run(state: OrtState) -> tuple[np.ndarray, int] | None:
            a = state.arrays
            sess_run, names = self._single_session()
            logits, layer, out = sess_run(outputs, {k: feed[k] if k in feed else a[k] for k in names})
            k = int(layer[0])
            margin = out.item() / ts[k - 1] - gaps[k - 1] if raw else out.item()
            if k < n and not margin > guards[k - 1]:  # (NaN too)
                return None
            return (logits if scales is None else logits / scales[k - 1]), k

        return run

    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None) -> OrtState:
        check_lengths(input_ids, self.manifest.max_seq_length)
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask}
        arrays["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        if self._mean:
            arrays["pool_weights"] = self._pool_weights(attention_mask)
        return OrtState(arrays)

    def _pool_weights(self, mask: np.ndarray) -> np.ndarray:
        """``mean_pool_weights(mask)``; for one unpadded row, kept per length (read-only, the same bits): at
        batch size 1 each numpy call between two graph calls counts."""
        if not unpadded_row(mask):
            return mean_pool_weights(mask)
        w = self._unpadded_pool.get(mask.shape[1])
        if w is None:
            w = self._unpadded_pool[mask.shape[1]] = mean_pool_weights(mask)
            w.setflags(write=False)
        return w

    def layer(self, index: int, state: OrtState, features: bool = False):
        """Segment ``index``: (state, logits [b, C]), and with ``features`` also {"nsp": [b]}."""
        a = state.arrays
        wanted = self._outputs[features][index]
        outs = dict(zip(wanted, self._runs[index](wanted, {n: a[n] for n in self._inputs[index]}), strict=True))
        if "next_state" in outs:
            nxt = {"state": outs["next_state"], "attention_mask": a["attention_mask"]}
            if self._mean:
                nxt["pool_weights"] = a["pool_weights"]
            state = OrtState(nxt)
        # (after the last segment the state is never read again)
        if not features:
            return state, outs["logits"]
        return state, outs["logits"], {"nsp": outs["nsp"]}

    def select(self, state: OrtState, rows: np.ndarray, cols: int) -> OrtState:
        return OrtState({k: np.ascontiguousarray(v[rows, :cols]) for k, v in state.arrays.items()})

    def merge(self, states: Sequence[OrtState], cols: int) -> OrtState:
        keys = states[0].arrays
        return OrtState({k: np.concatenate([_width(s.arrays[k], cols) for s in states]) for k in keys})


def stopping_gaps(policy: ExitPolicy, num_layers: int) -> np.ndarray:
    """For two classes, per exit: the gap |z_1 - z_0| between the (scaled) logits from which ``policy`` (a
    rule on the softmax, monotone in the gap: entropy, maxprob) takes a row; -1 where it takes every row,
    inf where none (the final exit: -1). Found with the policy's own rule, narrowing [0, _MAX_GAP] 64-fold
    a round, to well inside ``SINGLE_ROW_GUARD``."""

    def exits(layer: int, gaps: np.ndarray) -> np.ndarray:
        logits = np.stack([np.zeros_like(gaps), gaps], axis=1)  # [m, 2]
        return policy.step(layer, logits, policy.init_state(len(gaps), num_layers))[0]

    d = np.full(num_layers, -1.0)
    for layer in range(num_layers - 1):
        ends = exits(layer, np.array([0.0, _MAX_GAP]))
        if ends[0] or not ends[1]:
            d[layer] = -1.0 if ends[0] else np.inf
            continue
        lo, hi = 0.0, _MAX_GAP
        for _ in range(8):
            gaps = np.linspace(lo, hi, 65)
            first = int(np.argmax(exits(layer, gaps)))  # (the last one exits, the first does not)
            lo, hi = gaps[first - 1], gaps[first]
        d[layer] = hi
    return d


def new_session(model: str | bytes, so: Any = None) -> Any:
    """An ONNX Runtime CPU session on a graph (its path, or its serialized bytes) as romebert runs them:
    ``so`` (default :func:`session_options`) and without :data:`DISABLED_OPTIMIZERS`."""
    ort = _ort()
    return ort.InferenceSession(model, so or session_options(), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))  # fmt: skip


def unchecked_run(sess: Any) -> Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]:
    """``sess.run(outputs, feed)`` without the Python wrapper's checks on every call (which inputs are
    missing, who owns each OrtValue): they read every input's metadata through the bindings, a share of
    a short graph call at batch size 1 that counts. Only for feeds built from the session's own input
    names, checked once at load (``OrtSegments``). ``sess.run`` itself where the binding is not there."""
    inner = getattr(sess, "_sess", None)
    if inner is None or not callable(getattr(inner, "run", None)):
        return sess.run

    def run(outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return inner.run(outputs, feed, None)

    return run


def _load(path: Path, so):
    try:
        return new_session(str(path), so)
    except Exception as exc:  # ORT raises its own exception types for unreadable graphs
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RomebertError(f"{path}: ONNX Runtime cannot load it ({msg})") from None


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
