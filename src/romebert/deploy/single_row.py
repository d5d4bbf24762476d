"""The whole early exit for ONE input in one ONNX graph (``early_exit.onnx``), built from the finished
segment graphs.

With one row, the exit decision after layer k belongs to that row alone, so it can be taken inside the
graph: segment k's nodes, then its exit score, then an ``If`` whose then-branch returns exit k's logits
and whose else-branch holds segment k+1 and the next ``If``. One session call runs the input to its exit,
with no per-layer call, no state copied out and back, and one thread pool that stays warm. The segments'
own nodes are copied unchanged (renamed), so the graph computes the segments' logits bit for bit.

Inputs: segment 1's (input_ids, attention_mask, [token_type_ids], [pool_weights]) and
    temperatures [L] float32   exit k's logits are divided by temperatures[k-1] (ones: no calibration)
    exit_bias [L] float64      per exit: t for entropy, -t for maxprob (the host fills it from the policy)
    use_maxprob [1] bool
Outputs:
    logits [1, C] float32      the (scaled) logits of the exit the graph stopped at
    exit_layer [1] int64       that exit, 1-based
    margin [1] float64         entropy: t - H; maxprob: p_max - t (the rule exits when it is > 0)
    state [1, t, H] float32    the next segment's input there (empty after the last layer)

The graph stops at exit k when ``margin >= -GUARD``. The host (``runtime/onnx_runtime.py``) accepts the
exit when ``margin > GUARD``; within ``GUARD`` of the threshold it decides with the engine's own numpy
scores and, if the row goes on, continues with the segment graphs from ``state``. ORT's and numpy's
float64 softmax may differ in the last bits, so this keeps every decision the engine's, ties included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.artefacts import ExportManifest
from romebert.runtime.onnx_runtime import SINGLE_ROW_GUARD, SINGLE_ROW_INPUTS

SINGLE_ROW_FILE = "early_exit.onnx"
_TOP = ("input_ids", "attention_mask", "token_type_ids", "pool_weights", *SINGLE_ROW_INPUTS)


def build_single_row(folder: Path, manifest: ExportManifest, out: Path) -> None:
    """Write the one-graph early exit of the export in ``folder`` (its segment graphs) to ``out``."""
    import onnx
    from onnx import TensorProto, helper

    if manifest.regression:
        raise RomebertError("the one-graph early exit is for classification (entropy and maxprob)")
    segs = [onnx.load(str(folder / g.file)) for g in manifest.graphs]
    n = len(segs)
    first = segs[0].graph
    inputs = [i for i in first.input if i.name in manifest.graphs[0].inputs]
    inputs += [helper.make_tensor_value_info("temperatures", TensorProto.FLOAT, [n]),
               helper.make_tensor_value_info("exit_bias", TensorProto.DOUBLE, [n]),
               helper.make_tensor_value_info("use_maxprob", TensorProto.BOOL, [1])]  # fmt: skip
    top = [helper.make_node("Split", ["temperatures"], [f"temperature/{k}" for k in range(1, n + 1)], axis=0),
           helper.make_node("Split", ["exit_bias"], [f"bias/{k}" for k in range(1, n + 1)], axis=0),
           _const("guard", TensorProto.DOUBLE, [], [-SINGLE_ROW_GUARD])]  # fmt: skip
    if manifest.opset >= 18:  # Split takes its output count as an attribute from opset 18
        for node in top[:2]:
            node.attribute.append(helper.make_attribute("num_outputs", n))
    outputs = ["logits", "exit_layer", "margin", "state"]
    nodes, inits, infos = _level(1, segs, outputs, manifest.opset)
    types = (TensorProto.FLOAT, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT)
    graph = helper.make_graph(top + nodes, "early_exit", inputs,
                              [helper.make_tensor_value_info(o, t, None) for o, t in zip(outputs, types, strict=True)],
                              initializer=inits, value_info=infos)  # fmt: skip
    opsets: dict[str, int] = {}
    for s in segs:
        for o in s.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="romebert")  # fmt: skip
    model.ir_version = max(s.ir_version for s in segs)
    onnx.save(model, str(out))


def _renamed(k: int, seg) -> tuple[list, list, list]:
    """Segment k's nodes, initializers and value infos with every name of its own prefixed ``s{k}/``; its
    inputs are the top graph's (mask, pool weights, ...) or, for ``state``, segment k-1's output."""
    g = seg.graph

    def name(x: str) -> str:
        if not x:
            return x
        if x == "state":
            return f"s{k - 1}/next_state"
        return x if x in _TOP else f"s{k}/{x}"

    nodes = []
    for node in g.node:
        node.input[:] = [name(x) for x in node.input]
        node.output[:] = [name(x) for x in node.output]
        if node.name:
            node.name = f"s{k}/{node.name}"
        nodes.append(node)
    for t in g.initializer:
        t.name = name(t.name)
    for v in g.value_info:
        v.name = name(v.name)
    return nodes, list(g.initializer), list(g.value_info)


def _level(k: int, segs: list, outs: list[str], opset: int) -> tuple[list, list, list]:
    """Nodes, initializers, value infos of the graph running segment k and, unless exit k stops the row,
    segments k+1.. (nested); its outputs are named ``outs``."""
    from onnx import TensorProto, helper

    n = len(segs)
    nodes, inits, infos = _renamed(k, segs[k - 1])
    p = f"s{k}"
    nodes.append(helper.make_node("Div", [f"{p}/logits", f"temperature/{k}"], [f"{p}/scaled"]))
    if k == n:  # the final head takes the row: no decision
        nodes += [helper.make_node("Identity", [f"{p}/scaled"], [outs[0]]),
                  _const(outs[1], TensorProto.INT64, [1], [k]),
                  _const(outs[2], TensorProto.DOUBLE, [1], [np.inf]),
                  _const(outs[3], TensorProto.FLOAT, [1, 0, 1], [])]  # fmt: skip
        return nodes, inits, infos
    nodes += [
        helper.make_node("Cast", [f"{p}/scaled"], [f"{p}/x"], to=TensorProto.DOUBLE),
        helper.make_node("Softmax", [f"{p}/x"], [f"{p}/p"], axis=-1),
        helper.make_node("LogSoftmax", [f"{p}/x"], [f"{p}/logp"], axis=-1),
        helper.make_node("Mul", [f"{p}/p", f"{p}/logp"], [f"{p}/plogp"]),
        helper.make_node("ReduceSum", [f"{p}/plogp", "axis/last"], [f"{p}/neg_entropy"], keepdims=0),
        helper.make_node("ReduceMax", [f"{p}/p", "axis/last"], [f"{p}/maxprob"], keepdims=0)
        if opset >= 18
        else helper.make_node("ReduceMax", [f"{p}/p"], [f"{p}/maxprob"], axes=[-1], keepdims=0),
        helper.make_node("Where", ["use_maxprob", f"{p}/maxprob", f"{p}/neg_entropy"], [f"{p}/score"]),
        helper.make_node("Add", [f"{p}/score", f"bias/{k}"], [f"{p}/margin"]),
        helper.make_node("GreaterOrEqual", [f"{p}/margin", "guard"], [f"{p}/stop"]),
    ]
    if k == 1:
        nodes.insert(0, _const("axis/last", TensorProto.INT64, [1], [-1]))
    t = f"then{k}"
    then = helper.make_graph(
        [helper.make_node("Identity", [f"{p}/scaled"], [f"{t}/logits"]),
         _const(f"{t}/exit_layer", TensorProto.INT64, [1], [k]),
         helper.make_node("Identity", [f"{p}/margin"], [f"{t}/margin"]),
         helper.make_node("Identity", [f"{p}/next_state"], [f"{t}/state"])],
        t, [], _infos([f"{t}/logits", f"{t}/exit_layer", f"{t}/margin", f"{t}/state"]))  # fmt: skip
    e = f"else{k}"
    sub_outs = [f"{e}/logits", f"{e}/exit_layer", f"{e}/margin", f"{e}/state"]
    sub_nodes, sub_inits, sub_infos = _level(k + 1, segs, sub_outs, opset)
    other = helper.make_graph(sub_nodes, e, [], _infos(sub_outs), initializer=sub_inits, value_info=sub_infos)
    nodes.append(helper.make_node("If", [f"{p}/stop"], outs, then_branch=then, else_branch=other))
    return nodes, inits, infos


def _infos(names: list[str]) -> list:
    from onnx import TensorProto, helper

    types = (TensorProto.FLOAT, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT)
    return [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types, strict=True)]


def _const(name: str, dtype: int, dims: list[int], values: list):
    from onnx import helper

    return helper.make_node("Constant", [], [name], value=helper.make_tensor(f"{name}/value", dtype, dims, values))
