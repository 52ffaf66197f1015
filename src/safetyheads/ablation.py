"""Ablating attention heads with forward hooks that are always removed.

Every ablation is a *strength* tensor ``a[batch_row, layer, head]`` in [0, 1] (1 = the head is
fully ablated in that row, 0 = untouched) and a :class:`Mode`, whose strategy maps the head's
tensor ``x`` at its site to the ablated one. One hook per touched layer applies it; rows may ablate
different heads, which is what makes sweeps batchable; a strength that requires grad turns the
same hooks into attribution patching ("the gradient of the mask is the score").

Modes (SPEC §1):

``ua``        undifferentiated attention: the head's final query (after q bias and q norm) × eps.
``sc``        scaling contribution: the head's output (its o_proj input slice) × eps.
``zero``      the head's output set to 0 (= ``sc`` with eps = 0).
``mean``      the head's output replaced by its dataset mean (:func:`head_means`).
``ua-limit``  the head's output replaced by the causal running mean of its values — what ``ua``
              tends to as eps → 0; an independent cross-check of ``ua`` and the basis of the
              gradient estimator. Prefill only (no KV cache); pass ``attention_mask`` when padded.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from .adapters import BoundAdapter, get_adapter, validate_heads

Head = tuple[int, int]


class Mode(str, Enum):
    """How a head is ablated. The value is what users type (``"ua"``, ``"sc"``, …)."""

    UA = "ua"
    SC = "sc"
    ZERO = "zero"
    MEAN = "mean"
    UA_LIMIT = "ua-limit"

    @property
    def site(self) -> str:
        """``"query"`` for modes that act on the final query, ``"output"`` for the o_proj input."""
        return "query" if self is Mode.UA else "output"

    @property
    def uses_eps(self) -> bool:
        return self in (Mode.UA, Mode.SC)

    @property
    def surgery_ok(self) -> bool:
        """Whether the ablation can be written into the weights (see :mod:`safetyheads.surgery`)."""
        return self in (Mode.UA, Mode.SC, Mode.ZERO)

    @classmethod
    def parse(cls, mode: Mode | str) -> Mode:
        try:
            return cls(mode)
        except ValueError:
            raise ValueError(f"unknown ablation mode {mode!r}; choose one of {[m.value for m in cls]}") from None


def check_eps(mode: Mode, eps: float) -> float:
    """Validate ε: finite, > 0 for ``ua`` (0 would be exactly uniform but is almost surely a typo),
    ≥ 0 for ``sc`` (0 is zero ablation)."""
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a number, got {eps!r}") from None
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite, got {eps}")
    if mode is Mode.UA and eps <= 0:
        raise ValueError(f"eps must be > 0 for mode 'ua' (the paper uses 1e-5), got {eps}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def check_mean(model: nn.Module, mode: Mode | str, mean: torch.Tensor | None) -> torch.Tensor | None:
    """The head means to ablate with: for mode ``mean`` ``mean`` itself, checked (given, and
    ``[layers, heads, head_dim]``); for other modes None (a given ``mean`` is ignored).

    Raises ValueError naming :func:`head_means` when mode is ``mean`` and no mean is given, so a
    library function fails before any work rather than at its first ablated forward."""
    if Mode.parse(mode) is not Mode.MEAN:
        return None
    if mean is None:
        raise ValueError("mode 'mean' needs mean=head_means(model, ...) (the dataset mean of each head's output)")
    g = get_adapter(model).geometry
    if not isinstance(mean, torch.Tensor) or tuple(mean.shape) != (g.n_layers, g.n_heads, g.head_dim):
        got = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
        raise ValueError(f"mean must be [{g.n_layers}, {g.n_heads}, {g.head_dim}] (from head_means), got {got}")
    return mean


def mean_digest(mean: torch.Tensor | None) -> str | None:
    """sha256 of the head means (float64 bytes), to record and to key checkpoints by; None for None."""
    if mean is None:
        return None
    return hashlib.sha256(mean.detach().double().cpu().contiguous().numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- strategies
# Each takes the head-shaped tensor x [..., H, d] (heads on dim -2), the strength a broadcastable
# to it, and the context; returns the ablated tensor. Small and declarative, one per mode.


def _scale(x: torch.Tensor, a: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """ua / sc: x × (1 − a·(1 − ε)); a = 1 gives x·ε, a = 0 leaves x bit-identical."""
    return x * (1 - a * (1 - ctx.eps))


def _zero(x: torch.Tensor, a: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """zero: x × (1 − a)."""
    return x * (1 - a)


def _mean(x: torch.Tensor, a: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """mean: x + a·(μ − x), μ the head's dataset-mean output."""
    mu = ctx.mean[ctx.layer].to(device=x.device, dtype=x.dtype)  # [H, d]
    return x + a * (mu - x)


def _ua_limit(x: torch.Tensor, a: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """ua-limit: x + a·(v̄ − x), v̄_t the mean of the head's values over the positions it can see."""
    v = ctx.values.pop(ctx.layer)  # [b, t, H, d], already expanded from kv heads
    if ctx.attention_mask is not None:
        m = ctx.attention_mask.to(device=v.device, dtype=v.dtype)
        if m.shape != v.shape[:2]:
            raise ValueError(
                f"ua-limit: attention_mask {tuple(m.shape)} does not match the activations {tuple(v.shape[:2])} "
                "(ua-limit is prefill-only: no KV cache)"
            )
    else:
        m = torch.ones(v.shape[:2], device=v.device, dtype=v.dtype)
    vm = v * m[:, :, None, None]
    csum = vm.cumsum(1)
    ccount = m.cumsum(1)
    window = ctx.windows[ctx.layer]
    if window is not None and window < v.shape[1]:
        csum = csum - torch.nn.functional.pad(csum, (0, 0, 0, 0, window, 0))[:, : v.shape[1]]
        ccount = ccount - torch.nn.functional.pad(ccount, (window, 0))[:, : v.shape[1]]
    vbar = csum / ccount.clamp(min=1)[:, :, None, None]
    return x + a * (vbar - x)


_STRATEGIES = {Mode.UA: _scale, Mode.SC: _scale, Mode.ZERO: _zero, Mode.MEAN: _mean, Mode.UA_LIMIT: _ua_limit}


def _sliding_window(attn: nn.Module) -> int | None:
    """The attention module's sliding window (None: full causal attention).

    Gemma2/3, Qwen2/3 keep it per layer on the module (None on full-attention layers); Mistral,
    Mixtral and Phi-3 read ``config.sliding_window`` inside their forward and have no attribute."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


@dataclass
class _Ctx:
    mode: Mode
    eps: float
    mean: torch.Tensor | None
    attention_mask: torch.Tensor | None
    windows: list[int | None]
    layer: int = 0
    values: dict[int, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- hooks


def _strength_for(strength: torch.Tensor, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Row strengths [B, H] of ``layer`` on x's device/dtype, checked against x's batch."""
    a = strength[:, layer]
    if a.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"the ablation has {a.shape[0]} rows but the batch has {x.shape[0]}: per-row ablations need "
            "one row per batch row (or a single row, broadcast to all)"
        )
    return a.to(device=x.device, dtype=x.dtype)


class Ablation:
    """Installed hooks for one ablation; use through :func:`ablate` / :func:`ablate_strengths`."""

    def __init__(
        self,
        model: nn.Module,
        strength: torch.Tensor,
        mode: Mode,
        eps: float,
        *,
        mean: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        self.adapter: BoundAdapter = get_adapter(model)
        g = self.adapter.geometry
        if strength.dim() != 3 or strength.shape[1:] != (g.n_layers, g.n_heads):
            raise ValueError(f"strength must be [rows, {g.n_layers}, {g.n_heads}], got {tuple(strength.shape)}")
        check_mean(model, mode, mean)
        self.strength = strength
        self.mode = mode
        windows = [_sliding_window(a) for a in self.adapter.attns]
        self.ctx = _Ctx(mode, eps, mean, attention_mask, windows)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def layers(self) -> list[int]:
        """Layers that get a hook: any nonzero strength, or all when the strength needs a gradient."""
        if self.strength.requires_grad:
            return list(range(self.strength.shape[1]))
        return sorted(set(torch.nonzero(self.strength.detach().abs().sum(0) > 0)[:, 0].tolist()))

    def install(self) -> None:
        ad = self.adapter
        for layer in self.layers:
            if self.mode.site == "query":
                self.handles.append(ad.q_module(layer).register_forward_hook(self._query_hook(layer)))
            else:
                if self.mode is Mode.UA_LIMIT:
                    self.handles.append(ad.v_module(layer).register_forward_hook(self._values_hook(layer)))
                self.handles.append(ad.o_module(layer).register_forward_pre_hook(self._output_hook(layer)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.ctx.values.clear()

    # -- hook factories ---------------------------------------------------------
    def _query_hook(self, layer: int):
        g = self.adapter.geometry
        layout = self.adapter.spec.q_layout
        width = g.n_heads * g.head_dim

        def hook(module, args, out):
            a = _strength_for(self.strength, layer, out)  # [B, H]
            self.ctx.layer = layer
            if layout == "bthd":
                return _scale(out, a[:, None, :, None], self.ctx)
            if layout == "bhtd":
                return _scale(out, a[:, :, None, None], self.ctx)
            # flat [b, t, F]; the query is the first H*d columns (fused projections put q first)
            q = out[..., :width].unflatten(-1, (g.n_heads, g.head_dim))
            q = _scale(q, a[:, None, :, None], self.ctx).flatten(-2)
            return q if out.shape[-1] == width else torch.cat([q, out[..., width:]], dim=-1)

        return hook

    def _values_hook(self, layer: int):
        g = self.adapter.geometry
        cols = self.adapter.v_columns()

        def hook(module, args, out):
            v = out[..., cols].unflatten(-1, (g.n_kv_heads, g.head_dim))
            self.ctx.values[layer] = v.repeat_interleave(g.group_size, dim=2)

        return hook

    def _output_hook(self, layer: int):
        g = self.adapter.geometry
        strategy = _STRATEGIES[self.mode]

        def hook(module, args):
            z = args[0]
            a = _strength_for(self.strength, layer, z)
            self.ctx.layer = layer
            zh = z.unflatten(-1, (g.n_heads, g.head_dim))
            z2 = strategy(zh, a[:, None, :, None], self.ctx).flatten(-2)
            return (z2, *args[1:])

        return hook


def heads_to_strength(model: nn.Module, rows: Sequence[Sequence[Head]]) -> torch.Tensor:
    """Strength tensor [len(rows), L, H] with 1 at each row's heads."""
    g = get_adapter(model).geometry
    s = torch.zeros(len(rows), g.n_layers, g.n_heads)
    for i, heads in enumerate(rows):
        for layer, head in validate_heads(heads, g):
            s[i, layer, head] = 1.0
    return s


@contextlib.contextmanager
def ablate_strengths(
    model: nn.Module,
    strength: torch.Tensor,
    *,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    mean: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[Ablation]:
    """Ablate with an explicit strength tensor ``[rows, layers, heads]`` (values in [0, 1]).

    The general form behind :func:`ablate`: fractional strengths interpolate, and a strength with
    ``requires_grad`` gives each head's attribution-patching gradient.
    """
    mode = Mode.parse(mode)
    eps = check_eps(mode, eps)
    ablation = Ablation(model, strength, mode, eps, mean=mean, attention_mask=attention_mask)
    try:
        ablation.install()
        yield ablation
    finally:
        ablation.remove()


@contextlib.contextmanager
def ablate(
    model: nn.Module,
    heads: Sequence[Head] = (),
    *,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    rows: Sequence[Sequence[Head]] | None = None,
    mean: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[Ablation]:
    """Ablate attention heads inside a ``with`` block; the model is untouched on exit, even on error.

    Args:
        model: a Hugging Face causal LM of a supported architecture.
        heads: ``(layer, head)`` pairs, 0-indexed, ablated in every batch row. Empty: no-op.
        mode: ``"ua"`` (paper's main mode), ``"sc"``, ``"zero"``, ``"mean"`` or ``"ua-limit"``.
        eps: the ε of ``ua``/``sc`` (paper: 1e-5).
        rows: instead of ``heads``, one head list per batch row: row i of the next forward ablates
            ``rows[i]`` — equal to running the rows one at a time.
        mean: for ``mode="mean"``, the tensor from :func:`head_means`.
        attention_mask: for ``mode="ua-limit"`` on a padded batch, the 2-D mask.

    Example::

        with ablate(model, [(2, 26)], mode="ua", eps=1e-5):
            out = model.generate(**batch)
    """
    if rows is not None and len(heads):
        raise ValueError("pass either heads (same for every row) or rows (one list per row), not both")
    strength = heads_to_strength(model, rows if rows is not None else [heads])
    with ablate_strengths(model, strength, mode=mode, eps=eps, mean=mean, attention_mask=attention_mask) as ab:
        yield ab


@torch.no_grad()
def head_means(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               *, batch_size: int = 8) -> torch.Tensor:
    """Mean of every head's output (its o_proj input slice) over all non-pad tokens, in float64.

    Returns ``[layers, heads, head_dim]`` (float64) for ``ablate(..., mode="mean", mean=...)``.
    """
    ad = get_adapter(model)
    g = ad.geometry
    total = torch.zeros(g.n_layers, g.n_heads, g.head_dim, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    current: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module, args):
            z = args[0].unflatten(-1, (g.n_heads, g.head_dim)).to(torch.float64)
            m = current["mask"].to(device=z.device, dtype=torch.float64)
            total[layer] += (z * m[:, :, None, None]).sum((0, 1)).cpu()

        return hook

    handles = [ad.o_module(layer).register_forward_pre_hook(make_hook(layer)) for layer in range(g.n_layers)]
    try:
        from .forward import input_device, position_ids_from_mask

        dev = input_device(model)
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i : i + batch_size].to(dev)
            mask = attention_mask[i : i + batch_size].to(dev)
            current["mask"] = mask
            count += mask.sum().double().cpu()
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("head_means: no tokens (all masked)")
    return total / count
