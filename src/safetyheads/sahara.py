"""Sahara — Safety Attention Head AttRibution Algorithm: the group of heads safety rests on.

Generalized Ships of an ablation (SPEC §3): stack the final hidden states (after the final norm)
at the last prompt position of N harmful queries into M (N × d); take the top-``rank`` singular
subspace of M and of the ablated model's M'; the score is the sum of the principal angles between
the two subspaces. Greedy search: start from G = {}; at every step score G ∪ {h} for every
remaining candidate h against the *unablated* model and add the best.

Subspaces live in representation space (R^d, spanned by the top right singular vectors of the
N × d stack — the "safety feature" directions) by default; ``space="query"`` uses the left
singular vectors (R^N) instead.

Presets: ``"official"`` = rank 1, no centring (the public prototype); ``"paper"`` = rank 3, no
centring — the paper sums principal angles, which needs rank > 1, but does not state the rank;
3 keeps the subspace to the few dominant, stably estimated directions of 16–64 prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .ablation import Head, Mode, check_eps, heads_to_strength
from .ablation import ablate_strengths as _ablate
from .adapters import get_adapter, validate_heads
from .forward import last_token_hidden, reuse_residual
from .prompts import encode_prompts, format_prompts
from .provenance import atomic_write_text, model_record, provenance

log = logging.getLogger("safetyheads")

PRESETS: dict[str, dict] = {
    "official": {"rank": 1, "center": False},
    "paper": {"rank": 3, "center": False},
}


# --------------------------------------------------------------------------- linear algebra


def subspace(M: torch.Tensor, rank: int, *, center: bool = False, space: str = "feature") -> torch.Tensor:
    """Orthonormal basis (columns) of the top-``rank`` singular subspace of ``M`` (N × d), float64.

    ``space="feature"``: right singular vectors (in R^d); ``"query"``: left singular vectors (R^N).
    Raises ValueError when ``M`` has numerical rank below ``rank`` (σ_rank ≤ 1e-6·σ_1: duplicate
    prompts, collapsed representations), where the subspace would be an arbitrary choice of the SVD.
    """
    if space not in ("feature", "query"):
        raise ValueError("space must be 'feature' or 'query'")
    M = M.double()
    if center:
        M = M - M.mean(0, keepdim=True)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rank > min(M.shape):
        raise ValueError(f"rank {rank} exceeds min(n_prompts, d) = {min(M.shape)}")
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    if not S[rank - 1] > 1e-6 * S[0]:
        numerical = int((S > 1e-6 * S[0]).sum()) if S[0] > 0 else 0
        raise ValueError(
            f"the {'centred ' if center else ''}representation matrix has numerical rank {numerical} < rank {rank} "
            "(duplicate prompts or collapsed representations?): its top-rank subspace is not defined"
        )
    return (U[:, :rank] if space == "query" else Vh[:rank].T).contiguous()


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(A) and span(B), float64.

    A, B: ``[n, r]`` with orthonormal columns. Uses cosines from svd(AᵀB) and sines from
    svd(B − A AᵀB), paired and combined with atan2, so small angles are accurate (arccos alone
    loses them near 1) and results are exactly 0 for identical spans up to rounding.
    """
    A, B = A.double(), B.double()
    for name, X in (("A", A), ("B", B)):
        if X.dim() != 2 or X.shape[0] != A.shape[0] or X.shape[1] > X.shape[0]:
            raise ValueError(f"{name} must be [n, r] with r <= n and the same n as A, got {tuple(X.shape)}")
        if (X.T @ X - torch.eye(X.shape[1], dtype=X.dtype, device=X.device)).abs().max() > 1e-6:
            raise ValueError(f"{name} does not have orthonormal columns: pass an orthonormal basis (see subspace())")
    cos = torch.linalg.svdvals(A.T @ B).clamp(0, 1)  # descending
    sin = torch.linalg.svdvals(B - A @ (A.T @ B)).clamp(0, 1)
    sin = sin.flip(0)  # ascending, pairs with descending cosines
    k = min(cos.numel(), sin.numel())
    return torch.atan2(sin[:k], cos[:k])


def generalized_ships(base: torch.Tensor, ablated: torch.Tensor, rank: int, *, center: bool = False,
                      space: str = "feature") -> float:
    """Sum of principal angles between the top-``rank`` subspaces of two representation stacks."""
    return float(principal_angles(subspace(base, rank, center=center, space=space),
                                  subspace(ablated, rank, center=center, space=space)).sum())


# --------------------------------------------------------------------------- result


@dataclass
class SaharaStep:
    """One greedy step: every candidate's score for G ∪ {h}, and the head added."""

    chosen: Head
    score: float
    scores: dict[Head, float]

    def as_matrix(self, n_layers: int, n_heads: int) -> torch.Tensor:
        """Scores as a ``[n_layers, n_heads]`` heatmap (NaN where not scored)."""
        t = torch.full((n_layers, n_heads), math.nan)
        for (layer, head), s in self.scores.items():
            t[layer, head] = s
        return t


@dataclass
class SaharaResult:
    """The chosen heads in order, every step's candidate scores, and provenance."""

    heads: list[Head]
    steps: list[SaharaStep]
    config: dict
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "kind": "sahara",
            "heads": [list(h) for h in self.heads],
            "steps": [{"chosen": list(s.chosen), "score": s.score,
                       "scores": [[layer, head, v] for (layer, head), v in sorted(s.scores.items())]} for s in self.steps],
            "config": self.config,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, d: dict) -> SaharaResult:
        steps = [SaharaStep(tuple(s["chosen"]), s["score"], {(a, b): v for a, b, v in s["scores"]}) for s in d["steps"]]
        return cls([tuple(h) for h in d["heads"]], steps, d["config"], d.get("provenance", {}))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> SaharaResult:
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class SaharaConfig:
    steps: int
    mode: str
    eps: float
    rank: int
    center: bool
    space: str
    prompt_format: str
    system_prompt: str | None
    candidates: tuple[Head, ...]
    prompts_sha256: str
    prefilter: str | None
    prefilter_k: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=list).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- representations


class _Reps:
    """Final-norm last-token states of all prompts, with the residual stream cached per layer.

    The cache holds the layer inputs of the model under the ablation ``self.under`` (at first none;
    :meth:`rebase` moves it to the heads already chosen). An ablation that adds heads to ``under``
    changes nothing below the lowest added head's layer, so only the layers from there on run — in
    every greedy step, not just the first. Exact: the same operations on the same batch shapes.
    """

    def __init__(self, model, tokenizer, texts: list[str], batch_size: int, reuse: bool) -> None:
        self.model = model
        self.batch_size = batch_size
        self.reuse = reuse
        self.under: torch.Tensor | None = None
        self.blocks = []  # (ids, mask, layer inputs or None, last hidden)
        for b0 in range(0, len(texts), batch_size):
            enc = encode_prompts(tokenizer, texts[b0:b0 + batch_size])
            ids, mask = enc["input_ids"], enc["attention_mask"]
            inputs, h = self._run(ids, mask, None, None, 0.0)
            self.blocks.append((ids, mask, inputs, h))
        self.base = torch.cat([b[3] for b in self.blocks]).double()

    def _run(self, ids, mask, strength, mode, eps) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        """One full forward of a block (ablated by ``strength`` if given), capturing layer inputs if reusing."""
        inputs: list[torch.Tensor] = []
        handles = [layer.register_forward_pre_hook(
            lambda m, a, k, inputs=inputs: inputs.append((a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
            for layer in get_adapter(self.model).layers] if self.reuse else []
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if strength is not None:
                    stack.enter_context(_ablate(self.model, strength, mode=mode, eps=eps, attention_mask=mask))
                h = last_token_hidden(self.model, ids, mask)
        finally:
            for hd in handles:
                hd.remove()
        return inputs or None, h

    def rebase(self, strength: torch.Tensor, mode: Mode, eps: float) -> None:
        """Cache the layer inputs of the model ablated by ``strength`` (the heads chosen so far)."""
        if not self.reuse or not strength.any():
            return
        self.blocks = [(ids, mask, self._run(ids, mask, strength, mode, eps)[0], h) for ids, mask, _, h in self.blocks]
        self.under = strength.clone()

    def ablated(self, strength: torch.Tensor, mode: Mode, eps: float) -> torch.Tensor:
        """M' for one ablation (strength ``[1, L, H]``)."""
        added = strength
        if self.under is not None:
            added = strength - self.under
            if (added < 0).any() or (self.under.bool() & added.bool()).any():
                raise RuntimeError("internal error: the cached ablation is not part of this one")
        low = int(torch.nonzero(added[0].sum(1))[0, 0]) if added.any() else 0
        # low == 0 (or no cache): run every layer under `strength`
        cached = [inputs[low] if inputs and low > 0 else None for _, _, inputs, _ in self.blocks]
        out = []
        for (ids, mask, _, _), hidden in zip(self.blocks, cached):
            with torch.no_grad(), reuse_residual(self.model, low, hidden), \
                    _ablate(self.model, strength, mode=mode, eps=eps, attention_mask=mask):
                out.append(last_token_hidden(self.model, ids, mask))
        return torch.cat(out).double()


# --------------------------------------------------------------------------- search


def _checkpoint_load(path: Path | None, digest: str) -> dict:
    if path is None or not path.exists():
        return {"digest": digest, "done": [], "partial": {}}
    state = json.loads(path.read_text())
    if state.get("digest") != digest:
        raise ValueError(
            f"checkpoint {path} was written by a different Sahara configuration (digest {state.get('digest')} != "
            f"{digest}); use another checkpoint path or delete it"
        )
    return state


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
    batch_size: int = 32,
    reuse: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 60.0,
    progress: bool = True,
    shard: Any = None,
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
        batch_size: prompts per forward pass.
        reuse: cache the unablated residual stream per layer (memory: layers × prompts × tokens × d).
        checkpoint: a JSON file written atomically after every step and every ``checkpoint_every_s``
            within a step; rerunning the same call resumes from it. A checkpoint of a different
            configuration is refused.
        shard: share every step's candidates with other processes (see :mod:`safetyheads.distributed`):
            ``shard.select`` picks this process's candidates, ``shard.record`` receives each score,
            ``shard.gather`` returns every candidate's score, so all processes choose the same head.
            It keeps its own per-process checkpoints: do not pass ``checkpoint`` with it. The
            ``"exact-subset"`` prefilter is shared the same way.
    Returns:
        :class:`SaharaResult`: ``heads`` in the order chosen and every step's candidate scores.
    """
    mode = Mode.parse(mode)
    eps = check_eps(mode, eps)
    if preset and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    base_cfg = dict(PRESETS[preset]) if preset else {"rank": 1, "center": False}
    rank = base_cfg["rank"] if rank is None else int(rank)
    center = base_cfg["center"] if center is None else bool(center)
    if space not in ("feature", "query"):
        raise ValueError("space must be 'feature' or 'query'")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if rank < 1:
        raise ValueError("rank must be >= 1")
    if len(prompts) < rank + (1 if center else 0):
        raise ValueError(f"Sahara with rank {rank}{' (centred)' if center else ''} needs at least "
                         f"{rank + (1 if center else 0)} prompts, got {len(prompts)}")
    g = get_adapter(model).geometry
    if candidates is None:
        cands = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    else:
        cands = validate_heads(candidates, g)
        if len(set(cands)) != len(cands):
            dup = sorted({c for c in cands if cands.count(c) > 1})
            raise ValueError(f"duplicate candidates: {dup}")
        if not cands:
            raise ValueError("candidates is empty")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if steps > len(cands):
        raise ValueError(f"steps={steps} is more than the {len(cands)} candidate heads")
    if prefilter not in (None, "estimate", "exact-subset"):
        raise ValueError(f"unknown prefilter {prefilter!r}; choose None, 'estimate' or 'exact-subset'")
    if prefilter and prefilter_k < steps:
        raise ValueError(f"prefilter_k={prefilter_k} must be >= steps={steps}")
    if shard is not None:
        from .distributed import as_shard

        shard = as_shard(shard, need_all=True)
        if checkpoint is not None:
            raise ValueError("pass checkpoint= or shard=, not both: a shard keeps per-process checkpoints "
                             "(DistributedShard(checkpoint_dir=...))")

    texts = format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt)
    from .provenance import prompts_digest

    cfg = SaharaConfig(steps, mode.value, eps, rank, center, space, str(prompt_format), system_prompt,
                       tuple(cands), prompts_digest(texts), prefilter, prefilter_k)
    ckpt = Path(checkpoint) if checkpoint else None
    state = _checkpoint_load(ckpt, cfg.digest())

    def save_state() -> None:
        if ckpt is not None:
            atomic_write_text(ckpt, json.dumps(state))

    t0 = time.perf_counter()
    reps = _Reps(model, tokenizer, texts, batch_size, reuse)
    U0 = subspace(reps.base, rank, center=center, space=space)

    def score(heads: list[Head]) -> float:
        strength = heads_to_strength(model, [heads])
        M = reps.ablated(strength, mode, eps)
        return float(principal_angles(U0, subspace(M, rank, center=center, space=space)).sum())

    # prefilter: restrict the candidates once, recorded in the checkpoint
    if prefilter and "kept" not in state:
        state["kept"] = [list(h) for h in _prefilter(model, tokenizer, prompts, cands, prefilter, prefilter_k,
                                                       mode, eps, rank, center, space, prompt_format, system_prompt,
                                                       batch_size, progress, shard, prefilter_scores)]
        save_state()
    pool = [tuple(h) for h in state["kept"]] if prefilter else cands

    done: list[dict] = state["done"]
    chosen: list[Head] = [tuple(s["chosen"]) for s in done]
    for step in range(len(done), steps):
        if chosen:  # reuse the residual of the model with the chosen heads ablated below each candidate
            reps.rebase(heads_to_strength(model, [chosen]), mode, eps)
        partial = {tuple(json.loads(k)): v for k, v in state["partial"].items()}
        todo = [h for h in pool if h not in chosen and h not in partial]
        last_save = time.perf_counter()
        bar = tqdm(total=len(pool) - len(chosen), initial=len(partial), disable=not progress,
                   desc=f"Sahara step {step + 1}/{steps}")
        if shard is not None:
            from .distributed import candidate_cost

            record = {k: v for k, v in model_record(model).items() if k != "device"}
            key = {"kind": "sahara", "config": cfg.digest(), "model": record, "batch_size": batch_size,
                   "reuse": reuse, "step": step, "chosen": [list(h) for h in chosen]}
            mine = set(shard.select(key, [(h, candidate_cost(chosen + [h], g.n_layers)) for h in todo]))
            bar.total = len(mine)
            bar.refresh()
            for h in todo:
                if h in mine:
                    partial[h] = score(chosen + [h])
                    shard.record(h, partial[h])
                    bar.update(1)
            bar.close()
            partial.update(shard.gather())
            partial = dict(sorted(partial.items()))  # the same order on every process
            todo = []
        try:
            for h in todo:
                partial[h] = score(chosen + [h])
                bar.update(1)
                if time.perf_counter() - last_save > checkpoint_every_s:
                    state["partial"] = {json.dumps(list(k)): v for k, v in partial.items()}
                    save_state()
                    last_save = time.perf_counter()
        finally:  # an interrupted step keeps what it scored
            state["partial"] = {json.dumps(list(k)): v for k, v in partial.items()}
            save_state()
            bar.close()
        best = max(partial, key=lambda k: (partial[k], -k[0], -k[1]))
        chosen.append(best)
        done.append({"chosen": list(best), "score": partial[best],
                     "scores": [[a, b, v] for (a, b), v in sorted(partial.items())]})
        state["partial"] = {}
        save_state()
        log.info("Sahara step %d: head %s (score %.4f)", step + 1, best, partial[best])

    result_steps = [SaharaStep(tuple(s["chosen"]), s["score"], {(a, b): v for a, b, v in s["scores"]}) for s in done]
    prov = provenance(model, prompts, prompt_format=str(prompt_format), mode=mode.value, eps=eps,
                      system_prompt=system_prompt, seconds=round(time.perf_counter() - t0, 2))
    config = {k: v for k, v in asdict(cfg).items() if k != "candidates"}
    config.update(preset=preset, n_candidates=len(cands), kept=state.get("kept"))
    return SaharaResult(chosen, result_steps, config, prov)


def _prefilter(model, tokenizer, prompts, cands, how, k, mode, eps, rank, center, space, prompt_format,
               system_prompt, batch_size, progress, shard=None, scores=None) -> list[Head]:
    """The ``k`` most promising candidates (see :func:`sahara`)."""
    if len(cands) <= k:
        return list(cands)
    if how == "estimate" and scores is not None:
        vals = {h: float(scores[h]) for h in cands}
    elif how == "estimate":
        from .ships import ships_estimate

        est = ships_estimate(model, tokenizer, prompts, mode=mode, eps=eps, prompt_format=prompt_format,
                             system_prompt=system_prompt, progress=progress).mean("kl")
        vals = {h: float(est[h]) for h in cands}
    else:
        sub = list(prompts[: max(min(8, len(prompts)), rank + 1)])
        res = sahara(model, tokenizer, sub, steps=1, mode=mode, eps=eps, preset=None, rank=rank, center=center,
                     space=space, prompt_format=prompt_format, system_prompt=system_prompt, candidates=cands,
                     batch_size=batch_size, progress=progress, shard=shard)
        vals = res.steps[0].scores
    return sorted(cands, key=lambda h: -vals[h])[:k]
