"""Sahara — Safety Attention Head AttRibution Algorithm: the group of heads safety rests on.

Generalized Ships of an ablation (SPEC §3): stack the final hidden states (after the final norm)
at the last prompt position of N harmful queries into M (N × d); take the top-``rank`` singular
subspace of M and of the ablated model's M'; the score is the sum of the principal angles between
the two subspaces. Greedy search: start from G = {}; at every step score G ∪ {h} for every
remaining candidate h against the *unablated* model and add the best. The search is the shared
engine of :mod:`safetyheads.search` (objective ``"subspace"``); the geometry is in
:mod:`safetyheads.subspaces` (re-exported here).

Subspaces live in representation space (R^d, spanned by the top right singular vectors of the
N × d stack — the "safety feature" directions) by default; ``space="query"`` uses the left
singular vectors (R^N) instead.

Presets: ``"official"`` = rank 1, no centring (the public prototype); ``"paper"`` = rank 3, no
centring — the paper sums principal angles, which needs rank > 1, but does not state the rank;
3 keeps the subspace to the few dominant, stably estimated directions of 16–64 prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from .ablation import Head, Mode
from .search import SearchResult, SearchStep, search_heads
from .subspaces import generalized_ships, principal_angles, subspace

__all__ = ["PRESETS", "SaharaResult", "SaharaStep", "generalized_ships", "principal_angles", "sahara", "subspace"]

PRESETS: dict[str, dict] = {
    "official": {"rank": 1, "center": False},
    "paper": {"rank": 3, "center": False},
}


# --------------------------------------------------------------------------- result

#: one greedy step: every candidate's score for G ∪ {h}, and the head added
SaharaStep = SearchStep


class SaharaResult(SearchResult):
    """The chosen heads in order, every step's candidate scores, signed effects and provenance
    (a :class:`~safetyheads.search.SearchResult` of the ``"subspace"`` objective)."""

    kind: ClassVar[str] = "sahara"


# --------------------------------------------------------------------------- search


def sahara(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    steps: int = 3,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    preset: str | None = "official",
    rank: int | None = None,
    center: bool | None = None,
    space: str = "feature",
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    candidates: Sequence[Head] | None = None,
    prefilter: str | None = None,
    prefilter_k: int = 24,
    prefilter_scores: torch.Tensor | None = None,
    refusal_tokens: Sequence[int] | None = None,
    batch_size: int = 32,
    reuse: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 60.0,
    progress: bool = True,
    shard: Any = None,
    mean: torch.Tensor | None = None,
) -> SaharaResult:
    """Greedy dataset-level search for the heads whose joint ablation most moves the representation.

    Args:
        prompts: harmful queries (at least ``rank`` of them).
        steps: how many heads to pick (paper: ≤ 5; attack success peaks near 3).
        preset: ``"official"`` (rank 1, uncentred) or ``"paper"`` (rank 3, uncentred); ``rank``/``center``
            override it.
        space: ``"feature"`` (subspace of R^d, default) or ``"query"`` (of R^N).
        candidates: heads to search over (default: all).
        prefilter: ``None`` (exhaustive), ``"estimate"`` (keep the ``prefilter_k`` heads with the highest
            mean estimated Ships, from :func:`~safetyheads.ships.ships_estimate`) or ``"exact-subset"``
            (keep the ``prefilter_k`` best step-1 scores computed on the first ``min(8, N)`` prompts).
        prefilter_scores: with ``prefilter="estimate"``, per-head scores ``[n_layers, n_heads]`` already
            computed (e.g. ``ships_estimate(...).mean("kl")`` of the same prompts) instead of recomputing them.
        refusal_tokens: token ids that start a refusal; if given, each chosen head's exact signed effect
            on refusal (``SaharaResult.signed``: mean drop of the refusal log-odds when it alone is
            ablated; negative = its ablation raises refusal). The search itself never uses them.
        batch_size: prompts per forward pass.
        reuse: cache the unablated residual stream per layer (memory: layers × prompts × tokens × d).
        checkpoint: a JSON file written atomically after every step and every ``checkpoint_every_s``
            within a step; rerunning the same call resumes from it. A checkpoint of a different
            configuration is refused.
        shard: share every step's candidates with other processes (see :mod:`safetyheads.shards`):
            ``shard.select`` picks this process's candidates, ``shard.record`` receives each score,
            ``shard.gather`` returns every candidate's score, so all processes choose the same head.
            It keeps its own per-process checkpoints: do not pass ``checkpoint`` with it. The
            ``"exact-subset"`` prefilter is shared the same way.
        mean: for ``mode="mean"`` (required there), each head's dataset-mean output
            (:func:`~safetyheads.ablation.head_means`, :func:`~safetyheads.ships.dataset_means`).
    Returns:
        :class:`SaharaResult`: ``heads`` in the order chosen and every step's candidate scores.

    Implemented on the shared greedy engine (:func:`safetyheads.search.search_heads` with
    ``objective="subspace"``), which also holds the residual reuse, checkpoints and sharding.
    """
    if preset and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    base_cfg = dict(PRESETS[preset]) if preset else {"rank": 1, "center": False}
    rank = base_cfg["rank"] if rank is None else int(rank)
    center = base_cfg["center"] if center is None else bool(center)
    res = search_heads(model, tokenizer, prompts, objective="subspace", steps=steps, mode=mode, eps=eps,
                       prompt_format=prompt_format, system_prompt=system_prompt, candidates=candidates,
                       prefilter=prefilter, prefilter_k=prefilter_k, prefilter_scores=prefilter_scores,
                       refusal_tokens=refusal_tokens, rank=rank, center=center, space=space, batch_size=batch_size,
                       reuse=reuse, checkpoint=checkpoint, checkpoint_every_s=checkpoint_every_s, progress=progress,
                       shard=shard, mean=mean, _label="Sahara")
    config = dict(res.config)
    config["preset"] = preset
    return SaharaResult(res.heads, res.steps, config, res.provenance, res.signed)
