"""The multi-exit model: a Hugging Face encoder run layer by layer, an exit after each layer.

The backbone's own modules (embeddings, each layer) are called one at a time through the adapter of
its family (``encoders.py``: BERT-like, DistilBERT, ALBERT, DeBERTa-v2/v3, ModernBERT), so nothing of
its code is forked.
Exit ``L`` is the final head: the reference kept an extra, never-trained exit after layer L (a DEFECT in
``method.md``); here the last exit *is* the classifier, so every exit is trained.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from romebert.core.environment import backbone_label, default_backbone
from romebert.core.errors import RomebertError
from romebert.core.files import dataclass_from_json, write_atomic
from romebert.model.encoders import EncoderAdapter, adapter_for
from romebert.model.segments import TorchSegments

CONFIG_NAME = "romebert_config.json"
BACKBONE_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2  # 2: regression target scaling (target_mean, target_std); version-1 folders still load
POOLINGS = ("cls", "mean")


@dataclass
class MultiExitConfig:
    """Everything needed, besides the backbone's own config, to rebuild a trained model."""

    num_labels: int
    pooling: str = "cls"
    exit_dropout: float = 0.1
    backbone: str = ""  # the backbone it started from, named (core.environment.backbone_label; informational)
    task: str | None = None
    labels: list[str] | None = None  # label strings in class-index order; None for regression
    # Regression only: every head predicts the standardised target, and its output is
    # ``raw * target_std + target_mean`` in label units. None until fitted on the training labels
    # (the Trainer does it): heads that start at 0 while the labels average, say, 2.7 (STS-B) make every
    # example's error the same sign, and in the joint methods the summed pull of all exits collapses the
    # shared encoder's representations onto one direction (see ``fit_target_scaling``).
    target_mean: float | None = None
    target_std: float | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise RomebertError(f"pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.num_labels < 1:
            raise RomebertError(f"num_labels must be >= 1, got {self.num_labels}")
        if (self.target_mean is None) != (self.target_std is None):
            raise RomebertError("target_mean and target_std are set together (or both left unset)")
        if self.target_std is not None and not (math.isfinite(self.target_std) and self.target_std > 0):
            raise RomebertError(f"target_std must be a positive number, got {self.target_std}")
        if self.target_mean is not None and not math.isfinite(self.target_mean):
            raise RomebertError(f"target_mean must be a finite number, got {self.target_mean}")
        if self.target_mean is not None and not self.is_regression:
            raise RomebertError("target_mean / target_std apply to regression (num_labels 1) only")

    @property
    def target_scaling(self) -> tuple[float, float] | None:
        """(mean, std) applied to every head's raw output, or None (classification, or not fitted)."""
        return None if self.target_mean is None else (float(self.target_mean), float(self.target_std))

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def save(self, path: str | Path) -> None:
        write_atomic(Path(path), json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MultiExitConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RomebertError(f"{path}: not found (is this a romebert model folder?)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RomebertError(f"{path}: not valid JSON ({exc})") from None
        version = data.get("format_version", 0) if isinstance(data, dict) else 0  # not a dict: refused below
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise RomebertError(
                f"{path}: format_version {version} is newer than this romebert understands ({FORMAT_VERSION}); "
                "upgrade romebert"
            )
        return dataclass_from_json(cls, data, str(path))


def pool_weights(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Masked-mean weights [B, T] from a 0/1 mask [B, T]: 1 / (real tokens) on real tokens, 0 on padding.

    Computed once per batch and shared by every exit, so mean pooling is one batched matrix-vector
    product per exit (at batch size 1 the per-op overhead, not the arithmetic, is what costs).
    """
    m = mask.to(dtype)
    return m / m.sum(1, keepdim=True).clamp_min(1.0)


class ExitHead(nn.Module):
    """pooler (Linear + tanh) -> dropout -> classifier, the structure of BERT's classification head."""

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        dropout: float,
        pooling: str,
        target: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        self.target = target  # regression: (mean, std) mapping the raw output to label units

    def forward(self, hidden: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
        # hidden [B, T, H], mask [B, T] (1 = token), weights [B, T] from pool_weights(mask) -> logits [B, C]
        return self.classify(self.feature(hidden, mask, weights))

    def feature(self, hidden: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
        """The pooled feature the classifier reads, [B, H] (after the pooler's tanh, and dropout in training)."""
        if self.pooling == "mean" and weights is None:
            weights = pool_weights(mask, hidden.dtype)
        pooled = _pool(hidden, weights if self.pooling == "mean" else None)  # [B, H]
        # addmm, not F.linear: the same arithmetic (F.linear calls addmm) with less dispatch.
        x = torch.addmm(self.pooler.bias, pooled, self.pooler.weight.t()).tanh()
        return self.dropout(x) if self.training else x

    def classify(self, x: Tensor) -> Tensor:
        """Logits [B, C] of pooled features [B, H] (in label units for regression)."""
        return _to_label_units(torch.addmm(self.classifier.bias, x, self.classifier.weight.t()), self.target)

    def null_space_basis(self) -> tuple[Tensor, Tensor]:
        """What CAP's NSP score needs of the classifier W [C, H], b [C]: (offset [H], basis [H, C]).

        ``offset = b W^+`` (W^+ the pseudo-inverse of W^T) folds the bias in: ``(x + offset) W^T`` is the
        logits. ``basis`` is orthonormal and spans W's rows. Both are constants of a trained head (an ONNX
        export stores them in each segment graph)."""
        w, b = self.classifier.weight.detach().float(), self.classifier.bias.detach().float()
        offset = b @ torch.linalg.pinv(w.t())  # [H]
        basis, _ = torch.linalg.qr(w.t())  # [H, C]
        return offset, basis

    def null_space_share(self, x: Tensor, basis: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """CAP's NSP score of pooled features x [B, H] -> [B] (see :func:`null_space_share`); ``basis``: this
        head's :meth:`null_space_basis`, when the caller keeps it."""
        return null_space_share(x, *(basis if basis is not None else self.null_space_basis()))


def null_space_share(x: Tensor, offset: Tensor, basis: Tensor) -> Tensor:
    """CAP's NSP score: the share (sine) of ``x + offset`` ([B, H]) outside the span of ``basis`` [H, C]
    (``ExitHead.null_space_basis``) -> [B], in fp32.

    The projection is a product and a sum, not a MatMul: an int8 export then leaves it in fp32 (the
    quantizer rewrites MatMuls with a constant operand)."""
    shifted = x.float() + offset  # [B, H]
    inside = (shifted.unsqueeze(-1) * basis).sum(1).pow(2).sum(-1)  # [B, H, C] -> [B, C] -> [B]
    total = shifted.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return (1.0 - inside / total).clamp_min(0.0).sqrt()


def _to_label_units(raw: Tensor, target: tuple[float, float] | None) -> Tensor:
    """Regression heads predict the standardised target; ``raw * std + mean`` is in label units."""
    return raw if target is None else raw.mul(target[1]).add(target[0])


def _pool(hidden: Tensor, weights: Tensor | None) -> Tensor:
    """[B, T, H] -> [B, H]: first token (weights None) or the masked mean (weights [B, T])."""
    if weights is None:
        return hidden[:, 0]
    return torch.bmm(weights.unsqueeze(1), hidden).squeeze(1)


class MultiExitModel(nn.Module):
    """An encoder with one exit per layer; exit ``L`` is the final head.

    ``forward`` returns every exit's logits from one pass, shape [L, B, C]. The encoder family's
    adapter (``self.adapter``, ``encoders.adapter_for``) knows its modules; unknown families are refused.
    """

    def __init__(self, backbone: PreTrainedModel, config: MultiExitConfig) -> None:
        super().__init__()
        # a plain attribute, not a submodule: it only refers to the backbone's modules (no state_dict keys)
        self.adapter: EncoderAdapter = adapter_for(backbone)
        self.config = config
        self.backbone = backbone
        pooler_dense = self.adapter.take_pooler()
        hidden = self.adapter.hidden_size
        self.exits = nn.ModuleList(
            ExitHead(hidden, config.num_labels, config.exit_dropout, config.pooling, config.target_scaling)
            for _ in range(self.num_layers)
        )
        std = getattr(backbone.config, "initializer_range", 0.02)
        for head in self.exits:
            if isinstance(pooler_dense, nn.Linear) and pooler_dense.weight.shape == head.pooler.weight.shape:
                head.pooler.load_state_dict(pooler_dense.state_dict())
            else:  # e.g. ELECTRA, DistilBERT, DeBERTa and ModernBERT have no pooler
                nn.init.normal_(head.pooler.weight, std=std)
                nn.init.zeros_(head.pooler.bias)
            nn.init.normal_(head.classifier.weight, std=std)
            nn.init.zeros_(head.classifier.bias)

    # ----------------------------------------------------------------------------------------------
    # construction and persistence
    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | None = None,
        num_labels: int = 2,
        pooling: str = "cls",
        exit_dropout: float = 0.1,
        task: str | None = None,
        labels: list[str] | None = None,
    ) -> MultiExitModel:
        """Start from a pretrained encoder (hub name or local folder; default: packaged MiniLM)."""
        name_or_path = name_or_path or default_backbone()
        try:
            backbone = AutoModel.from_pretrained(name_or_path)
        except OSError as exc:
            raise RomebertError(f"cannot load backbone {name_or_path!r}: {str(exc).splitlines()[0]}") from None
        config = MultiExitConfig(
            num_labels=num_labels,
            pooling=pooling,
            exit_dropout=exit_dropout,
            backbone=backbone_label(name_or_path),  # named, never a machine path
            task=task,
            labels=list(labels) if labels is not None else None,
        )
        return cls(backbone, config)

    @classmethod
    def from_config(cls, backbone_config: PretrainedConfig, config: MultiExitConfig) -> MultiExitModel:
        """A randomly initialised model (tests, or before loading weights)."""
        return cls(AutoModel.from_config(backbone_config), config)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``romebert_config.json``, the backbone's ``config.json`` and ``model.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        write_atomic(directory / BACKBONE_CONFIG_NAME, self.backbone.config.to_json_string())
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "romebert_format_version": str(FORMAT_VERSION)})
        os.replace(tmp, directory / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> MultiExitModel:
        """Load a model written by :meth:`save_pretrained` (safetensors only, never pickle)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise RomebertError(f"{directory}: no such model folder")
        config = MultiExitConfig.load(directory / CONFIG_NAME)
        try:
            backbone_config = AutoConfig.from_pretrained(str(directory))
        except (OSError, ValueError) as exc:
            raise RomebertError(f"{directory / BACKBONE_CONFIG_NAME}: {str(exc).splitlines()[0]}") from None
        model = cls.from_config(backbone_config, config)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise RomebertError(f"{weights}: not found")
        try:
            state = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise RomebertError(f"{weights}: corrupt or truncated safetensors file ({exc})") from None
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise RomebertError(
                f"{weights}: weights do not match {CONFIG_NAME} (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise RomebertError(
                    f"{weights}: {key} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[key].shape)}"
                )
        model.load_state_dict(state)
        return model.to(map_location)

    def fit_target_scaling(self, labels: np.ndarray) -> None:
        """Regression: standardise every head's target with the training labels' mean and std.

        Why: the heads start near 0. With labels far from 0 every example's error has the same sign,
        so every exit's gradient asks the shared encoder for the same thing, a larger output for every
        input; in the joint methods the summed pull of the L-1 exits wins, and the encoder maps every
        input to nearly the same representation, after which no head can tell pairs apart (the STS-B
        figures are in docs/methods.md). Predicting the standardised target removes that common-mode
        error, whatever the labels' scale.
        """
        if not self.config.is_regression:
            raise RomebertError("target scaling applies to regression models (num_labels 1) only")
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if y.size == 0:
            raise RomebertError("no regression labels to fit the target scaling on")
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:
            i = int(bad[0])
            raise RomebertError(f"training example {i} has label {y[i]}: regression labels must be finite")
        std = float(y.std())
        self.set_target_scaling(float(y.mean()), std if std > 1e-8 else 1.0)

    def set_target_scaling(self, mean: float | None, std: float | None) -> None:
        """Set (or clear, with None) the regression heads' output scaling; see :meth:`fit_target_scaling`."""
        self.config.target_mean, self.config.target_std = mean, std
        self.config.__post_init__()  # the same checks as a loaded config
        for head in self.exits:
            head.target = self.config.target_scaling

    # ----------------------------------------------------------------------------------------------
    # layer-by-layer execution
    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def layers(self) -> Sequence[nn.Module]:
        """The module run as each layer (ALBERT: the shared layer, L times)."""
        return self.adapter.layers

    def embed(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Token embeddings [B, T, H] (projected to the hidden size where the family does that).

        ``attention_mask`` [B, T]: DeBERTa's embeddings are multiplied by it; the others ignore it.
        """
        return self.adapter.embed(input_ids, token_type_ids, attention_mask)

    def layer_inputs(self, hidden: Tensor, mask: Tensor) -> Any:
        """What every layer of this batch needs besides its hidden state, built once per batch from the
        embeddings [B, T, H] and the 0/1 mask [B, T]: for BERT-like families the mask the backbone's
        attention implementation expects (None where it needs none), for DeBERTa relative positions
        too, for ModernBERT per-attention-type masks and rotary tables.
        """
        return self.adapter.layer_inputs(hidden, mask)

    attention_mask = layer_inputs  # the BERT-only name of layer_inputs, kept for callers of that API

    def run_layer(self, index: int, hidden: Tensor, layer_inputs: Any) -> Tensor:
        """Apply encoder layer ``index`` (0-based) to hidden [B, T, H]."""
        return self.adapter.run_layer(index, hidden, layer_inputs)

    def exit_input(self, hidden: Tensor) -> Tensor:
        """What the exits read of a layer's output (ModernBERT: its final norm; otherwise ``hidden``)."""
        transform = self.adapter.exit_transform
        return hidden if transform is None else transform(hidden)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        frozen_backbone: bool = False,
        **_: object,
    ) -> Tensor:
        """Every exit's logits, [L, B, C].

        ``frozen_backbone``: run the encoder without building a graph (DeeBERT stage two trains only
        the exits, so storing activations for a backward through the encoder would be wasted memory).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = []
        encoder_grad = torch.is_grad_enabled() and not frozen_backbone
        with torch.set_grad_enabled(encoder_grad):
            hidden = self.embed(input_ids, token_type_ids, attention_mask)
            inputs = self.layer_inputs(hidden, attention_mask)
        weights = pool_weights(attention_mask, hidden.dtype) if self.config.pooling == "mean" else None
        for i, head in enumerate(self.exits):
            with torch.set_grad_enabled(encoder_grad):
                hidden = self.run_layer(i, hidden, inputs)
                exit_hidden = self.exit_input(hidden)
            logits.append(head(exit_hidden, attention_mask, weights))
        return torch.stack(logits)

    # ----------------------------------------------------------------------------------------------
    # parameter groups used by the training methods
    def projection_parameters(self) -> list[nn.Parameter]:
        """The set S of gradient projection: weight matrices of encoder layers 1..L-1.

        Matrices only (ndim == 2): no biases, no LayerNorm weights. The last layer is excluded because
        only the final loss reaches it. ALBERT: the shared layer's matrices, once
        (``encoders.AlbertAdapter.projection_parameters`` says why).
        """
        return self.adapter.projection_parameters()

    def segments(self, precision: str = "fp32") -> TorchSegments:
        """This model cut after every layer, as ``engine.EarlyExitEngine`` runs it (on a GPU, in
        ``precision`` under autocast)."""
        return TorchSegments(self, precision)

    def final_head_parameters(self) -> list[nn.Parameter]:
        return list(self.exits[-1].parameters())

    def early_exit_parameters(self) -> list[nn.Parameter]:
        """Exits 1..L-1 (everything DeeBERT's second stage trains)."""
        return [p for head in self.exits[:-1] for p in head.parameters()]
