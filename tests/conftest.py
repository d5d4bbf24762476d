import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402, I001
import torch  # noqa: E402

# ROMEBERT_TEST_PRETEND_GPU=1 makes torch report one CUDA device that cannot be used: every test that
# lets device "auto" pick a GPU fails at once instead of quietly switching devices on a GPU machine. A
# check of the suite that needs no GPU (the suite must pass with a GPU visible, and without one).
HAS_CUDA = torch.cuda.is_available()  # the real answer, before any pretending
if os.environ.get("ROMEBERT_TEST_PRETEND_GPU") == "1":
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
from transformers import BertConfig  # noqa: E402

from romebert.model.modeling import MultiExitConfig, MultiExitModel  # noqa: E402


def tiny_bert_config(layers: int = 2, vocab_size: int = 100, dropout: float = 0.1) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def tiny_model(
    num_labels: int = 2,
    layers: int = 2,
    pooling: str = "cls",
    dropout: float = 0.1,
    seed: int = 0,
    vocab_size: int = 100,
) -> MultiExitModel:
    torch.manual_seed(seed)
    return MultiExitModel.from_config(
        tiny_bert_config(layers, vocab_size, dropout),
        MultiExitConfig(num_labels=num_labels, pooling=pooling, exit_dropout=dropout),
    )


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA; where there is none they are skipped (they test GPU-only paths; every
    decision they check on the GPU is checked on the CPU by the rest of the suite)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def model_factory():
    return tiny_model


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """A random 3-layer BERT + tiny tokenizer saved like a pretrained folder (for ``--model``)."""
    from transformers import BertModel

    from tiny import VOCAB, make_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(layers=3, vocab_size=len(VOCAB))).save_pretrained(path)
    make_tiny_tokenizer(path)
    return path


def sharpen_exits(model: MultiExitModel) -> MultiExitModel:
    """Make a random model behave a bit like a trained one: distinctive inputs (large word embeddings),
    related exits (head 0 plus noise, so predictions often agree across layers, as patience needs) and
    sharp ones (confidences spread over the layers)."""
    with torch.no_grad():
        model.backbone.embeddings.word_embeddings.weight.mul_(20.0)
        first = model.exits[0]
        for head in model.exits:
            for mine, ref in zip(head.parameters(), first.parameters()):
                mine.copy_(ref + 0.5 * ref.abs().mean() * torch.randn_like(ref))
            head.classifier.weight.mul_(15.0)
    return model


@pytest.fixture(scope="module")
def tiny_sst2_run(tmp_path_factory, tiny_backbone_dir):
    """A run folder trained briefly (romebert-sd) on a 16-row SST-2 fixture with the tiny backbone."""
    from romebert.cli import main

    from glue_fixtures import write_glue_fixture
    from tiny import TINY

    tmp = tmp_path_factory.mktemp("tiny-run")
    write_glue_fixture(tmp / "glue", "SST-2", n=16)
    out = tmp / "run"
    args = ["train", "--task", "SST-2", "--data-dir", str(tmp / "glue"), "--model", str(tiny_backbone_dir),
            "--method", "romebert-sd", "-o", str(out), *TINY]  # fmt: skip
    assert main(args) == 0
    return out
