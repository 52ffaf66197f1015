"""Why methods disagree, per head: every method's top heads side by side, with the score each method
ranks by and two properties that explain the differences.

One row per head in the union of the methods' top heads:

``kl_ships``               mean exact Ships over the prompts: KL(unablated ‖ head ablated alone) of the
                           last-position next-token distribution — what Ships ranks by (unsigned).
``refusal_drop``           the head's exact signed effect on refusal: mean drop of the refusal log-odds
                           when it alone is ablated. Negative: its ablation *raises* refusal.
``sahara_angle``           Sahara's generalized Ships of the head alone (its step-1 score; unsigned).
``direction_projection``   its direct write onto the difference-of-means refusal direction
                           (:func:`safetyheads.refusal_direction.head_contributions`, mean harmful −
                           mean harmless); None when no direction was given, NaN above its layer.
``first_token_attention``  the head's mean attention weight on the first token, at the last prompt
                           position: near 1, an attention sink that writes little (its ablation moves
                           the output little, though it may still gate refusal); near 1/T, a head
                           that already spreads its attention, which UA barely changes.

A head with a large KL but a refusal drop near 0 perturbs the output without touching refusal; a
large angle with a negative drop holds refusal *down*: unsigned scores (KL, angle) rank both kinds
among "safety heads", the signed drop tells them apart.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .ablation import Head, Mode, check_eps, check_mean, mean_digest
from .adapters import get_adapter, validate_heads
from .forward import input_device
from .prompts import encode_prompts, format_prompts
from .provenance import atomic_write_text, provenance
from .search import head_scores

__all__ = ["COLUMNS", "Disagreement", "HeadRow", "disagreement", "first_token_attention"]

COLUMNS = ("kl_ships", "refusal_drop", "sahara_angle", "direction_projection", "first_token_attention")


# --------------------------------------------------------------------------- attention on the first token


@contextlib.contextmanager
def _eager_attention(model) -> Iterator[None]:
    """Run ``model`` with eager attention (which can return attention weights); restored on exit."""
    before = getattr(model.config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def first_token_attention(model, tokenizer, prompts: Sequence[str], *, prompt_format: str = "chat",
                          system_prompt: str | None = None) -> torch.Tensor:
    """Each head's attention weight on the first token at the last prompt position, mean over prompts.

    Returns ``[n_layers, n_heads]`` float64. One unpadded forward per prompt with eager attention
    (attention weights are not available from SDPA); any ablation active around the call applies.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    g = get_adapter(model).geometry
    total = torch.zeros(g.n_layers, g.n_heads, dtype=torch.float64)
    dev = input_device(model)
    with _eager_attention(model):
        for text in format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt):
            ids = encode_prompts(tokenizer, [text])["input_ids"].to(dev)
            out = model(input_ids=ids, output_attentions=True, use_cache=False, logits_to_keep=1)
            if out.attentions is None or len(out.attentions) != g.n_layers:
                raise RuntimeError("the model did not return attention weights for every layer")
            for layer, att in enumerate(out.attentions):  # [1, H, T, T]
                total[layer] += att[0, :, -1, 0].double().cpu()
    return total / len(prompts)


# --------------------------------------------------------------------------- the table


@dataclass
class HeadRow:
    """One head: which methods picked it (method → 1-based rank) and the columns of :data:`COLUMNS`."""

    head: Head
    methods: dict[str, int]
    kl_ships: float | None = None
    refusal_drop: float | None = None
    sahara_angle: float | None = None
    direction_projection: float | None = None
    first_token_attention: float | None = None

    @property
    def raises_refusal(self) -> bool:
        """Whether ablating the head alone *raises* refusal (negative signed effect)."""
        return self.refusal_drop is not None and self.refusal_drop < 0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"head": list(self.head), "methods": self.methods}
        for c in COLUMNS:
            v = getattr(self, c)
            d[c] = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
        d["raises_refusal"] = self.raises_refusal
        return d


@dataclass
class Disagreement:
    """The per-head table, the methods' head lists, and how every column was computed."""

    rows: list[HeadRow]
    methods: dict[str, list[Head]]
    config: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "disagreement", "columns": list(COLUMNS),
                "methods": {m: [list(h) for h in hs] for m, hs in self.methods.items()},
                "rows": [r.to_json() for r in self.rows], "config": self.config, "provenance": self.provenance}

    def save(self, path: str | Path) -> None:
        """Write ``disagreement.json`` (atomically)."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Disagreement:
        d = json.loads(Path(path).read_text())
        rows = [HeadRow(tuple(r["head"]), dict(r["methods"]), *[r.get(c) for c in COLUMNS]) for r in d["rows"]]
        return cls(rows, {m: [tuple(h) for h in hs] for m, hs in d["methods"].items()}, d.get("config", {}),
                   d.get("provenance", {}))

    def to_markdown(self) -> str:
        """The table in Markdown; heads whose ablation raises refusal are marked ▲."""
        names = list(self.methods)
        head = ["head", *names, "KL-Ships", "refusal drop", "Sahara angle", "refusal-dir. proj.", "attn. 1st token"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [f"L{r.head[0]}H{r.head[1]}" + (" ▲" if r.raises_refusal else "")]
            cells += [str(r.methods[m]) if m in r.methods else "" for m in names]
            cells += [_fmt(getattr(r, c)) for c in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n\n▲: ablating the head alone raises refusal (negative signed effect). " \
                                  "Method columns: the head's rank in that method's list.\n"


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:+.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:+.1e}"


def disagreement(
    model,
    tokenizer,
    prompts: Sequence[str],
    methods: Mapping[str, Sequence[Head]],
    *,
    refusal_tokens: Sequence[int] | None,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    rank: int = 1,
    center: bool = False,
    space: str = "feature",
    direction: Any = None,
    kl_ships: torch.Tensor | Mapping[Head, float] | None = None,
    refusal_drop: torch.Tensor | Mapping[Head, float] | None = None,
    sahara_angle: Mapping[Head, float] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    mean: torch.Tensor | None = None,
) -> Disagreement:
    """The per-head table of why ``methods`` disagree (see the module docstring).

    Args:
        prompts: the attribution prompts every column is averaged over.
        methods: method name → its heads, best first (e.g. each method's top 5).
        refusal_tokens: refusal-start token ids (None: no signed column).
        rank, center, space: Sahara's subspace settings for the angle column.
        direction: a :class:`~safetyheads.refusal_direction.RefusalDirection` with contributions, or
            an ``[L, H]`` tensor of them; None leaves that column empty.
        kl_ships, refusal_drop: mean exact scores already computed on the same prompts, as ``[L, H]``
            (e.g. an exact :func:`~safetyheads.ships` sweep's ``mean("kl")`` / ``mean("refusal")``) or
            ``{head: score}`` covering every head (e.g. :func:`~safetyheads.search.signed_effects`),
            instead of recomputing them; ``sahara_angle`` likewise as ``{head: angle}``.
        batch_size: prompts per forward of the exact single-head scores.
        mean: for ``mode="mean"`` (required there), the head means of the exact single-head scores
            (:func:`~safetyheads.ablation.head_means`).
    """
    mode_ = Mode.parse(mode)
    eps = check_eps(mode_, eps)
    mean = check_mean(model, mode_, mean)
    g = get_adapter(model).geometry
    lists = {str(m): validate_heads(list(hs), g) for m, hs in methods.items()}
    if not lists:
        raise ValueError("no methods given")
    union = list(dict.fromkeys(h for hs in lists.values() for h in hs))
    common = dict(mode=mode_, eps=eps, prompt_format=prompt_format, system_prompt=system_prompt, batch_size=batch_size,
                  progress=progress, mean=mean)
    sources: dict[str, str] = {}

    def from_grid(t, name: str, objective: str, **kw) -> dict[Head, float]:
        if isinstance(t, Mapping) and all(h in t for h in union):
            sources[name] = "given"
            return {h: float(t[h]) for h in union}
        if t is not None and not isinstance(t, Mapping):
            t = torch.as_tensor(t)
            if tuple(t.shape) != (g.n_layers, g.n_heads):
                raise ValueError(f"{name} must be [{g.n_layers}, {g.n_heads}], got {tuple(t.shape)}")
            sources[name] = "given"
            return {h: float(t[h]) for h in union}
        sources[name] = f"exact, head_scores(objective={objective!r})"
        return head_scores(model, tokenizer, prompts, union, objective=objective, **kw, **common)

    kl = from_grid(kl_ships, "kl_ships", "kl")
    ref = None
    if refusal_tokens is not None:
        ref = from_grid(refusal_drop, "refusal_drop", "refusal", refusal_tokens=refusal_tokens)
    if sahara_angle is not None and all(h in sahara_angle for h in union):
        ang = {h: float(sahara_angle[h]) for h in union}
        sources["sahara_angle"] = "given"
    else:
        ang = head_scores(model, tokenizer, prompts, union, objective="subspace", rank=rank, center=center,
                          space=space, **common)
        sources["sahara_angle"] = "exact, head_scores(objective='subspace')"
    proj = None
    if direction is not None:
        contrib = getattr(direction, "contributions", direction)
        if contrib is None:
            raise ValueError("the refusal direction has no head contributions")
        contrib = torch.as_tensor(contrib)
        if tuple(contrib.shape) != (g.n_layers, g.n_heads):
            raise ValueError(f"direction contributions must be [{g.n_layers}, {g.n_heads}], got {tuple(contrib.shape)}")
        proj = {h: float(contrib[h]) for h in union}
        sources["direction_projection"] = f"refusal direction at layer {getattr(direction, 'layer', '?')}"
    att = first_token_attention(model, tokenizer, prompts, prompt_format=prompt_format, system_prompt=system_prompt)
    rows = [HeadRow(h, {m: hs.index(h) + 1 for m, hs in lists.items() if h in hs}, kl[h],
                    None if ref is None else ref[h], ang[h], None if proj is None else proj[h], float(att[h]))
            for h in union]
    rows.sort(key=lambda r: (-len(r.methods), -(r.refusal_drop if r.refusal_drop is not None else 0.0), r.head))
    config = {"mode": mode_.value, "eps": eps, "prompt_format": str(prompt_format), "system_prompt": system_prompt,
              "sahara": {"rank": rank, "center": center, "space": space}, "sources": sources,
              "refusal_tokens": None if refusal_tokens is None else [int(t) for t in refusal_tokens],
              "first_token_attention": "mean over prompts of the attention weight at the last position on position 0 "
                                       "(unpadded, eager attention, unablated)"}
    if mean is not None:
        config["mean_sha256"] = mean_digest(mean)
    prov = provenance(model, prompts, prompt_format=str(prompt_format), mode=mode_.value, eps=eps,
                      system_prompt=system_prompt)
    return Disagreement(rows, lists, config, prov)
