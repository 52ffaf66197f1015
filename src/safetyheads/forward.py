"""Forward passes that compute only what a score needs.

* :func:`position_ids_from_mask` — positions that ignore left padding (so padding changes nothing,
  also for absolute-position models like GPT-2).
* :func:`reuse_residual` — skip the layers below ``start`` and feed a cached residual stream
  instead: an ablation in layer ``l`` cannot change layers ``< l``.
* :func:`lower_layers` — run only the layers below one layer (the residual entering it, their KV cache).
* :func:`last_token_logits` / :func:`last_token_hidden` — logits (``logits_to_keep=1``) or the
  final-norm hidden state at the last prompt position only, optionally after a cached prefix.
* :class:`SharedPrefix` — the token prefix every prompt of a set starts with (a chat template's
  system block), run once per ablation instead of once per prompt: its KV cache, expanded over a
  batch, stands in for those tokens (layout ``[prefix | left padding | rest]``, positions that skip
  the padding: the same attention and positions as the whole prompt).

All of them work on models split over devices by accelerate (``device_map=...``, including CPU/disk
offload): inputs go to :func:`input_device`, cached activations move to the layer that reads them,
and accelerate's per-module ``forward`` wrappers are left in place.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only real tokens: ``cumsum(mask) - 1``, 0 on left padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _identity_forward(hidden_states, *args, **kwargs):
    return hidden_states


_NO_FORWARD = object()


def execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: accelerate's execution device if it is dispatched, else the device of
    its first parameter that is not on ``meta`` (offloaded); None when neither is known."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook or one hook
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev)  # an int is an index of the accelerator (CUDA, XPU, …)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the input embeddings' device; under accelerate offload (embedding weights on
    ``meta``) the embedding's or the model's execution device."""
    emb = model.get_input_embeddings()
    if emb.weight.device.type != "meta":
        return emb.weight.device
    return execution_device(emb) or execution_device(model) or torch.device("cpu")


@contextlib.contextmanager
def reuse_residual(model: nn.Module, start: int, hidden: torch.Tensor | None) -> Iterator[None]:
    """Inside the block, layers ``0..start-1`` are skipped and layer ``start`` receives ``hidden``.

    ``hidden`` is the residual stream entering layer ``start`` from an earlier (unablated) forward
    pass of the same tokens, shape ``[1 or batch, pos, d_model]``; it is broadcast to the batch and
    moved to layer ``start``'s execution device (under a ``device_map`` it may live elsewhere).
    Nothing happens when ``start == 0`` or ``hidden is None``. The layers are restored on exit.

    A skipped layer's ``forward`` is replaced by an identity *instance attribute* and the previous
    instance attribute, if any, is put back on exit: accelerate's ``dispatch_model`` keeps its
    device-moving / offload wrapper there (``module._hf_hook`` + ``module._old_forward``), and it
    must survive the block. Skipped offloaded layers are not even loaded.
    """
    if start <= 0 or hidden is None:
        yield
        return
    layers = get_adapter(model).layers
    skipped = layers[:start]
    target = execution_device(layers[start])
    moved: dict[tuple, torch.Tensor] = {}

    def replace_input(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        dev = target or x.device
        key = (dev, x.dtype)
        if key not in moved:
            moved[key] = hidden.to(device=dev, dtype=x.dtype)
        h = moved[key]
        if h.shape[1:] != x.shape[1:]:
            raise ValueError(f"cached residual {tuple(h.shape)} does not match the input {tuple(x.shape)}")
        h = h.expand(x.shape[0], -1, -1).contiguous()
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    saved = [layer.__dict__.get("forward", _NO_FORWARD) for layer in skipped]
    handle = layers[start].register_forward_pre_hook(replace_input, with_kwargs=True)
    try:
        for layer in skipped:
            layer.forward = _identity_forward
        yield
    finally:
        handle.remove()
        for layer, fwd in zip(skipped, saved):
            if fwd is _NO_FORWARD:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = fwd


@contextlib.contextmanager
def captured_inputs(model: nn.Module, layers: Iterable[int] | None = None) -> Iterator[list[torch.Tensor | None]]:
    """Inside the block, ``inputs[l]`` is set to the residual stream entering layer ``l`` on every
    forward (only for ``l`` in ``layers`` when given; the others stay None)."""
    blocks = get_adapter(model).layers
    inputs: list[torch.Tensor | None] = [None] * len(blocks)
    which = range(len(blocks)) if layers is None else sorted(set(layers))

    def make(i: int):
        def hook(module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    handles = [blocks[i].register_forward_pre_hook(make(i), with_kwargs=True) for i in which]
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()


class _LayersDone(Exception):
    """Raised at the layer where :func:`lower_layers` stops."""


def lower_layers(model: nn.Module, stop: int, **inputs: Any) -> list[torch.Tensor]:
    """Run only layers ``0 … stop-1`` of ``model`` (under whatever ablation is active) on ``inputs`` (the
    keyword arguments of a forward, a KV cache included); returns the residual stream entering layers
    ``0 … stop``. A cache passed in ``inputs`` receives these tokens' keys and values in layers below
    ``stop`` only. Nothing above is computed: no later layer, no final norm, no unembedding."""
    layers = get_adapter(model).layers
    if not 0 < stop < len(layers):
        raise ValueError(f"stop must be in 1..{len(layers) - 1}, got {stop}")

    def halt(module, args, kwargs):
        raise _LayersDone

    with captured_inputs(model) as captured:
        handle = layers[stop].register_forward_pre_hook(halt, with_kwargs=True)  # after the capture's hook
        try:
            model.base_model(**inputs)
        except _LayersDone:
            pass
        else:  # pragma: no cover - a model whose forward skips its layers' pre-hooks
            raise RuntimeError(f"{type(model).__name__}: layer {stop} was never reached")
        finally:
            handle.remove()
    return captured[: stop + 1]  # type: ignore[return-value]


def layer_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 past: Any = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward (under whatever ablation is active): the residual stream entering every layer, and the
    last-token logits; ``past`` as in :func:`last_token_logits` (then the inputs cover ``input_ids`` only).

    Returns ``(inputs, logits)``: ``inputs[l]`` is ``[batch, pos, d_model]`` entering layer ``l``;
    ``logits`` is ``[batch, vocab]`` at the last position (see :func:`last_token_logits`).
    """
    with captured_inputs(model) as inputs:
        logits = last_token_logits(model, input_ids, attention_mask, past)
    return inputs, logits  # type: ignore[return-value]


def cache_argument(fn) -> str:
    """The name of ``fn``'s KV-cache argument: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``cache`` or ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def plain_cache(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain growing ``DynamicLayer`` holding tensors (caches with
    sliding windows, static, quantized or offloaded layers are not reshaped by this library)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - transformers without per-layer caches
        return False
    layers = getattr(cache, "layers", None)
    return (bool(layers) and not getattr(cache, "offloading", False)
            and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers))


def cache_rows(cache: Any, rows: int | torch.Tensor) -> Any:
    """A new cache with ``rows`` rows of a plain ``cache``: a count (its one row expanded, no copy) or
    an index tensor; ``cache`` itself is untouched (a forward reassigns, never edits, a layer's tensors)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        if isinstance(rows, int):
            layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
            layer.values = layer.values.expand(rows, *layer.values.shape[1:])
        else:
            i = rows.to(layer.keys.device)  # layers of a split model live on their own devices
            layer.keys, layer.values = layer.keys[i], layer.values[i]
    return new


class SharedPrefix:
    """The first ``len(ids)`` tokens every prompt of a set starts with, run once (one row).

    ``inputs[l]``: the residual stream entering layer ``l`` at the prefix positions (``[1, P, d]``),
    ``cache``: its KV cache, both under the ablation active when it was built (usually none).
    :meth:`under` gives the prefix's cache under another ablation (the context active when it is
    called) that touches no layer below ``low``: layers below come from this one, the rest run from
    ``inputs[low]``. Build with :meth:`build`, which returns None when the model's cache is not made of
    plain dynamic layers (then prompts are run whole).
    """

    def __init__(self, ids: torch.Tensor, inputs: list[torch.Tensor], cache: Any) -> None:
        self.ids, self.inputs, self.cache = ids, inputs, cache

    def __len__(self) -> int:
        return int(self.ids.shape[1])

    @staticmethod
    def length(rows: list[list[int]]) -> int:
        """How many leading tokens all ``rows`` share, at least one short of the shortest row (a prompt
        keeps a last token of its own, whose logits are read)."""
        return len(os.path.commonprefix(rows)[: min(len(r) for r in rows) - 1]) if rows else 0

    @classmethod
    def build(cls, model: nn.Module, ids: Sequence[int]) -> SharedPrefix | None:
        if not len(ids):
            return None
        x = torch.tensor([list(ids)], dtype=torch.long)
        inputs, cache = cls._run(model, x, None, 0)
        return cls(x, inputs, cache) if plain_cache(cache) else None

    @staticmethod
    def _run(model: nn.Module, x: torch.Tensor, prefix: SharedPrefix | None, low: int) -> tuple[list, Any]:
        mask = torch.ones_like(x)
        # reuse_residual's hook first: the capture at layer ``low`` must see the input it put there
        with torch.no_grad(), reuse_residual(model, low, None if prefix is None else prefix.inputs[low]), \
                captured_inputs(model) as inputs:
            kw = _model_inputs(model, x, mask)
            out = model.base_model(**{**kw, "use_cache": True})
        cache = output_cache(out)
        if prefix is not None and low > 0:  # the skipped layers keep the cache and inputs they had
            cache = copy.copy(cache)
            cache.layers = [prefix.cache.layers[i] if i < low else layer for i, layer in enumerate(cache.layers)]
            inputs = [prefix.inputs[i] if i < low else h for i, h in enumerate(inputs)]
        return inputs, cache

    def under(self, model: nn.Module, low: int, rows: int = 1) -> SharedPrefix:
        """The prefix under the ablation now active on ``model``, which changes no layer below ``low``;
        ``rows``: the ablation's batch rows (e.g. one head per row), each its own prefix row."""
        inputs, cache = self._run(model, self.ids.expand(rows, -1), self, low)
        return SharedPrefix(self.ids, inputs, cache)

    def batch(self, rows: int) -> Any:
        """The prefix cache for a batch of ``rows`` prompts (expanded, not copied; a prefix built with
        ``rows`` rows is taken as it is)."""
        return cache_rows(self.cache, rows)


def _model_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: Any = None,
                  fn=None) -> dict:
    """Keyword arguments of a forward: left padding skipped by the positions; with ``past`` (a prefix
    cache) ``attention_mask`` covers the prefix and ``input_ids`` (``[prefix | padding | rest]``)."""
    dev = input_device(model)
    mask = attention_mask.to(dev)
    kw = {"input_ids": input_ids.to(dev), "attention_mask": mask,
          "position_ids": position_ids_from_mask(mask)[:, mask.shape[1] - input_ids.shape[1]:]}
    if past is None:
        return {**kw, "use_cache": False}
    return {**kw, "use_cache": True, cache_argument(fn or model.forward): past}


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in float64 when it is float64 already (half precisions are widened, float64
    is never narrowed: a float64 model's scores keep float64 precision, which the equivalence tests need)."""
    return t if t.dtype == torch.float64 else t.float()


def score_dtype(model: nn.Module) -> torch.dtype:
    """The dtype scores of ``model`` are kept in: float64 for a float64 model, float32 otherwise."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


def last_token_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      past: Any = None) -> torch.Tensor:
    """Next-token logits at the last position (left padding), ``[batch, vocab]`` in float32 (float64 for a
    float64 model). ``past``: a prefix's KV cache (:meth:`SharedPrefix.batch`), which
    ``attention_mask`` then covers too."""
    out = model(**_model_inputs(model, input_ids, attention_mask, past), logits_to_keep=1)
    return at_least_float32(out.logits[:, -1])


def last_token_hidden_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             past: Any = None) -> torch.Tensor:
    """One forward, both readouts at the last position: ``[batch, d_model + vocab]``, the final-norm
    hidden state (as :func:`last_token_hidden`) then the logits (as :func:`last_token_logits`)."""
    got: list[torch.Tensor] = []
    handle = get_adapter(model).final_norm.register_forward_hook(lambda m, a, out: got.append(out[:, -1]))
    try:
        logits = last_token_logits(model, input_ids, attention_mask, past)
    finally:
        handle.remove()
    hidden = at_least_float32(got[-1]).to(logits.device)
    return torch.cat([hidden.to(logits.dtype), logits], -1)


def last_token_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      past: Any = None) -> torch.Tensor:
    """Final hidden state after the final norm at the last position, ``[batch, d_model]``, float32
    (float64 for a float64 model); ``past`` as in :func:`last_token_logits`.

    Runs the base model only (no unembedding).
    """
    ad = get_adapter(model)
    got: list[torch.Tensor] = []
    handle = ad.final_norm.register_forward_hook(lambda m, a, out: got.append(out[:, -1]))
    try:
        model.base_model(**_model_inputs(model, input_ids, attention_mask, past, model.base_model.forward))
    finally:
        handle.remove()
    return at_least_float32(got[-1])
