"""Where the per-head tensors live in each Hugging Face architecture — as data.

An :class:`ArchAdapter` is a table entry, not code: the module paths of the decoder layers, the
attention block and the final norm; the module whose *output* is the final query (after any q bias
and q norm, which is where undifferentiated attention must scale it); the module whose *input* is
the concatenated per-head outputs (the o_proj input, ``hook_z`` in TransformerLens terms); where
the values live (for the running-mean cross-check); and how the weights are laid out for surgery.

A new family is one entry in :data:`ADAPTERS`. :func:`get_adapter` resolves a model to its
adapter and reads the head geometry from the config and the attention module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

QLayout = Literal["flat", "bthd", "bhtd"]
WeightKind = Literal["linear", "conv1d"]


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter (or does not look like its adapter expects)."""


@dataclass(frozen=True)
class ArchAdapter:
    """Per-architecture module paths and tensor layouts.

    Paths are dotted attribute paths: ``layers`` from the CausalLM root, the others relative to
    one attention module (``attn`` relative to a decoder layer).
    """

    layers: str = "model.layers"
    attn: str = "self_attn"
    final_norm: str = "model.norm"
    # module whose OUTPUT is the final query of every head (after bias and q norm)
    q_site: str = "q_proj"
    q_layout: QLayout = "flat"
    # column offset of the query inside a fused projection, in units of (n_heads * head_dim) = 0
    # the module whose output holds the values, and the offset of v inside it in units of head_dim
    v_site: str = "v_proj"
    v_fused_offset: Literal["none", "after_q_and_k", "after_q_and_k_equal"] = "none"
    # module whose INPUT is the concatenation of the heads' outputs [batch, pos, n_heads*head_dim]
    o_site: str = "o_proj"
    # weight surgery
    q_weight: str | None = "q_proj"  # None: UA cannot be written into weights (q norm)
    weight_kind: WeightKind = "linear"
    notes: str = ""


_LLAMA = ArchAdapter(notes="q/k/v/o linears; q bias if attention_bias; GQA")
_QWEN3 = dataclasses.replace(
    _LLAMA,
    q_site="q_norm",
    q_layout="bthd",
    q_weight=None,
    notes="per-head q RMSNorm on [b,t,H,d]: the query is final after q_norm",
)
_GEMMA3 = dataclasses.replace(
    _LLAMA,
    q_site="q_norm",
    q_layout="bhtd",
    q_weight=None,
    notes="q RMSNorm applied after the head transpose [b,H,t,d]; sliding-window layers",
)
_OLMO2 = dataclasses.replace(
    _LLAMA,
    q_site="q_norm",
    q_layout="flat",
    q_weight=None,
    notes="q RMSNorm over the whole flat query",
)
_PHI3 = dataclasses.replace(
    _LLAMA,
    q_site="qkv_proj",
    v_site="qkv_proj",
    v_fused_offset="after_q_and_k",
    q_weight="qkv_proj",
    notes="fused qkv linear: [q (H*d) | k (Hkv*d) | v (Hkv*d)]",
)
_GPT2 = ArchAdapter(
    layers="transformer.h",
    attn="attn",
    final_norm="transformer.ln_f",
    q_site="c_attn",
    v_site="c_attn",
    v_fused_offset="after_q_and_k_equal",
    o_site="c_proj",
    q_weight="c_attn",
    weight_kind="conv1d",
    notes="fused Conv1D c_attn [q | k | v], weights stored [in, out]",
)

#: ``config.model_type`` -> adapter. Add a family here.
ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen2_moe": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "qwen3": _QWEN3,
    "qwen3_moe": _QWEN3,
    "gemma3_text": _GEMMA3,
    "olmo2": _OLMO2,
    "phi3": _PHI3,
    "gpt2": _GPT2,
}


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path from ``root``."""
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


@dataclass(frozen=True)
class HeadGeometry:
    """The head layout of one model: what the user indexes and how tensors are shaped."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def n_total(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The key/value head serving query ``head`` (GQA groups are contiguous, as ``repeat_kv``)."""
        return head // self.group_size


@dataclass(frozen=True)
class BoundAdapter:
    """An adapter bound to one model instance: modules resolved, geometry read."""

    spec: ArchAdapter
    geometry: HeadGeometry
    layers: tuple[nn.Module, ...]
    attns: tuple[nn.Module, ...]
    final_norm: nn.Module

    def q_module(self, layer: int) -> nn.Module:
        return get_module(self.attns[layer], self.spec.q_site)

    def v_module(self, layer: int) -> nn.Module:
        return get_module(self.attns[layer], self.spec.v_site)

    def o_module(self, layer: int) -> nn.Module:
        return get_module(self.attns[layer], self.spec.o_site)

    def v_columns(self) -> slice:
        """Columns of the v-site output that hold the values (all kv heads)."""
        g = self.geometry
        width = g.n_kv_heads * g.head_dim
        if self.spec.v_fused_offset == "none":
            return slice(0, width)
        start = g.n_heads * g.head_dim + width
        return slice(start, start + width)

    def check_heads(self, heads) -> list[tuple[int, int]]:
        """Validate ``(layer, head)`` pairs; returns them as a list of int tuples."""
        return validate_heads(heads, self.geometry)


def validate_heads(heads, geometry: HeadGeometry) -> list[tuple[int, int]]:
    """Check ``heads`` is a sequence of in-range ``(layer, head)`` pairs; return it normalised."""
    if isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, int) for x in heads):
        raise TypeError(f"heads must be a list of (layer, head) pairs, got a single pair {heads!r}; "
                        f"write [{heads!r}]")
    out: list[tuple[int, int]] = []
    for item in heads:
        try:
            layer, head = item
            layer, head = int(layer), int(head)
        except (TypeError, ValueError):
            raise TypeError(f"each head must be a (layer, head) pair of ints, got {item!r}") from None
        if not 0 <= layer < geometry.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {geometry.n_layers} layers (0..{geometry.n_layers - 1})")
        if not 0 <= head < geometry.n_heads:
            raise IndexError(f"head {head} out of range: layer {layer} has {geometry.n_heads} query heads (0..{geometry.n_heads - 1})")
        out.append((layer, head))
    return out


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no .config: pass a Hugging Face causal LM")
    return getattr(config, "text_config", None) if config.model_type not in ADAPTERS and hasattr(config, "text_config") else config


def get_adapter(model: nn.Module) -> BoundAdapter:
    """Resolve ``model`` to its adapter, check the modules exist, and read the head geometry.

    The result is cached on the model (``model._safetyheads_adapter``).
    """
    cached = model.__dict__.get("_safetyheads_adapter")
    if cached is not None and get_module(model, cached.spec.layers)[0] is cached.layers[0]:
        return cached
    config = _config_of(model)
    model_type = getattr(config, "model_type", None)
    spec = ADAPTERS.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"no safetyheads adapter for model_type {model_type!r} ({type(model).__name__}). Supported: "
            f"{', '.join(sorted(ADAPTERS))}. An adapter names: the decoder layer list, the attention "
            "module, the final norm, the module whose output is the final query (after q bias and q "
            "norm) and its layout, the module holding v, and the o_proj whose input is the per-head "
            "outputs; see safetyheads/adapters.py"
        )
    try:
        layers = tuple(get_module(model, spec.layers))
        attns = tuple(get_module(layer, spec.attn) for layer in layers)
        final_norm = get_module(model, spec.final_norm)
        for a in attns[:1]:
            for site in (spec.q_site, spec.v_site, spec.o_site):
                get_module(a, site)
    except AttributeError as e:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type {model_type!r}) does not have the modules its adapter "
            f"expects ({spec}): {e}"
        ) from e
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    attn0 = attns[0]
    head_dim = getattr(attn0, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // n_heads
    geometry = HeadGeometry(str(model_type), len(layers), n_heads, n_kv, int(head_dim))
    bound = BoundAdapter(spec, geometry, layers, attns, final_norm)
    model.__dict__["_safetyheads_adapter"] = bound  # plain attribute, not a registered submodule
    return bound


def head_geometry(model: nn.Module) -> HeadGeometry:
    """Number of layers, query heads, key/value heads and head_dim of ``model``."""
    return get_adapter(model).geometry


def model_device(model: nn.Module) -> torch.device:
    """The device of the input embeddings (where inputs go, also under ``device_map``)."""
    emb = model.get_input_embeddings()
    return emb.weight.device
