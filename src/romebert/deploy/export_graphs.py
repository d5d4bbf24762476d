"""The modules that become ONNX graphs: a multi-exit model cut into segments, one per layer.

ONNX Runtime cannot leave a graph early per sample (an ``If`` decides for the whole batch), so an export
is one graph per layer, each with its exit head, and the engine's loop runs between them.

Two segment forms:

* Fused BERT segments, for BERT-like layers (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM). Where the cut
  goes matters for speed. ONNX Runtime's transformer optimizer fuses a BERT layer's attention only when
  the attention's input comes from a LayerNorm inside the same graph (its pattern starts at that
  LayerNorm). So a segment does not end at a layer's output: segment i ends at the residual sum that
  layer i's output LayerNorm normalises, and segment i+1 starts with that LayerNorm. Segment i computes
  the LayerNorm too, for its exit head: one LayerNorm per layer is computed twice, and every layer keeps
  its fused attention. Segment 1 also holds the embeddings (and so their fused EmbedLayerNormalization,
  and one call less). The attention is written out in the classic BERT form (one transpose per operand,
  scores divided by sqrt(d), an additive mask); that is the pattern the optimizer's attention fusion
  matches, and it is the same arithmetic as the backbone's own attention (tests compare the two).
* Generic segments, for every other family (DistilBERT, ALBERT, DeBERTa-v2/v3, ModernBERT): segment 1
  is embeddings + layer 1 + exit 1, segment i is layer i + exit i, each cut at the layer's output and
  calling the backbone's own modules through the family's adapter (``encoders.py``), which builds the
  layer inputs (masks, relative positions, rotary tables) inside the graph from the mask and the state.
  The optimizer fuses what it recognises (the manifest lists it per graph); attention fusion mostly
  does not apply to these forms.

Graph inputs and outputs (b = batch, t = tokens; both dynamic):
    segment 1:      input_ids, attention_mask, token_type_ids [b, t] int64 -> next_state [b, t, H], logits [b, C],
                                                                             nsp [b]
    segment 2..L-1: state [b, t, H], attention_mask [b, t] int64           -> next_state, logits, nsp
    segment L:      state, attention_mask                                    -> logits, nsp
nsp is CAP's null-space share of the exit's pooled feature (``modeling.null_space_share``), for the cap
criterion; the engine asks for it only under that criterion.
With mean pooling every segment also takes pool_weights [b, t] float32 (``data.mean_pool_weights``): the
host computes them once per batch, where in-graph they cost seven small nodes per exit. An input a graph
does not use (token_type_ids for DistilBERT or ModernBERT) is dropped by the exporter; the manifest
lists each graph's actual inputs, and the runtime feeds those.
(a one-layer model has one segment, from input_ids to logits.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from romebert.core.errors import RomebertError
from romebert.model.modeling import MultiExitModel, null_space_share

MASK_VALUE = -10000.0  # the additive mask of classic BERT exports (what the attention fusion expects)


def _is_bert_like(layer: nn.Module) -> bool:
    att = getattr(layer, "attention", None)
    parts = (
        getattr(getattr(att, "self", None), "query", None),
        getattr(getattr(att, "output", None), "LayerNorm", None),
        getattr(getattr(layer, "intermediate", None), "dense", None),
        getattr(getattr(layer, "output", None), "LayerNorm", None),
    )
    return all(p is not None for p in parts)


def uses_fused_segments(model: MultiExitModel) -> bool:
    """Whether the fused BERT segments apply (a BERT-like family whose every layer has BERT's layout)."""
    return model.adapter.fused_export and all(_is_bert_like(layer) for layer in model.layers)


def check_exportable(model: MultiExitModel) -> None:
    """Refuse, in one line, a family that cannot be exported (``EncoderAdapter.export_refusal``)."""
    reason = model.adapter.export_refusal
    if reason is not None:
        raise RomebertError(f"ONNX export does not support {model.adapter.family} encoders: {reason}")


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[b, t] 0/1 -> [b, 1, 1, t]: 0 on tokens, MASK_VALUE on padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def _attention(layer: nn.Module, x: Tensor, ext: Tensor) -> Tensor:
    """The layer's self-attention block (attention + output dense + residual LayerNorm), classic form."""
    att = layer.attention.self
    heads = att.num_attention_heads
    d = att.attention_head_size
    b, t = x.shape[0], x.shape[1]
    q = att.query(x).view(b, t, heads, d).permute(0, 2, 1, 3)
    k = att.key(x).view(b, t, heads, d).permute(0, 2, 3, 1)
    v = att.value(x).view(b, t, heads, d).permute(0, 2, 1, 3)
    probs = torch.softmax(torch.matmul(q, k) / math.sqrt(d) + ext, dim=-1)
    ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(b, t, heads * d)
    out = layer.attention.output
    return out.LayerNorm(out.dense(ctx) + x)


def layer_sum(layer: nn.Module, x: Tensor, ext: Tensor) -> Tensor:
    """BERT layer up to its output LayerNorm: the residual sum that LayerNorm normalises."""
    a = _attention(layer, x, ext)
    return layer.output.dense(layer.intermediate(a)) + a


class _Exit(nn.Module):
    """Exit ``index``'s head as a segment ends: (logits [b, C], nsp [b]), CAP's projection kept as constants."""

    def __init__(self, model: MultiExitModel, index: int) -> None:
        super().__init__()
        self.head = model.exits[index]
        offset, basis = self.head.null_space_basis()
        self.register_buffer("nsp_offset", offset)
        self.register_buffer("nsp_basis", basis)

    def forward(self, hidden: Tensor, mask: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
        x = self.head.feature(hidden, mask, weights)  # [b, H]
        return self.head.classify(x), null_space_share(x, self.nsp_offset, self.nsp_basis)


def _ends(is_last: bool, state: Tensor, exit_out: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    """A segment's outputs (``segment_io``): the exit's, after the state unless it is the last segment."""
    return exit_out if is_last else (state, *exit_out)


class FirstSegment(nn.Module):
    """Embeddings + layer 1 + exit 1 (the whole model when it has one layer), fused BERT form."""

    def __init__(self, model: MultiExitModel) -> None:
        super().__init__()
        self.model, self.exit = model, _Exit(model, 0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor, pool_weights=None):
        m = self.model
        hidden = m.embed(input_ids, token_type_ids)
        s = layer_sum(m.layers[0], hidden, additive_mask(attention_mask, hidden.dtype))
        return _ends(m.num_layers == 1, s, self.exit(m.layers[0].output.LayerNorm(s), attention_mask, pool_weights))


class NextSegment(nn.Module):
    """Layer ``index``'s output LayerNorm of the previous layer, layer ``index`` and its exit (fused form)."""

    def __init__(self, model: MultiExitModel, index: int) -> None:
        super().__init__()
        self.model, self.index, self.exit = model, index, _Exit(model, index)

    def forward(self, state: Tensor, attention_mask: Tensor, pool_weights=None):
        m, i = self.model, self.index
        x = m.layers[i - 1].output.LayerNorm(state)
        s = layer_sum(m.layers[i], x, additive_mask(attention_mask, x.dtype))
        return _ends(i == m.num_layers - 1, s, self.exit(m.layers[i].output.LayerNorm(s), attention_mask, pool_weights))


def _generic_layer(m: MultiExitModel, exit: _Exit, i: int, hidden: Tensor, mask: Tensor, pool_weights: Tensor | None):
    """Layer i and exit i as the model itself runs them: (next state, logits, nsp), without the state after layer L."""
    hidden = m.run_layer(i, hidden, m.layer_inputs(hidden, mask))
    return _ends(i == m.num_layers - 1, hidden, exit(m.exit_input(hidden), mask, pool_weights))


class GenericFirstSegment(nn.Module):
    """Embeddings + layer 1 + exit 1 through the family's adapter (any family)."""

    def __init__(self, model: MultiExitModel) -> None:
        super().__init__()
        self.model, self.exit = model, _Exit(model, 0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor, pool_weights=None):
        hidden = self.model.embed(input_ids, token_type_ids, attention_mask)
        return _generic_layer(self.model, self.exit, 0, hidden, attention_mask, pool_weights)


class GenericNextSegment(nn.Module):
    """Layer ``index`` + its exit, from the previous layer's output (any family)."""

    def __init__(self, model: MultiExitModel, index: int) -> None:
        super().__init__()
        self.model, self.index, self.exit = model, index, _Exit(model, index)

    def forward(self, state: Tensor, attention_mask: Tensor, pool_weights=None):
        return _generic_layer(self.model, self.exit, self.index, state, attention_mask, pool_weights)


class FullModel(nn.Module):
    """The whole model, final head only: the graph a user would export instead (the baseline)."""

    def __init__(self, model: MultiExitModel) -> None:
        super().__init__()
        self.model = model
        self.fused = uses_fused_segments(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor):
        m = self.model
        hidden = m.embed(input_ids, token_type_ids, attention_mask)
        if self.fused:
            ext = additive_mask(attention_mask, hidden.dtype)
            for layer in m.layers:
                hidden = layer.output.LayerNorm(layer_sum(layer, hidden, ext))
            return m.exits[-1](hidden, attention_mask)
        inputs = m.layer_inputs(hidden, attention_mask)
        for i in range(m.num_layers):
            hidden = m.run_layer(i, hidden, inputs)
        return m.exits[-1](m.exit_input(hidden), attention_mask)


def segment_modules(model: MultiExitModel) -> list[nn.Module]:
    """One module per layer (segment 1 .. L), in eval mode: fused BERT segments where they apply,
    generic ones otherwise."""
    check_exportable(model)
    if uses_fused_segments(model):
        mods: list[nn.Module] = [FirstSegment(model)]
        mods += [NextSegment(model, i) for i in range(1, model.num_layers)]
    else:
        mods = [GenericFirstSegment(model)]
        mods += [GenericNextSegment(model, i) for i in range(1, model.num_layers)]
    return [m.eval() for m in mods]


def segment_io(index: int, num_layers: int, mean_pooling: bool) -> tuple[list[str], list[str]]:
    """(input names, output names) of segment ``index`` (0-based), as traced (the exporter may drop an
    input the graph does not use)."""
    inputs = ["input_ids", "attention_mask", "token_type_ids"] if index == 0 else ["state", "attention_mask"]
    if mean_pooling:  # computed once per batch on the host (data.mean_pool_weights), not in every graph
        inputs.append("pool_weights")
    outputs = ["logits", "nsp"] if index == num_layers - 1 else ["next_state", "logits", "nsp"]
    return inputs, outputs
