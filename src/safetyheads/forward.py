"""Forward passes that compute only what a score needs.

* :func:`position_ids_from_mask` — positions that ignore left padding (so padding changes nothing,
  also for absolute-position models like GPT-2).
* :func:`reuse_residual` — skip the layers below ``start`` and feed a cached residual stream
  instead: an ablation in layer ``l`` cannot change layers ``< l``.
* :func:`last_token_logits` / :func:`last_token_hidden` — logits (``logits_to_keep=1``) or the
  final-norm hidden state at the last prompt position only.
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


@contextlib.contextmanager
def reuse_residual(model: nn.Module, start: int, hidden: torch.Tensor | None) -> Iterator[None]:
    """Inside the block, layers ``0..start-1`` are skipped and layer ``start`` receives ``hidden``.

    ``hidden`` is the residual stream entering layer ``start`` from an earlier (unablated) forward
    pass of the same tokens, shape ``[1 or batch, pos, d_model]``; it is broadcast to the batch.
    Nothing happens when ``start == 0`` or ``hidden is None``. The layers are restored on exit.
    """
    if start <= 0 or hidden is None:
        yield
        return
    layers = get_adapter(model).layers
    skipped = layers[:start]

    def replace_input(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        h = hidden.to(device=x.device, dtype=x.dtype)
        if h.shape[1:] != x.shape[1:]:
            raise ValueError(f"cached residual {tuple(h.shape)} does not match the input {tuple(x.shape)}")
        h = h.expand(x.shape[0], -1, -1).contiguous()
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = layers[start].register_forward_pre_hook(replace_input, with_kwargs=True)
    try:
        for layer in skipped:
            layer.forward = _identity_forward
        yield
    finally:
        handle.remove()
        for layer in skipped:
            layer.__dict__.pop("forward", None)


def layer_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One unablated forward: the residual stream entering every layer, and the last-token logits.

    Returns ``(inputs, logits)``: ``inputs[l]`` is ``[batch, pos, d_model]`` entering layer ``l``;
    ``logits`` is ``[batch, vocab]`` float32 at the last position.
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
    dev = model.get_input_embeddings().weight.device
    mask = attention_mask.to(dev)
    return {"input_ids": input_ids.to(dev), "attention_mask": mask, "position_ids": position_ids_from_mask(mask),
            "use_cache": False}


def last_token_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the last position (left padding), ``[batch, vocab]`` in float32."""
    out = model(**_model_inputs(model, input_ids, attention_mask), logits_to_keep=1)
    return out.logits[:, -1].float()


def last_token_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden state after the final norm at the last position, ``[batch, d_model]``, float32.

    Runs the base model only (no unembedding).
    """
    ad = get_adapter(model)
    got: list[torch.Tensor] = []
    handle = ad.final_norm.register_forward_hook(lambda m, a, out: got.append(out[:, -1]))
    try:
        model.base_model(**_model_inputs(model, input_ids, attention_mask))
    finally:
        handle.remove()
    return got[-1].float()
