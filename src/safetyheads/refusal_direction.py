"""The refusal direction (Arditi et al. 2024) and each head's direct contribution to it.

The classic cheap baseline: the difference of the mean residual stream of harmful and harmless
prompts at the last prompt position (the position the first answer token is predicted from),
one candidate per layer, and the layer where it works best. Here "layer ``l``" is the residual
stream *after* decoder block ``l`` (so heads of layers ``0..l`` write into it).

Choosing the layer (``select``), only among layers ``l < max_layer_frac · L`` (Arditi et al. drop
the last layers, whose directions are about output tokens rather than the decision to refuse):

``"separation"``  (default; no generation, no refusal tokens) two-fold cross-fitted separation: the
                  prompts are split into even and odd positions; a direction fitted on one half
                  projects the other half's harmful and harmless states, scored by Cohen's d
                  (difference of the projection means over their pooled standard deviation); the
                  score of a layer is the mean over the two folds. Held out from the fit, so a
                  direction that only memorises its own prompts does not win.
``"ablation"``    (needs ``refusal_tokens``) Arditi et al.'s intervention: the layer's unit direction
                  is projected out of the residual stream at every layer (the input of each
                  decoder block and of the final norm, every position), and the score is the
                  drop of the mean refusal log-odds on the harmful prompts. One forward of the
                  harmful prompts per candidate layer.

A head's *direct* contribution is its write into the residual stream at the last position — its
slice of the o_proj input times its o_proj columns — projected on the unit direction:
``z_h · W_O[:, h]ᵀ r``. Summed over the heads of layers ``≤ l``, plus the o_proj biases, the
MLP writes and the embeddings, it is the projection of the residual stream at layer ``l`` (the
tests check this decomposition). Where the architecture normalises the attention output before
adding it to the residual stream (Gemma 2/3, OLMo 2: a post-attention RMSNorm), the norm's
realised per-channel scale at that position is frozen (``y / x``), the usual linearisation of
direct attribution, so the decomposition still holds exactly. Heads above the direction's layer
cannot write into it directly: their entries are NaN. By default the contribution is the mean
over harmful prompts minus the mean over harmless ones (their sum over all writers is then the
norm of the difference-of-means vector); ``top_heads`` ranks heads by it, most positive first
(heads that push the residual stream toward refusal).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .ablation import Head
from .adapters import get_adapter, get_module
from .forward import input_device, position_ids_from_mask
from .prompts import encode_prompts, format_prompts, prompt_format_info
from .provenance import load_tensors_json, prompts_digest, provenance, save_tensors_json

__all__ = ["POST_ATTENTION_NORM", "RefusalDirection", "head_contributions", "refusal_direction"]

#: model_type -> the decoder-layer module that normalises the attention output before the residual add
POST_ATTENTION_NORM: dict[str, str] = {
    "gemma2": "post_attention_layernorm",
    "gemma3_text": "post_attention_layernorm",
    "olmo2": "post_attention_layernorm",
}

SELECT = ("separation", "ablation")


# --------------------------------------------------------------------------- result


@dataclass
class RefusalDirection:
    """A difference-of-means refusal direction and the heads that write into it.

    Attributes:
        layer: the residual stream after decoder block ``layer``.
        direction: unit vector ``[d_model]`` (float64).
        raw: mean harmful minus mean harmless state at ``layer`` ``[d_model]`` (float64).
        diffs: the difference of means at every layer ``[L, d_model]`` (float64).
        scores: the selection score of every layer ``[L]`` (NaN for layers not considered).
        select: how the layer was chosen (``"separation"`` or ``"ablation"``).
        separation: the cross-fitted Cohen's d of every layer ``[L]``.
        ablation: the refusal log-odds drop of every candidate layer ``[L]`` (None unless computed).
        contributions: each head's direct contribution ``[L, H]`` (mean harmful − mean harmless,
            or mean harmful if no harmless prompts were subtracted); NaN above ``layer``.
    """

    layer: int
    direction: torch.Tensor
    raw: torch.Tensor
    diffs: torch.Tensor
    scores: torch.Tensor
    select: str
    separation: torch.Tensor
    ablation: torch.Tensor | None
    contributions: torch.Tensor | None
    provenance: dict[str, Any]
    seconds: float = 0.0

    def top_heads(self, k: int) -> list[Head]:
        """The ``k`` heads with the largest (most positive) direct contribution, best first."""
        return [(layer, head) for layer, head, _ in self.top(k)]

    def top(self, k: int) -> list[tuple[int, int, float]]:
        """``(layer, head, contribution)`` of the ``k`` most positive heads."""
        if self.contributions is None:
            raise ValueError("no head contributions: compute them with head_contributions()")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        c = self.contributions
        cells = [(float(c[layer, h]), layer, h) for layer in range(c.shape[0]) for h in range(c.shape[1])
                 if not math.isnan(float(c[layer, h]))]
        if k > len(cells):
            raise ValueError(f"k={k} exceeds the {len(cells)} heads at or below layer {self.layer}")
        cells.sort(key=lambda t: (-t[0], t[1], t[2]))
        return [(layer, h, v) for v, layer, h in cells[:k]]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "refusal_direction", "layer": self.layer, "select": self.select,
                "scores": self.scores.tolist(), "separation": self.separation.tolist(),
                "ablation": None if self.ablation is None else self.ablation.tolist(),
                "top_heads": [list(t) for t in self.top(min(10, self._n_scored()))] if self._n_scored() else [],
                "provenance": self.provenance, "seconds": self.seconds}

    def _n_scored(self) -> int:
        return 0 if self.contributions is None else int((~torch.isnan(self.contributions)).sum())

    def save(self, stem: str | Path) -> None:
        """Write ``stem.safetensors`` (vectors, scores, contributions) and ``stem.json`` (the rest)."""
        tensors = {"direction": self.direction, "raw": self.raw, "diffs": self.diffs, "scores": self.scores,
                   "separation": self.separation}
        if self.ablation is not None:
            tensors["ablation"] = self.ablation
        if self.contributions is not None:
            tensors["contributions"] = self.contributions
        save_tensors_json(stem, tensors, self.to_json())

    @classmethod
    def load(cls, stem: str | Path) -> RefusalDirection:
        t, m = load_tensors_json(stem)
        if m.get("kind") != "refusal_direction":
            raise ValueError(f"{stem} is not a refusal-direction result (kind {m.get('kind')!r})")
        return cls(int(m["layer"]), t["direction"], t["raw"], t["diffs"], t["scores"], m["select"], t["separation"],
                   t.get("ablation"), t.get("contributions"), m["provenance"], m.get("seconds", 0.0))


# --------------------------------------------------------------------------- capture


@dataclass
class _States:
    """Last-position activations of a prompt set, float64 on CPU."""

    resid: torch.Tensor  # [n, L, d] residual stream after each decoder block
    z: torch.Tensor  # [n, L, H*hd] o_proj input (the heads' outputs)
    scale: torch.Tensor | None  # [n, L, d] frozen post-attention-norm scale (post-norm archs only)


def _o_weight(module: nn.Module, kind: str) -> torch.Tensor:
    """The o-projection as a ``[d_model, H*hd]`` float64 matrix (Linear: weight; Conv1D: weight.T)."""
    w = module.weight
    if w.device.type == "meta":
        raise ValueError("the o-projection weights are offloaded (meta); load the model without disk offload")
    w = w.detach().double().cpu()
    return w.T if kind == "conv1d" else w


def _post_norms(model) -> list[nn.Module] | None:
    ad = get_adapter(model)
    path = POST_ATTENTION_NORM.get(ad.geometry.model_type)
    return None if path is None else [get_module(layer, path) for layer in ad.layers]


@torch.no_grad()
def _capture(model, tokenizer, prompts: Sequence[str], prompt_format, system_prompt, batch_size: int) -> _States:
    """One unablated forward per batch; hooks record the last position's residual streams and head outputs."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    ad = get_adapter(model)
    g = ad.geometry
    texts = format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt)
    norms = _post_norms(model)
    resid, zs, scales = [], [], []
    cur: dict[str, dict[int, torch.Tensor]] = {}

    def layer_hook(i):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            cur["resid"][i] = h[:, -1].double().cpu()
        return hook

    def o_hook(i):
        def hook(module, args):
            cur["z"][i] = args[0][:, -1].double().cpu()
        return hook

    def norm_hook(i):
        def hook(module, args, out):
            x, y = args[0][:, -1].double().cpu(), out[:, -1].double().cpu()
            cur["scale"][i] = torch.where(x != 0, y / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(x))
        return hook

    handles = [layer.register_forward_hook(layer_hook(i)) for i, layer in enumerate(ad.layers)]
    handles += [ad.o_module(i).register_forward_pre_hook(o_hook(i)) for i in range(g.n_layers)]
    if norms is not None:
        handles += [n.register_forward_hook(norm_hook(i)) for i, n in enumerate(norms)]
    dev = input_device(model)
    try:
        for b0 in range(0, len(texts), batch_size):
            enc = encode_prompts(tokenizer, texts[b0:b0 + batch_size])
            ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
            if (mask.sum(1) == 0).any():
                raise ValueError(f"a prompt in {b0}..{b0 + batch_size - 1} is empty after tokenization")
            cur.update(resid={}, z={}, scale={})
            # the unembedding is not needed: run the base model only
            model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                             use_cache=False)
            resid.append(torch.stack([cur["resid"][i] for i in range(g.n_layers)], 1))
            zs.append(torch.stack([cur["z"][i] for i in range(g.n_layers)], 1))
            if norms is not None:
                scales.append(torch.stack([cur["scale"][i] for i in range(g.n_layers)], 1))
    finally:
        for h in handles:
            h.remove()
    return _States(torch.cat(resid), torch.cat(zs), torch.cat(scales) if scales else None)


def _contributions(model, states: _States, direction: torch.Tensor, top_layer: int) -> torch.Tensor:
    """Per-prompt direct contributions ``[n, L, H]`` of every head on the unit ``direction``; NaN above ``top_layer``."""
    ad = get_adapter(model)
    g = ad.geometry
    r = direction.double().cpu()
    n = states.z.shape[0]
    out = torch.full((n, g.n_layers, g.n_heads), math.nan, dtype=torch.float64)
    for layer in range(min(top_layer, g.n_layers - 1) + 1):
        w = _o_weight(ad.o_module(layer), ad.spec.weight_kind)  # [d, H*hd]
        reff = r[None] if states.scale is None else states.scale[:, layer] * r[None]  # [1 or n, d]
        u = (reff @ w).unflatten(-1, (g.n_heads, g.head_dim))  # [1 or n, H, hd]
        out[:, layer] = (states.z[:, layer].unflatten(-1, (g.n_heads, g.head_dim)) * u).sum(-1)
    return out


# --------------------------------------------------------------------------- selection


def _cohens_d(a: torch.Tensor, b: torch.Tensor) -> float:
    va = a.var(unbiased=True) if a.numel() > 1 else torch.zeros((), dtype=a.dtype)
    vb = b.var(unbiased=True) if b.numel() > 1 else torch.zeros((), dtype=b.dtype)
    pooled = math.sqrt(max(float((va + vb) / 2), 1e-30))
    return float(a.mean() - b.mean()) / pooled


def _separation(harm: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """Two-fold cross-fitted Cohen's d of every layer ``[L]`` (folds: even / odd prompt positions)."""
    n_layers = harm.shape[1]
    folds = [(torch.arange(harm.shape[0]) % 2 == f, torch.arange(safe.shape[0]) % 2 == f) for f in (0, 1)]
    out = torch.zeros(n_layers, dtype=torch.float64)
    for (fit_h, fit_s), (test_h, test_s) in ((folds[0], folds[1]), (folds[1], folds[0])):
        for layer in range(n_layers):
            d = harm[fit_h, layer].mean(0) - safe[fit_s, layer].mean(0)
            r = d / d.norm().clamp(min=1e-30)
            out[layer] += _cohens_d(harm[test_h, layer] @ r, safe[test_s, layer] @ r) / 2
    return out


@contextlib.contextmanager
def _directional_ablation(model, r: torch.Tensor) -> Iterator[None]:
    """Project ``r`` (unit) out of the residual stream entering every decoder block and the final norm."""
    ad = get_adapter(model)

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        rr = r.to(device=x.device, dtype=x.dtype)
        x2 = x - (x @ rr)[..., None] * rr
        if args:
            return (x2, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x2}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in (*ad.layers, ad.final_norm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _ablation_scores(model, tokenizer, harmful, units: dict[int, torch.Tensor], refusal_tokens, prompt_format,
                     system_prompt, batch_size) -> torch.Tensor:
    """Drop of the mean refusal log-odds when each candidate layer's direction is ablated everywhere."""
    from .ships import refusal_logodds

    rt = torch.as_tensor(list(refusal_tokens), dtype=torch.long)
    if rt.numel() == 0:
        raise ValueError("refusal_tokens is empty")
    texts = format_prompts(tokenizer, harmful, prompt_format, system_prompt=system_prompt)
    dev = input_device(model)
    batches = []
    for b0 in range(0, len(texts), batch_size):
        enc = encode_prompts(tokenizer, texts[b0:b0 + batch_size])
        batches.append((enc["input_ids"].to(dev), enc["attention_mask"].to(dev)))

    def mean_logodds() -> float:
        total = 0.0
        for ids, mask in batches:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=False, logits_to_keep=1).logits[:, -1]
            total += float(refusal_logodds(logits, rt).sum())
        return total / len(texts)

    base = mean_logodds()
    g = get_adapter(model).geometry
    out = torch.full((g.n_layers,), math.nan, dtype=torch.float64)
    for layer, r in units.items():
        with _directional_ablation(model, r):
            out[layer] = base - mean_logodds()
    return out


# --------------------------------------------------------------------------- public


def refusal_direction(
    model,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    select: str = "separation",
    max_layer_frac: float = 0.8,
    refusal_tokens: Sequence[int] | None = None,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    batch_size: int = 16,
    contributions: bool = True,
) -> RefusalDirection:
    """The difference-of-means refusal direction at the best layer, and each head's direct contribution.

    Args:
        model, tokenizer: a supported Hugging Face causal LM and its tokenizer.
        harmful, harmless: the two prompt sets (at least 2 each; 4+ for the cross-fitted selection).
        select: ``"separation"`` (cross-fitted Cohen's d, the default) or ``"ablation"`` (refusal
            log-odds drop under directional ablation; needs ``refusal_tokens``). See the module
            docstring.
        max_layer_frac: only layers ``l < max_layer_frac · L`` are candidates (1.0: all).
        refusal_tokens: refusal-start token ids (for ``select="ablation"``; e.g.
            :func:`~safetyheads.evaluate.derive_refusal_tokens`).
        prompt_format, system_prompt: see :mod:`safetyheads.prompts`.
        batch_size: prompts per forward.
        contributions: also compute every head's direct contribution (mean harmful − mean harmless),
            from the same forward passes (no extra cost).

    Returns:
        :class:`RefusalDirection`.
    """
    if select not in SELECT:
        raise ValueError(f"unknown select {select!r}; choose one of {list(SELECT)}")
    if select == "ablation" and refusal_tokens is None:
        raise ValueError("select='ablation' needs refusal_tokens (e.g. evaluate.derive_refusal_tokens)")
    if len(harmful) < 2 or len(harmless) < 2:
        raise ValueError(f"need at least 2 harmful and 2 harmless prompts, got {len(harmful)} and {len(harmless)}")
    if not 0 < max_layer_frac <= 1:
        raise ValueError(f"max_layer_frac must be in (0, 1], got {max_layer_frac}")
    t0 = time.perf_counter()
    harmful, harmless = list(harmful), list(harmless)
    g = get_adapter(model).geometry
    h = _capture(model, tokenizer, harmful, prompt_format, system_prompt, batch_size)
    s = _capture(model, tokenizer, harmless, prompt_format, system_prompt, batch_size)
    diffs = h.resid.mean(0) - s.resid.mean(0)  # [L, d]
    candidates = [layer for layer in range(g.n_layers) if layer < max_layer_frac * g.n_layers] or [0]
    separation = _separation(h.resid, s.resid)
    ablation = None
    if select == "ablation":
        units = {layer: diffs[layer] / diffs[layer].norm().clamp(min=1e-30) for layer in candidates}
        ablation = _ablation_scores(model, tokenizer, harmful, units, refusal_tokens, prompt_format, system_prompt,
                                    batch_size)
    score_all = separation if select == "separation" else ablation
    scores = torch.full((g.n_layers,), math.nan, dtype=torch.float64)
    scores[candidates] = score_all[candidates]
    layer = max(candidates, key=lambda i: (float(scores[i]), -i))
    raw = diffs[layer].clone()
    unit = raw / raw.norm().clamp(min=1e-30)
    contrib = None
    if contributions:
        contrib = (_contributions(model, h, unit, layer).mean(0) - _contributions(model, s, unit, layer).mean(0))
    prov = provenance(model, harmful, prompt_format=prompt_format_info(prompt_format, system_prompt,
                                                                       tokenizer=tokenizer),
                      system_prompt=system_prompt, method="refusal direction (difference of means)", select=select,
                      max_layer_frac=max_layer_frac, candidates=candidates,
                      harmless={"n": len(harmless), "sha256": prompts_digest(harmless)},
                      refusal_tokens=None if refusal_tokens is None else [int(t) for t in refusal_tokens],
                      contributions="mean harmful - mean harmless" if contributions else None)
    return RefusalDirection(layer, unit, raw, diffs, scores, select, separation, ablation, contrib, prov,
                            time.perf_counter() - t0)


def head_contributions(
    model,
    tokenizer,
    prompts: Sequence[str],
    direction: RefusalDirection | torch.Tensor,
    *,
    layer: int | None = None,
    harmless: Sequence[str] | None = None,
    per_prompt: bool = False,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Each head's direct contribution to ``direction`` at the last prompt position.

    Args:
        prompts: the prompts to average over (typically harmful).
        direction: a :class:`RefusalDirection` (its unit vector and layer) or a ``[d_model]`` vector
            (normalised here).
        layer: the residual stream the direction lives in (after block ``layer``); heads above it are
            NaN. Default: the RefusalDirection's layer, or the last layer for a bare vector.
        harmless: if given, their mean contribution is subtracted.
        per_prompt: return ``[n, L, H]`` per prompt (``harmless`` must then be None) instead of the mean.

    Returns:
        ``[L, H]`` float64 (``[n, L, H]`` with ``per_prompt``), NaN for heads above ``layer``.
    """
    g = get_adapter(model).geometry
    if isinstance(direction, RefusalDirection):
        vec = direction.direction
        layer = direction.layer if layer is None else layer
    else:
        vec = torch.as_tensor(direction)
    vec = vec.double().flatten()
    if vec.shape[0] != _d_model(model):
        raise ValueError(f"direction has {vec.shape[0]} entries, the model's residual stream {_d_model(model)}")
    if not math.isfinite(float(vec.norm())) or float(vec.norm()) == 0:
        raise ValueError("direction must be a finite nonzero vector")
    vec = vec / vec.norm()
    layer = g.n_layers - 1 if layer is None else int(layer)
    if not 0 <= layer < g.n_layers:
        raise IndexError(f"layer {layer} out of range 0..{g.n_layers - 1}")
    if per_prompt and harmless is not None:
        raise ValueError("per_prompt=True returns each prompt's contributions; do not pass harmless")
    c = _contributions(model, _capture(model, tokenizer, list(prompts), prompt_format, system_prompt, batch_size),
                       vec, layer)
    if per_prompt:
        return c
    out = c.mean(0)
    if harmless is not None:
        out = out - _contributions(model, _capture(model, tokenizer, list(harmless), prompt_format, system_prompt,
                                                   batch_size), vec, layer).mean(0)
    return out


def _d_model(model) -> int:
    return int(model.get_input_embeddings().weight.shape[1])
