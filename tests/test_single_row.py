"""The one-graph early exit for batches of one row (``early_exit.onnx``): the engine takes it for a batch
of one row when the rule is entropy or maxprob, and it decides exactly as the segment engine does, at
the same exits with the same logits, thresholds on a score's exact value included."""

from __future__ import annotations

import numpy as np
import pytest

from romebert.deploy.classifier import EarlyExitClassifier
from romebert.deploy.export import export_model
from romebert.runtime.artefacts import ExportManifest
from romebert.runtime.engine import EarlyExitEngine, all_exit_logits
from romebert.runtime.onnx_runtime import GAP_PARAMS_BEFORE, SINGLE_ROW_CRITERIA, OrtSegments
from romebert.runtime.policies import CRITERIA, criterion_class, get_policy
from romebert.runtime.scores import entropy, maxprob

from export_fixtures import _batches, _dataset, _model
from glue_fixtures import sentence
from tiny import make_tiny_tokenizer


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Exports of BERT with mean pooling (pool weights fed) and RoBERTa with [CLS] pooling (3 classes), and
    of a two-class BERT in fp32 and int8."""
    tok = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(tok)
    out = {}
    for family, pooling in (("bert", "mean"), ("roberta", "cls")):
        folder = tmp_path_factory.mktemp(f"single-{family}") / "export"
        model = _model(family, pooling, seed=4)
        export_model(model, tok, folder, max_seq_length=40)
        out[family] = folder
    folder = tmp_path_factory.mktemp("single-bert-2") / "export"  # two classes: the stop test on the gap
    export_model(_model("bert", "mean", seed=4, num_labels=2), tok, folder, max_seq_length=40)
    out["bert-2"] = folder
    folder = tmp_path_factory.mktemp("single-bert-int8") / "export"  # two classes, the default int8 recipe
    export_model(_model("bert", "mean", seed=4, num_labels=2), tok, folder, precision="int8", max_seq_length=40,
                 calibration=_batches(_dataset(n=64, seed=9), 16))  # fmt: skip
    out["bert-int8"] = folder
    return out


FAMILIES = ["bert", "roberta", "bert-2", "bert-int8"]


def _rows(n: int = 30, seed: int = 5):
    return _batches(_dataset(n=n, seed=seed), 1)


def _engines(folder, policy, temperatures=None):
    one = EarlyExitEngine(OrtSegments(folder, intra_op_threads=1), policy, temperatures)
    segments = EarlyExitEngine(OrtSegments(folder, intra_op_threads=1, single_row=False), policy, temperatures)
    return one, segments


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_one_row_decides_as_the_segment_engine(exports, family, criterion):
    folder = exports[family]
    assert ExportManifest.load(folder).single_row_graph.file == "early_exit.onnx"
    rows = _rows()
    temperatures = [0.7, 1.3, 1.0]
    logits = all_exit_logits(OrtSegments(folder, single_row=False), rows)
    early = logits[:-1] / np.float32(temperatures)[:-1, None, None]  # what the policy sees
    threshold = {"entropy": float(np.quantile(entropy(early), 0.4)), "maxprob": float(np.quantile(maxprob(early), 0.6)),
                 "patience-confidence": float(np.quantile(entropy(early), 0.5))}.get(criterion)  # fmt: skip
    if threshold is None:  # the criteria the one graph does not hold: their own default
        threshold = criterion_class(criterion).default_threshold
    one, segments = _engines(folder, get_policy(criterion, threshold, patience=2), temperatures)
    assert (one._one_row is not None) == (criterion in SINGLE_ROW_CRITERIA)  # the others run the segments
    assert one.segments._single is None  # the one-row graph (a second copy of the weights) waits for a row
    a = [one.run(*r) for r in rows]
    assert (one.segments._single is not None) == (criterion in SINGLE_ROW_CRITERIA)
    b = [segments.run(*r) for r in rows]
    layers = np.array([o.exit_layer[0] for o in a])
    assert np.array_equal(layers, [o.exit_layer[0] for o in b])
    # the graph copies the segments' nodes: the same logits to the bit, scaled by the exit's temperature
    assert all(np.array_equal(x.logits, y.logits) for x, y in zip(a, b, strict=True))
    assert [o.layer_work for o in a] == layers.tolist() and [o.shapes for o in a] == [o.shapes for o in b]
    if criterion in SINGLE_ROW_CRITERIA:
        assert len(np.unique(layers)) >= 2  # a real mix of exits through the graph


@pytest.mark.parametrize("family", ["bert", "bert-2"])
@pytest.mark.parametrize("criterion", SINGLE_ROW_CRITERIA)
def test_a_threshold_on_a_scores_exact_value_is_decided_by_the_engines_rule(exports, family, criterion):
    """The graph stops within 1e-5 of the threshold and hands the row back; the engine runs it through the
    segments, where its numpy rule decides (entropy: < t, maxprob: >= t)."""
    folder = exports[family]
    rows = _rows(n=12, seed=6)
    seg = OrtSegments(folder, intra_op_threads=1)
    logits = all_exit_logits(OrtSegments(folder, single_row=False), rows)
    rule = entropy if criterion == "entropy" else maxprob
    score = [rule(logits[0][r : r + 1])[0] for r in range(len(rows))]  # exit 1's scores, as the engine sees them
    for r in (0, 3, 7):
        for threshold in (score[r], np.nextafter(score[r], np.inf), np.nextafter(score[r], -np.inf)):
            policy = get_policy(criterion, [float(threshold), 10.0 if criterion == "entropy" else 0.0])
            runner = seg.one_row(policy, None)
            assert runner(seg.start(*rows[r])) is None  # within the guard: the host decides
            one, segments = _engines(folder, policy)
            a, b = one.run(*rows[r]), segments.run(*rows[r])
            assert a.exit_layer[0] == b.exit_layer[0] and np.array_equal(a.logits, b.logits)
            leaves = score[r] < threshold if criterion == "entropy" else score[r] >= threshold
            assert a.exit_layer[0] == (1 if leaves else 2)  # exit 2's threshold takes every row that stays


def test_batch_size_one_streams_through_the_one_graph_and_a_classifier_predicts_alike(exports, tmp_path):
    folder = exports["bert"]
    rows = _rows(n=16, seed=8)
    policy = get_policy("entropy", float(np.quantile(entropy(all_exit_logits(OrtSegments(folder), rows)[:-1]), 0.5)))
    one, segments = _engines(folder, policy)
    calls = []
    runner = one._one_row
    one._one_row = lambda state: calls.append(1) or runner(state)
    a = one.run_stream(rows, 1)
    b = segments.run_stream(rows, 1)
    assert len(calls) == len(rows)  # one graph call per input
    assert np.array_equal(a.exit_layer, b.exit_layer) and np.array_equal(a.logits, b.logits)
    assert a.layer_work == b.layer_work and a.token_work == b.token_work
    texts = [sentence(i, 2 + (i * 3) % 9) for i in range(10)]
    with_graph = EarlyExitClassifier.from_pretrained(folder, intra_op_threads=1)
    without = EarlyExitClassifier.from_pretrained(folder, intra_op_threads=1, single_row=False)
    x = with_graph.predict_with_exits(texts, threshold=policy.threshold, batch_size=1)
    y = without.predict_with_exits(texts, threshold=policy.threshold, batch_size=32)
    assert x.labels == y.labels and np.array_equal(x.exit_layers, y.exit_layers)
    assert np.abs(x.logits - y.logits).max() < 1e-5


def test_a_regression_export_has_no_one_graph(tmp_path):
    import torch

    from romebert.model.modeling import MultiExitConfig, MultiExitModel

    from export_fixtures import _backbone_config

    tok = tmp_path / "tok"
    make_tiny_tokenizer(tok)
    torch.manual_seed(0)
    model = MultiExitModel.from_config(_backbone_config("bert"), MultiExitConfig(num_labels=1, exit_dropout=0.0))
    manifest = export_model(model.eval(), tok, tmp_path / "export", max_seq_length=40)
    assert manifest.single_row_graph is None and not (tmp_path / "export" / "early_exit.onnx").exists()
    seg = OrtSegments(tmp_path / "export")
    assert seg.one_row(get_policy("entropy", 0.1), None) is None


def _ops(graph, op: str) -> int:
    """How many ``op`` nodes ``graph`` holds, its subgraphs (the If branches) included."""
    return sum((n.op_type == op) + sum(_ops(a.g, op) for a in n.attribute if a.g.node) for n in graph.node)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_layers_opening_layernorm_is_the_previous_exits(exports, family):
    import onnx

    folder = exports[family]
    manifest = ExportManifest.load(folder)
    segments = [onnx.load(str(folder / g.file)).graph for g in manifest.graphs]
    one = onnx.load(str(folder / manifest.single_row_graph.file)).graph
    # each segment after the first opens with the LayerNorm that exit k-1 also takes of the same state:
    # the one graph computes it once (and runs the segments' other nodes as they are, see the test above)
    assert _ops(one, "LayerNormalization") == sum(_ops(g, "LayerNormalization") for g in segments) - (len(segments) - 1)
    assert _ops(one, "If") == len(segments) - 1


def _nodes(graph) -> list:
    """Every node of ``graph``, its subgraphs' (the If branches) included."""
    return [m for n in graph.node for m in [n] + [x for a in n.attribute if a.g.node for x in _nodes(a.g)]]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_rows_mean_pooling_squeezes_the_weights_once_and_no_exit_squeezes_its_pooled_vector(exports, family):
    import onnx

    folder = exports[family]
    manifest = ExportManifest.load(folder)
    nodes = _nodes(onnx.load(str(folder / manifest.single_row_graph.file)).graph)
    made_by = {o: n.op_type for n in nodes for o in n.output}
    # the segments pool [b, 1, T] @ [b, T, H] and squeeze each product; the one graph pools [T] @ [1, T, H]
    assert not [n for n in nodes if n.op_type == "Squeeze" and made_by.get(n.input[0]) == "MatMul"]
    squeezed = [n.output[0] for n in nodes if n.op_type == "Squeeze" and n.input[0] == "pool_weights"]
    pooled = [n for n in nodes if n.op_type == "MatMul" and n.input[0] in squeezed]
    mean = "pool_weights" in manifest.graphs[0].inputs
    assert (len(squeezed), len(pooled)) == ((1, len(manifest.graphs)) if mean else (0, 0))
    # (the logits stay the segments' to the bit: test_one_row_decides_as_the_segment_engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_one_row_graph_attends_to_every_token_and_a_row_with_other_padding_takes_the_segments(exports, family):
    import onnx

    folder = exports[family]
    manifest = ExportManifest.load(folder)
    nodes = _nodes(onnx.load(str(folder / manifest.single_row_graph.file)).graph)
    attentions = [n for n in nodes if n.op_type in ("Attention", "QAttention")]
    assert len(attentions) == len(manifest.graphs)  # fused, one a layer: none reads a mask index
    masks = [{"Attention": 3, "QAttention": 5}[n.op_type] for n in attentions]  # where their mask index goes
    assert all(len(n.input) <= i or not n.input[i] for n, i in zip(attentions, masks, strict=True))
    assert "attention_mask" not in manifest.single_row_graph.inputs  # nor anything else the mask
    assert not [n for n in nodes if "attention_mask" in n.input]
    rows = _rows(n=8, seed=11)
    policy = get_policy("entropy", float(np.median(entropy(all_exit_logits(OrtSegments(folder), rows)[0]))))
    one, segments = _engines(folder, policy)
    calls = []
    runner = one._one_row
    one._one_row = lambda state: calls.append(runner(state)) or calls[-1]
    for ids, mask, types in rows:
        z = np.zeros((1, 2), np.int64)
        for padded in ((np.hstack([z, ids]), np.hstack([z, mask]), np.hstack([z, types])),  # left padding
                       (np.hstack([ids, z]), np.hstack([mask, z]), np.hstack([types, z]))):  # fmt: skip
            calls.clear()
            a, b = one.run(*padded), segments.run(*padded)
            # left padding: the segments take the row (they mask it); trailing padding is cut, then the graph
            assert len(calls) == (padded[1][0, 0] != 0)
            assert a.exit_layer[0] == b.exit_layer[0] and np.array_equal(a.logits, b.logits)
        c = one.run(ids, mask, types)  # trailing padding (the last `padded`) changes nothing
        assert a.exit_layer[0] == c.exit_layer[0] and np.array_equal(a.logits, c.logits)


def test_an_opset_12_export_whose_squeeze_takes_its_axes_as_an_attribute_pools_one_row_alike(tmp_path):
    import onnx

    tok = tmp_path / "tok"
    make_tiny_tokenizer(tok)
    folder = tmp_path / "export"
    export_model(_model("bert", "mean", seed=4, num_labels=2), tok, folder, max_seq_length=40, opset=12)
    nodes = _nodes(onnx.load(str(folder / "early_exit.onnx")).graph)
    (squeeze,) = [n for n in nodes if n.op_type == "Squeeze" and n.input[0] == "pool_weights"]
    assert list(squeeze.input) == ["pool_weights"] and [list(a.ints) for a in squeeze.attribute] == [[0]]
    rows = _rows(n=12, seed=3)
    policy = get_policy("entropy", float(np.median(entropy(all_exit_logits(OrtSegments(folder), rows)[0]))))
    one, segments = _engines(folder, policy)
    a, b = [one.run(*r) for r in rows], [segments.run(*r) for r in rows]
    assert [o.exit_layer[0] for o in a] == [o.exit_layer[0] for o in b] and len({o.exit_layer[0] for o in a}) > 1
    assert all(np.array_equal(x.logits, y.logits) for x, y in zip(a, b, strict=True))


def test_a_two_class_graph_tests_the_logits_gap_and_three_classes_the_softmax(exports):
    import onnx

    for family, gap in (("bert", False), ("bert-2", True), ("bert-int8", True)):
        folder = exports[family]
        graph = onnx.load(str(folder / "early_exit.onnx")).graph
        assert ("use_maxprob" in [i.name for i in graph.input]) != gap
        (split,) = [n for n in graph.node if n.op_type == "Split"]  # the per-exit parameters, one input cut once
        assert len(split.output) == (1 if gap else 2) * len(ExportManifest.load(folder).graphs)
        assert _ops(graph, "Softmax") == (0 if gap else 2) and _ops(graph, "Abs") == (2 if gap else 0)
        # two classes: the branches return the raw logits and |gap|, the host scales and takes the margin
        assert [o.name for o in graph.output] == (["logits", "exit_layer", "abs_gap"] if gap else
                                                  ["logits", "exit_layer", "margin"])  # fmt: skip
        branches = [a.g for n in _nodes(graph) for a in n.attribute if a.name == "then_branch"]
        assert {n.op_type for b in branches for n in b.node} == {"Constant", "Identity"}  # no arithmetic
        scaling = [n for n in _nodes(graph) if n.op_type == "Div" and n.input[1].startswith("temperatures/")]
        assert len(scaling) == (0 if gap else len(ExportManifest.load(folder).graphs))


@pytest.mark.parametrize("criterion", SINGLE_ROW_CRITERIA)
def test_the_gap_from_which_a_rule_takes_a_two_class_row_is_the_rules_own(criterion):
    from romebert.runtime.onnx_runtime import stopping_gaps

    rule = entropy if criterion == "entropy" else maxprob
    thresholds = {"entropy": [0.3, 1e-30, 0.7, 0.0], "maxprob": [0.9, 1.0, 0.5, 1.5]}[criterion]
    policy = get_policy(criterion, thresholds)
    d = stopping_gaps(policy, 5)
    assert d[2] == -1 and d[3] == np.inf and d[4] == -1  # every row (H <= ln 2, p >= 0.5); none; the final exit
    for k in (0, 1):
        exits = policy.step(k, np.array([[0.0, d[k]], [0.0, d[k] * (1 - 1e-9)]]), policy.init_state(2, 5))[0]
        assert exits.tolist() == [True, False]
        score = rule(np.array([[0.0, d[k]]]))[0]
        assert score == pytest.approx(thresholds[k], rel=1e-6)
    if criterion == "maxprob":  # p >= 1: only where softmax rounds to 1.0 in float64, from a gap of about 36.7
        assert 36 < d[1] < 38


@pytest.mark.parametrize("family", ["bert", "bert-2"])
def test_an_older_export_whose_one_graph_takes_separate_inputs_and_returns_the_state_still_runs(
    exports, tmp_path, family
):
    import shutil

    import onnx
    from onnx import helper

    from romebert.core.files import sha256

    folder = tmp_path / "older"
    shutil.copytree(exports[family], folder)
    path = folder / "early_exit.onnx"
    model = onnx.load(str(path))
    g = model.graph
    # exports before 2026-12-06 took each per-exit vector as its own input, cut by its own Split ..
    (split,) = [n for n in g.node if n.op_type == "Split"]
    params = list(dict.fromkeys(o.split("/")[0] for o in split.output))
    n = len(split.output) // len(params)
    params = list(GAP_PARAMS_BEFORE) if family == "bert-2" else params  # (two classes: three vectors then)
    g.node.remove(split)
    for x in reversed(params):
        g.node.insert(0, helper.make_node("Split", [x], [f"{x}/{k}" for k in range(1, n + 1)], axis=0))
    inputs = [i for i in g.input if i.name != "exit_params"]
    inputs += [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [n]) for x in params]
    del g.input[:]
    g.input.extend(inputs)
    # .. and those before 2026-12-05 also returned a fourth output, the state; then a two-class graph
    # still scaled the logits and took the margin itself (the manifest did not list the graph's outputs)
    g.node.append(helper.make_node("Identity", ["pool_weights"], ["state"]))
    g.output.append(helper.make_tensor_value_info("state", onnx.TensorProto.FLOAT, None))
    if family == "bert-2":
        _margin_in_the_graph(g)
    onnx.save(model, str(path))
    manifest = ExportManifest.load(folder, verify=False)
    manifest.single_row_graph.sha256 = sha256(path)
    manifest.single_row_graph.inputs = [i.name for i in inputs]
    manifest.single_row_graph.outputs = []
    manifest.save(folder)
    rows = _rows(n=8, seed=3)
    temperatures = [0.9, 1.1, 1.0]
    early = all_exit_logits(OrtSegments(folder), rows)[:-1] / np.float32(temperatures)[:-1, None, None]
    policy = get_policy("entropy", [float(np.median(entropy(x))) for x in early])  # about half leave at each
    one, segments = _engines(folder, policy, temperatures)
    a, b = [one.run(*r) for r in rows], [segments.run(*r) for r in rows]
    older = one.segments._single[0]  # the older graph, run through
    assert len(older.get_outputs()) == 4 and {"temperatures", "exit_bias"} <= {i.name for i in older.get_inputs()}
    assert older.get_outputs()[2].name == "margin"
    if family == "bert-2":  # its branches scale and take the margin: not the host
        assert _ops(g, "Div") == 2 * len(manifest.graphs) - 1 and _ops(g, "Identity") == 1  # (the state)
    assert [o.exit_layer[0] for o in a] == [o.exit_layer[0] for o in b] and len({o.exit_layer[0] for o in a}) > 1
    assert all(np.array_equal(x.logits, y.logits) for x, y in zip(a, b, strict=True))


def _margin_in_the_graph(g) -> None:
    """A two-class one graph as built before the host took the margin: each branch that returns divides the logits and
    |gap| by the exit's temperature and adds exit_bias (the margin, output "margin"), not the host."""
    from onnx import helper

    def margin(name: str) -> str:
        return name[: -len("abs_gap")] + "margin" if name.split("/")[-1] == "abs_gap" else name

    def rewrite(graph, k: int | None) -> None:  # k: the exit whose branch returns, if this is one
        nodes = []
        for node in graph.node:
            node.output[:] = [margin(x) if not x.startswith("s") else x for x in node.output]
            if node.op_type == "Identity" and node.input[0].endswith("/logits"):
                exit_k = node.input[0].split("/")[0][1:]
                node = helper.make_node("Div", [node.input[0], f"temperatures/{exit_k}"], list(node.output))
            elif node.op_type == "Identity" and node.input[0].endswith("/abs_gap"):
                scaled = f"then{k}/scaled_gap"
                nodes.append(helper.make_node("Div", [node.input[0], f"temperatures/{k}"], [scaled]))
                node = helper.make_node("Add", [scaled, f"exit_bias/{k}"], list(node.output))
            for a in node.attribute:
                if a.g.node:
                    rewrite(a.g, int(a.g.name[4:]) if a.name == "then_branch" else None)
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        for o in graph.output:
            o.name = margin(o.name)

    rewrite(g, None)
