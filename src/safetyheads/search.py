"""Exact greedy group search over attention heads, on any objective — the engine under Sahara.

Greedy search (SPEC §3.4, generalised): ``G = {}``; at every step score the ablation of ``G ∪ {h}``
for every remaining candidate ``h`` against the *unablated* model, by real ablated forward passes
over all prompts, and add the best ``h``. The objectives (higher is better; small strategies over
one last-token readout of the prompts):

``"subspace"``  Sahara's generalized Ships: the sum of the principal angles between the
                top-``rank`` singular subspaces of the final-norm last-token states, unablated
                vs ablated (:mod:`safetyheads.subspaces`). The paper's method (:func:`~safetyheads.sahara`).
``"refusal"``   the mean *drop* of the refusal log-odds ``log P(refusal-start tokens) − log P(others)``
                at the last prompt position: the group whose ablation most lowers refusal. Signed —
                a head whose ablation raises refusal scores below 0.
``"refusal-margin"`` the mean drop of the greedy refusal margin ``max_{y∈R} z_y − max_{y∉R} z_y``
                (> 0 exactly when greedy decoding opens with a refusal token), floored at 0: a prompt
                counts until its greedy first token leaves the refusal tokens, and a group that makes
                a complying prompt refuse is charged for it. The log-odds can fall while the refusal
                token stays the most likely one (probability lost to many small alternatives); this
                objective aims at the prompts greedy decoding actually flips.
``"kl"``        the mean KL(unablated ‖ ablated) of the last-position next-token distribution (Ships
                of a group).
``"asr"``       the attack-success rate itself: every candidate group's greedy answers to the
                attribution prompts are generated (``max_new_tokens``, each row ending once the
                judge's verdict is settled) and judged (``judge``, default ``keyword:paper``); the
                score is the rise of the share judged compliant over the unablated model's, ties
                broken by the refusal log-odds drop (added as ``0.4/N · tanh(drop)``, less than half
                of one prompt's ``1/N``). It measures what the evaluation measures — the log-odds at
                the first answer token can fall while greedy decoding still opens a refusal, or opens
                one in other words — at the cost of a generation per candidate.

Optional utility constraint: with ``harmless`` prompts and ``max_harmless_kl``, a candidate whose
group moves the harmless prompts' last-position distribution by more than the bound (mean KL) is
*rejected*: still scored and recorded, never chosen.

Cost and exactness: each step's forward passes start at the candidate's own layer — the residual
stream entering every layer is cached for the model with the already chosen heads ablated, and an
ablation that adds a head in layer ``l`` cannot change layers ``< l``. Prompts run in padded
batches of ``batch_size``. Per-step checkpoints (atomic JSON) resume an interrupted search with
bit-identical results; ``shard=`` shares each step's candidates between processes
(:mod:`safetyheads.shards`, :func:`safetyheads.distributed.search_distributed`).

Also here, built on the same readout: :func:`head_scores` (each head ablated alone, on any
objective) and :func:`signed_effects` — every reported head's exact signed effect on refusal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .ablation import Head, Mode, check_eps, check_mean, heads_to_strength, mean_digest
from .ablation import ablate_strengths as _ablate
from .adapters import get_adapter, validate_heads
from .forward import (
    SharedPrefix,
    captured_inputs,
    last_token_hidden,
    last_token_hidden_logits,
    last_token_logits,
    reuse_residual,
)
from .prompts import format_prompts, pad_left, prompt_token_ids
from .provenance import atomic_write_text, model_record, prompts_digest, provenance
from .refusal_metric import _get_judge, _judge_name, _run_judge
from .shards import as_shard, candidate_cost
from .ships import kl_from_logprobs, refusal_logodds, refusal_margin
from .subspaces import principal_angles, subspace

log = logging.getLogger("safetyheads")

OBJECTIVES = ("subspace", "refusal", "refusal-margin", "kl", "asr")
#: the objectives read off the refusal tokens (and prefiltered by the refusal-gradient estimate)
REFUSAL_OBJECTIVES = ("refusal", "refusal-margin", "asr")
PREFILTERS = (None, "estimate", "estimate-adaptive", "exact-subset")
DEFAULT_BATCH_SIZE = 32

__all__ = ["OBJECTIVES", "SearchResult", "SearchStep", "group_scores", "head_scores", "search_heads",
           "signed_effects", "single_head_scores"]


# --------------------------------------------------------------------------- result


def _pairs(d: dict[Head, float]) -> list[list]:
    return [[layer, head, v] for (layer, head), v in sorted(d.items())]


def _unpairs(rows: list) -> dict[Head, float]:
    return {(a, b): v for a, b, v in rows}


@dataclass
class SearchStep:
    """One greedy step: every candidate's score for ``G ∪ {h}`` and the head added.

    ``harmless_kl``: each candidate group's mean KL on the harmless prompts (with ``harmless=``);
    ``rejected``: candidates over ``max_harmless_kl``, never chosen.
    """

    chosen: Head
    score: float
    scores: dict[Head, float]
    harmless_kl: dict[Head, float] | None = None
    rejected: list[Head] = field(default_factory=list)

    def as_matrix(self, n_layers: int, n_heads: int) -> torch.Tensor:
        """Scores as a ``[n_layers, n_heads]`` heatmap (NaN where not scored)."""
        t = torch.full((n_layers, n_heads), math.nan)
        for (layer, head), s in self.scores.items():
            t[layer, head] = s
        return t

    def to_json(self) -> dict:
        d: dict[str, Any] = {"chosen": list(self.chosen), "score": self.score, "scores": _pairs(self.scores)}
        if self.harmless_kl is not None:
            d["harmless_kl"] = _pairs(self.harmless_kl)
            d["rejected"] = [list(h) for h in self.rejected]
        return d

    @classmethod
    def from_json(cls, d: dict) -> SearchStep:
        hk = d.get("harmless_kl")
        return cls(tuple(d["chosen"]), d["score"], _unpairs(d["scores"]), None if hk is None else _unpairs(hk),
                   [tuple(h) for h in d.get("rejected", [])])


@dataclass
class SearchResult:
    """The chosen heads in order, every step's candidate scores, signed effects and provenance.

    Attributes:
        heads: the heads in the order chosen.
        steps: every step's candidate scores (:class:`SearchStep`).
        config: the objective and the search's settings (``kept``: the prefilter's candidates;
            ``stopped``: why the search ended before ``steps``, if it did).
        provenance: model, data, prompt format, mode, ε, versions, seconds.
        signed: each head's exact signed effect on refusal — the mean drop of the refusal
            log-odds over the prompts when the head alone is ablated (positive: the head holds
            refusal up; negative: ablating it *raises* refusal); None without refusal tokens.
    """

    heads: list[Head]
    steps: list[SearchStep]
    config: dict
    provenance: dict = field(default_factory=dict)
    signed: dict[Head, float] | None = None

    kind: ClassVar[str] = "search"

    def raises_refusal(self) -> list[Head]:
        """The chosen heads whose ablation alone *raises* refusal (negative signed effect)."""
        return [h for h in self.heads if self.signed is not None and self.signed.get(h, 0.0) < 0]

    def to_json(self) -> dict:
        d: dict[str, Any] = {"kind": self.kind, "heads": [list(h) for h in self.heads],
                             "steps": [s.to_json() for s in self.steps], "config": self.config,
                             "provenance": self.provenance}
        if self.signed is not None:
            d["signed_effects"] = _pairs(self.signed)
        return d

    @classmethod
    def from_json(cls, d: dict):
        signed = d.get("signed_effects")
        return cls([tuple(h) for h in d["heads"]], [SearchStep.from_json(s) for s in d["steps"]], d["config"],
                   d.get("provenance", {}), None if signed is None else _unpairs(signed))

    def save(self, path: str | Path) -> None:
        """Write the result as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path):
        """Read a result written by :meth:`save`."""
        return cls.from_json(json.loads(Path(path).read_text()))

    def to_pandas(self):
        """One row per step × candidate (step, layer, head, score, chosen)
        as a tidy pandas DataFrame (:func:`safetyheads.views.search_frame`)."""
        from .views import search_frame

        return search_frame(self)

    def plot(self, step: int | None = None):
        """The report's heatmap of greedy step ``step`` (1-based, default the last) as a matplotlib
        Figure."""
        from .views import search_plot

        return search_plot(self, step=step)

    def _repr_html_(self) -> str:
        """A compact table plus the figure, for Jupyter (:func:`safetyheads.views.repr_html`)."""
        from .views import repr_html

        return repr_html(self)


# --------------------------------------------------------------------------- the readout


_READ = {"hidden": last_token_hidden, "logits": last_token_logits, "both": last_token_hidden_logits}


class _Residuals:
    """Last-token readout of the prompts under an ablation, with the residual stream cached per layer.

    ``readout="hidden"``: the final-norm hidden state (``[N, d]``); ``"logits"``: the next-token
    logits (``[N, vocab]``); ``"both"``: the two side by side (``[N, d + vocab]``, one forward); all
    at the last prompt position, as float64 stacks.

    The cache holds the layer inputs of the model under the ablation ``self.under`` (at first none;
    :meth:`rebase` moves it to the heads already chosen). An ablation that adds heads to ``under``
    changes nothing below the lowest added head's layer, so only the layers from there on run — in
    every greedy step, not just the first. Exact: the same operations on the same batch shapes.
    ``mean``: the head means every ablation of mode ``mean`` uses (:func:`~safetyheads.ablation.head_means`).

    ``shared_prefix``: the tokens every prompt starts with (a chat template's system block) run once
    per ablation, one row, and their KV cache stands in for them in every prompt batch
    (:class:`~safetyheads.forward.SharedPrefix`); the batches then hold only the rest of each prompt.
    Not with ``mode="ua-limit"`` (prefill only) — the caller says so.
    """

    def __init__(self, model, tokenizer, texts: list[str], batch_size: int, reuse: bool,
                 readout: str = "hidden", mean: torch.Tensor | None = None, shared_prefix: bool = True) -> None:
        if readout not in _READ:
            raise ValueError(f"readout must be one of {list(_READ)}, got {readout!r}")
        self.model = model
        self.mean = mean
        self.batch_size = batch_size
        self.reuse = reuse
        self.read = _READ[readout]
        self.under: torch.Tensor | None = None
        rows = prompt_token_ids(tokenizer, texts)
        n_prefix = SharedPrefix.length(rows) if shared_prefix and len(rows) > 1 else 0
        self.prefix0 = SharedPrefix.build(model, rows[0][:n_prefix]) if n_prefix else None  # unablated
        self.prefix = self.prefix0  # under self.under
        n_prefix = len(self.prefix0) if self.prefix0 is not None else 0
        self.blocks = []  # (ids, mask, layer inputs or None, last-token readout)
        for b0 in range(0, len(texts), batch_size):
            enc = pad_left(tokenizer, [r[n_prefix:] for r in rows[b0:b0 + batch_size]])
            ids, mask = enc["input_ids"], enc["attention_mask"]
            if n_prefix:
                mask = torch.cat([mask.new_ones(len(mask), n_prefix), mask], 1)
            inputs, h = self._run(ids, mask, None, None, 0.0, self.prefix)
            self.blocks.append((ids, mask, inputs, h))
        self.base = torch.cat([b[3] for b in self.blocks]).double()

    def _past(self, prefix: SharedPrefix | None, ids: torch.Tensor):
        return None if prefix is None else prefix.batch(ids.shape[0])

    def _run(self, ids, mask, strength, mode, eps, prefix) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        """One full forward of a block (ablated by ``strength`` if given; ``prefix`` under the same
        ablation), capturing layer inputs if reusing."""
        with torch.no_grad(), contextlib.ExitStack() as stack:
            inputs = stack.enter_context(captured_inputs(self.model)) if self.reuse else None
            if strength is not None:
                stack.enter_context(_ablate(self.model, strength, mode=mode, eps=eps, mean=self.mean,
                                            attention_mask=mask))
            h = self.read(self.model, ids, mask, self._past(prefix, ids))
        return inputs, h

    def _prefix_under(self, strength: torch.Tensor, mode: Mode, eps: float, low: int) -> SharedPrefix | None:
        if self.prefix is None:
            return None
        with torch.no_grad(), _ablate(self.model, strength, mode=mode, eps=eps, mean=self.mean):
            return self.prefix.under(self.model, low)

    def rebase(self, strength: torch.Tensor, mode: Mode, eps: float) -> None:
        """Cache the layer inputs of the model ablated by ``strength`` (the heads chosen so far)."""
        if not self.reuse or not strength.any():
            return
        if self.prefix0 is not None:  # from the unablated prefix: every layer under the new ablation
            with torch.no_grad(), _ablate(self.model, strength, mode=mode, eps=eps, mean=self.mean):
                self.prefix = self.prefix0.under(self.model, 0)
        self.blocks = [(ids, mask, self._run(ids, mask, strength, mode, eps, self.prefix)[0], h)
                       for ids, mask, _, h in self.blocks]
        self.under = strength.clone()

    def ablated(self, strength: torch.Tensor, mode: Mode, eps: float) -> torch.Tensor:
        """The readout stack for one ablation (strength ``[1, L, H]``)."""
        added = strength
        if self.under is not None:
            added = strength - self.under
            if (added < 0).any() or (self.under.bool() & added.bool()).any():
                raise RuntimeError("internal error: the cached ablation is not part of this one")
        low = int(torch.nonzero(added[0].sum(1))[0, 0]) if added.any() else 0
        # low == 0 (or no cache): run every layer under `strength`
        cached = [inputs[low] if inputs and low > 0 else None for _, _, inputs, _ in self.blocks]
        prefix = self._prefix_under(strength, mode, eps, low if self.reuse else 0)
        out = []
        for (ids, mask, _, _), hidden in zip(self.blocks, cached):
            with torch.no_grad(), reuse_residual(self.model, low, hidden), \
                    _ablate(self.model, strength, mode=mode, eps=eps, mean=self.mean, attention_mask=mask):
                out.append(self.read(self.model, ids, mask, self._past(prefix, ids)))
        return torch.cat(out).double()


# --------------------------------------------------------------------------- objectives
# Each: the readout it needs, prepare(base stack) once, then score(ablated stack) -> float (higher = better).


@dataclass
class _Subspace:
    """Sahara: sum of principal angles between the unablated and ablated top-``rank`` subspaces."""

    rank: int
    center: bool
    space: str
    readout: ClassVar[str] = "hidden"

    def prepare(self, base: torch.Tensor) -> None:
        self.U0 = subspace(base, self.rank, center=self.center, space=self.space)

    def score(self, M: torch.Tensor) -> float:
        return float(principal_angles(self.U0, subspace(M, self.rank, center=self.center, space=self.space)).sum())


@dataclass
class _Refusal:
    """Mean drop of the refusal log-odds (unablated − ablated) over the prompts."""

    tokens: torch.Tensor
    readout: ClassVar[str] = "logits"

    def prepare(self, base: torch.Tensor) -> None:
        self.base = refusal_logodds(base, self.tokens)

    def per_prompt(self, logits: torch.Tensor) -> torch.Tensor:
        return self.base - refusal_logodds(logits, self.tokens)

    def score(self, logits: torch.Tensor) -> float:
        return float(self.per_prompt(logits).mean())


@dataclass
class _RefusalMargin(_Refusal):
    """Mean drop of the greedy refusal margin floored at 0 (``max(m₀, 0) − max(m, 0)``) over the prompts."""

    def prepare(self, base: torch.Tensor) -> None:
        self.base = refusal_margin(base, self.tokens).clamp(min=0)

    def per_prompt(self, logits: torch.Tensor) -> torch.Tensor:
        return self.base - refusal_margin(logits, self.tokens).clamp(min=0)


@dataclass
class _KL:
    """Mean KL(unablated ‖ ablated) of the last-position next-token distribution over the prompts."""

    readout: ClassVar[str] = "logits"

    def prepare(self, base: torch.Tensor) -> None:
        self.base = F.log_softmax(base.double(), dim=-1)

    def score(self, logits: torch.Tensor) -> float:
        return float(kl_from_logprobs(self.base, F.log_softmax(logits.double(), dim=-1)).mean())


@dataclass
class _Asr:
    """Rise of the attack-success rate (share judged compliant) over the unablated model's, ties broken by
    the refusal log-odds drop (``0.4/N · tanh(mean drop)``)."""

    tokens: torch.Tensor
    readout: ClassVar[str] = "generation"

    def prepare(self, run) -> None:
        """``run(head sets) -> [(compliant per prompt, refusal log-odds per prompt)]``; the unablated model's first."""
        self.run = run
        compliant, self.base = run([[]])[0]
        self.base_asr = sum(compliant) / len(compliant)

    def score_many(self, groups: list[list[Head]]) -> list[float]:
        out = []
        for compliant, logodds in self.run(groups):
            n = len(compliant)
            out.append(sum(compliant) / n - self.base_asr + 0.4 / n * math.tanh(float((self.base - logodds).mean())))
        return out


def _objective(name: str, *, refusal_tokens, rank: int, center: bool, space: str):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {list(OBJECTIVES)}")
    if name == "subspace":
        if space not in ("feature", "query"):
            raise ValueError("space must be 'feature' or 'query'")
        if rank < 1:
            raise ValueError("rank must be >= 1")
        return _Subspace(int(rank), bool(center), space)
    if name in REFUSAL_OBJECTIVES:
        if refusal_tokens is None:
            raise ValueError(f"objective {name!r} needs refusal_tokens (e.g. evaluate.derive_refusal_tokens)")
        return {"refusal": _Refusal, "refusal-margin": _RefusalMargin, "asr": _Asr}[name](_tokens(refusal_tokens))
    return _KL()


def _tokens(refusal_tokens: Sequence[int]) -> torch.Tensor:
    t = torch.as_tensor(list(refusal_tokens), dtype=torch.long)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError("refusal_tokens must be a non-empty list of token ids")
    return t


# --------------------------------------------------------------------------- checkpoints


def _digest(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _check_extend(prev: SearchResult, cfg: dict, n_candidates: int, steps: int) -> None:
    """Refuse to extend a search of another configuration, or one longer than ``steps``."""
    old = {k: v for k, v in prev.config.items()
           if k not in ("steps", "kept", "kept_steps", "stopped", "n_candidates", "extended_from_steps")}
    new = {k: v for k, v in cfg.items() if k not in ("steps", "candidates")}
    old, new = (json.loads(json.dumps(d, sort_keys=True, default=list)) for d in (old, new))  # tuples → lists
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if prev.config.get("n_candidates") != n_candidates:
        diff.append("candidates")
    if diff:
        raise ValueError(f"extend= is a search of another configuration (differs in {diff}); it can only be "
                         "extended with the same objective, prompts, ablation and candidates")
    if len(prev.steps) > steps:
        raise ValueError(f"extend= already has {len(prev.steps)} steps; ask for steps >= {len(prev.steps)}")


def _checkpoint_load(path: Path | None, digest: str, label: str) -> dict:
    if path is None or not path.exists():
        return {"digest": digest, "done": [], "partial": {}}
    state = json.loads(path.read_text())
    if state.get("digest") != digest:
        raise ValueError(
            f"checkpoint {path} was written by a different {label} configuration (digest {state.get('digest')} != "
            f"{digest}); use another checkpoint path or delete it"
        )
    return state


# --------------------------------------------------------------------------- the search


def _settings(model, prompts: Sequence[str], objective: str, *, mode, eps, mean, refusal_tokens, rank, center, space,
              batch_size, judge, max_new_tokens) -> tuple[Mode, float, torch.Tensor | None, Any, Any, int]:
    """What :func:`search_heads` and :func:`group_scores` check alike: ``(mode, ε, mean, objective, judge
    (None unless ``"asr"``), batch size)``."""
    mode = Mode.parse(mode)
    eps = check_eps(mode, eps)
    mean = check_mean(model, mode, mean)
    obj = _objective(objective, refusal_tokens=refusal_tokens, rank=rank, center=center, space=space)
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if objective == "subspace" and len(prompts) < rank + (1 if center else 0):
        raise ValueError(f"Sahara with rank {rank}{' (centred)' if center else ''} needs at least "
                         f"{rank + (1 if center else 0)} prompts, got {len(prompts)}")
    judge_ = None
    if objective == "asr":
        judge_ = _get_judge(judge)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    bs = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return mode, eps, mean, obj, judge_, bs


def search_heads(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    objective: str = "subspace",
    steps: int = 3,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    candidates: Sequence[Head] | None = None,
    prefilter: str | None = None,
    prefilter_k: int = 24,
    prefilter_scores: torch.Tensor | None = None,
    refusal_tokens: Sequence[int] | None = None,
    rank: int = 1,
    center: bool = False,
    space: str = "feature",
    harmless: Sequence[str] | None = None,
    max_harmless_kl: float | None = None,
    batch_size: int | None = None,
    reuse: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 60.0,
    progress: bool = True,
    shard: Any = None,
    signed: bool = True,
    mean: torch.Tensor | None = None,
    extend: SearchResult | None = None,
    judge: Any = "keyword:paper",
    max_new_tokens: int = 32,
    _label: str = "search",
) -> SearchResult:
    """Exact greedy search for the group of heads whose joint ablation most moves ``objective``.

    Args:
        prompts: the attribution prompts (plain text; formatted with ``prompt_format``).
        objective: ``"subspace"`` (Sahara's generalized Ships; ``rank``, ``center``, ``space``),
            ``"refusal"`` (mean drop of the refusal log-odds; needs ``refusal_tokens``),
            ``"refusal-margin"`` (mean drop of the greedy refusal margin, floored at 0; needs
            ``refusal_tokens``), ``"kl"`` or ``"asr"`` (the rise of the attack-success rate of greedy
            answers, ``max_new_tokens`` long, judged by ``judge``; needs ``refusal_tokens`` for its
            tie-break and prefilter).
        steps: how many heads to pick.
        candidates: heads to search over (default: all).
        prefilter: ``None`` (every candidate, every step), ``"estimate"`` (keep the ``prefilter_k``
            best heads of a gradient estimate: the refusal-gradient for the refusal objectives, the Fisher KL
            estimate otherwise — :func:`~safetyheads.ships.ships_estimate`), ``"estimate-adaptive"``
            (the same at step 1; before every later step the estimate is taken again with the
            heads chosen so far ablated — ``ships_estimate(under=chosen)`` — and that step's pool is
            its ``prefilter_k`` best other heads: heads that matter only once others are gone, as
            when the model compensates for an ablation, can enter; each step's pool is recorded in
            ``config["kept_steps"]``) or ``"exact-subset"`` (keep the ``prefilter_k`` best exact
            step-1 scores on the first ``min(8, N)`` prompts).
        prefilter_scores: with ``prefilter="estimate"``, per-head scores ``[n_layers, n_heads]``
            already computed (higher = more promising) instead of recomputing the estimate.
        refusal_tokens: token ids that start a refusal. Needed by ``"refusal"``; with any objective
            they give each chosen head's signed effect (``SearchResult.signed``, unless ``signed=False``).
        harmless, max_harmless_kl: the utility constraint. Each candidate group's mean last-position
            KL on ``harmless`` prompts is recorded; one above ``max_harmless_kl`` is rejected. If
            every remaining candidate is rejected the search stops early (``config["stopped"]``).
        batch_size: prompts per forward pass (default 32); for ``"asr"``, rows per generation batch, and
            the candidates of a step are generated ``batch_size // len(prompts)`` at a time.
        reuse: cache the residual stream per layer (memory: layers × prompts × tokens × d).
        checkpoint: a JSON file written atomically after every step and every ``checkpoint_every_s``
            within a step; rerunning the same call resumes from it (bit-identical result). A
            checkpoint of a different configuration is refused.
        shard: share every step's candidates with other processes (a
            :class:`~safetyheads.shards.DistributedShard`); it keeps its own per-process
            checkpoints, so do not pass ``checkpoint`` with it.
        mean: for ``mode="mean"`` (required there), each head's dataset-mean output
            (:func:`~safetyheads.ablation.head_means`, :func:`~safetyheads.ships.dataset_means`);
            its sha256 is part of the checkpoint's configuration.
        extend: a finished search with the same configuration and fewer ``steps`` (or as many): its
            steps and candidate pool are kept and the search goes on from its last head, so ``steps=8``
            after a 5-step search scores only steps 6–8. Greedy search is prefix-consistent: the
            result equals an 8-step search run from scratch. A result of another configuration
            (objective, prompts, mode, ε, candidates, prefilter, refusal tokens, …) is refused.
        judge, max_new_tokens: for ``objective="asr"``: the judge (a name for
            :func:`~safetyheads.judges.get_judge` or an object with ``is_refusal``; one with
            ``refusal_settled`` ends each row once its verdict is settled) and the answer length.
    Returns:
        :class:`SearchResult`: the heads in the order chosen, every step's candidate scores and
        (with refusal tokens) each chosen head's signed effect on refusal.
    """
    mode, eps, mean, obj, judge_, bs = _settings(model, prompts, objective, mode=mode, eps=eps, mean=mean,
                                                 refusal_tokens=refusal_tokens, rank=rank, center=center, space=space,
                                                 batch_size=batch_size, judge=judge, max_new_tokens=max_new_tokens)
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
    if prefilter not in PREFILTERS:
        raise ValueError(f"unknown prefilter {prefilter!r}; choose None, 'estimate', 'estimate-adaptive' or "
                         "'exact-subset'")
    if prefilter and prefilter_k < steps:
        raise ValueError(f"prefilter_k={prefilter_k} must be >= steps={steps}")
    if prefilter_scores is not None and tuple(prefilter_scores.shape) != (g.n_layers, g.n_heads):
        raise ValueError(f"prefilter_scores must be [{g.n_layers}, {g.n_heads}], got {tuple(prefilter_scores.shape)}")
    if max_harmless_kl is not None:
        if not harmless:
            raise ValueError("max_harmless_kl needs harmless prompts (harmless=[...])")
        if not max_harmless_kl >= 0:
            raise ValueError(f"max_harmless_kl must be >= 0, got {max_harmless_kl}")
    if harmless is not None and len(harmless) == 0:
        raise ValueError("harmless is empty: give harmless prompts or None")
    rt = None if refusal_tokens is None else _tokens(refusal_tokens)
    if shard is not None:
        shard = as_shard(shard, need_all=True)
        if checkpoint is not None:
            raise ValueError("pass checkpoint= or shard=, not both: a shard keeps per-process checkpoints "
                             "(DistributedShard(checkpoint_dir=...))")

    texts = format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt)
    h_texts = None if harmless is None else format_prompts(tokenizer, list(harmless), prompt_format,
                                                          system_prompt=system_prompt)
    cfg: dict[str, Any] = {"objective": objective, "steps": steps, "mode": mode.value, "eps": eps,
                           "prompt_format": str(prompt_format), "system_prompt": system_prompt,
                           "candidates": [list(h) for h in cands], "prompts_sha256": prompts_digest(texts),
                           "prefilter": prefilter, "prefilter_k": prefilter_k}
    if objective == "subspace":
        cfg.update(rank=rank, center=center, space=space)
    if objective in REFUSAL_OBJECTIVES:
        cfg["refusal_tokens"] = rt.tolist()
    if judge_ is not None:
        cfg.update(judge=_judge_name(judge_), max_new_tokens=int(max_new_tokens))
    if mean is not None:
        cfg["mean_sha256"] = mean_digest(mean)
    if h_texts is not None:
        cfg.update(harmless_sha256=prompts_digest(h_texts), max_harmless_kl=max_harmless_kl)
    if prefilter == "estimate" and prefilter_scores is not None:
        cfg["prefilter_scores_sha256"] = hashlib.sha256(prefilter_scores.double().numpy().tobytes()).hexdigest()[:16]
    digest = _digest(cfg)
    ckpt = Path(checkpoint) if checkpoint else None
    state = _checkpoint_load(ckpt, digest, _label)
    if extend is not None:
        _check_extend(extend, cfg, len(cands), steps)
        if not state["done"] and not state["partial"]:
            state.update({k: extend.config[k] for k in ("kept", "kept_steps", "stopped") if extend.config.get(k)})
            state["done"] = [s.to_json() for s in extend.steps]

    def save_state() -> None:
        if ckpt is not None:
            atomic_write_text(ckpt, json.dumps(state))

    t0 = time.perf_counter()
    shared = mode is not Mode.UA_LIMIT  # ua-limit is prefill-only: no prefix cache
    reps = None
    if obj.readout == "generation":
        obj.prepare(_answers(model, tokenizer, list(prompts), judge_, rt, mode=mode, eps=eps,
                             prompt_format=prompt_format, system_prompt=system_prompt,
                             max_new_tokens=int(max_new_tokens), batch_size=bs, mean=mean))
    else:
        reps = _Residuals(model, tokenizer, texts, bs, reuse, obj.readout, mean=mean, shared_prefix=shared)
        obj.prepare(reps.base)
    harm = None
    if h_texts is not None:
        harm = _Residuals(model, tokenizer, h_texts, bs, reuse, "logits", mean=mean, shared_prefix=shared)
        harm_kl = _KL()
        harm_kl.prepare(harm.base)

    def evaluate(groups: list[list[Head]]) -> list[float | list[float]]:
        strengths = [heads_to_strength(model, [heads]) for heads in groups]
        vals = obj.score_many(groups) if reps is None else [obj.score(reps.ablated(st, mode, eps)) for st in strengths]
        if harm is None:
            return vals
        return [[v, harm_kl.score(harm.ablated(st, mode, eps))] for v, st in zip(vals, strengths)]

    # candidates scored together: for "asr" as many as fill a generation batch of `bs` rows (always the
    # same slices of the step's candidates, so a resumed step batches them as the first run did)
    per = max(1, bs // len(prompts)) if reps is None else 1

    # prefilter: restrict the candidates once, recorded in the checkpoint
    if prefilter and "kept" not in state:
        state["kept"] = [list(h) for h in _prefilter(
            model, tokenizer, prompts, cands, prefilter, prefilter_k, objective, rt, mode, eps, rank, center, space,
            prompt_format, system_prompt, bs, progress, shard, prefilter_scores, _label, mean,
            judge=judge_ if judge_ is not None else judge, max_new_tokens=max_new_tokens)]
        save_state()
    pool = [tuple(h) for h in state["kept"]] if prefilter else cands

    done: list[dict] = state["done"]
    chosen: list[Head] = [tuple(s["chosen"]) for s in done]
    for step in range(len(done), steps):
        if "stopped" in state:
            break
        if prefilter == "estimate-adaptive" and chosen:  # this step's pool: the estimate under the chosen heads
            kept_steps = state.setdefault("kept_steps", {})
            if str(step) not in kept_steps:
                kept_steps[str(step)] = [list(h) for h in _adaptive_pool(
                    model, tokenizer, prompts, [h for h in cands if h not in chosen], chosen, prefilter_k, objective,
                    rt, mode, eps, prompt_format, system_prompt, progress, mean)]
                save_state()
            pool = chosen + [tuple(h) for h in kept_steps[str(step)]]
        if chosen:  # reuse the residual of the model with the chosen heads ablated below each candidate
            strength = heads_to_strength(model, [chosen])
            if reps is not None:
                reps.rebase(strength, mode, eps)
            if harm is not None:
                harm.rebase(strength, mode, eps)
        partial = {tuple(json.loads(k)): v for k, v in state["partial"].items()}
        todo = [h for h in pool if h not in chosen and h not in partial]
        last_save = time.perf_counter()
        bar = tqdm(total=len(pool) - len(chosen), initial=len(partial), disable=not progress,
                   desc=f"{_label} ({objective}) step {step + 1}/{steps}")
        if shard is not None:
            record = {k: v for k, v in model_record(model).items() if k != "device"}
            key = {"kind": _label.lower(), "config": digest, "model": record, "batch_size": bs,
                   "reuse": reuse, "step": step, "chosen": [list(h) for h in chosen]}
            mine = set(shard.select(key, [(h, candidate_cost(chosen + [h], g.n_layers)) for h in todo]))
            bar.total = len(mine)
            bar.refresh()
            for h in todo:
                if h in mine:
                    partial[h] = evaluate([chosen + [h]])[0]
                    shard.record(h, partial[h])
                    bar.update(1)
            bar.close()
            partial.update(shard.gather())
            partial = dict(sorted(partial.items()))  # the same order on every process
            todo = []
        rest = [h for h in pool if h not in chosen]
        chunks = [c for c in (rest[i:i + per] for i in range(0, len(rest), per)) if any(h in todo for h in c)]
        try:
            for chunk in chunks:
                partial.update(zip(chunk, evaluate([chosen + [h] for h in chunk])))
                bar.update(len(chunk))
                if time.perf_counter() - last_save > checkpoint_every_s:
                    state["partial"] = {json.dumps(list(k)): v for k, v in partial.items()}
                    save_state()
                    last_save = time.perf_counter()
        finally:  # an interrupted step keeps what it scored
            state["partial"] = {json.dumps(list(k)): v for k, v in partial.items()}
            save_state()
            bar.close()
        entry = _choose(partial, harm is not None, max_harmless_kl)
        if entry is None:
            state["stopped"] = {"step": step + 1, "reason": f"every remaining candidate's harmless KL exceeds "
                                                            f"max_harmless_kl={max_harmless_kl}"}
            log.warning("%s step %d: %s; stopping with %d heads", _label, step + 1, state["stopped"]["reason"],
                        len(chosen))
        else:
            chosen.append(tuple(entry["chosen"]))
            done.append(entry)
            log.info("%s step %d: head %s (score %.4f)", _label, step + 1, tuple(entry["chosen"]), entry["score"])
        state["partial"] = {}
        save_state()

    result_steps = [SearchStep.from_json(s) for s in done]
    effects = None
    if rt is not None and signed and chosen:
        effects = _signed_of(result_steps, chosen, objective, prefilter)
        if effects is None:
            effects = signed_effects(model, tokenizer, prompts, chosen, refusal_tokens=rt.tolist(), mode=mode, eps=eps,
                                     prompt_format=prompt_format, system_prompt=system_prompt, batch_size=bs,
                                     mean=mean)
    prov = provenance(model, prompts, prompt_format=str(prompt_format), mode=mode.value, eps=eps,
                      system_prompt=system_prompt, seconds=round(time.perf_counter() - t0, 2))
    config = {k: v for k, v in cfg.items() if k != "candidates"}
    config.update(n_candidates=len(cands), kept=state.get("kept"))
    if "kept_steps" in state:
        config["kept_steps"] = state["kept_steps"]
    if "stopped" in state:
        config["stopped"] = state["stopped"]
    if extend is not None:
        config["extended_from_steps"] = len(extend.steps)
    return SearchResult(chosen, result_steps, config, prov, effects)


def _answers(model, tokenizer, prompts: list[str], judge, rt: torch.Tensor, **gen_kw: Any):
    """For the ``"asr"`` objective: ``run(head sets) -> [(compliant per prompt, refusal log-odds per prompt)]``
    from greedy answers under the ablation of each head set, all generated in shared batches (each row
    ends once ``judge`` settles it)."""
    from .generation import StopRule, generate_and_score

    settled = getattr(judge, "refusal_settled", None)
    stop = StopRule(f"{_judge_name(judge)}: refusal phrase", settled) if callable(settled) else None

    def run(groups: list[list[Head]]) -> list[tuple[list[bool], torch.Tensor]]:
        jobs = [{"prompts": prompts, "heads": list(g)} | ({"stop": stop} if stop else {}) for g in groups]
        ids, scores = generate_and_score(model, tokenizer, jobs, refusal_tokens=rt.tolist(), progress=False, **gen_kw)
        out = []
        for job_ids, job_scores in zip(ids, scores):
            refused = _run_judge(judge, prompts, [tokenizer.decode(t, skip_special_tokens=True) for t in job_ids])
            out.append(([not r for r in refused], torch.tensor([lo for _, lo in job_scores], dtype=torch.float64)))
        return out

    return run


def _choose(partial: dict[Head, Any], constrained: bool, bound: float | None) -> dict | None:
    """The step record: best accepted candidate (ties: lower layer, then lower head), or None if none is."""
    if constrained:
        scores = {h: v[0] for h, v in partial.items()}
        hkl = {h: v[1] for h, v in partial.items()}
        rejected = sorted(h for h, v in hkl.items() if bound is not None and not v <= bound)
    else:
        scores, hkl, rejected = dict(partial), None, []
    ok = [h for h in scores if h not in set(rejected)]
    if not ok:
        return None
    best = max(ok, key=lambda k: (scores[k], -k[0], -k[1]))
    entry = {"chosen": list(best), "score": scores[best], "scores": _pairs(scores)}
    if hkl is not None:
        entry["harmless_kl"] = _pairs(hkl)
        entry["rejected"] = [list(h) for h in rejected]
    return entry


def _signed_of(steps: list[SearchStep], chosen: list[Head], objective: str, prefilter: str | None) -> dict | None:
    """For the refusal objective the first step already scored every pool head alone: its signed effect."""
    if objective != "refusal" or not steps:
        return None
    first = steps[0].scores
    if not all(h in first for h in chosen):
        return None
    return {h: first[h] for h in chosen}


def _estimate(model, tokenizer, prompts, objective, rt, mode, eps, prompt_format, system_prompt, progress, mean,
              under=None) -> torch.Tensor:
    """The mean gradient estimate a prefilter ranks by: the refusal log-odds drop for the refusal objectives,
    Fisher KL otherwise."""
    from .ships import ships_estimate

    if objective in REFUSAL_OBJECTIVES:
        return ships_estimate(model, tokenizer, prompts, estimator="refusal-grad", refusal_tokens=rt.tolist(),
                              mode=mode, eps=eps, prompt_format=prompt_format, system_prompt=system_prompt,
                              progress=progress, mean=mean, under=under).mean("refusal")
    return ships_estimate(model, tokenizer, prompts, mode=mode, eps=eps, prompt_format=prompt_format,
                          system_prompt=system_prompt, progress=progress, mean=mean, under=under).mean("kl")


def _adaptive_pool(model, tokenizer, prompts, cands, chosen, k, objective, rt, mode, eps, prompt_format, system_prompt,
                   progress, mean) -> list[Head]:
    """The ``k`` best of ``cands`` by the estimate with the ``chosen`` heads ablated (ties: lower layer, head)."""
    est = _estimate(model, tokenizer, prompts, objective, rt, mode, eps, prompt_format, system_prompt, progress, mean,
                    under=chosen)
    return sorted(cands, key=lambda h: (-float(est[h]), h))[:k]


def _prefilter(model, tokenizer, prompts, cands, how, k, objective, rt, mode, eps, rank, center, space, prompt_format,
               system_prompt, batch_size, progress, shard=None, scores=None, label="search", mean=None,
               judge: Any = "keyword:paper", max_new_tokens: int = 32) -> list[Head]:
    """The ``k`` most promising candidates (see :func:`search_heads`)."""
    if len(cands) <= k:
        return list(cands)
    if how in ("estimate", "estimate-adaptive") and scores is not None:
        vals = {h: float(scores[h]) for h in cands}
    elif how in ("estimate", "estimate-adaptive"):
        est = _estimate(model, tokenizer, prompts, objective, rt, mode, eps, prompt_format, system_prompt, progress,
                        mean)
        vals = {h: float(est[h]) for h in cands}
    else:
        n = max(min(8, len(prompts)), rank + 1) if objective == "subspace" else min(8, len(prompts))
        res = search_heads(model, tokenizer, list(prompts[:n]), objective=objective, steps=1, mode=mode, eps=eps,
                           refusal_tokens=None if rt is None else rt.tolist(), rank=rank, center=center, space=space,
                           prompt_format=prompt_format, system_prompt=system_prompt, candidates=cands,
                           batch_size=batch_size, progress=progress, shard=shard, signed=False, mean=mean,
                           judge=judge, max_new_tokens=max_new_tokens, _label=label)
        vals = res.steps[0].scores
    return sorted(cands, key=lambda h: -vals[h])[:k]


# --------------------------------------------------------------------------- single heads


def single_head_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    heads: Sequence[Head],
    *,
    objectives: Sequence[str] = ("kl", "refusal", "subspace"),
    refusal_tokens: Sequence[int] | None = None,
    rank: int = 1,
    center: bool = False,
    space: str = "feature",
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    mean: torch.Tensor | None = None,
) -> dict[str, dict[Head, float]]:
    """Each head's exact score on every one of ``objectives`` when it alone is ablated (mean over
    ``prompts``): ``{objective: {head: score}}``, all read off the same forward passes.

    The same readout and forward passes as a search's first step (one forward per head per prompt
    batch, from the head's own layer; the final-norm state and the logits of one pass when the
    objectives need both), so the values equal the step-1 scores of :func:`search_heads` with the
    same ``batch_size``. ``"refusal"``: the signed effect on refusal; ``"kl"``: mean Ships (KL);
    ``"subspace"``: Sahara's single-head generalized Ships (``rank``, ``center``, ``space``).
    ``mean``: for ``mode="mean"`` (required there), the head means (:func:`~safetyheads.ablation.head_means`).
    """
    mode = Mode.parse(mode)
    eps = check_eps(mode, eps)
    mean = check_mean(model, mode, mean)
    objectives = list(dict.fromkeys(objectives))
    if not objectives:
        raise ValueError("no objectives given")
    if "asr" in objectives:
        raise ValueError("objective 'asr' generates and judges answers: score single heads with "
                         "search_heads(objective='asr', steps=1) or evaluate()")
    objs = {o: _objective(o, refusal_tokens=refusal_tokens, rank=rank, center=center, space=space) for o in objectives}
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    heads = validate_heads(heads, get_adapter(model).geometry)
    bs = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    texts = format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt)
    readouts = {o.readout for o in objs.values()}
    readout = readouts.pop() if len(readouts) == 1 else "both"
    reps = _Residuals(model, tokenizer, texts, bs, True, readout, mean=mean, shared_prefix=mode is not Mode.UA_LIMIT)
    vocab = model.get_output_embeddings().weight.shape[0]  # the logits' width; the hidden state comes first

    def part(stack: torch.Tensor, obj) -> torch.Tensor:
        if readout != "both":
            return stack
        return stack[:, :-vocab] if obj.readout == "hidden" else stack[:, -vocab:]

    for obj in objs.values():
        obj.prepare(part(reps.base, obj))
    out: dict[str, dict[Head, float]] = {o: {} for o in objs}
    for h in tqdm(list(dict.fromkeys(heads)), desc=f"head scores ({', '.join(objs)})", disable=not progress):
        stack = reps.ablated(heads_to_strength(model, [[h]]), mode, eps)
        for o, obj in objs.items():
            out[o][h] = obj.score(part(stack, obj))
    return out


def head_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    heads: Sequence[Head],
    *,
    objective: str = "refusal",
    **kwargs: Any,
) -> dict[Head, float]:
    """Each head's exact score on ``objective`` when it alone is ablated (mean over ``prompts``): one
    objective of :func:`single_head_scores` (same keyword arguments)."""
    return single_head_scores(model, tokenizer, prompts, heads, objectives=(objective,), **kwargs)[objective]


def group_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    groups: Sequence[Sequence[Head]],
    *,
    objective: str = "refusal",
    refusal_tokens: Sequence[int] | None = None,
    rank: int = 1,
    center: bool = False,
    space: str = "feature",
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    batch_size: int | None = None,
    mean: torch.Tensor | None = None,
    judge: Any = "keyword:paper",
    max_new_tokens: int = 32,
    progress: bool = False,
) -> list[float]:
    """The score :func:`search_heads` gives each whole group of ``groups`` (all its heads ablated together,
    against the unablated model): a search that reached a group scores it so, but a search only reaches
    the groups its greedy path passes through. Here any groups — every subset of a candidate set, say,
    where heads matter only together. Same objectives and keyword arguments as :func:`search_heads`; for
    ``"asr"`` the groups' answers are generated in shared batches of ``batch_size`` rows. ``progress``: a
    bar over the groups."""
    mode, eps, mean, obj, judge_, bs = _settings(model, prompts, objective, mode=mode, eps=eps, mean=mean,
                                                 refusal_tokens=refusal_tokens, rank=rank, center=center, space=space,
                                                 batch_size=batch_size, judge=judge, max_new_tokens=max_new_tokens)
    g = get_adapter(model).geometry
    sets = [validate_heads(list(grp), g) for grp in groups]
    for heads in sets:
        if len(set(heads)) != len(heads):
            raise ValueError(f"duplicate heads in group {heads}")
    if obj.readout == "generation":
        obj.prepare(_answers(model, tokenizer, list(prompts), judge_, obj.tokens, mode=mode, eps=eps,
                             prompt_format=prompt_format, system_prompt=system_prompt,
                             max_new_tokens=int(max_new_tokens), batch_size=bs, mean=mean))
        per = max(1, bs // len(prompts))
        out: list[float] = []
        with tqdm(total=len(sets), disable=not progress, desc=f"groups ({objective})") as bar:
            for i in range(0, len(sets), per):
                out += obj.score_many(sets[i:i + per])
                bar.update(len(sets[i:i + per]))
        return out
    texts = format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt)
    reps = _Residuals(model, tokenizer, texts, bs, True, obj.readout, mean=mean,
                      shared_prefix=mode is not Mode.UA_LIMIT)
    obj.prepare(reps.base)
    return [obj.score(reps.ablated(heads_to_strength(model, [heads]), mode, eps))
            for heads in tqdm(sets, disable=not progress, desc=f"groups ({objective})")]


def signed_effects(
    model,
    tokenizer,
    prompts: Sequence[str],
    heads: Sequence[Head],
    *,
    refusal_tokens: Sequence[int],
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    mean: torch.Tensor | None = None,
) -> dict[Head, float]:
    """Each head's exact signed effect on refusal: the mean drop of the refusal log-odds over
    ``prompts`` when the head alone is ablated.

    Positive: the head holds refusal up (ablating it lowers refusal); negative: ablating it
    *raises* refusal. One forward per head per prompt batch (residual reused below the head).
    ``mean``: for ``mode="mean"`` (required there), the head means (:func:`~safetyheads.ablation.head_means`).
    """
    return head_scores(model, tokenizer, prompts, heads, objective="refusal", refusal_tokens=refusal_tokens,
                       mode=mode, eps=eps, prompt_format=prompt_format, system_prompt=system_prompt,
                       batch_size=batch_size, progress=progress, mean=mean)
