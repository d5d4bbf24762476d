"""The whole early exit for ONE input in one ONNX graph (``early_exit.onnx``), built from the finished
segment graphs.

With one row, the exit decision after layer k belongs to that row alone, so it can be taken inside the
graph: segment k's nodes, then its exit test, then an ``If`` whose then-branch returns exit k's logits
and whose else-branch holds segment k+1 and the next ``If``. One session call runs the input to its exit,
with no per-layer call, no state copied out and back, and one thread pool that stays warm. The segments'
own nodes are copied unchanged (renamed), so the graph computes the segments' logits bit for bit.

The graph is for one unpadded row (the engine cuts trailing padding; a row with other padding goes
through the segments): its fused attentions take no mask, and attention_mask is no input unless another
operator reads it (:func:`_attend_to_all`).

Inputs: segment 1's (input_ids, [attention_mask], [token_type_ids], [pool_weights]) and
    exit_params [P * L] float32  P per-exit vectors, one after the other (``onnx_runtime.SOFTMAX_PARAMS``
                                 or ``GAP_PARAMS``), cut into each exit's scalars by one Split:
        temperatures             more than two classes: exit k's logits are divided by temperatures[k-1]
        exit_bias                more than two classes: per exit, from the policy (below)
        exit_limit               two classes: the stop test's limit on the raw logits' gap
    use_maxprob [1] bool         more than two classes: the rule is maxprob (else entropy)
Outputs, more than two classes (``SINGLE_ROW_OUTPUTS``):
    logits [1, C] float32      the scaled logits of the exit the graph stopped at
    exit_layer [1] int64       that exit, 1-based
    margin [1] float32         how far past the threshold the row was there (the rule exits when > 0)
two classes (``SINGLE_ROW_GAP_OUTPUTS``): logits (raw), exit_layer, abs_gap [1] float32 (|z_1 - z_0|,
raw; inf at the last exit).

More than two classes: exit_bias is t for entropy and -t for maxprob, the margin entropy: t - H;
maxprob: p_max - t, and the graph stops at exit k when ``margin >= -GUARD``. Two classes: both rules
depend on the scaled logits' gap |z_1 - z_0| alone, and take a row from a gap d_k on (the host finds d_k
with the policy's own rule: ``runtime/onnx_runtime.py``). The test is then |raw gap| >= exit_limit[k-1]
(T_k (d_k - guard_k)), three kernels instead of nine; the branch that returns hands the raw logits and
gap to the host, which divides by T_k (as the engine does) and takes the margin |raw gap| / T_k - d_k: no
kernel in the branch, and the Split cuts L limits, not 3 L parameters. (Older exports took the margin
and scaled in the graph: ``onnx_runtime.GAP_PARAMS_BEFORE``; the runtime runs either.)

The host accepts the exit when the margin exceeds its guard; within it (about one decision in 10^5) it
runs the row through the segment graphs instead, where the engine decides with its own numpy scores
(float64). The graph's float32 arithmetic is within about 1e-7 (relative) of the engine's, far inside the
guard, so every decision is the engine's, ties included. (Few kernels per exit: at batch size 1 each
kernel call counts.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.artefacts import ExportManifest
from romebert.runtime.onnx_runtime import (
    EXIT_PARAMS,
    GAP_PARAMS,
    SINGLE_ROW_GAP_OUTPUTS,
    SINGLE_ROW_GUARD,
    SINGLE_ROW_OUTPUTS,
    SOFTMAX_PARAMS,
    USE_MAXPROB,
)

SINGLE_ROW_FILE = "early_exit.onnx"
_TOP = ("input_ids", "attention_mask", "token_type_ids", "pool_weights")  # segment 1's inputs, read by every segment
_OWN = ("next_state", "logits")  # each segment's outputs, read by name by the levels: never taken from another


def build_single_row(folder: Path, manifest: ExportManifest, out: Path) -> None:
    """Write the one-graph early exit of the export in ``folder`` (its segment graphs) to ``out``."""
    import onnx
    from onnx import TensorProto, helper

    if manifest.regression:
        raise RomebertError("the one-graph early exit is for classification (entropy and maxprob)")
    gap = manifest.num_labels == 2  # two classes: the stop test on the logits' gap
    segs = [onnx.load(str(folder / g.file)) for g in manifest.graphs]
    for seg in segs:
        _pool_one_row(seg.graph, manifest.opset)
        _attend_to_all(seg.graph)
    n = len(segs)
    first = segs[0].graph
    outputs = SINGLE_ROW_GAP_OUTPUTS if gap else SINGLE_ROW_OUTPUTS
    nodes, inits, infos = _level(1, segs, outputs, manifest.opset, gap, {})
    read = _read(nodes)  # (the mask, once no fused op reads it, is no input)
    inputs = [i for i in first.input if i.name in manifest.graphs[0].inputs and i.name in read]
    params = GAP_PARAMS if gap else SOFTMAX_PARAMS
    inputs.append(helper.make_tensor_value_info(EXIT_PARAMS, TensorProto.FLOAT, [len(params) * n]))
    if not gap:
        inputs.append(helper.make_tensor_value_info(USE_MAXPROB, TensorProto.BOOL, [1]))
    # the parameters cut into each exit's scalars ("temperatures/1" .. "temperatures/L", "exit_bias/1" ..)
    top = [helper.make_node("Split", [EXIT_PARAMS], [f"{x}/{k}" for x in params for k in range(1, n + 1)], axis=0)]
    if manifest.opset >= 18:  # Split takes its output count as an attribute from opset 18
        top[0].attribute.append(helper.make_attribute("num_outputs", len(params) * n))
    if gap:
        top.append(_const("gap/basis", TensorProto.FLOAT, [2], [-1.0, 1.0]))  # z_1 - z_0 = z @ [-1, 1]
    else:
        top += [_const("guard", TensorProto.FLOAT, [], [-SINGLE_ROW_GUARD]),
                _const("axis/last", TensorProto.INT64, [1], [-1])]  # fmt: skip
    graph = helper.make_graph(top + nodes, "early_exit", inputs, _infos(outputs),
                              initializer=inits, value_info=infos)  # fmt: skip
    opsets: dict[str, int] = {}
    for s in segs:
        for o in s.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="romebert")  # fmt: skip
    model.ir_version = max(s.ir_version for s in segs)
    onnx.save(model, str(out))


def _pool_one_row(g, opset: int) -> None:
    """Rewrite segment graph ``g``'s mean pooling for one row: the exported
    ``Squeeze(MatMul(Unsqueeze(pool_weights, [1]), h), [1])`` ([b, T] -> [b, 1, T] @ [b, T, H] -> [b, H])
    becomes ``MatMul(Squeeze(pool_weights, [0]), h)`` ([T] @ [1, T, H] -> [1, H]: MatMul drops the 1-D
    operand's dimension itself). The same products, so the same bits, and one kernel call fewer per exit;
    the squeeze of the weights is computed once (see :func:`_renamed`). Other poolings are left as they are."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in g.initializer}

    def axes(node) -> list | None:  # an attribute before opset 13, a constant input from it
        for a in node.attribute:
            if a.name == "axes":
                return list(a.ints)
        t = inits.get(node.input[1]) if len(node.input) > 1 else None
        return None if t is None else numpy_helper.to_array(t).tolist()

    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for node in g.node:
        for x in node.input:
            readers[x] = readers.get(x, 0) + 1
    outputs = {o.name for o in g.output}
    drop, rename, squeezes = set(), {}, []
    for sq in g.node:
        mm = producer.get(sq.input[0]) if sq.op_type == "Squeeze" else None
        un = producer.get(mm.input[0]) if mm is not None and mm.op_type == "MatMul" else None
        if (un is None or un.op_type != "Unsqueeze" or un.input[0] != "pool_weights" or axes(un) != [1]
                or axes(sq) != [1] or readers[mm.output[0]] != 1 or readers[un.output[0]] != 1
                or sq.output[0] in outputs):  # fmt: skip
            continue
        squeeze = f"{un.output[0]}/one_row"
        if opset >= 13:
            g.initializer.append(numpy_helper.from_array(np.array([0], np.int64), f"{squeeze}/axes"))
            squeezes.append(helper.make_node("Squeeze", ["pool_weights", f"{squeeze}/axes"], [squeeze]))
        else:
            squeezes.append(helper.make_node("Squeeze", ["pool_weights"], [squeeze], axes=[0]))
        mm.input[0] = squeeze
        drop.update((id(sq), id(un)))
        rename[sq.output[0]] = mm.output[0]
    if not drop:
        return
    kept = squeezes + [n for n in g.node if id(n) not in drop]  # (the new squeezes first: before their readers)
    for node in kept:
        node.input[:] = [rename.get(x, x) for x in node.input]
    del g.node[:]
    g.node.extend(kept)
    stale = set(rename.values())  # the products' recorded shapes ([b, 1, H]) no longer hold
    infos = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(infos)


# ONNX Runtime's fused operators whose mask input may be left out: (domain, operator) -> its position
_MASKS = {("com.microsoft", "Attention"): 3, ("com.microsoft", "QAttention"): 5}
_EMBED_MASK = (("com.microsoft", "EmbedLayerNormalization"), 7, 1)  # its mask input, the mask index it outputs


def _attend_to_all(g) -> None:
    """Segment graph ``g`` for one unpadded row: its fused attentions without a mask index (every token
    attends to every token, as a mask of ones says: the same bits), and the embedding's mask left out
    once nothing reads the mask index it makes. The kernels then skip the masking (docs/inference.md has
    the figures), and the mask's cast and count are no longer computed. A node that reads the mask
    otherwise keeps it. The host runs any other mask through the segments."""
    for node in g.node:
        i = _MASKS.get((node.domain, node.op_type))
        if i is not None and len(node.input) > i:
            node.input[i] = ""
    op, i, out = _EMBED_MASK
    read = _read(g.node) | {o.name for o in g.output}
    for node in g.node:
        if (node.domain, node.op_type) == op and len(node.input) > i and not set(node.output[out : out + 1]) & read:
            node.input[i] = ""
    for node in g.node:  # trailing empty names: absent optional inputs
        while node.input and not node.input[-1]:
            del node.input[-1]


def _read(nodes) -> set[str]:
    """Every name that ``nodes`` read, in their subgraphs too."""
    names = set()
    for node in nodes:
        names.update(x for x in node.input if x)
        for a in node.attribute:
            if a.HasField("g"):  # a branch of If or Loop
                names |= _read(a.g.node)
    return names


def _renamed(k: int, seg, shared: dict) -> tuple[list, list, list]:
    """Segment k's nodes, initializers and value infos with every name of its own prefixed ``s{k}/``; its
    inputs are the top graph's (mask, pool weights, ...) or, for ``state``, segment k-1's output.

    A node that computes what an earlier node computed (the same operator and attributes on the same
    values: the top graph's inputs, earlier nodes' outputs, constants equal by value) is dropped and its
    outputs read from that one, visible here since later segments are nested inside earlier ones. So
    segment k+1's opening LayerNorm of the state reuses exit k's, and the attention's mask index and the
    pool weights' reshape are computed once: each costs a kernel call per layer at batch size 1.
    ``shared`` maps each node's key to its outputs (and renames) across segments.
    """
    import hashlib

    import onnx

    g = seg.graph
    alias: dict[str, str] = shared.setdefault("alias", {})
    produced: set[str] = shared.setdefault("outputs", set())
    consts = {t.name: t for t in g.initializer}

    def name(x: str) -> str:
        if not x:
            return x
        if x == "state":
            return f"s{k - 1}/next_state"
        x = x if x in _TOP else f"s{k}/{x}"
        return alias.get(x, x)

    def key_of(node) -> tuple | None:
        parts = []
        for x in node.input:
            if not x or x in _TOP or name(x) in produced:
                parts.append(name(x))
            elif x in consts:  # a constant: by value, whatever its name
                t = onnx.TensorProto()
                t.CopyFrom(consts[x])
                t.name = ""
                parts.append(hashlib.sha256(t.SerializeToString()).hexdigest())
            else:
                return None  # reads this segment's own computation
        attrs = tuple(sorted(a.SerializeToString() for a in node.attribute))
        return (node.domain, node.op_type, attrs, tuple(map(str, parts)), len(node.output))

    nodes = []
    for node in _needed(g, _OWN):  # (not CAP's nsp: the one-graph rules do not read it)
        key = key_of(node)
        if key is not None and key in shared and not set(node.output) & set(_OWN):
            for mine, theirs in zip(node.output, shared[key], strict=True):
                alias[f"s{k}/{mine}"] = theirs
            continue
        node.input[:] = [name(x) for x in node.input]
        node.output[:] = [name(x) for x in node.output]
        if node.name:
            node.name = f"s{k}/{node.name}"
        if key is not None:
            shared[key] = list(node.output)
            produced.update(node.output)
        nodes.append(node)
    used = {x for n in nodes for x in n.input}
    inits = [t for t in g.initializer if name(t.name) in used]
    for t in inits:
        t.name = name(t.name)
    made = {x for n in nodes for x in n.output}
    infos = [v for v in g.value_info if name(v.name) in made]
    for v in infos:
        v.name = name(v.name)
    return nodes, inits, infos


def _needed(g, outputs: tuple[str, ...]) -> list:
    """The nodes of graph ``g`` that ``outputs`` depend on, in graph order."""
    producer = {o: n for n in g.node for o in n.output}
    todo, keep = [o for o in outputs if o in producer], set()
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            todo += list(n.input)
            for a in n.attribute:  # subgraphs (If, Loop) read outer names too
                if a.HasField("g"):
                    todo += [x for sub in a.g.node for x in sub.input]
    return [n for n in g.node if id(n) in keep]


def _level(k: int, segs: list, outs: list[str], opset: int, gap: bool, shared: dict) -> tuple[list, list, list]:
    """Nodes, initializers, value infos of the graph running segment k and, unless exit k stops the row,
    segments k+1.. (nested); its outputs are named ``outs``. ``gap``: the two-class stop test."""
    from onnx import TensorProto, helper

    n = len(segs)
    nodes, inits, infos = _renamed(k, segs[k - 1], shared)
    p, t = f"s{k}", f"then{k}"

    def scaled(out: str):  # exit k's logits divided by its temperature
        return helper.make_node("Div", [f"{p}/logits", f"temperatures/{k}"], [out])

    if k == n:  # the final head takes the row: no decision
        last = helper.make_node("Identity", [f"{p}/logits"], [outs[0]]) if gap else scaled(outs[0])
        nodes += [last, _const(outs[1], TensorProto.INT64, [1], [k]), _const(outs[2], TensorProto.FLOAT, [1], [np.inf])]
        return nodes, inits, infos
    returned = [_const(f"{t}/exit_layer", TensorProto.INT64, [1], [k])]
    if gap:  # |z_1 - z_0| >= limit; the branch that returns hands the raw logits and |gap| to the host
        nodes += [helper.make_node("MatMul", [f"{p}/logits", "gap/basis"], [f"{p}/gap"]),  # [1]
                  helper.make_node("Abs", [f"{p}/gap"], [f"{p}/abs_gap"]),
                  helper.make_node("GreaterOrEqual", [f"{p}/abs_gap", f"exit_limit/{k}"], [f"{p}/stop"])]  # fmt: skip
        # (ONNX Runtime refuses a branch output that is an outer value itself: an Identity each)
        returned += [helper.make_node("Identity", [f"{p}/logits"], [f"{t}/logits"]),
                     helper.make_node("Identity", [f"{p}/abs_gap"], [f"{t}/abs_gap"])]  # fmt: skip
    else:
        nodes += [
            scaled(f"{p}/scaled"),
            helper.make_node("Softmax", [f"{p}/scaled"], [f"{p}/p"], axis=-1),
            helper.make_node("LogSoftmax", [f"{p}/scaled"], [f"{p}/logp"], axis=-1),
            helper.make_node("Mul", [f"{p}/p", f"{p}/logp"], [f"{p}/plogp"]),
            helper.make_node("ReduceSum", [f"{p}/plogp", "axis/last"], [f"{p}/neg_entropy"], keepdims=0),
            helper.make_node("ReduceMax", [f"{p}/p", "axis/last"], [f"{p}/maxprob"], keepdims=0)
            if opset >= 18
            else helper.make_node("ReduceMax", [f"{p}/p"], [f"{p}/maxprob"], axes=[-1], keepdims=0),
            helper.make_node("Where", [USE_MAXPROB, f"{p}/maxprob", f"{p}/neg_entropy"], [f"{p}/score"]),
            helper.make_node("Add", [f"{p}/score", f"exit_bias/{k}"], [f"{p}/margin"]),
            helper.make_node("GreaterOrEqual", [f"{p}/margin", "guard"], [f"{p}/stop"]),
        ]
        returned += [helper.make_node("Identity", [f"{p}/scaled"], [f"{t}/logits"]),
                     helper.make_node("Identity", [f"{p}/margin"], [f"{t}/margin"])]  # fmt: skip
    last = (SINGLE_ROW_GAP_OUTPUTS if gap else SINGLE_ROW_OUTPUTS)[2]  # the third output's name, per level
    then = helper.make_graph(returned, t, [], _infos([f"{t}/logits", f"{t}/exit_layer", f"{t}/{last}"]))
    e = f"else{k}"
    sub_outs = [f"{e}/logits", f"{e}/exit_layer", f"{e}/{last}"]
    sub_nodes, sub_inits, sub_infos = _level(k + 1, segs, sub_outs, opset, gap, shared)
    other = helper.make_graph(sub_nodes, e, [], _infos(sub_outs), initializer=sub_inits, value_info=sub_infos)
    nodes.append(helper.make_node("If", [f"{p}/stop"], outs, then_branch=then, else_branch=other))
    return nodes, inits, infos


def _infos(names: list[str]) -> list:
    """Value infos of a level's outputs (logits, exit layer, margin or |gap|: ``SINGLE_ROW_OUTPUTS`` or
    ``SINGLE_ROW_GAP_OUTPUTS``) named ``names``."""
    from onnx import TensorProto, helper

    types = (TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT)
    return [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types, strict=True)]


def _const(name: str, dtype: int, dims: list[int], values: list):
    from onnx import helper

    return helper.make_node("Constant", [], [name], value=helper.make_tensor(f"{name}/value", dtype, dims, values))
