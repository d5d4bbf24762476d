"""int8 for the export: the recipes ``romebert export --quantize int8`` can apply to the segment graphs, the
one it uses (:data:`DEFAULT_INT8`), and the calibration they share.

A recipe starts from the optimized fp32 graphs. ONNX Runtime's dynamic quantization (int8 weights,
activations quantized per call, per tensor) is fast on CPU, and its error in these encoders comes from
the activations: one token ([CLS]) carries a few input channels 5-15x larger than the rest, and one
scale per tensor then spends most of its 256 levels on them. The default recipe therefore:

* quantizes weights per output channel (``per_channel``);
* shrinks those outlier channels in the int8 input (``outliers``, found on calibration sentences from
  the training split): each is split into m copies of x_c / m, its weight row repeated m times, so that
  it no longer sets the tensor's scale (``split``: outlier channel splitting, OCS); the copies quantize
  alike, so the default folds them into one channel x_c / m with the weight row m w_c (``fold_copies``:
  one node per product, none gathering or appending). The older treatment,
  LLM.int8's decomposition on fixed channels (the channel multiplied in fp32 on the side, a [t, k] x
  [k, N] product, and zeroed in the int8 input), is as accurate and slower: its side product writes
  and sums an output as wide as the product's;
* scales the attention's input channels (``smooth``, SmoothQuant's alpha) since the fused attention's
  input cannot be split or decomposed;
* keeps the embeddings fp32 (a table lookup: int8 saves only file size) and the exit heads' classifiers
  (a few columns: int8 saves nothing), but quantizes the heads' poolers ([H, H], ``poolers_int8``): on
  one row a pooler is a matrix-vector product whose time is reading its weights, fp32 weights as large as
  an encoder product's int8 ones, once per exit. Their weights take one scale per matrix
  (``poolers_per_tensor``): on the quick-start runs no dev prediction moves, and ONNX Runtime's
  per-column output path costs a pooler more than its product;
* computes GELU in its tanh form, ONNX Runtime's FastGelu, in place of the exact (erf) kernel the fp32
  graphs keep (``gelu_tanh``): the two differ by at most 4.7e-4, far below the int8 step of the product
  that reads the GELU's output, and the tanh kernel is faster on CPU;
* can keep the ``fp32_groups`` matrix products whose quantization moves the exits' outputs most
  (measured one at a time on the calibration sentences) in fp32.

The other recipes (ORT's plain dynamic quantization, the recipe optimum applies; static QDQ/QOperator
calibrated by MinMax, Entropy or Percentile) stay available for comparison (``benchmarks/int8_recipes.py``,
results/int8_recipes.md has the per-exit dev figures behind the choice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.deploy.quantizer_logging import quiet_quantizer
from romebert.runtime.encoding import mean_pool_weights
from romebert.runtime.scores import log_softmax

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # input_ids, attention_mask, token_type_ids [b, t] int64
Feeds = list[dict[str, np.ndarray]]  # one graph's inputs, one dict per calibration batch


@dataclass(frozen=True)
class Int8Recipe:
    """How the segment graphs become int8 (see the module docstring)."""

    name: str
    per_channel: bool = True  # one weight scale per output column (else one per matrix)
    calibrate: str | None = None  # static quantization calibrated by "minmax" | "entropy" | "percentile"
    quant_format: str = "qoperator"  # static only: "qdq" | "qoperator"
    outliers: float | None = None  # input channels whose max |x| exceeds this x the median channel's are outliers
    max_outliers: int = 2  # per matrix product
    split: bool = False  # outlier channels split into copies (OCS), not multiplied in fp32 on the side
    fold_copies: bool = False  # with split: the copies as one channel x_c / m, its weight row times m
    smooth: float | None = None  # SmoothQuant's alpha for the attention's input channels
    embeddings_fp32: bool = False
    fp32_groups: int = 0  # the most sensitive matrix products (measured) kept fp32
    heads_fp32: bool = True  # the exit heads' products stay fp32 (on a [b, H] input int8 saves little) ..
    poolers_int8: bool = False  # .. except their square [H, H] ones, the poolers (see the module docstring)
    poolers_per_tensor: bool = False  # with poolers_int8 (dynamic recipes): one weight scale per pooler
    gelu_tanh: bool = False  # the int8 graphs compute GELU in its tanh form (see the module docstring)
    calibration_examples: int = 256

    @property
    def needs_calibration(self) -> bool:
        return bool(self.calibrate or self.outliers or self.smooth or self.fp32_groups)

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "name"}


_OUTLIERS = {"outliers": 4.0, "smooth": 0.6, "embeddings_fp32": True}  # the outlier recipes' shared settings
_FOLDED = {**_OUTLIERS, "split": True, "fold_copies": True, "calibration_examples": 1024}
RECIPES: dict[str, Int8Recipe] = {
    r.name: r
    for r in (
        # ORT's quantize_dynamic with its defaults, what optimum's recipe gives (the benchmark's baseline)
        Int8Recipe("dynamic", per_channel=False, heads_fp32=False),
        Int8Recipe("dynamic-per-channel"),
        Int8Recipe("static-minmax-qdq", calibrate="minmax", quant_format="qdq"),
        Int8Recipe("static-minmax-qoperator", calibrate="minmax"),
        Int8Recipe("static-entropy-qdq", calibrate="entropy", quant_format="qdq"),
        Int8Recipe("static-percentile-qdq", calibrate="percentile", quant_format="qdq"),
        Int8Recipe("per-channel-fp32-4", fp32_groups=4),
        Int8Recipe("per-channel-smooth", smooth=0.6, embeddings_fp32=True),
        # 1,024 calibration sentences: the channels' maxima, and so the outliers and the smoothing, move
        # less from draw to draw than with 256 (results/int8_recipes.md has both, over three draws)
        Int8Recipe("per-channel-outliers", **_OUTLIERS, calibration_examples=1024),
        Int8Recipe("per-channel-outliers-256", **_OUTLIERS),  # the same on 256 sentences
        Int8Recipe("per-channel-outliers-fp32-2", **_OUTLIERS, fp32_groups=2),
        Int8Recipe("per-channel-split", **_OUTLIERS, split=True, calibration_examples=1024),
        Int8Recipe("per-channel-split-folded", **_FOLDED),
        Int8Recipe("per-channel-split-folded-poolers", **_FOLDED, poolers_int8=True),
        Int8Recipe("per-channel-split-folded-poolers-tanh-gelu", **_FOLDED, poolers_int8=True, gelu_tanh=True),
        Int8Recipe(
            "per-channel-split-folded-tensor-poolers-tanh-gelu",
            **_FOLDED,
            poolers_int8=True,
            poolers_per_tensor=True,
            gelu_tanh=True,
        ),  # fmt: skip
    )
}
DEFAULT_INT8 = "per-channel-split-folded-tensor-poolers-tanh-gelu"
BASELINE_INT8 = "dynamic"


def recipe(name: str) -> Int8Recipe:
    if name not in RECIPES:
        raise RomebertError(f"unknown int8 recipe {name!r}; choose one of {list(RECIPES)}")
    return RECIPES[name]


# ------------------------------------------------------------------------------------ running graphs
def _session(model: Any):
    from romebert.runtime.onnx_runtime import new_session, session_options

    src = str(model) if isinstance(model, str | Path) else model.SerializeToString()
    return new_session(src, session_options(None, 1, False))


def first_feeds(batches: Sequence[Batch], mean_pooling: bool) -> Feeds:
    """Segment 1's inputs for each batch (an unused input is dropped by the session's names later)."""
    feeds = []
    for ids, mask, types in batches:
        f = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if mean_pooling:
            f["pool_weights"] = mean_pool_weights(mask)
        feeds.append(f)
    return feeds


def _run(sess, feeds: Feeds) -> tuple[Feeds, list[np.ndarray]]:
    """One segment over every batch -> (the next segment's feeds, this exit's logits per batch)."""
    names = [i.name for i in sess.get_inputs()]
    wanted = [o.name for o in sess.get_outputs() if o.name in ("next_state", "logits")]  # (not nsp)
    nxt, logits = [], []
    for f in feeds:
        outs = dict(zip(wanted, sess.run(wanted, {k: f[k] for k in names}), strict=True))
        logits.append(outs["logits"])
        if "next_state" in outs:
            nxt.append({"state": outs["next_state"], **{k: f[k] for k in ("attention_mask", "pool_weights") if k in f}})
    return nxt, logits


def chain(paths: Sequence[Any], feeds: Feeds, start: int = 0) -> tuple[list[Feeds], list[np.ndarray]]:
    """Segments ``start``.. over ``feeds`` (segment ``start``'s inputs) -> (each segment's input feeds,
    each exit's logits [n, C])."""
    inputs, logits = [], []
    for p in paths[start:]:
        sess = p if hasattr(p, "run") else _session(p)
        inputs.append(feeds)
        feeds, out = _run(sess, feeds)
        logits.append(np.concatenate(out))
    return inputs, logits


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean KL(ref || got) of the softmax over rows of [n, C] logits (regression: mean squared change)."""
    if ref.shape[-1] == 1:
        return float(np.mean((ref - got) ** 2))
    a, b = log_softmax(ref), log_softmax(got)
    return float(np.mean((np.exp(a) * (a - b)).sum(-1)))


# ------------------------------------------------------------------------------------ graph rewrites
# the names of the activation-scaling Mul nodes a rewrite adds before a product "<product>/int8/...":
# SmoothQuant's (the attention's input) and the folded split's
SMOOTH_NODE, SPLIT_NODE = "Smooth", "Split"


def _is_head(node) -> bool:
    """A node of an exit head: it reads the head's weights (``model.exits.<k>.*``), whatever the node's own
    name (the segment graphs name theirs ``/exit/...``)."""
    return any("exits." in x for x in node.input)


def _kept_heads(graph, rec: Int8Recipe) -> list[str]:
    """The exit heads' nodes ``rec`` keeps fp32: all of them, or all but the poolers (a weight [H, H]), or
    none. (ORT's quantizer rewrites a Gemm as MatMul + Add before it quantizes, naming the MatMul
    "<Gemm>_MatMul": both names are listed.)"""
    if not rec.heads_fp32:
        return []
    poolers = set(_poolers(graph)) if rec.poolers_int8 else set()
    return [m for n in graph.node if _is_head(n) and n.name not in poolers for m in (n.name, f"{n.name}_MatMul")]


def _poolers(graph) -> list[str]:
    """The exit heads' poolers (their product's weight is [H, H]), under both names the quantizer may give."""
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}

    def pooler(node) -> bool:
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        return w is not None and len(w) == 2 and w[0] == w[1]

    return [m for n in graph.node if _is_head(n) and pooler(n) for m in (n.name, f"{n.name}_MatMul")]


def _encoder_products(graph) -> list:
    """The encoder's matrix products with a weight: MatMul and fused Attention nodes outside the exits."""
    weights = {t.name for t in graph.initializer}
    return [n for n in graph.node if n.op_type in ("MatMul", "Attention") and not _is_head(n)
            and len(n.input) > 1 and n.input[1] in weights]  # fmt: skip


def channel_max(path: Path, feeds: Feeds) -> dict[str, np.ndarray]:
    """max |x| per input channel of every encoder product's input, over the real tokens of ``feeds``."""
    import onnx

    model = onnx.load(str(path))
    names = sorted({n.input[0] for n in _encoder_products(model.graph)})
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in have)  # fmt: skip
    sess = _session(model)
    inputs = [i.name for i in sess.get_inputs()]
    out: dict[str, np.ndarray] = {}
    for f in feeds:
        real = f["attention_mask"].astype(bool)
        for name, x in zip(names, sess.run(names, {k: f[k] for k in inputs}), strict=True):
            m = np.abs(x[real]).max(0)
            out[name] = np.maximum(out[name], m) if name in out else m
    return out


def rewrite(src: Path, dst: Path, rec: Int8Recipe, ranges: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """The fp32 graph with the recipe's outlier treatment (split or decomposition) and smoothing applied
    (the same function up to rounding); returns {"fp32": names of nodes to keep fp32, "outliers": {node:
    channels}}."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep_fp32, outliers = [], {}
    nodes = []
    products = {n.name for n in _encoder_products(g)} if ranges is not None else set()
    for n in g.node:
        x = n.input[0]
        a = ranges.get(x) if ranges is not None and n.name in products else None
        if a is None:
            nodes.append(n)
            continue
        w_t = inits[n.input[1]]
        w = numpy_helper.to_array(w_t)  # [K, N] (Attention: [K, 3H])
        p = f"{n.name}/int8"
        if n.op_type == "Attention" and rec.smooth:
            s = np.maximum(a, 1e-5) ** rec.smooth / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - rec.smooth)
            s = (s / np.exp(np.log(s).mean())).astype(np.float32)  # geometric mean 1: magnitudes kept
            w_t.CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), w_t.name))
            g.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), f"{p}/inv_scale"))
            nodes.append(helper.make_node("Mul", [x, f"{p}/inv_scale"], [f"{p}/x"], name=f"{p}/{SMOOTH_NODE}"))
            n.input[0] = f"{p}/x"
            nodes.append(n)
            continue
        top = np.argsort(a)[::-1][: rec.max_outliers]
        top = top[a[top] > (rec.outliers or np.inf) * np.median(a)] if n.op_type == "MatMul" else top[:0]
        if top.size == 0:
            nodes.append(n)
            continue
        outliers[n.name] = [int(c) for c in top]
        if rec.split:
            nodes += _split_channels(n, g, w_t, w, a, top, p, rec.fold_copies)
            continue
        mask = np.ones(w.shape[0], np.float32)
        mask[top] = 0.0
        g.initializer.extend([numpy_helper.from_array(mask, f"{p}/keep"),
                              numpy_helper.from_array(top.astype(np.int64), f"{p}/channels"),
                              numpy_helper.from_array(w[top].astype(np.float32), f"{p}/outlier_weight")])  # fmt: skip
        y = n.output[0]
        nodes.append(helper.make_node("Mul", [x, f"{p}/keep"], [f"{p}/x"], name=f"{p}/Keep"))
        nodes.append(helper.make_node("Gather", [x, f"{p}/channels"], [f"{p}/xo"], name=f"{p}/Outliers", axis=-1))
        n.input[0], n.output[0] = f"{p}/x", f"{p}/y"
        nodes.append(n)
        nodes.append(helper.make_node("MatMul", [f"{p}/xo", f"{p}/outlier_weight"], [f"{p}/yo"], name=f"{p}/Fp32"))
        nodes.append(helper.make_node("Add", [f"{p}/y", f"{p}/yo"], [y], name=f"{p}/Sum"))
        keep_fp32.append(f"{p}/Fp32")
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(dst))
    return {"fp32": keep_fp32, "outliers": outliers}


MAX_COPIES = 64  # per split channel: beyond it the channel keeps a coarser step rather than the product growing


def _split_channels(n, g, w_t, w: np.ndarray, a: np.ndarray, top: np.ndarray, p: str, fold: bool) -> list:
    """Outlier channel splitting (Zhao et al., 2019) for product ``n`` (x [.., K] @ w [K, N]): channel c,
    m_c times the largest other channel's max, becomes m_c copies of x_c / m_c (x scaled, then the extra
    copies gathered and appended), and its weight row is repeated m_c times. The product is the same; the
    int8 input's range is the other channels'. Its side nodes touch [.., K] (and the copies), where the
    fp32 side product writes and sums an [.., N] output. ``w_t``: the graph's initializer holding ``w``.

    ``fold``: the m_c copies quantize to the same integer, so they are one channel x_c / m_c whose weight
    row is m_c w_c: one node (the scaling), the product no wider. Its weights differ in their rounding: a
    column whose largest entry becomes m_c w_c gets a coarser int8 step."""
    from onnx import helper, numpy_helper

    level = max(float(np.delete(a, top).max(initial=0.0)), 1e-6 * float(a[top].max()), 1e-30)
    copies = {int(c): int(min(np.ceil(a[c] / level), MAX_COPIES)) for c in top}
    share = np.ones(w.shape[0], np.float32)
    for c, m in copies.items():
        share[c] = 1.0 / m
    x = n.input[0]
    n.input[0] = f"{p}/x"
    g.initializer.append(numpy_helper.from_array(share, f"{p}/share"))
    if fold:
        rows = np.ones(w.shape[0], np.float32)
        rows[list(copies)] = list(copies.values())
        w_t.CopyFrom(numpy_helper.from_array((w * rows[:, None]).astype(np.float32), w_t.name))  # [K, N]
        return [helper.make_node("Mul", [x, f"{p}/share"], [f"{p}/x"], name=f"{p}/{SPLIT_NODE}"), n]
    extra = np.concatenate([np.full(m - 1, c) for c, m in copies.items()]).astype(np.int64)  # [E]
    w_t.CopyFrom(numpy_helper.from_array(np.concatenate([w, w[extra]]).astype(np.float32), w_t.name))  # [K+E, N]
    g.initializer.append(numpy_helper.from_array(extra, f"{p}/copies"))
    return [helper.make_node("Mul", [x, f"{p}/share"], [f"{p}/xs"], name=f"{p}/{SPLIT_NODE}"),
            helper.make_node("Gather", [f"{p}/xs", f"{p}/copies"], [f"{p}/xe"], name=f"{p}/Copies", axis=-1),
            helper.make_node("Concat", [f"{p}/xs", f"{p}/xe"], [f"{p}/x"], name=f"{p}/Append", axis=-1), n]  # fmt: skip


def quantize(src: Path, dst: Path, rec: Int8Recipe, exclude: Sequence[str] = (), only: Sequence[str] | None = None,
             feeds: Feeds | None = None) -> None:  # fmt: skip
    """One graph to int8 by ``rec``; ``exclude``: nodes kept fp32 (so are the exit heads, unless the recipe
    is the baseline's, which quantizes every product as optimum does); ``only``: quantize just
    these nodes (sensitivity); ``feeds``: calibration inputs (static recipes)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    graph = onnx.load(str(src), load_external_data=False).graph
    heads = _kept_heads(graph, rec)
    ops = ["MatMul", "Attention"] + ([] if rec.embeddings_fp32 else ["EmbedLayerNormalization", "Gather"])
    # per-tensor poolers: left out of the per-column pass, quantized in a pass of their own
    later = (
        _poolers(graph)
        if rec.poolers_per_tensor and rec.poolers_int8 and rec.calibrate is None and only is None
        else []
    )
    common = dict(per_channel=rec.per_channel, weight_type=QuantType.QInt8, nodes_to_exclude=[*heads, *exclude, *later],
                  nodes_to_quantize=list(only) if only is not None else None)  # fmt: skip
    if rec.calibrate is None:
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=ops if rec.embeddings_fp32 else None,
                         extra_options=extra, **common)  # fmt: skip
        if later:
            poolers = dst.with_name(f"poolers-{dst.name}")
            quantize_dynamic(str(dst), str(poolers), per_channel=False, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], nodes_to_quantize=later, extra_options=extra)  # fmt: skip
            poolers.replace(dst)
        return
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, quant_pre_process

    if not feeds:
        raise RomebertError(f"int8 recipe {rec.name}: static quantization needs calibration sentences")
    width = max(f["attention_mask"].shape[1] for f in feeds)  # histograms need one shape for every batch
    names = [i.name for i in graph.input]
    padded = [{k: _pad(v, width) for k, v in f.items() if k in names} for f in feeds]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(padded)

        def get_next(self):
            return next(self.it, None)

    pre = dst.with_name(f"pre-{dst.name}")
    quant_pre_process(str(src), str(pre), skip_optimization=True)  # shape inference, as the quantizer asks
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[rec.calibrate]  # fmt: skip
    fmt = QuantFormat.QDQ if rec.quant_format == "qdq" else QuantFormat.QOperator
    try:
        quantize_static(str(pre), str(dst), Reader(), quant_format=fmt, op_types_to_quantize=["MatMul"],
                        activation_type=QuantType.QUInt8, calibrate_method=method, **common)  # fmt: skip
    finally:
        pre.unlink(missing_ok=True)


# ONNX Runtime's exact GELU kernels (erf) -> its tanh form, the same inputs (x, and the bias if any)
TANH_GELU = {"BiasGelu": "FastGelu", "Gelu": "FastGelu"}


def tanh_gelu(path: Path) -> int:
    """Rewrite the graph at ``path`` to compute GELU in its tanh form (``TANH_GELU``); returns how many
    nodes changed. 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) differs from x Phi(x) by at most
    4.7e-4 (near |x| = 2.7)."""
    import onnx

    model = onnx.load(str(path))
    changed = 0
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in TANH_GELU:
            node.op_type, changed = TANH_GELU[node.op_type], changed + 1
    if changed:
        onnx.save(model, str(path))
    return changed


def _pad(x: np.ndarray, width: int) -> np.ndarray:
    return np.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2)) if x.ndim >= 2 else x


# ----------------------------------------------------------------------------------- the whole model
def quantize_segments(fp32: Sequence[Path], out: Sequence[Path], rec: Int8Recipe,
                      calibration: Sequence[Batch] | None, mean_pooling: bool) -> dict[str, Any]:  # fmt: skip
    """Every segment graph ``fp32[i]`` to int8 at ``out[i]`` by ``rec``; returns what the manifest records
    (the recipe, its settings, the calibration size, the outliers and the fp32 nodes per graph)."""
    if rec.needs_calibration and not calibration:
        raise RomebertError(f"int8 recipe {rec.name} needs calibration sentences from the training split")
    record: dict[str, Any] = {"recipe": rec.name, "settings": rec.settings(), "calibration_rows": 0,
                              "outliers": {}, "fp32_nodes": {}}  # fmt: skip
    feeds: list[Feeds] = [[] for _ in fp32]
    prepared = list(fp32)
    with quiet_quantizer() as notes:
        if rec.needs_calibration:
            record["calibration_rows"] = int(sum(b[0].shape[0] for b in calibration or ()))
            prepared = [p.with_name(f"prep-{p.name}") for p in fp32]
            feeds[0] = first_feeds(calibration or (), mean_pooling)
            for i, p in enumerate(fp32):  # each graph rewritten on the inputs the rewritten graphs before it give
                done = rewrite(p, prepared[i], rec, channel_max(p, feeds[i]) if rec.outliers or rec.smooth else None)
                record["outliers"][out[i].name] = done["outliers"]
                record["fp32_nodes"][out[i].name] = done["fp32"]
                if i + 1 < len(fp32):
                    feeds[i + 1] = _run(_session(prepared[i]), feeds[i])[0]
        kept = _most_sensitive(prepared, feeds, rec, out) if rec.fp32_groups else {}
        for i, p in enumerate(prepared):
            exclude = record["fp32_nodes"].get(out[i].name, []) + kept.get(i, [])
            quantize(p, out[i], rec, exclude=exclude, feeds=feeds[i])
            if rec.gelu_tanh:
                tanh_gelu(out[i])
            record["fp32_nodes"][out[i].name] = exclude
    for p in prepared:
        if p not in fp32:
            p.unlink(missing_ok=True)
    if notes:
        record["quantizer_notes"] = notes[:3]
    return record


def _most_sensitive(paths: Sequence[Path], feeds: list[Feeds], rec: Int8Recipe, out: Sequence[Path]):
    """{segment: [node]} of the ``rec.fp32_groups`` encoder products whose quantization alone moves the
    exits' outputs most on the calibration sentences (summed KL over the exits after it)."""
    import onnx

    sessions = [_session(p) for p in paths]
    ref = chain(sessions, feeds[0])[1]
    scores = []
    for i, p in enumerate(paths):
        for node in _encoder_products(onnx.load(str(p), load_external_data=False).graph):
            one = p.with_name(f"one-{p.name}")
            quantize(p, one, rec, only=[node.name], feeds=feeds[i])
            got = chain([one, *sessions[i + 1 :]], feeds[i])[1]
            one.unlink()
            scores.append((sum(_kl(r, q) for r, q in zip(ref[i:], got, strict=True)), i, node.name))
    kept: dict[int, list[str]] = {}
    for _, i, name in sorted(scores, reverse=True)[: rec.fp32_groups]:
        kept.setdefault(i, []).append(name)
    return kept


def calibration_batches(examples: Sequence[Any], tokenizer: Any, max_seq_length: int, rows: int,
                        seed: int = 0, batch_size: int = 32) -> list[Batch]:  # fmt: skip
    """``rows`` examples drawn at random (seeded) from ``examples`` (the training split), tokenized and
    padded in length-sorted batches: the calibration sentences of a recipe."""
    from romebert.runtime.encoding import Collator, encode

    if not examples:
        return []
    pick = np.sort(np.random.default_rng(seed).choice(len(examples), min(rows, len(examples)), replace=False))
    dataset = encode([examples[int(i)] for i in pick], tokenizer, None, max_seq_length)
    order = np.argsort(np.asarray(dataset.lengths), kind="stable")
    collate = Collator(tokenizer, return_tensors="np")
    out = []
    for s in range(0, len(order), batch_size):
        b = collate([dataset[int(i)] for i in order[s : s + batch_size]])
        out.append((b["input_ids"], b["attention_mask"], b.get("token_type_ids", np.zeros_like(b["input_ids"]))))
    return out
