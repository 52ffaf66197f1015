"""Weight surgery: write a head ablation into the weights, so any tool can run the ablated model.

* ``ua``: the head's rows of W_q (and its q bias) × ε. Not expressible for architectures with a
  q norm (Qwen3, Gemma 3, OLMo 2): the norm would undo the scale — use the hooks of
  :func:`safetyheads.ablate` there.
* ``sc``: the head's columns of W_o (its slice of the o_proj input) × ε.
* ``zero``: ``sc`` with ε = 0.

:func:`surgery` returns an ablated deep copy; :func:`surgery_applied` edits the model in place
inside a ``with`` block and restores the original weights bit-for-bit on exit (even on error),
which :func:`save_surgery` uses to write a copy to disk without holding two models in memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .ablation import Head, Mode, check_eps
from .adapters import BoundAdapter, get_adapter, get_module, validate_heads


class SurgeryError(ValueError):
    """The requested ablation cannot be written into this model's weights."""


def _edits(ad: BoundAdapter, heads: Sequence[Head], mode: Mode) -> list[tuple[torch.Tensor, tuple]]:
    """(parameter, index) pairs to scale: the head's slice of each affected weight / bias."""
    g = ad.geometry
    conv = ad.spec.weight_kind == "conv1d"  # Conv1D stores [in, out]; Linear stores [out, in]
    out: list[tuple[torch.Tensor, tuple]] = []
    for layer, head in heads:
        cols = slice(head * g.head_dim, (head + 1) * g.head_dim)
        attn = ad.attns[layer]
        if mode is Mode.UA:
            if ad.spec.q_weight is None:
                raise SurgeryError(
                    f"UA cannot be written into the weights of {g.model_type}: its q norm comes after W_q and "
                    "would undo the scale. Use safetyheads.ablate(...) hooks instead."
                )
            proj = get_module(attn, ad.spec.q_weight)
            out.append((proj.weight, (slice(None), cols) if conv else (cols, slice(None))))
            if getattr(proj, "bias", None) is not None:
                out.append((proj.bias, (cols,)))
        else:
            proj = ad.o_module(layer)
            out.append((proj.weight, (cols, slice(None)) if conv else (slice(None), cols)))
    return out


def _check(model: nn.Module, heads: Sequence[Head], mode: Mode | str, eps: float) -> tuple[BoundAdapter, list[Head], Mode, float]:
    mode = Mode.parse(mode)
    if not mode.surgery_ok:
        raise SurgeryError(f"mode {mode.value!r} cannot be written into weights; surgery supports ua, sc, zero")
    eps = 0.0 if mode is Mode.ZERO else check_eps(mode, eps)
    ad = get_adapter(model)
    heads = validate_heads(heads, ad.geometry)
    if not heads:
        raise ValueError("surgery needs at least one (layer, head)")
    return ad, heads, mode, eps


@contextlib.contextmanager
def surgery_applied(model: nn.Module, heads: Sequence[Head], *, mode: Mode | str = "ua", eps: float = 1e-5) -> Iterator[nn.Module]:
    """Edit ``model``'s weights in place for the block; the originals are restored exactly on exit."""
    ad, heads, mode, eps = _check(model, heads, mode, eps)
    edits = _edits(ad, heads, mode)
    saved = [(p, idx, p.data[idx].clone()) for p, idx in edits]
    try:
        with torch.no_grad():
            for p, idx in edits:
                p.data[idx] *= eps
        yield model
    finally:
        with torch.no_grad():
            for p, idx, orig in reversed(saved):
                p.data[idx] = orig


def surgery(model: nn.Module, heads: Sequence[Head], *, mode: Mode | str = "ua", eps: float = 1e-5) -> nn.Module:
    """A deep copy of ``model`` with the ablation written into its weights (plain transformers runs it)."""
    _check(model, heads, mode, eps)
    clone = copy.deepcopy(model)
    clone.__dict__.pop("_safetyheads_adapter", None)
    ad, heads, mode, eps = _check(clone, heads, mode, eps)
    with torch.no_grad():
        for p, idx in _edits(ad, heads, mode):
            p.data[idx] *= eps
    return clone


def save_surgery(
    model: nn.Module,
    tokenizer,
    heads: Sequence[Head],
    path: str | Path,
    *,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    provenance: dict | None = None,
) -> Path:
    """Write an ablated copy of ``model`` (and its tokenizer) to ``path`` with ``save_pretrained``.

    The model is edited in place only while saving and restored exactly afterwards. A
    ``safetyheads_surgery.json`` beside the weights records the heads, mode, ε and provenance.
    """
    path = Path(path)
    ad, heads, mode_, eps = _check(model, heads, mode, eps)
    path.mkdir(parents=True, exist_ok=True)
    with surgery_applied(model, heads, mode=mode_, eps=eps):
        model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    record = {"heads": [list(h) for h in heads], "mode": mode_.value, "eps": eps, "model_type": ad.geometry.model_type}
    record.update(provenance or {})
    (path / "safetyheads_surgery.json").write_text(json.dumps(record, indent=2))
    return path
