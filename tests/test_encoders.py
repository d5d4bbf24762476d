"""Every supported encoder family on a tiny random config: the one-pass forward against the backbone and
the layer-by-layer engine, padding invariance, save/load, a training step, engine decisions against the
offline sweep, and the ONNX export round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AlbertConfig, BertConfig, DebertaV2Config, DistilBertConfig, GPT2Config, ModernBertConfig

from romebert.core.errors import RomebertError
from romebert.evaluation.exits import sweep
from romebert.evaluation.logits import collect_logits
from romebert.model.encoders import ADAPTERS
from romebert.model.modeling import MultiExitConfig, MultiExitModel
from romebert.runtime.encoding import Collator, EncodedDataset
from romebert.runtime.engine import EarlyExitEngine, all_exit_logits
from romebert.runtime.policies import get_policy
from romebert.runtime.scores import entropy
from romebert.training.trainer import Trainer
from romebert.training.training_args import TrainingArguments

from fakes import FakeTask, fake_metrics, padded_batches

LAYERS = 2
VOCAB = 100
COLLATE = Collator(pad_token_id=0)
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=37,
               max_position_embeddings=64)  # fmt: skip
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_DEBERTA = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm")


def _backbone_config(family: str):
    if family == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=LAYERS, n_heads=2, hidden_dim=37,
                                max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)  # fmt: skip
    if family == "albert":  # one shared layer; embeddings narrower than the hidden size
        return AlbertConfig(**_COMMON, **_NO_DROPOUT, embedding_size=16)
    if family == "deberta-v3":  # v3's layout: shared keys, log-bucketed positions, no absolute positions
        return DebertaV2Config(**_COMMON, **_NO_DROPOUT, **_DEBERTA, share_att_key=True, position_buckets=8,
                               position_biased_input=False, type_vocab_size=0)  # fmt: skip
    if family == "deberta-v2":  # v2's: separate position projections, token types, the convolution after layer 1
        return DebertaV2Config(**_COMMON, **_NO_DROPOUT, **_DEBERTA, share_att_key=False, max_relative_positions=16,
                               type_vocab_size=2, conv_kernel_size=3, conv_act="gelu")  # fmt: skip
    if family.startswith("modernbert"):  # layer 1 global, layer 2 sliding (window +-4 tokens)
        return ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=LAYERS,
                                num_attention_heads=2, max_position_embeddings=64, local_attention=8, pad_token_id=0,
                                bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)  # fmt: skip
    raise AssertionError(family)


FAMILIES = ["distilbert", "albert", "deberta-v3", "deberta-v2", "modernbert", "modernbert-eager"]


def _model(family: str, pooling: str = "mean", seed: int = 0) -> MultiExitModel:
    torch.manual_seed(seed)
    cfg = MultiExitConfig(num_labels=3, pooling=pooling, exit_dropout=0.0, labels=["a", "b", "c"])
    model = MultiExitModel.from_config(_backbone_config(family), cfg)
    if family == "modernbert-eager":
        model.backbone.config._attn_implementation = "eager"
    with torch.no_grad():  # sharper exits: confidences spread over the layers, so some rows leave early
        for head in model.exits:
            head.classifier.weight.mul_(20.0)
    return model.eval()


def _dataset(n: int = 32, seed: int = 0, max_len: int = 24) -> EncodedDataset:
    rng = np.random.default_rng(seed)
    feats = []
    for _ in range(n):
        length = int(rng.integers(2, max_len + 1))
        ids = [2, *rng.integers(5, VOCAB, size=length - 2).tolist(), 3]
        types = [0] * (length // 2) + [1] * (length - length // 2)
        feats.append({"input_ids": ids, "attention_mask": [1] * length, "token_type_ids": types})
    return EncodedDataset(feats)


def _batches(dataset: EncodedDataset, batch_size: int, collator: Collator = COLLATE) -> list:
    return padded_batches(dataset, batch_size, collator)


def _one_pass(model: MultiExitModel, batches: list) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(*b).numpy() for b in batches], axis=1)  # [L, N, C]


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-4) -> bool:
    return bool(np.allclose(a, b, atol=tol, rtol=tol))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_equals_the_backbone_and_the_layer_by_layer_engine(family):
    model = _model(family)
    batches = _batches(_dataset(), 8)  # unsorted: every batch mixes lengths 2..24
    one_pass = _one_pass(model, batches)
    assert one_pass.shape == (LAYERS, 32, 3) and np.isfinite(one_pass).all()
    # exit L reads what the backbone's own forward returns (ModernBERT: after its final norm)
    takes_types = family not in ("distilbert",) and not family.startswith("modernbert")
    with torch.no_grad():
        for ids, mask, types in batches:
            kw = {"token_type_ids": types} if takes_types else {}
            last = model.backbone(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
            assert torch.allclose(model(ids, mask, types)[-1], model.exits[-1](last, mask), atol=1e-5)
    # the engine's segments (trailing padding trimmed, layer inputs rebuilt per group) give every exit's logits
    assert _close(all_exit_logits(model, batches), one_pass)
    # threshold 0 runs every row to the end, through queues that merge and split groups
    out = EarlyExitEngine(model.segments(), get_policy("entropy", 0.0)).run_stream(batches, batch_size=5)
    assert (out.exit_layer == LAYERS).all() and _close(out.logits, one_pass[-1])
    # and padding never changes a result: each row alone, unpadded
    ids, mask, types = batches[0]
    with torch.no_grad():
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = model(ids[row : row + 1, :n], mask[row : row + 1, :n], types[row : row + 1, :n])
            assert _close(alone[:, 0].numpy(), one_pass[:, row])


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path):
    model = _model(family, pooling="cls")
    model.save_pretrained(tmp_path)
    loaded = MultiExitModel.from_pretrained(tmp_path).eval()
    assert type(loaded.adapter) is type(model.adapter) and loaded.config == model.config
    if family == "modernbert-eager":
        loaded.backbone.config._attn_implementation = "eager"
    batches = _batches(_dataset(n=8), 8)
    assert np.array_equal(_one_pass(model, batches), _one_pass(loaded, batches))


def _training_set(n: int = 8) -> EncodedDataset:
    data = _dataset(n=n, seed=3, max_len=12)
    return EncodedDataset([{**f, "labels": i % 3} for i, f in enumerate(data.features)])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_gradient_projection_training_step_changes_every_layer(family, tmp_path):
    model = _model(family).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), method="romebert-sdgr", gr_anchor="exits", epochs=1,
                             batch_size=4, learning_rate=1e-3, progress=False, group_by_length=False,
                             log_every=1, device="cpu")  # fmt: skip
    Trainer(model, args, _training_set(), COLLATE).train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {f"exits.{i}.classifier.weight" for i in range(LAYERS)} <= changed
    # every matrix gradient projection acts on was trained, and every module run as a layer changed
    named = {id(p): k for k, p in model.named_parameters()}
    projected = [named[id(p)] for p in model.projection_parameters()]
    assert projected and set(projected) <= changed
    for layer in model.layers:
        assert any(not torch.equal(p, before[named[id(p)]]) for p in layer.parameters())


def test_albert_projects_the_shared_layer_once():
    model = _model("albert")
    shared = model.layers[0]
    assert all(layer is shared for layer in model.layers) and model.num_layers == LAYERS
    params = model.projection_parameters()
    assert len({id(p) for p in params}) == len(params)
    assert {id(p) for p in params} == {id(p) for p in shared.parameters() if p.ndim == 2}


def _safe_threshold(scores: np.ndarray) -> float:
    """A threshold in the widest gap between distinct scores in their middle 40 % (about half the rows on
    either side, and no score near it: ONNX Runtime's logits differ from torch's in the last digits)."""
    s = np.unique(scores)
    lo, hi = int(0.3 * (s.size - 1)), max(int(0.7 * (s.size - 1)), int(0.3 * (s.size - 1)) + 1)
    i = lo + int(np.argmax(np.diff(s[lo : hi + 1])))
    assert s[i + 1] - s[i] > 1e-4, "scores too close for a robust test threshold"
    return float((s[i] + s[i + 1]) / 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_decisions_equal_the_offline_sweep(family):
    model = _model(family, seed=1)
    data = _dataset(n=40, seed=2)
    cached = collect_logits(model, data, COLLATE, batch_size=16)  # one pass, length-sorted batches
    policy = get_policy("entropy", _safe_threshold(entropy(cached[0])))  # about half leave at exit 1
    ref_layers, ref_logits = policy.decide(cached)
    assert set(ref_layers.tolist()) == {1, 2}
    for input_bs, batch_size in ((1, 1), (8, 5), (40, 40)):
        out = EarlyExitEngine(model, policy).run_stream(_batches(data, input_bs), batch_size=batch_size)
        assert np.array_equal(out.exit_layer, ref_layers)
        assert _close(out.logits, ref_logits)
    labels = ref_logits.argmax(-1)
    row = sweep(cached, labels, FakeTask(labels=("a", "b", "c")), [policy], metric_fn=fake_metrics)[0]
    assert row["counts"] == np.bincount(ref_layers - 1, minlength=LAYERS).tolist()


def test_unknown_families_are_refused_in_one_line():
    gpt2 = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    with pytest.raises(RomebertError, match="'gpt2'.*not supported; supported model types: albert, bert") as err:
        MultiExitModel.from_config(gpt2, MultiExitConfig(num_labels=2))
    assert "\n" not in str(err.value) and "modernbert" in str(err.value)
    assert {"bert", "roberta", "electra", "distilbert", "albert", "deberta-v2", "modernbert"} <= set(ADAPTERS)
    # and the BERT family keeps its adapter: one shared by BERT, RoBERTa, ELECTRA, ...
    bert = MultiExitModel.from_config(BertConfig(**_COMMON), MultiExitConfig(num_labels=2))
    assert type(bert.adapter).__name__ == "EncoderAdapter" and bert.adapter.exit_transform is None


# ------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tiny import make_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(path)
    return path


EXPORTED = ["distilbert", "albert", "deberta-v3", "deberta-v2", "modernbert"]


@pytest.mark.parametrize("family", EXPORTED)
def test_export_round_trips_every_exit(family, tokenizer_dir, tmp_path):
    from romebert.deploy.export import export_model
    from romebert.runtime.artefacts import ExportManifest
    from romebert.runtime.onnx_runtime import OrtSegments

    model = _model(family, seed=4)
    folder = tmp_path / "export"
    export_model(model, tokenizer_dir, folder, max_seq_length=40, full_graph=True)
    manifest = ExportManifest.load(folder)
    assert manifest.num_layers == LAYERS and "generic segments" in manifest.source["encoder"]
    assert len(manifest.fusions) == LAYERS
    np_collate = Collator(pad_token_id=0, return_tensors="np")
    data = _dataset(n=24, seed=5)
    batches = _batches(data, 8, np_collate)
    ort = OrtSegments(folder, intra_op_threads=1)
    got = all_exit_logits(ort, batches)
    ref = _one_pass(model, [tuple(torch.from_numpy(a) for a in b) for b in batches])
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-3
    plain = all_exit_logits(OrtSegments(folder, intra_op_threads=1, one_graph=True), batches)  # the one graph
    assert np.abs(plain[0] - ref[-1]).max() < 1e-3
    # the ONNX Runtime engine decides as the PyTorch one does (threshold away from near-ties)
    policy = get_policy("entropy", _safe_threshold(entropy(ref[0])))
    a = EarlyExitEngine(model, policy).run_stream(batches, batch_size=5)
    b = EarlyExitEngine(ort, policy).run_stream(batches, batch_size=5)
    assert np.array_equal(a.exit_layer, b.exit_layer) and np.abs(a.logits - b.logits).max() < 1e-3
