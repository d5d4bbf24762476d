"""ONNX export and the torch-free runtime on tiny random models: round trips, parity with the PyTorch
engine for every criterion, int8, the CLI, and every bad-input error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from romebert.cli import main
from romebert.core.errors import RomebertError
from romebert.data.examples import Example
from romebert.deploy.classifier import EarlyExitClassifier
from romebert.deploy.export import export_model
from romebert.deploy.quantize import DEFAULT_INT8
from romebert.runtime.artefacts import MANIFEST_FILE, EarlyExitConfig, ExportManifest
from romebert.runtime.criteria import AgreementPolicy
from romebert.runtime.encoding import FastTokenizer, encode
from romebert.runtime.engine import EarlyExitEngine, all_exit_logits, all_exit_outputs
from romebert.runtime.onnx_runtime import OrtSegments
from romebert.runtime.policies import CRITERIA, criterion_class, exit_scores, get_policy

from export_fixtures import LAYERS, _batches, _dataset, _model, _threshold
from glue_fixtures import sentence
from tiny import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    """(model, export folder) for BERT and RoBERTa, mean and cls pooling, fp32."""
    out = {}
    for family, pooling in (("bert", "mean"), ("bert", "cls"), ("roberta", "mean")):
        model = _model(family, pooling)
        folder = tmp_path_factory.mktemp(f"export-{family}-{pooling}") / "export"
        export_model(model, tokenizer_dir, folder, max_seq_length=40)
        out[family, pooling] = (model, folder)
    return out


def test_export_leaves_the_callers_model_as_it_found_it(tmp_path, tokenizer_dir):
    model = _model().train()
    model.backbone.config._attn_implementation = "sdpa"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(model, tokenizer_dir, tmp_path / "export", max_seq_length=40)
    assert model.training and model.backbone.config._attn_implementation == "sdpa"
    assert next(model.parameters()).device.type == "cpu"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def agreement(all_logits: np.ndarray) -> np.ndarray:
    return exit_scores(AgreementPolicy, all_logits)[0]


@pytest.mark.parametrize("key", [("bert", "mean"), ("bert", "cls"), ("roberta", "mean")], ids=lambda k: "-".join(k))
def test_export_round_trips_every_exit(exported, key):
    model, folder = exported[key]
    manifest = ExportManifest.load(folder)
    assert manifest.num_layers == LAYERS and manifest.precision == "fp32" and manifest.pooling == key[1]
    assert [g.file for g in manifest.graphs] == [f"segment_{i:02d}.onnx" for i in range(1, LAYERS + 1)]
    assert all("Attention" in f for f in manifest.fusions)  # every layer keeps its fused attention
    assert "EmbedLayerNormalization" in manifest.fusions[0] or key[0] == "roberta"
    data = _dataset()
    got = all_exit_logits(OrtSegments(folder), _batches(data, 8))
    with torch.no_grad():
        ref = np.concatenate([model(*(torch.from_numpy(a) for a in b)).numpy() for b in _batches(data, 8)], axis=1)
    assert got.shape == ref.shape == (LAYERS, len(data), 3)
    assert np.abs(got - ref).max() < 1e-4


def test_full_graph_is_the_final_exit_in_one_checksummed_graph(tmp_path, tokenizer_dir):
    model = _model("bert", "mean", seed=2)
    folder = tmp_path / "export"
    manifest = export_model(model, tokenizer_dir, folder, max_seq_length=40, full_graph=True)
    assert manifest.full_graph is not None and manifest.full_graph.file == "full.onnx"
    assert ExportManifest.load(folder).full_graph == manifest.full_graph  # round-trips through JSON
    data = _dataset(seed=3)
    one = OrtSegments(folder, one_graph=True)
    assert one.num_layers == 1
    got = all_exit_logits(one, _batches(data, 8))[0]
    final = all_exit_logits(OrtSegments(folder), _batches(data, 8))[-1]
    assert np.abs(got - final).max() < 1e-4
    # through the engine it is the model's last exit: exit layer L, L layers of work per row, and the
    # final exit's temperature
    temps = [0.5 + i for i in range(LAYERS)]
    batch = _batches(data, 40)[0]
    out = EarlyExitEngine(one, get_policy("entropy", 1.0), temperatures=temps).run(*batch)
    ref = EarlyExitEngine(OrtSegments(folder), get_policy("entropy", 0.0), temperatures=temps).run(*batch)
    assert set(out.exit_layer.tolist()) == {LAYERS} and out.layer_work == LAYERS * len(data)
    assert np.abs(out.logits - ref.logits).max() < 1e-4
    assert EarlyExitClassifier.from_pretrained(folder, one_graph=True).num_layers == LAYERS
    (folder / "full.onnx").write_bytes(b"not onnx")
    with pytest.raises(RomebertError, match=r"full.onnx: checksum mismatch"):
        ExportManifest.load(folder)


@pytest.mark.parametrize("batch_size", [1, 3, 32])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_ort_engine_equals_the_pytorch_engine(exported, criterion, batch_size):
    model, folder = exported["bert", "mean"]
    data = _dataset(n=20 if batch_size == 1 else 40, seed=1)
    batches = _batches(data, batch_size)
    # every exit's logits and nsp (CAP's feature, an output of every segment graph) from both runtimes
    (torch_logits, torch_nsp), (ort_logits, ort_nsp) = (
        all_exit_outputs(seg, batches, ("nsp",)) for seg in (model, OrtSegments(folder))
    )
    assert np.abs(torch_nsp["nsp"] - ort_nsp["nsp"]).max() < 1e-4
    assert 0.0 < torch_nsp["nsp"].min() and torch_nsp["nsp"].max() < 1.0  # a share of the feature's norm
    quantile = {"entropy": 0.4, "maxprob": 0.6, "patience-confidence": 0.3, "energy": 0.4, "agreement": 0.6, "cap": 0.4}
    if criterion == "patience":
        threshold = 2.0
    else:  # patience-confidence reads the entropy of each exit
        cls = criterion_class("entropy" if criterion == "patience-confidence" else criterion)
        ours = exit_scores(cls, torch_logits, features=torch_nsp)[0]
        both = np.concatenate([ours, exit_scores(cls, ort_logits, features=ort_nsp)[0]])
        threshold = _threshold(ours, quantile[criterion], both)
    policy = get_policy(criterion, threshold, patience=2)
    a = EarlyExitEngine(model, policy).run_stream(batches, batch_size)
    b = EarlyExitEngine(OrtSegments(folder), policy).run_stream(batches, batch_size)
    assert np.array_equal(a.exit_layer, b.exit_layer)
    assert np.array_equal(a.logits.argmax(-1), b.logits.argmax(-1))
    assert np.abs(a.logits - b.logits).max() < 1e-4
    if criterion != "patience-confidence":  # (this random model's exit 2 is never confident enough)
        assert len(np.unique(a.exit_layer)) >= 2  # a real mix of exits


def test_int8_export_loads_runs_and_agrees_with_fp32(tmp_path, exported, tokenizer_dir):
    model, fp32 = exported["bert", "mean"]
    int8 = tmp_path / "int8"
    calibration = _batches(_dataset(n=64, seed=9), 16)  # "training sentences" the recipe calibrates on
    manifest = export_model(model, tokenizer_dir, int8, precision="int8", max_seq_length=40, calibration=calibration)
    assert manifest.precision == "int8" and manifest.quantization["recipe"] == DEFAULT_INT8
    sizes = {f: sum(p.stat().st_size for p in f.glob("segment_*.onnx")) for f in (int8, fp32)}
    assert sizes[int8] < 0.7 * sizes[fp32]  # (the default recipe keeps the embedding table fp32)
    import onnx

    for g in manifest.graphs:  # every layer's attention and feed-forward products run in int8
        ops = [n.op_type for n in onnx.load(str(int8 / g.file)).graph.node]
        assert "QAttention" in ops and ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") >= 3
    data = _dataset(n=60, seed=2)
    a = all_exit_logits(OrtSegments(fp32), _batches(data, 16))
    b = all_exit_logits(OrtSegments(int8), _batches(data, 16))
    # the stated bounds (what the recipes give on this random model, with margin for other CPUs' int8
    # kernels): with fp32 exit heads every exit's logits within 0.02 of fp32 (0.0015 here; their scale: a
    # few units); the default's int8 poolers (one scale each) and tanh GELU add their own rounding (0.055
    # here: on 32 channels one int8 step is a larger share of the pooled vector than on a real model's 384,
    # where the pooler adds little to the encoder's error: results/int8_recipes.md); the fp32 prediction of
    # at least 95 % of rows kept at every exit
    heads_fp32 = tmp_path / "heads-fp32"
    export_model(model, tokenizer_dir, heads_fp32, precision="int8", max_seq_length=40, calibration=calibration,
                 int8_recipe="per-channel-split-folded", single_row=False)  # fmt: skip
    c = all_exit_logits(OrtSegments(heads_fp32), _batches(data, 16))
    assert np.abs(a - c).max() < 0.02 and np.abs(a - b).max() < 0.08
    for x in (b, c):
        assert ((a.argmax(-1) == x.argmax(-1)).mean(axis=1) >= 0.95).all()


def test_fast_tokenizer_gives_the_transformers_ids(tokenizer_dir):
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    fast = FastTokenizer(tokenizer_dir / "tokenizer.json", hf.pad_token_id)
    singles = [Example(str(i), sentence(i, 3 + i), None, None) for i in range(12)]
    pairs = [Example(str(i), sentence(i, 2 + 3 * i), sentence(i + 5, 9 - (i % 7)), None) for i in range(12)]
    for examples in (singles, pairs):
        for max_len in (8, 64):
            a = encode(examples, hf, None, max_len).features
            b = encode(examples, fast, None, max_len).features
            assert a == b


def test_classifier_from_an_export_predicts_like_the_model(exported, tokenizer_dir, tmp_path):
    model, folder = exported["bert", "mean"]
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch_clf = EarlyExitClassifier(model, hf, ["a", "b", "c"], max_seq_length=40)
    texts = [sentence(i, 2 + (i * 5) % 11) for i in range(20)] + [(sentence(1), sentence(2))][:0]
    ort_clf = EarlyExitClassifier.from_pretrained(folder, intra_op_threads=1)
    cached = torch_clf.predict_with_exits(texts, threshold=0.0).logits  # every row at the last exit
    assert np.abs(ort_clf.predict_with_exits(texts, threshold=0.0).logits - cached).max() < 1e-4
    assert ort_clf.predict(texts[0]) in ("a", "b", "c")
    assert ort_clf.predict_proba(texts[:3]).shape == (3, 3)
    with pytest.raises(RomebertError, match="already a deployable folder"):
        ort_clf.save_pretrained(tmp_path / "x")


def test_the_segments_run_each_graph_past_the_wrappers_checks_and_through_run_where_there_is_no_binding(exported):
    from romebert.runtime.onnx_runtime import unchecked_run

    seg = OrtSegments(exported["bert", "mean"][1])
    sess = seg.sessions[0]
    feed = seg.start(np.array([[2, 5, 6, 3]]), np.ones((1, 4), np.int64), None).arrays
    feed = {i.name: feed[i.name] for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    direct = unchecked_run(sess)
    assert direct != sess.run and all(np.array_equal(x, y) for x, y in zip(direct(names, feed), sess.run(names, feed)))

    class Bare:  # an ONNX Runtime build whose session has no such binding: its public run
        def run(self, outputs, feed):
            return sess.run(outputs, feed)

    bare = Bare()
    assert unchecked_run(bare) == bare.run


def test_an_input_longer_than_the_exported_maximum_is_refused(exported):
    _, folder = exported["bert", "mean"]
    engine = EarlyExitEngine(OrtSegments(folder), get_policy("entropy", 0.1))
    ids = np.full((1, 41), 7, dtype=np.int64)
    with pytest.raises(RomebertError, match="an input of 41 tokens is longer than the exported maximum of 40"):
        engine.run(ids)


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_missing_corrupt_or_mismatched_files_are_named(exported, tmp_path):
    _, folder = exported["bert", "mean"]
    broken = _copy(folder, tmp_path)
    (broken / "segment_02.onnx").unlink()
    with pytest.raises(RomebertError, match=r"segment_02.onnx: missing"):
        OrtSegments(broken)
    shutil.rmtree(broken)
    broken = _copy(folder, tmp_path)
    data = (broken / "segment_03.onnx").read_bytes()
    (broken / "segment_03.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(RomebertError, match=r"segment_03.onnx: checksum mismatch"):
        OrtSegments(broken)
    # a file that matches its checksum but is not what the manifest promises
    manifest = json.loads((broken / MANIFEST_FILE).read_text())
    shutil.copy(folder / "segment_03.onnx", broken / "segment_03.onnx")
    manifest["graphs"][1]["inputs"] = ["input_ids", "attention_mask", "token_type_ids"]
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(RomebertError, match=r"segment_02.onnx: inputs \['state', 'attention_mask', 'pool_weights'\]"):
        OrtSegments(broken)
    manifest["graphs"] = manifest["graphs"][:2]
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(RomebertError, match="2 graphs for 3 layers"):
        OrtSegments(broken)
    (broken / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(RomebertError, match="manifest.json: not valid JSON"):
        OrtSegments(broken)
    (broken / MANIFEST_FILE).unlink()
    with pytest.raises(RomebertError, match="is .* an export made by 'romebert export'"):
        OrtSegments(broken)


def test_a_manifest_from_a_newer_format_version_is_refused(exported, tmp_path):
    _, folder = exported["bert", "cls"]
    newer = _copy(folder, tmp_path)
    manifest = json.loads((newer / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (newer / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(RomebertError, match="format_version 99 is newer"):
        EarlyExitClassifier.from_pretrained(newer)


def test_an_interrupted_export_leaves_nothing_that_loads(tmp_path, tokenizer_dir, monkeypatch, exported):
    from romebert.deploy import export

    model, folder = exported["bert", "mean"]
    calls = []

    def failing(path, m):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C in the middle of the graphs
        return {}

    monkeypatch.setattr(export, "optimize_graph", failing)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, tokenizer_dir, tmp_path / "out", max_seq_length=40)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    # over an older export, the old one stays complete
    old = _copy(folder, tmp_path)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        export_model(model, tokenizer_dir, old, max_seq_length=40)
    assert ExportManifest.load(old).num_layers == LAYERS


def test_the_next_export_removes_what_a_killed_one_left(tmp_path, tokenizer_dir, exported):
    import subprocess
    import sys

    model, _ = exported["bert", "mean"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.tmp-{int(dead.stdout)}-abc123"  # as SIGKILL leaves it: a dead process's folder
    (stale / "half").mkdir(parents=True)
    alive = subprocess.Popen(["sleep", "30"])
    running = tmp_path / f".out.tmp-{alive.pid}-def456"  # another export, still at work
    running.mkdir()
    other = tmp_path / f".other.tmp-{int(dead.stdout)}-x"  # another target's: not this export's business
    other.mkdir()
    try:
        export_model(model, tokenizer_dir, tmp_path / "out", max_seq_length=40)
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", running.name, other.name])


def test_early_exit_config_is_checked():
    with pytest.raises(RomebertError, match="criterion must be one of"):
        EarlyExitConfig(criterion="margin")
    with pytest.raises(RomebertError, match="temperatures must be positive"):
        EarlyExitConfig(temperatures=[1.0, 0.0])
    with pytest.raises(RomebertError, match="k must be >= 1"):
        EarlyExitConfig(criterion="patience", threshold=0)


@pytest.fixture(scope="module")
def trained_run(tiny_sst2_run):
    return tiny_sst2_run


def test_cli_export_then_predict_with_the_export(trained_run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(trained_run), "-o", str(out), "--target-speedup", "2"]) == 0
    manifest = ExportManifest.load(out)
    chosen = manifest.early_exit.chosen
    assert chosen["split"] == "dev" and chosen["target_speedup"] == 2.0 and chosen["speedup"] >= 2.0
    assert manifest.source["run"] == "run" and manifest.source["method"] == "romebert-sd"
    assert "/" not in json.dumps(manifest.source)  # no machine paths
    preds = tmp_path / "preds"
    assert main(["predict", str(out), "--predictions-dir", str(preds), "--intra-op-threads", "1"]) == 0
    assert f"threshold {manifest.early_exit.threshold}" in capsys.readouterr().out
    from_export = (preds / "SST-2.tsv").read_text()
    threshold = repr(manifest.early_exit.threshold)
    assert main(["predict", str(trained_run), "--threshold", threshold, "--device", "cpu"]) == 0
    assert (trained_run / "predictions" / "SST-2.tsv").read_text() == from_export
    layers = np.load(preds / "SST-2.exit_layers.npy")
    assert np.array_equal(np.load(trained_run / "predictions" / "SST-2.exit_layers.npy"), layers)
    assert layers.min() < manifest.num_layers  # rows do leave early: the equality covers real exits
    layers = np.load(preds / "SST-2.exit_layers.npy")
    assert np.array_equal(layers, np.load(trained_run / "predictions" / "SST-2.exit_layers.npy"))


@pytest.mark.parametrize("against", ["fp32", "exported"])
def test_cli_int8_export_counts_the_drop_against_the_fp32_model_by_default(trained_run, tmp_path, capsys, against):
    from romebert.evaluation.exits import per_exit_metrics
    from romebert.evaluation.logits import collect_logits
    from romebert.model.loading import load_run

    out = tmp_path / "exp"
    flags = [] if against == "fp32" else ["--drop-against", against]
    assert main(["export", str(trained_run), "-o", str(out), "--quantize", "int8", "--max-metric-drop", "0.05",
                 *flags]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    m = ExportManifest.load(out)
    chosen, dev = m.early_exit.chosen, m.dev_metrics
    # the fp32 figures are the trained PyTorch model's own, every exit
    model, tok, data = load_run(trained_run, "cpu")
    dataset = encode(data.examples("dev"), tok, data.task_spec().labels, data.max_seq_length)
    labels = np.asarray([f["labels"] for f in dataset.features])
    assert dev["fp32"] == per_exit_metrics(collect_logits(model, dataset), labels, data.task_spec())
    assert dev["exported"][-1][chosen["metric_name"]] == chosen["final_metric"]
    fp32_final = dev["fp32"][-1][chosen["metric_name"]]
    assert chosen["reference"] == against and chosen["fp32_final_metric"] == fp32_final
    assert chosen["reference_metric"] == (fp32_final if against == "fp32" else chosen["final_metric"])
    assert chosen["reference_metric"] - chosen["metric"] <= 0.05 + 1e-12
    # the summary names both final exits and what the drop counted against; the per-exit deltas are printed
    assert f"final exit: int8 {100 * chosen['final_metric']:.2f}, fp32 {100 * fp32_final:.2f}" in printed
    assert ("against the fp32 model" if against == "fp32" else "against the int8 export") in printed
    deltas = " ".join(f"{100 * (e['accuracy'] - f['accuracy']):+.2f}" for f, e in zip(dev["fp32"], dev["exported"]))
    assert f"int8 - fp32 on dev, accuracy (fp32 final exit {100 * dev['fp32'][-1]['accuracy']:.2f}), " in printed
    assert deltas in printed
    assert m.quantization["recipe"] == DEFAULT_INT8 and m.quantization["calibration_rows"] > 0
    assert "pre-processing" not in printed


def test_cli_export_errors(trained_run, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "e")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    half = tmp_path / "half"
    half.mkdir()
    (half / "run.json").write_text("{}")
    assert main(["export", str(half), "-o", str(tmp_path / "e")]) == 2
    assert "not a finished run" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["export", str(trained_run), "-o", str(taken), "--threshold", "0.1"]) == 2
    assert "exists and is not an export folder" in capsys.readouterr().err
    assert main(["export", str(trained_run), "-o", str(tmp_path / "e"), "--threshold", "0.1",
                 "--target-speedup", "2"]) == 2  # fmt: skip
    assert "not both" in capsys.readouterr().err


def test_an_export_is_served_without_torch_transformers_or_scipy(trained_run, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "exp"
    assert main(["export", str(trained_run), "-o", str(out), "--threshold", "0.3"]) == 0
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'scipy', 'safetensors'): sys.modules[name] = None  # import fails\n"
        "from romebert.cli import main\n"
        f"rc = main(['predict', {str(out)!r}, '--predictions-dir', {str(tmp_path / 'p')!r}])\n"
        "from romebert import EarlyExitClassifier\n"
        f"clf = EarlyExitClassifier.from_pretrained({str(out)!r})\n"
        "print(rc, clf.predict('the cat sat on the mat .'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] in ("0 0", "0 1")
    assert len((tmp_path / "p" / "SST-2.tsv").read_text().splitlines()) == 1 + 16


def test_cap_on_an_export_made_before_cap_is_a_one_line_error(exported, tmp_path):
    """An export whose segment graphs give no nsp (made before CAP) runs every other criterion; cap gets a
    one-line error before any input runs."""
    import onnx

    from romebert.core.files import sha256

    model, folder = exported["bert", "mean"]
    old = _copy(folder, tmp_path)
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    for g in manifest["graphs"]:
        graph = onnx.load(str(old / g["file"]))
        kept = [o for o in graph.graph.output if o.name != "nsp"]
        del graph.graph.output[:]
        graph.graph.output.extend(kept)
        onnx.save(graph, str(old / g["file"]))
        g["sha256"], g["outputs"] = sha256(old / g["file"]), [o.name for o in kept]
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    segments = OrtSegments(old)
    assert segments.features == () and OrtSegments(folder).features == ("nsp",)
    batches = _batches(_dataset(n=8, seed=4), 8)
    assert np.abs(all_exit_logits(segments, batches) - all_exit_logits(OrtSegments(folder), batches)).max() < 1e-6
    with pytest.raises(RomebertError, match=r"criterion 'cap' needs each exit's nsp.*export the run again"):
        EarlyExitEngine(segments, get_policy("cap", 0.3))


def test_no_skip_layer_normalization_in_the_graphs_or_the_sessions(tmp_path, tokenizer_dir):
    # ONNX Runtime's SkipLayerNormalization kernel is the slow one on CPU: neither the export's optimizer
    # nor romebert's sessions may fuse the residual Add and LayerNormalization into it
    import onnx
    import onnxruntime as ort

    from romebert.runtime.onnx_runtime import new_session, session_options

    model = _model("bert", "mean")
    m = export_model(model, tokenizer_dir, tmp_path / "e", max_seq_length=40, single_row=False)
    assert all("SkipLayerNormalization" not in f for f in m.fusions) and any("Attention" in f for f in m.fusions)
    so = session_options(1)
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    new_session(str(tmp_path / "e" / m.graphs[1].file), so)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops
    # (ORT alone would fuse them: the test sees the difference)
    plain = ort.SessionOptions()
    plain.optimized_model_filepath = str(tmp_path / "plain.onnx")
    ort.InferenceSession(str(tmp_path / "e" / m.graphs[1].file), plain, providers=["CPUExecutionProvider"])
    assert "SkipLayerNormalization" in {n.op_type for n in onnx.load(str(tmp_path / "plain.onnx")).graph.node}
