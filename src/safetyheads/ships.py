"""Ships — Safety Head ImPortant Score: how far ablating one head moves the answer to a query.

``Ships(q, h) = KL( p(· | q) || p(· | q; h ablated) )`` over the full vocabulary at the last prompt
position (SPEC §2). Beside it, a *signed* score: the drop of the model's refusal log-odds
``log P(refusal-start tokens) − log P(other tokens)`` at that position when ``h`` is ablated
(positive: the head supports refusing).

* :func:`ships` — exact scores. ``method="exact"`` batches one ablated head per batch row, reuses
  the unablated residual stream below the ablated layer and computes logits only at the last
  position; ``method="naive"`` is the paper's loop (one head per full forward, batch 1, full
  logits), kept as the reference the fast sweep is checked against.
* :func:`ships_estimate` — estimates for every head from one forward and a few backward passes
  (never silently in place of exact scores; :func:`agreement` reports how well it ranks).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .ablation import (
    Head,
    Mode,
    ablate,
    ablate_strengths,
    check_eps,
    check_mean,
    head_means,
    heads_to_strength,
)
from .adapters import get_adapter, validate_heads
from .forward import (
    SharedPrefix,
    at_least_float32,
    input_device,
    last_token_logits,
    layer_inputs,
    position_ids_from_mask,
    reuse_residual,
    score_dtype,
)
from .prompts import encode_prompts, format_prompts
from .provenance import load_tensors_json, model_record, provenance, save_tensors_json
from .shards import as_shard, unit_cost

METRICS = ("kl", "refusal")


# --------------------------------------------------------------------------- result


@dataclass
class ShipsResult:
    """Per-prompt head scores.

    Attributes:
        kl: ``[n_prompts, n_layers, n_heads]`` KL(unablated ‖ ablated), float32 (float64 for a float64
            model); NaN for heads not scored.
        refusal: same shape, drop of the refusal log-odds under the ablation, or None.
        prompts: the queries (unformatted).
        method: ``"exact"``, ``"naive"`` or ``"estimate:<estimator>"``.
        provenance: model, data, prompt format, mode, ε, versions, …
    """

    kl: torch.Tensor
    refusal: torch.Tensor | None
    prompts: list[str]
    method: str
    provenance: dict = field(default_factory=dict)

    def metric(self, name: str = "kl") -> torch.Tensor:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; choose from {METRICS}")
        t = self.kl if name == "kl" else self.refusal
        if t is None:
            raise ValueError("this result has no refusal scores: pass refusal_tokens= to compute them")
        return t

    def mean(self, metric: str = "kl") -> torch.Tensor:
        """Dataset view: each head's mean score over prompts, ``[n_layers, n_heads]``."""
        return self.metric(metric).nanmean(0)

    def top_heads(self, k: int = 10, metric: str = "kl") -> list[list[tuple[int, int, float]]]:
        """Each prompt's ``k`` highest-scoring heads as ``(layer, head, score)``, best first."""
        t = self.metric(metric)
        flat = torch.nan_to_num(t.flatten(1), nan=-math.inf)
        n_heads = t.shape[2]
        out = []
        for row in flat:
            vals, idx = row.topk(min(k, row.numel()))
            out.append([(int(i) // n_heads, int(i) % n_heads, float(v)) for v, i in zip(vals, idx) if v > -math.inf])
        return out

    def dataset_top(self, k: int = 10, metric: str = "kl") -> list[Head]:
        """The ``k`` heads with the highest mean score."""
        m = torch.nan_to_num(self.mean(metric), nan=-math.inf)
        vals, idx = m.flatten().topk(min(k, m.numel()))
        return [(int(i) // m.shape[1], int(i) % m.shape[1]) for v, i in zip(vals, idx) if v > -math.inf]

    def topk_frequency(self, k: int = 10, metric: str = "kl") -> torch.Tensor:
        """How often each head is in a prompt's top-``k`` (share of prompts), ``[n_layers, n_heads]``."""
        t = self.metric(metric)
        freq = torch.zeros(t.shape[1:])
        for heads in self.top_heads(k, metric):
            for layer, head, _ in heads:
                freq[layer, head] += 1
        return freq / len(self.prompts)

    def save(self, stem: str | Path) -> None:
        """Write ``stem.safetensors`` (kl, refusal) and ``stem.json`` (prompts, method, provenance)."""
        save_tensors_json(stem, {"kl": self.kl, "refusal": self.refusal},
                          {"kind": "ships", "method": self.method, "prompts": self.prompts, "provenance": self.provenance})

    @classmethod
    def load(cls, stem: str | Path) -> ShipsResult:
        tensors, meta = load_tensors_json(stem)
        return cls(tensors["kl"], tensors.get("refusal"), meta["prompts"], meta["method"], meta["provenance"])

    def to_pandas(self):
        """One row per prompt × layer × head (prompt_index, prompt, layer, head, kl[, refusal])
        as a tidy pandas DataFrame (:func:`safetyheads.views.ships_frame`)."""
        from .views import ships_frame

        return ships_frame(self)

    def plot(self, metric: str = "kl", top: int = 5):
        """The report's layer × head heatmap of the mean ``metric``,
        the ``top`` heads numbered (a matplotlib Figure)."""
        from .views import ships_plot

        return ships_plot(self, metric=metric, top=top)

    def _repr_html_(self) -> str:
        """A compact table plus the figure, for Jupyter (:func:`safetyheads.views.repr_html`)."""
        from .views import repr_html

        return repr_html(self)


# --------------------------------------------------------------------------- helpers


def _encode(model, tokenizer, prompts: Sequence[str], prompt_format, system_prompt) -> list[torch.Tensor]:
    """Format and tokenize each prompt on its own (no padding); checks empties and context length."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    texts = format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt)
    max_len = getattr(model.config, "max_position_embeddings", None)
    out = []
    for i, text in enumerate(texts):
        ids = encode_prompts(tokenizer, [text])["input_ids"]
        if ids.shape[1] == 0:
            raise ValueError(f"prompt {i} is empty after tokenization")
        if max_len is not None and ids.shape[1] > max_len:
            raise ValueError(f"prompt {i} has {ids.shape[1]} tokens, longer than the model's context ({max_len})")
        out.append(ids)
    return out


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.double(), dim=-1)


def kl_from_logprobs(base_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ other) per row from log-probabilities, in float64; exact zeros where base underflows."""
    return F.kl_div(lp, base_lp.expand_as(lp), log_target=True, reduction="none").sum(-1)


def _refusal_split(logits: torch.Tensor, refusal_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (float64) of the refusal tokens, and every logit with the refusal tokens' set to −inf.
    index_select / masked_fill: no boolean gather over the whole vocabulary (slow on CPU)."""
    lg = logits.double()
    idx = refusal_tokens.to(lg.device)
    in_r = torch.zeros(lg.shape[-1], dtype=torch.bool, device=lg.device)
    in_r[idx] = True
    return lg.index_select(-1, idx), lg.masked_fill(in_r, -math.inf)


def refusal_logodds(logits: torch.Tensor, refusal_tokens: torch.Tensor) -> torch.Tensor:
    """``log Σ_{y∈R} p_y − log Σ_{y∉R} p_y`` per row (float64, stable via logsumexp)."""
    refusal, others = _refusal_split(logits, refusal_tokens)
    return torch.logsumexp(refusal, -1) - torch.logsumexp(others, -1)


def refusal_margin(logits: torch.Tensor, refusal_tokens: torch.Tensor) -> torch.Tensor:
    """``max_{y∈R} z_y − max_{y∉R} z_y`` per row (float64): > 0 exactly when greedy decoding's next token is
    a refusal token. Unlike the log-odds it ignores how the rest of the probability is spread: a model
    can lose most of ``P(R)`` to many small alternatives and still open with a refusal."""
    refusal, others = _refusal_split(logits, refusal_tokens)
    return refusal.amax(-1) - others.amax(-1)


def _heads_to_score(model, heads: Sequence[Head] | None) -> list[Head]:
    g = get_adapter(model).geometry
    if heads is None:
        return [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    heads = validate_heads(heads, g)
    if not heads:
        raise ValueError("heads= is empty: give at least one (layer, head) or None for all")
    if len(set(heads)) != len(heads):
        raise ValueError("heads= has duplicates")
    return sorted(heads)


def _default_batch_size(model) -> int:
    """64 rows on CUDA; on CPU whole layers of heads, about 64 rows (56 for 14 heads per layer), so that
    chunks start at a layer boundary and no row recomputes a layer below its own head's. Measured on
    the 0.5B model, one prompt's sweep, 2 cores: shared with other jobs, 56 and 112 rows ~71 s, 28 rows
    85 s, 14 ~170 s; idle (bench/results/ships_bench_cpu_0.5b_idle.md), 28 rows 23.8 s, 56 rows 29.7 s,
    112 rows 30.2 s — the best CPU batch depends on the load; pass ``batch_size`` to choose."""
    if next(model.parameters()).is_cuda:
        return 64
    n_heads = get_adapter(model).geometry.n_heads
    return max(1, 64 // n_heads) * n_heads


def _token_tensor(refusal_tokens) -> torch.Tensor | None:
    if refusal_tokens is None:
        return None
    t = torch.as_tensor(list(refusal_tokens), dtype=torch.long)
    if t.numel() == 0:
        raise ValueError("refusal_tokens is empty")
    return t


# --------------------------------------------------------------------------- exact


@torch.no_grad()
def ships(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    heads: Sequence[Head] | None = None,
    batch_size: int | None = None,
    refusal_tokens: Sequence[int] | None = None,
    method: str = "exact",
    mean: torch.Tensor | None = None,
    progress: bool = True,
    shard: Any = None,
) -> ShipsResult:
    """Exact Ships of every head (or of ``heads``) for every prompt.

    Args:
        prompts: harmful queries (plain text; formatted with ``prompt_format``).
        mode, eps: the ablation (see :func:`safetyheads.ablate`).
        prompt_format: ``"chat"`` (model's chat template), ``"template"`` (``## Query: …``) or ``"raw"``.
        heads: restrict the sweep to these ``(layer, head)``; others are NaN in the result.
        batch_size: ablated heads per forward pass (rows).
        refusal_tokens: token ids that start a refusal; if given, the signed refusal score too.
        method: ``"exact"`` (fast) or ``"naive"`` (reference: one head per full forward).
        mean: for ``mode="mean"``, the head means (default: computed over ``prompts``).
        shard: share the work with other processes (see :mod:`safetyheads.shards`). The work
            is cut into units — one prompt × one batch of heads, exactly the forward passes of a
            single-process run, so every score is computed the same way wherever it runs — and
            ``shard.select`` picks this process's units, ``shard.record`` receives each finished one,
            ``shard.gather`` returns every unit's scores. A ``(rank, world)`` pair is a static share
            (other heads NaN; combine parts with :func:`safetyheads.distributed.merge_ships`).
            None: all the work here.
    """
    mode = Mode.parse(mode)
    eps = check_eps(mode, eps)
    if method not in ("exact", "naive"):
        raise ValueError(f"method must be 'exact' or 'naive', got {method!r} (estimates: ships_estimate)")
    todo = _heads_to_score(model, heads)
    encoded = _encode(model, tokenizer, prompts, prompt_format, system_prompt)
    rt = _token_tensor(refusal_tokens)
    g = get_adapter(model).geometry
    if mode is Mode.MEAN and mean is None:
        mean = _means_over(model, encoded)
    mean = check_mean(model, mode, mean)
    bs = batch_size or _default_batch_size(model)
    kl = torch.full((len(prompts), g.n_layers, g.n_heads), math.nan, dtype=score_dtype(model))
    refusal = torch.full_like(kl, math.nan) if rt is not None else None
    chunks = _chunks(todo, 1 if method == "naive" else bs)
    mine: set | None = None
    if shard is not None:
        shard = as_shard(shard)
        units = [((i, c), unit_cost(ids.shape[1], chunk, g.n_layers, method))
                 for i, ids in enumerate(encoded) for c, chunk in enumerate(chunks)]
        mine = set(shard.select(_work_key(model, encoded, todo, bs, method, mode, eps, rt, mean), units))
    n_steps = len(encoded) * len(chunks) if mine is None else len(mine)
    bar = tqdm(total=n_steps, desc=f"Ships {method} ({len(todo)} heads × {len(prompts)} prompts)", disable=not progress)

    def fill(i: int, chunk: list[Head], chunk_kl, chunk_ref) -> None:
        for (layer, head), k, r in zip(chunk, chunk_kl, chunk_ref if chunk_ref is not None else [None] * len(chunk)):
            kl[i, layer, head] = float(k)
            if refusal is not None:
                refusal[i, layer, head] = float(r)

    def done(i: int, c: int, chunk_kl, chunk_ref) -> None:
        fill(i, chunks[c], chunk_kl, chunk_ref)
        if shard is not None:
            shard.record((i, c), (chunk_kl.tolist(), None if chunk_ref is None else chunk_ref.tolist()))
        bar.update(1)

    prefix = _shared_prefix(model, encoded) if method == "exact" and mode is not Mode.UA_LIMIT else None
    if prefix is not None:
        for i, c, chunk_kl, chunk_ref in _sweep_shared(model, encoded, prefix, chunks, mode, eps, mean, rt, mine):
            done(i, c, chunk_kl, chunk_ref)
    for i, ids in enumerate(encoded if prefix is None else ()):
        only = None if mine is None else {c for p, c in mine if p == i}
        if only is not None and not only:
            continue
        sweep = _sweep_naive if method == "naive" else _sweep_exact
        for c, chunk_kl, chunk_ref in sweep(model, ids, chunks, mode, eps, mean, rt, only):
            done(i, c, chunk_kl, chunk_ref)
    bar.close()
    if shard is not None:
        for (i, c), (chunk_kl, chunk_ref) in shard.gather().items():
            fill(i, chunks[c], chunk_kl, chunk_ref)
    prov = provenance(model, prompts, prompt_format=prompt_format, mode=mode.value, eps=eps,
                      system_prompt=system_prompt, heads=None if heads is None else [list(h) for h in todo],
                      refusal_tokens=None if rt is None else rt.tolist())
    if shard is not None:
        prov["shard"] = shard.describe()
    return ShipsResult(kl, refusal, list(prompts), method, prov)


def _chunks(todo: list[Head], size: int) -> list[list[Head]]:
    """The batches of heads of one prompt's sweep (one forward pass each), in order."""
    return [todo[s:s + size] for s in range(0, len(todo), size)]


def _work_key(model, encoded, todo, bs, method, mode, eps, rt, mean) -> dict:
    """Everything that fixes what a work unit computes (for sharded runs and their checkpoints)."""
    ids = hashlib.sha256()
    for t in encoded:
        ids.update(t.numpy().astype("int64").tobytes())
        ids.update(b"|")
    record = {k: v for k, v in model_record(model).items() if k != "device"}
    return {"kind": "ships", "model": record, "ids": ids.hexdigest(), "heads": [list(h) for h in todo],
            "batch": 1 if method == "naive" else bs, "method": method, "mode": mode.value, "eps": eps,
            "refusal_tokens": None if rt is None else rt.tolist(),
            "mean": None if mean is None else hashlib.sha256(mean.double().cpu().numpy().tobytes()).hexdigest()}


def _means_over(model, encoded: list[torch.Tensor]) -> torch.Tensor:
    total = None
    n = 0
    for ids in encoded:
        m = head_means(model, ids) * ids.shape[1]
        total = m if total is None else total + m
        n += ids.shape[1]
    return total / n


MEANS_OVER = ("each head's output (its o_proj input slice) averaged over every token of every prompt (template "
              "tokens included), each prompt formatted and run alone (no padding), unablated, token-weighted, float64")
"""What the head means of :func:`dataset_means` (the default ``mean`` of :func:`ships`) average over."""


def dataset_means(model, tokenizer, prompts: Sequence[str], *, prompt_format: str = "chat",
                  system_prompt: str | None = None) -> torch.Tensor:
    """The head means for ``mode="mean"`` over a prompt set: exactly what :func:`ships` and
    :func:`ships_estimate` use when given no ``mean`` (see :data:`MEANS_OVER`).

    Returns ``[layers, heads, head_dim]`` float64, for ``mean=`` of every function taking ``mode``.
    """
    return _means_over(model, _encode(model, tokenizer, prompts, prompt_format, system_prompt))


def _scores(base_logits, logits, rt):
    base_lp = _log_probs(base_logits)
    kl = kl_from_logprobs(base_lp, _log_probs(logits))
    ref = None if rt is None else refusal_logodds(base_logits, rt) - refusal_logodds(logits, rt)
    return kl, ref


def _sweep_exact(model, ids, chunks, mode, eps, mean, rt, only=None) -> Iterator:
    """One prompt: chunks of heads, one head per row, residual reused below the chunk's lowest layer.

    Yields ``(chunk index, kl, refusal)``; ``only``: the chunk indices to compute (None: all)."""
    mask = torch.ones_like(ids)
    inputs, base_logits = layer_inputs(model, ids, mask)
    for c, chunk in enumerate(chunks):
        if only is not None and c not in only:
            continue
        low = min(layer for layer, _ in chunk)
        strength = heads_to_strength(model, [[h] for h in chunk])
        rows = len(chunk)
        with reuse_residual(model, low, inputs[low]), ablate_strengths(model, strength, mode=mode, eps=eps, mean=mean):
            logits = last_token_logits(model, ids.expand(rows, -1), mask.expand(rows, -1))
        kl, ref = _scores(base_logits, logits, rt)
        yield c, kl, ref


def _shared_prefix(model, encoded: list[torch.Tensor]) -> SharedPrefix | None:
    """The token prefix all prompts share (≥ 2 prompts; None when there is none or the model's cache
    is not plain)."""
    if len(encoded) < 2:
        return None
    rows = [e[0].tolist() for e in encoded]
    n = SharedPrefix.length(rows)
    return SharedPrefix.build(model, rows[0][:n]) if n else None


def _sweep_shared(model, encoded, prefix: SharedPrefix, chunks, mode, eps, mean, rt, mine=None) -> Iterator:
    """The exact sweep of several prompts that start with the same tokens: per chunk of heads, the
    prefix runs once (one row per head, from the chunk's lowest layer) and its KV cache stands in for
    those tokens in every prompt, whose own tokens run from the same layer on the residual of an
    unablated pass. Chunk-major; yields ``(prompt, chunk, kl, refusal)``; ``mine``: the units to
    compute (None: all)."""
    n = len(prefix)
    lows = {min(layer for layer, _ in chunk) for chunk in chunks}
    rest = []  # per prompt: its own tokens, their residual at the chunks' lowest layers, base logits
    for ids in encoded:
        tail = ids[:, n:]
        inputs, base_logits = layer_inputs(model, tail, torch.ones_like(ids), prefix.batch(1))
        rest.append((tail, {low: inputs[low] for low in lows}, base_logits))
    for c, chunk in enumerate(chunks):
        todo = [i for i in range(len(encoded)) if mine is None or (i, c) in mine]
        if not todo:
            continue
        low = min(layer for layer, _ in chunk)
        strength = heads_to_strength(model, [[h] for h in chunk])
        rows = len(chunk)
        with ablate_strengths(model, strength, mode=mode, eps=eps, mean=mean):
            pre = prefix.under(model, low, rows)
        for i in todo:
            tail, inputs, base_logits = rest[i]
            mask = torch.ones(rows, n + tail.shape[1], dtype=torch.long)
            with reuse_residual(model, low, inputs[low]), \
                    ablate_strengths(model, strength, mode=mode, eps=eps, mean=mean):
                logits = last_token_logits(model, tail.expand(rows, -1), mask, pre.batch(rows))
            kl, ref = _scores(base_logits, logits, rt)
            yield i, c, kl, ref


def _sweep_naive(model, ids, chunks, mode, eps, mean, rt, only=None) -> Iterator:
    """The paper's loop: one full forward (all positions' logits) per head, batch 1 (chunks of one head)."""
    ids = ids.to(input_device(model))
    base_logits = at_least_float32(model(input_ids=ids).logits[:, -1])
    for c, chunk in enumerate(chunks):
        if only is not None and c not in only:
            continue
        with ablate(model, chunk, mode=mode, eps=eps, mean=mean):
            logits = at_least_float32(model(input_ids=ids).logits[:, -1])
        kl, ref = _scores(base_logits, logits, rt)
        yield c, kl, ref


# --------------------------------------------------------------------------- estimates

ESTIMATORS = ("fisher", "refusal-grad")

# the output-site form of each mode, which is differentiable in the strength
_LINEARISED = {Mode.UA: Mode.UA_LIMIT, Mode.UA_LIMIT: Mode.UA_LIMIT, Mode.SC: Mode.SC, Mode.ZERO: Mode.ZERO,
               Mode.MEAN: Mode.MEAN}


@contextlib.contextmanager
def _frozen(model) -> Iterator[None]:
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


@contextlib.contextmanager
def _unembedding(model) -> Iterator[torch.Tensor]:
    """The unembedding weight, also when accelerate offloads it (to CPU or disk: ``meta`` outside its forward)."""
    head = model.get_output_embeddings()
    if head.weight.device.type != "meta":
        yield head.weight
        return
    from accelerate.utils import align_module_device

    with align_module_device(head, torch.device("cpu")):
        yield head.weight


def _fisher_directions(model, base_logits: torch.Tensor, k: int, mass: float = 1 - 1e-4, max_tokens: int = 4096):
    """Top-``k`` eigenpairs of the logit Fisher pulled back to the final hidden state.

    KL(p ‖ p + Δ) ≈ ½ Δhᵀ A Δh with A = W_Yᵀ (diag p − p pᵀ) W_Y over the tokens Y holding
    ``mass`` of the probability (at most ``max_tokens``), W_Y their unembedding rows (times the
    softcap derivative where the model caps logits). Returns (λ [k], U [k, d]) per row.
    """
    cap = getattr(model.config, "final_logit_softcapping", None)
    lams, vecs = [], []
    with _unembedding(model) as W:  # also when accelerate offloads it
        for row in base_logits:
            p = torch.softmax(row.double(), -1)
            ps, idx = p.sort(descending=True)
            n = int(min(max_tokens, (ps.cumsum(0) < mass).sum().item() + 1))
            idx, py = idx[:n], ps[:n]
            wy = W[idx.to(W.device)].double().cpu()
            if cap:
                wy = wy * (1 - torch.tanh(row[idx].double().cpu() / cap) ** 2)[:, None]
            mu = py @ wy
            A = (wy * py[:, None]).T @ wy - torch.outer(mu, mu)
            # only the top-k eigenpairs (LAPACK syevr on a subset): exact, and ~10× faster than a full
            # torch.linalg.eigh of the d × d matrix, which dominated the estimator's time on CPU
            kk = min(k, A.shape[0])
            lam, U = scipy.linalg.eigh(A.numpy(), subset_by_index=[A.shape[0] - kk, A.shape[0] - 1])
            lams.append(torch.from_numpy(lam.copy()).flip(0).clamp(min=0))
            vecs.append(torch.from_numpy(U.copy()).flip(1).T)
    return torch.stack(lams), torch.stack(vecs)


def ships_estimate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    estimator: str = "fisher",
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    directions: int = 2,
    refusal_tokens: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    mean: torch.Tensor | None = None,
    under: Sequence[Head] | None = None,
) -> ShipsResult:
    """Estimate Ships for every head from one forward and a few backward passes per batch.

    ``mean``: for ``mode="mean"``, the head means (default: :func:`dataset_means` of ``prompts``).
    ``under``: heads ablated throughout (strength 1, in the linearised form below): the estimate is
    then of each other head's ablation *on top of* those, measured from the model with them ablated
    (the heads of ``under`` get no score: NaN). A greedy search re-ranks its candidates this way
    after each chosen head (``search_heads(prefilter="estimate-adaptive")``).

    Each head's ablation is linearised as a strength ``a`` in its output-site form (for UA: the
    head's output moving toward the running mean of its values, UA's ε→0 limit), and
    ``∂(metric)/∂a`` at ``a = 0`` comes from backpropagation for all heads at once.

    * ``"fisher"`` (KL): KL has zero gradient at no ablation, so the estimate is second order:
      ``½ Σ_i λ_i (∂(u_i·h)/∂a)²`` over the top ``directions`` eigenvectors ``u_i`` of the logit
      Fisher pulled back to the final hidden state ``h``. One backward per direction.
    * ``"refusal-grad"``: attribution patching of the refusal log-odds (first order; needs
      ``refusal_tokens``). Fills ``refusal`` with the estimated drop; one backward.
      ``"fisher"`` given ``refusal_tokens`` fills it too, from the same forward pass (one backward
      more): the same numbers as a separate ``"refusal-grad"`` run, one forward fewer.

    Both are estimates: check them with :func:`agreement` against :func:`ships` on a sample.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {ESTIMATORS}")
    mode = Mode.parse(mode)
    eps = check_eps(mode, eps)
    lin = _LINEARISED[mode]
    rt = _token_tensor(refusal_tokens)
    if estimator == "refusal-grad" and rt is None:
        raise ValueError("estimator 'refusal-grad' needs refusal_tokens")
    if directions < 1:
        raise ValueError("directions must be >= 1")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    texts = format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt)
    g = get_adapter(model).geometry
    kl = torch.full((len(prompts), g.n_layers, g.n_heads), math.nan, dtype=score_dtype(model))
    refusal = torch.full_like(kl, math.nan) if rt is not None else None
    encoded = _encode(model, tokenizer, prompts, prompt_format, system_prompt)  # empty / over-long prompts
    if mode is Mode.MEAN and mean is None:
        mean = _means_over(model, encoded)
    mean = check_mean(model, mode, mean)
    ad = get_adapter(model)
    dev = input_device(model)
    under = validate_heads(under, g) if under else []
    base = heads_to_strength(model, [under]).to(kl.dtype) if under else None  # [1, L, H], broadcast over rows
    bar = tqdm(total=len(prompts), desc=f"Ships estimate ({estimator})", disable=not progress)
    with _frozen(model):
        for b0 in range(0, len(texts), batch_size):
            enc = encode_prompts(tokenizer, texts[b0:b0 + batch_size])
            ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
            n = ids.shape[0]
            s = torch.zeros(n, g.n_layers, g.n_heads, dtype=kl.dtype, requires_grad=True)
            hidden: list[torch.Tensor] = []
            handle = ad.final_norm.register_forward_hook(lambda m, a, out, hidden=hidden: hidden.append(out[:, -1]))
            try:
                total = s if base is None else s + base
                with torch.enable_grad(), ablate_strengths(model, total, mode=lin, eps=eps, mean=mean,
                                                           attention_mask=mask):
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                   use_cache=False, logits_to_keep=1).logits[:, -1]
                    logits, h = at_least_float32(logits), at_least_float32(hidden[-1])
                    if estimator == "fisher":
                        lam, U = _fisher_directions(model, logits.detach(), directions)
                        est = torch.zeros(n, g.n_layers, g.n_heads, dtype=torch.float64)
                        for i in range(lam.shape[1]):
                            obj = (h * U[:, i].to(h)).sum()
                            more = i < lam.shape[1] - 1 or rt is not None
                            (grad,) = torch.autograd.grad(obj, s, retain_graph=more)
                            est += 0.5 * lam[:, i, None, None] * grad.double() ** 2
                        kl[b0:b0 + n] = est.to(kl.dtype)
                    if rt is not None:  # the refusal gradient from the same forward
                        obj = refusal_logodds(logits, rt).sum()
                        (grad,) = torch.autograd.grad(obj, s)
                        refusal[b0:b0 + n] = -grad  # drop in log-odds ≈ −∂/∂a at a = 0
            finally:
                handle.remove()
            bar.update(n)
    bar.close()
    for layer, head in under:  # no score for a head that is already ablated
        kl[:, layer, head] = math.nan
        if refusal is not None:
            refusal[:, layer, head] = math.nan
    prov = provenance(model, prompts, prompt_format=prompt_format, mode=mode.value, eps=eps, system_prompt=system_prompt,
                      estimator=estimator, directions=directions,
                      refusal_tokens=None if rt is None else rt.tolist())
    if under:
        prov["under"] = [list(h) for h in under]
    return ShipsResult(kl, refusal, list(prompts), f"estimate:{estimator}", prov)


# --------------------------------------------------------------------------- validation


def agreement(estimate: torch.Tensor, exact: torch.Tensor, k: int = 10) -> dict[str, float]:
    """How well ``estimate`` ranks heads like ``exact`` (both ``[n, L, H]`` or ``[L, H]``).

    Returns Spearman ρ of the dataset-mean scores, the mean per-prompt Spearman ρ, and top-``k``
    recall (share of the exact top-``k`` heads among the estimate's top-``k``) of the means.
    """
    from scipy.stats import spearmanr

    est, ex = estimate.double(), exact.double()
    if est.dim() == 2:
        est, ex = est[None], ex[None]
    keep = ~torch.isnan(ex[0].flatten())
    m_est, m_ex = est.nanmean(0).flatten()[keep], ex.nanmean(0).flatten()[keep]
    rho = float(spearmanr(m_est.numpy(), m_ex.numpy()).statistic)
    per = [float(spearmanr(a.flatten()[keep].numpy(), b.flatten()[keep].numpy()).statistic) for a, b in zip(est, ex)]
    k = min(k, int(keep.sum()))
    top_est = set(m_est.topk(k).indices.tolist())
    top_ex = set(m_ex.topk(k).indices.tolist())
    return {"spearman": rho, "spearman_per_prompt": sum(per) / len(per), f"top{k}_recall": len(top_est & top_ex) / k}
