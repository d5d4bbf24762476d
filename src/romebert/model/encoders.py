"""One adapter per encoder family: how :class:`~romebert.model.modeling.MultiExitModel` runs a Hugging Face
encoder one layer at a time.

The backbone's own modules are called (nothing of their code is forked); an adapter only knows where
they are and what each layer call needs besides the hidden state:

    embed(input_ids, token_type_ids, mask)  -> hidden [B, T, H]   (embeddings, projected to H if needed)
    layer_inputs(hidden, mask)              -> what every layer of this batch needs (masks, positions)
    run_layer(i, hidden, inputs)            -> hidden [B, T, H]
    exit_transform                          -> None, or the module every exit reads its hidden state through

``layer_inputs`` is computed once per batch from the batch's hidden state and 0/1 mask [B, T] and never
sliced: when the engine selects or merges rows (``modeling.TorchSegments``) it recomputes them from the
compacted mask, so an adapter needs no select/merge code for masks, rotary tables or relative positions.
Every adapter assumes right padding (positions 0..T-1), which is what the engine's column trimming keeps.

``ADAPTERS`` maps ``config.model_type`` to the adapter class; it is the one place a family is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

from romebert.core.errors import RomebertError


class EncoderAdapter:
    """BERT-like encoders (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, MiniLM): ``.embeddings`` and
    ``.encoder.layer``, post-LayerNorm layers called as ``layer(hidden, attention_mask=mask)``; the base
    class of the other families' adapters."""

    family = "BERT-like"
    # export_graphs' fused BERT segments (cut before each output LayerNorm) fit this family's layers;
    # the other families export as generic segments.
    fused_export = True
    # A one-line reason if this family cannot be exported to ONNX, else None.
    export_refusal: str | None = None

    def __init__(self, backbone: PreTrainedModel) -> None:
        self.backbone = backbone
        self.config = backbone.config

    # ---------------------------------------------------------------------------------- structure
    @property
    def layers(self) -> Sequence[nn.Module]:
        """Module run as layer i (a module may appear more than once: ALBERT)."""
        return self.backbone.encoder.layer

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def exit_transform(self) -> Callable[[Tensor], Tensor] | None:
        """Applied to a layer's output before any exit reads it (None: the exits read it as it is)."""
        return None

    def take_pooler(self) -> nn.Linear | None:
        """Remove the backbone's pretrained pooler and return its Linear (exits start from a copy).

        The pooler itself is never called (each exit has its own), so dropping it keeps the parameter
        list free of weights that get no gradient.
        """
        pooler = getattr(self.backbone, "pooler", None)
        if pooler is None:
            return None
        self.backbone.pooler = None
        dense = getattr(pooler, "dense", None)
        return dense if isinstance(dense, nn.Linear) else None

    # -------------------------------------------------------------------------------- computation
    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Token embeddings [B, T, H] (ELECTRA's projection applied when it has one)."""
        hidden = self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        project = getattr(self.backbone, "embeddings_project", None)
        return project(hidden) if project is not None else hidden

    def layer_inputs(self, hidden: Tensor, mask: Tensor) -> Any:
        """The mask the backbone's attention implementation expects (eager, sdpa, ...); None where it
        needs none (the backbone's mask builder decides, e.g. for a batch without padding)."""
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)

    def run_layer(self, index: int, hidden: Tensor, inputs: Any) -> Tensor:
        """Layer ``index`` (0-based) on hidden [B, T, H]."""
        out = self.layers[index](hidden, attention_mask=inputs)
        return out[0] if isinstance(out, tuple) else out

    # -------------------------------------------------------------------------------- training
    def projection_parameters(self) -> list[nn.Parameter]:
        """Weight matrices (ndim 2) of the modules run as layers 1..L-1, each parameter once.

        The last layer is excluded because only the final loss reaches it (where it is not shared).
        """
        seen: set[int] = set()
        out = []
        for layer in self.layers[:-1]:
            for p in layer.parameters():
                if p.ndim == 2 and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out


class DistilBertAdapter(EncoderAdapter):
    """DistilBERT: ``.embeddings`` (no segment embeddings) and ``.transformer.layer``; no pooler."""

    family = "DistilBERT"
    fused_export = False

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self.backbone.transformer.layer

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self.backbone.embeddings(input_ids)  # DistilBERT has no token types


class AlbertAdapter(EncoderAdapter):
    """ALBERT: shared layer groups; layer i runs group ``i * G // L`` (G = num_hidden_groups, usually 1:
    one layer applied L times). Embeddings are ``embedding_size`` wide and projected to the hidden size
    by the encoder's ``embedding_hidden_mapping_in``, which ``embed`` applies."""

    family = "ALBERT"
    fused_export = False

    def __init__(self, backbone: PreTrainedModel) -> None:
        super().__init__(backbone)
        cfg, groups = self.config, backbone.encoder.albert_layer_groups
        # the index rule of AlbertTransformer.forward
        per_group = cfg.num_hidden_layers / cfg.num_hidden_groups
        self._layers = [groups[int(i / per_group)] for i in range(cfg.num_hidden_layers)]

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self._layers

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        hidden = self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # [B, T, E]
        return self.backbone.encoder.embedding_hidden_mapping_in(hidden)  # [B, T, H]

    def take_pooler(self) -> nn.Linear | None:
        pooler = getattr(self.backbone, "pooler", None)  # a bare Linear (+ pooler_activation, a Tanh)
        self.backbone.pooler = None
        return pooler if isinstance(pooler, nn.Linear) else None

    def run_layer(self, index: int, hidden: Tensor, inputs: Any) -> Tensor:
        return self.layers[index](hidden, inputs)

    def projection_parameters(self) -> list[nn.Parameter]:
        """The shared layer's weight matrices, once (with several layer groups: the matrices of the
        groups that layers 1..L-1 run, each once).

        The BERT rule (layers 1..L-1, not L) cannot separate anything here: the one shared layer is
        layers 1..L. Leaving it out would make S empty and gradient projection a no-op, so S is the
        shared layer: the early exits' losses reach it through every application but the last, and
        that is where their gradients conflict with the final loss's. (It also receives the final
        loss's gradient through application L; the projection acts on the summed gradient, which is
        what the optimizer applies to the shared weights anyway.)
        """
        return super().projection_parameters()


@dataclass
class DebertaInputs:
    """What every DeBERTa-v2/v3 layer of a batch needs, built once per batch by the encoder's methods."""

    attention: Tensor  # [B, 1, T, T] 0/1: query and key both real tokens
    relative_pos: Tensor | None  # [1, T, T] (log-bucketed) relative positions, None without relative attention
    rel_embeddings: Tensor | None  # [2 * span, H] the shared relative embeddings, LayerNorm'd if configured
    mask: Tensor  # [B, T] 0/1, for the convolution after layer 1 (DeBERTa-v2 with conv_kernel_size)


class DebertaV2Adapter(EncoderAdapter):
    """DeBERTa-v2 / v3: disentangled attention over relative positions shared across layers (the
    encoder's ``rel_embeddings``, its LayerNorm and the relative position ids), a [B, 1, T, T] 0/1 mask,
    embeddings multiplied by the mask, and (v2 with ``conv_kernel_size``) a convolution after layer 1."""

    family = "DeBERTa-v2"
    fused_export = False

    def take_pooler(self) -> nn.Linear | None:
        return None  # DebertaV2Model has none (ContextPooler belongs to the classification model)

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        # The mask zeroes padding positions' embeddings, as DebertaV2Model does; the convolution after
        # layer 1 reads neighbours, so padding must look like the zeros trimmed columns are replaced by.
        if mask is None:
            mask = torch.ones_like(input_ids)
        return self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=mask)

    def layer_inputs(self, hidden: Tensor, mask: Tensor) -> DebertaInputs:
        enc = self.backbone.encoder
        return DebertaInputs(enc.get_attention_mask(mask), enc.get_rel_pos(hidden), enc.get_rel_embedding(), mask)

    def run_layer(self, index: int, hidden: Tensor, inputs: DebertaInputs) -> Tensor:
        enc = self.backbone.encoder
        out = enc.layer[index](
            hidden, inputs.attention, relative_pos=inputs.relative_pos, rel_embeddings=inputs.rel_embeddings
        )[0]
        if index == 0 and enc.conv is not None:  # reads layer 1's input (the embeddings) too
            out = enc.conv(hidden, out, inputs.mask)
        return out


@dataclass
class ModernBertInputs:
    """Per-batch inputs of ModernBERT layers, by attention type ("full_attention", "sliding_attention")."""

    masks: dict[str, Tensor | None]  # each type's attention mask (sdpa: bool, eager: additive; None: none needed)
    rotary: dict[str, tuple[Tensor, Tensor]]  # each type's (cos, sin) [1, T, head_dim]


class ModernBertAdapter(EncoderAdapter):
    """ModernBERT: pre-norm layers with rotary position embeddings, global attention every few layers and
    sliding-window attention between them, and a final LayerNorm after the last layer.

    The final norm: every exit reads ``final_norm(hidden)``, while the next layer gets the un-normalised
    residual stream. A pre-norm encoder's residual stream is never normalised between layers (its scale
    grows with depth); the final norm is what the pretrained model puts in front of every head, so each
    exit gets the kind of input a head was pretrained on, the encoder still computes exactly the
    backbone's function, and exit L reads the backbone's own ``last_hidden_state``.

    Attention runs as eager or sdpa on padded batches: flash and flex attention need unpadded or
    block-mask inputs that this layer-by-layer path does not build, so they are replaced by sdpa.
    """

    family = "ModernBERT"
    fused_export = False

    def __init__(self, backbone: PreTrainedModel) -> None:
        super().__init__(backbone)
        if self.config._attn_implementation not in ("eager", "sdpa"):
            self.config._attn_implementation = "sdpa"

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self.backbone.layers

    @property
    def exit_transform(self) -> Callable[[Tensor], Tensor] | None:
        return self.backbone.final_norm

    def take_pooler(self) -> nn.Linear | None:
        return None

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self.backbone.embeddings(input_ids=input_ids)  # positions are rotary, in the layers

    def layer_inputs(self, hidden: Tensor, mask: Tensor) -> ModernBertInputs:
        kw = {"config": self.config, "inputs_embeds": hidden, "attention_mask": mask}
        builders = {
            "full_attention": create_bidirectional_mask,
            "sliding_attention": create_bidirectional_sliding_window_mask,
        }
        types = sorted(set(self.config.layer_types))
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # [1, T]: right padding
        rotary = self.backbone.rotary_emb
        return ModernBertInputs({t: builders[t](**kw) for t in types}, {t: rotary(hidden, positions, t) for t in types})

    def run_layer(self, index: int, hidden: Tensor, inputs: ModernBertInputs) -> Tensor:
        layer = self.layers[index]
        kind = layer.attention_type
        return layer(hidden, attention_mask=inputs.masks[kind], position_embeddings=inputs.rotary[kind])


# config.model_type -> adapter; the one place a family is registered
ADAPTERS: dict[str, type[EncoderAdapter]] = {
    "bert": EncoderAdapter,
    "roberta": EncoderAdapter,
    "xlm-roberta": EncoderAdapter,
    "camembert": EncoderAdapter,
    "data2vec-text": EncoderAdapter,
    "electra": EncoderAdapter,
    "distilbert": DistilBertAdapter,
    "albert": AlbertAdapter,
    "deberta-v2": DebertaV2Adapter,
    "modernbert": ModernBertAdapter,
}


def adapter_for(backbone: PreTrainedModel) -> EncoderAdapter:
    """The adapter of ``backbone``'s family (by ``config.model_type``); unknown families are refused."""
    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise RomebertError(
            f"encoder family {model_type!r} ({type(backbone).__name__}) is not supported; "
            f"supported model types: {', '.join(sorted(ADAPTERS))}"
        )
    return cls(backbone)
