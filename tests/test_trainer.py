import json

import pytest
import torch

from romebert.data import Collator, EncodedDataset
from romebert.errors import RomebertError
from romebert.trainer import Trainer, TrainingArguments, find_latest_checkpoint

from conftest import tiny_model


def _dataset(n=16, seed=0, regression=False):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = [2] + torch.randint(5, 100, (length - 2,), generator=g).tolist() + [3]
        label = float(i % 5) if regression else i % 2
        feats.append({"input_ids": ids, "attention_mask": [1] * length, "labels": label})
    return EncodedDataset(feats)


def _train(tmp_path, name, method="romebert-sdgr", dataset=None, **kw):
    model = tiny_model(layers=3, dropout=0.0, seed=7, num_labels=kw.pop("num_labels", 2))
    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        method=method,
        epochs=kw.pop("epochs", 1),
        learning_rate=1e-3,
        progress=False,
        group_by_length=False,
        log_every=1,
        **kw,
    )
    summary = Trainer(model, args, dataset or _dataset(), Collator(pad_token_id=0)).train()
    return model, summary


def test_gradient_accumulation_equals_double_batch_for_gr(tmp_path):
    one, _ = _train(tmp_path, "a", batch_size=8, gradient_accumulation_steps=1)
    two, _ = _train(tmp_path, "b", batch_size=4, gradient_accumulation_steps=2)
    for (name, p), q in zip(one.named_parameters(), two.parameters()):
        assert torch.allclose(p, q, atol=2e-5), name


@pytest.mark.parametrize("method", ["deebert", "deebert-sd"])
def test_deebert_stage_two_trains_only_the_exits(tmp_path, method):
    model, summary = _train(tmp_path, "s1", method=method)
    assert [s["stage"] for s in summary["stages"]] == ["finetune", "exits"]
    # replay stage one alone from the same seed: backbone and final head must equal the two-stage result
    from romebert import methods

    stage_one = (methods.METHODS[method][0],)
    original = methods.METHODS["deebert"]
    methods.METHODS["deebert"] = stage_one
    try:
        ref, _ = _train(tmp_path, "s1-only", method="deebert")
    finally:
        methods.METHODS["deebert"] = original
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if name.startswith("backbone.") or name.startswith(f"exits.{model.num_layers - 1}."):
            assert torch.equal(p, q), f"{name} changed in stage two"
    assert not torch.equal(model.exits[0].classifier.weight, ref.exits[0].classifier.weight)


def test_log_has_losses_and_gr_statistics(tmp_path):
    _train(tmp_path, "log")
    rows = [json.loads(line) for line in (tmp_path / "log" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # 16 examples / batch 8, logged every step
    for r in rows:
        assert {"final_loss", "exit_loss", "loss", "lr", "gr_angle_deg", "gr_norm_a", "gr_norm_b"} <= set(r)
        assert 0.0 <= r["gr_angle_deg"] <= 180.0


def test_regression_trains_with_every_method(tmp_path):
    for method in ("deebert", "deebert-sd", "romebert-sd", "romebert-sdgr"):
        model, summary = _train(tmp_path, method, method=method, dataset=_dataset(regression=True), num_labels=1)
        assert all(s["loss"] == s["loss"] for s in summary["stages"])  # not NaN


def test_non_finite_loss_stops_with_the_step(tmp_path):
    data = _dataset(regression=True)
    data.features[3]["labels"] = float("inf")
    with pytest.raises(RomebertError, match=r"non-finite loss .* step \d+"):
        _train(tmp_path, "nan", method="romebert-sd", dataset=data, num_labels=1, batch_size=4)


def test_epoch_checkpoints_are_complete_and_resumable(tmp_path):
    model, _ = _train(tmp_path, "ck", epochs=2)
    latest = find_latest_checkpoint(tmp_path / "ck")
    assert latest["epoch"] == 2 and latest["stage_index"] == 0
    assert not list((tmp_path / "ck" / "checkpoints").glob("*.tmp"))
    # a half-written checkpoint (no state file) is ignored
    (tmp_path / "ck" / "checkpoints" / "stage0-epoch003").mkdir()
    assert find_latest_checkpoint(tmp_path / "ck")["epoch"] == 2


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    from romebert.checkpoint import list_checkpoints

    reference, _ = _train(tmp_path, "c", epochs=2)
    ckpts = list_checkpoints(tmp_path / "c")
    assert [c.name for c in ckpts] == ["stage0-step0000002", "stage0-step0000004"]
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    model = tiny_model(layers=3, dropout=0.0, seed=99)
    args = TrainingArguments(
        output_dir=str(tmp_path / "c"), epochs=2, learning_rate=1e-3, progress=False, group_by_length=False
    )
    with pytest.warns(UserWarning, match="skipping checkpoint .*step0000004"):
        summary = Trainer(model, args, _dataset(), Collator(pad_token_id=0)).train(resume=True)
    assert summary["resumed_from_step"] == {"stage": "joint", "step": 2}
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)  # epoch 2 replayed from the epoch-1 checkpoint gives the same weights
