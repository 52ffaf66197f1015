"""Forward passes that compute only what a score needs.

* :func:`position_ids_from_mask` — positions that ignore left padding (so padding changes nothing,
  also for absolute-position models like GPT-2).
* :func:`reuse_residual` — skip the layers below ``start`` and feed a cached residual stream
  instead: an ablation in layer ``l`` cannot change layers ``< l``.
* :func:`last_token_logits` / :func:`last_token_hidden` — logits (``logits_to_keep=1``) or the
  final-norm hidden state at the last prompt position only.

All of them work on models split over devices by accelerate (``device_map=...``, including CPU/disk
offload): inputs go to :func:`input_device`, cached activations move to the layer that reads them,
and accelerate's per-module ``forward`` wrappers are left in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def layer_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One unablated forward: the residual stream entering every layer, and the last-token logits.

    Returns ``(inputs, logits)``: ``inputs[l]`` is ``[batch, pos, d_model]`` entering layer ``l``;
    ``logits`` is ``[batch, vocab]`` at the last position (see :func:`last_token_logits`).
    """
    layers = get_adapter(model).layers
    inputs: list[torch.Tensor | None] = [None] * len(layers)

    def make(i: int):
        def hook(module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        logits = last_token_logits(model, input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    return inputs, logits  # type: ignore[return-value]


def _model_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    dev = input_device(model)
    mask = attention_mask.to(dev)
    return {"input_ids": input_ids.to(dev), "attention_mask": mask, "position_ids": position_ids_from_mask(mask),
            "use_cache": False}


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in float64 when it is float64 already (half precisions are widened, float64
    is never narrowed: a float64 model's scores keep float64 precision, which the equivalence tests need)."""
    return t if t.dtype == torch.float64 else t.float()


def score_dtype(model: nn.Module) -> torch.dtype:
    """The dtype scores of ``model`` are kept in: float64 for a float64 model, float32 otherwise."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


def last_token_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the last position (left padding), ``[batch, vocab]`` in float32 (float64 for a
    float64 model)."""
    out = model(**_model_inputs(model, input_ids, attention_mask), logits_to_keep=1)
    return at_least_float32(out.logits[:, -1])


def last_token_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden state after the final norm at the last position, ``[batch, d_model]``, float32
    (float64 for a float64 model).

    Runs the base model only (no unembedding).
    """
    ad = get_adapter(model)
    got: list[torch.Tensor] = []
    handle = ad.final_norm.register_forward_hook(lambda m, a, out: got.append(out[:, -1]))
    try:
        model.base_model(**_model_inputs(model, input_ids, attention_mask))
    finally:
        handle.remove()
    return at_least_float32(got[-1])
