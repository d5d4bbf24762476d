"""A :class:`~romebert.model.modeling.MultiExitModel` as ``runtime.engine.Segments``: run one layer at a
time by the early-exit engine, hidden states kept on the model's device, logits handed to the host."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from romebert.core.devices import autocast
from romebert.runtime.encoding import mean_pool_weights


@dataclass
class TorchState:
    """Rows between two layers: the next layer's input and what every layer of these rows needs."""

    hidden: Tensor  # [b, T, H]
    mask: Tensor  # [b, T] 0/1, on the model's device
    weights: Tensor | None  # [b, T] mean-pooling weights; None for first-token pooling
    # The layers' per-batch inputs for (hidden, mask) (``MultiExitModel.layer_inputs``), built at the first
    # layer these rows run; never sliced: select and merge make a new state, which rebuilds them from its mask.
    layer_inputs: Any = None
    has_layer_inputs: bool = False  # (None is a valid value: "no mask needed")


class TorchSegments:
    """A :class:`MultiExitModel` run one layer at a time for the early-exit engine (``engine.Segments``).

    Inputs and logits are numpy on the host; hidden states stay on the model's device. The exit heads
    run as the modules themselves, so the engine's logits are the model's, on whatever device or dtype
    the model is moved to.
    """

    def __init__(self, model: Any, precision: str = "fp32") -> None:  # a MultiExitModel (its segments() makes these)
        self.model = model.eval()
        # the training precision, where it is faster: on a GPU; the logits handed out are fp32 either way
        device = model.exits[0].classifier.weight.device
        self._autocast = (lambda: autocast(device, precision)) if device.type == "cuda" else contextlib.nullcontext
        self.num_layers = model.num_layers
        self.exit_layers = list(range(1, self.num_layers + 1))
        self.num_labels = model.config.num_labels
        self.regression = model.config.is_regression
        self._mean = model.config.pooling == "mean"
        self._exit_transform = model.adapter.exit_transform  # None for most families: no call at all
        self.features = ("nsp",)  # per-exit outputs besides the logits it can hand out (CAP's null-space share)
        # each head's (offset, basis) for nsp, computed on first use (a pinv and a QR); segments are made per
        # use of a model (model.segments()), so weights trained later get bases of their own
        self._nsp_bases: dict[int, tuple[Tensor, Tensor]] = {}

    @torch.inference_mode()
    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None) -> TorchState:
        device = self.model.exits[0].classifier.weight.device
        ids = torch.from_numpy(input_ids).to(device)
        types = torch.from_numpy(token_type_ids).to(device) if token_type_ids is not None else None
        mask = torch.from_numpy(attention_mask).to(device)
        hidden = self.model.embed(ids, types, mask)  # [b, T, H]
        weights = None
        if self._mean:
            weights = torch.from_numpy(mean_pool_weights(attention_mask)).to(device, hidden.dtype)
        return TorchState(hidden, mask, weights)

    @torch.inference_mode()
    def all_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None):
        """Every exit's logits [L, b, C] float32 from one forward pass (one copy to the host at the end)."""
        device = self.model.exits[0].classifier.weight.device
        types = torch.from_numpy(token_type_ids).to(device) if token_type_ids is not None else None
        ids, mask = torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device)
        with self._autocast():
            logits = self.model(ids, mask, types)
        return logits.float().cpu().numpy()

    @torch.inference_mode()
    def layer(self, index: int, state: TorchState, features: bool = False):
        """Layer ``index`` and its exit: (state, logits [b, C]), and with ``features`` also {"nsp": [b]}."""
        with self._autocast():
            if not state.has_layer_inputs:  # built once per set of rows and columns
                state.layer_inputs = self.model.layer_inputs(state.hidden, state.mask)
                state.has_layer_inputs = True
            state.hidden = self.model.run_layer(index, state.hidden, state.layer_inputs)
            exit_hidden = state.hidden if self._exit_transform is None else self._exit_transform(state.hidden)
            head = self.model.exits[index]
            x = head.feature(exit_hidden, state.mask, state.weights)  # [b, H]
            logits = head.classify(x)  # [b, C]
        if not features:
            return state, logits.float().cpu().numpy()
        if index not in self._nsp_bases:
            self._nsp_bases[index] = head.null_space_basis()
        nsp = head.null_space_share(x, self._nsp_bases[index])
        return state, logits.float().cpu().numpy(), {"nsp": nsp.cpu().numpy()}

    @torch.inference_mode()
    def select(self, state: TorchState, rows: np.ndarray, cols: int) -> TorchState:
        index = torch.from_numpy(rows).to(state.hidden.device)
        weights = state.weights[:, :cols].index_select(0, index) if state.weights is not None else None
        hidden = state.hidden[:, :cols].index_select(0, index)
        return TorchState(hidden, state.mask[:, :cols].index_select(0, index), weights)

    @torch.inference_mode()
    def merge(self, states: Sequence[TorchState], cols: int) -> TorchState:
        weights = None
        if states[0].weights is not None:
            weights = torch.cat([_width(s.weights, cols) for s in states])
        hidden = torch.cat([_width(s.hidden, cols) for s in states])
        return TorchState(hidden, torch.cat([_width(s.mask, cols) for s in states]), weights)


def _width(x: Tensor, cols: int) -> Tensor:
    """``x`` [g, T, ...] cut or zero-padded (padding = masked out) to ``cols`` columns."""
    t = x.shape[1]
    if t >= cols:
        return x[:, :cols]
    return torch.nn.functional.pad(x, [0, 0] * (x.ndim - 2) + [0, cols - t])
