"""Generation under ablation: every condition's prompts in shared batches (SPEC §4).

* :func:`generate` / :func:`generate_ids` — one head set (or one head list per prompt) for a list
  of prompts.
* :func:`generate_many` — several *jobs* (a prompt list and its heads: the conditions of an
  evaluation) at once: every (job, prompt) pair is one row, the rows of all jobs are sorted by
  prompt length and decoded in shared batches, each row ablating its own heads (one strength row
  per batch row, :func:`safetyheads.ablate` with ``rows=``). Rows of the same prompt under
  different conditions sit next to each other and need no padding; a row that ends leaves the
  batch, and waiting rows take its place (continuous batching); rows that repeat another row's
  prompt and heads are decoded once. The result is token-identical to running each job alone (exactly so in float64; in lower
  precision up to the rounding that any change of batch composition brings).

Decoding is deterministic and uses its own loop (a prefill per group of entering rows, then one
token per step with the model's KV cache; rows that reach EOS or ``max_new_tokens`` are dropped from
the batch and from the cache, so the cost follows the tokens actually generated, and once a quarter
of the batch is free the next rows are prefilled and join it, their cache left-padded to the
batch's length). The model's ``generation_config`` is
not consulted: greedy decoding is pure argmax (no repetition penalty or other defaults a checkpoint
may ship). Sampling is top-k (default 5) at temperature T (default 1): prompt ``i`` of a job's list
draws from its own ``torch.Generator`` seeded with ``seed * 1_000_003 + i``, so its samples depend
neither on the batch size nor on the other rows of its batch (up to float rounding of padded
batches), and the global torch RNG is not touched. Responses are decoded from the new tokens only,
cut at the first end-of-sequence token (the tokenizer's and the model's EOS ids, plus the chat
template's end-of-turn token when the prompt format is ``chat``), with special tokens skipped.

A job may carry a :class:`StopRule` (``"stop"``): its rows end as soon as their decoded text settles
the judge's verdict (a keyword judge's refusal phrase has appeared: more text cannot undo it), so a
refusal costs the few tokens up to its phrase instead of ``max_new_tokens``.

``generate_many(..., checkpoint=path)`` appends each finished batch's rows to a JSON-lines file
(first line: a digest of the model and settings) and, when started again with the same settings,
reuses every row found there, so a long evaluation interrupted mid-way loses at most one batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .ablation import Head, Mode, ablate_strengths, check_eps, check_mean, heads_to_strength, mean_digest
from .adapters import get_adapter, validate_heads
from .forward import (
    SharedPrefix,
    cache_argument,
    cache_rows,
    lower_layers,
    output_cache,
    plain_cache,
    position_ids_from_mask,
    reuse_residual,
)
from .prompts import format_prompts, pad_left, prompt_token_ids

__all__ = ["EvaluationError", "GENERATION_VERSION", "StopRule", "generate", "generate_and_score", "generate_ids",
           "generate_many"]

log = logging.getLogger("safetyheads")

GENERATION_VERSION = 1
"""Bumped when generation changes in a way that invalidates stored responses."""

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class EvaluationError(ValueError):
    """Bad evaluation input (no prompts, unknown judge, bad condition, a model that never refuses, …)."""


@dataclass(frozen=True)
class StopRule:
    """Ends a generated row as soon as ``settled(text so far)`` is True (e.g. a keyword judge's
    :meth:`~safetyheads.judges.KeywordJudge.refusal_settled`). ``name`` identifies the rule in
    checkpoints and stored settings: rows cut by one rule are never reused under another."""

    name: str
    settled: Callable[[str], bool]


def _check_prompts(prompts: Sequence[str], what: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"{what} must be a sequence of strings, not a single str")
    out = list(prompts)
    if not out:
        raise EvaluationError(f"no {what} given")
    return out


def _eos_ids(model, tokenizer, prompt_format: str) -> list[int]:
    ids: list[int] = []

    def add(x: Any) -> None:
        if x is None:
            return
        for t in x if isinstance(x, (list, tuple)) else [x]:
            if t is not None and int(t) not in ids:
                ids.append(int(t))

    add(getattr(tokenizer, "eos_token_id", None))
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    add(getattr(model.config, "eos_token_id", None))
    if prompt_format == "chat":
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        special = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for tok in _END_OF_TURN:
            if tok in vocab and (tok in special or tok in (getattr(tokenizer, "chat_template", "") or "")):
                add(vocab[tok])
    if not ids:
        raise EvaluationError("cannot tell where a response ends: the tokenizer and the model have no EOS token id")
    return ids


def _pad_id(tokenizer, eos: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos[0]


def _check_generation(max_new_tokens: int, sampling: bool, top_k: int, temperature: float, seed: int,
                      batch_size: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EvaluationError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive int, got {batch_size!r}")
    if sampling:
        if not isinstance(top_k, int) or top_k < 1:
            raise EvaluationError(f"top_k must be a positive int, got {top_k!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise EvaluationError(f"temperature must be > 0, got {temperature!r}")
    if not isinstance(seed, int) or seed < 0:
        raise EvaluationError(f"seed must be an int >= 0, got {seed!r}")


def _device(model) -> torch.device:
    from .forward import input_device

    return input_device(model)


def _normalise_rows(model, rows: Sequence[Sequence[Head]] | None, n: int) -> list[list[Head]] | None:
    if rows is None:
        return None
    rows = list(rows)
    if len(rows) != n:
        raise EvaluationError(f"rows= has {len(rows)} head lists for {n} prompts: give one per prompt")
    g = get_adapter(model).geometry
    return [validate_heads(r, g) for r in rows]


def _forward_style(model) -> tuple[str, dict[str, Any]]:
    """The name of the forward's KV-cache argument (``cache``; ``past_key_values`` before
    transformers 5.2x) and ``logits_to_keep=1`` where the model accepts it."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return cache_argument(model.forward), ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _pick(logits: torch.Tensor, generators: list[torch.Generator] | None, top_k: int, temperature: float) -> torch.Tensor:
    """Next token per row: argmax, or a top-k sample at ``temperature`` from each row's generator."""
    if generators is None:
        return logits.argmax(-1)
    vals, idx = (logits / temperature).topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(vals, dim=-1).cpu()
    picks = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
    return idx.gather(1, picks.to(idx.device))[:, 0]


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``x`` with zeros prepended along ``dim`` up to ``length``."""
    extra = length - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x.new_zeros(shape), x], dim=dim)


@dataclass
class _Batch:
    """Rows in flight: each row's next input token is not in the cache yet (``mask`` covers the
    cache and that token; ``pos`` is that token's position)."""

    rows: list[int]
    cache: Any
    mask: torch.Tensor
    pos: torch.Tensor
    tokens: torch.Tensor

    def select(self, keep: list[int]) -> None:
        """Keep batch rows ``keep``; drop the cache columns that no remaining row attends to."""
        sel = torch.tensor(keep, device=self.tokens.device)
        self.cache.reorder_cache(sel)
        self.mask, self.pos, self.tokens = self.mask[sel], self.pos[sel], self.tokens[sel]
        self.rows = [self.rows[b] for b in keep]
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if lead and plain_cache(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
            self.mask = self.mask[:, lead:]

    def extend(self, other: _Batch) -> None:
        """Append ``other``'s rows (both with plain dynamic caches), left-padding the shorter cache."""
        t = max(self.mask.shape[1], other.mask.shape[1])
        for a, b in zip(self.cache.layers, other.cache.layers, strict=True):
            a.keys = torch.cat([_left_pad(a.keys, t - 1, -2), _left_pad(b.keys, t - 1, -2)])
            a.values = torch.cat([_left_pad(a.values, t - 1, -2), _left_pad(b.values, t - 1, -2)])
        self.mask = torch.cat([_left_pad(self.mask, t, 1), _left_pad(other.mask, t, 1)])
        self.pos = torch.cat([self.pos, other.pos])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.rows = self.rows + other.rows


@torch.no_grad()
def _decode_stream(model, encode: Callable[[list[int], int], dict[str, torch.Tensor]], strength: torch.Tensor, mode: Mode,
                   eps: float, max_new_tokens: int, eos: set[int], generators: list[torch.Generator] | None,
                   top_k: int, temperature: float, batch_size: int, score_idx: torch.Tensor | None = None,
                   mean: torch.Tensor | None = None,
                   stops: Sequence[Callable[[list[int]], bool] | None] | None = None, continuous: bool = True,
                   prefix: Sequence[int] = (), reuse_lower: bool = True,
                   ) -> Iterator[list[tuple[int, list[int], tuple[float, float] | None]]]:
    """Greedy / sampled decoding of rows ``0 … n-1`` (entering in that order) with a KV cache, at
    most ``batch_size`` rows at a time; yields ``(row, new token ids, first-position scores)`` for the
    rows that finished at each step.

    Row ``i`` ablates ``strength[i]`` and, when sampling, draws from ``generators[i]``;
    ``encode(rows)`` tokenizes those rows' prompts (left-padded). A row leaves the batch (and the
    cache) at EOS, at ``max_new_tokens`` or when ``stops[i](ids so far)`` is True, so the cost follows
    the tokens actually generated. Continuous batching: once a quarter of the batch is free and rows
    are waiting, the next rows are prefilled and join the running batch (their cache left-padded to
    the batch's length; leading columns no row attends to are dropped), so the batch stays full while
    refusals leave early. With a KV cache other than plain dynamic layers (sliding windows, …) a new
    batch starts only when the last one is done, as with ``continuous=False``. ``score_idx`` (refusal
    token ids): each row's prefill logits give its ``(P(refusal), refusal log-odds)`` at the first
    answer position, under its ablation.

    ``prefix``: token ids every prompt starts with (a chat template's system block). Its KV cache is
    computed once per distinct ablation and copied into each row's cache, so a prefill reads only the
    rest of the prompt (``encode(rows, len(prefix))``), laid out ``[prefix | padding | rest]`` with
    positions that skip the padding — the same attention and positions as the whole prompt. Caches
    other than plain dynamic layers prefill whole prompts (``encode(rows, 0)``).

    ``reuse_lower`` (with a shared prefix): an ablation cannot change the layers below a row's lowest
    ablated head, so a prefill group runs those layers once per distinct prompt, unablated, and each
    row runs only from its lowest ablated layer up (:func:`_prefill_from_lowest`).
    """
    n = strength.shape[0]
    cache_arg, extra = _forward_style(model)
    waiting = 0  # the next row to enter
    out: dict[int, list[int]] = {}
    first: dict[int, tuple[float, float] | None] = {}
    running: _Batch | None = None
    refill_at = max(1, batch_size // 4)

    def advance(rows: list[int], logits: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        """Pick each row's next token; the batch positions that go on, and the rows that finished."""
        gens = None if generators is None else [generators[r] for r in rows]
        tokens = _pick(logits.float(), gens, top_k, temperature)
        keep, done = [], []
        for b, (r, t) in enumerate(zip(rows, tokens.tolist())):
            if t not in eos:
                out[r].append(t)
                if len(out[r]) < max_new_tokens and not (stops is not None and stops[r] is not None
                                                         and stops[r](out[r])):
                    keep.append(b)
                    continue
            done.append(r)
        return tokens, keep, done

    # each row's lowest ablated layer (n_layers: none), for prefills that share the layers below it
    lows = _lowest_layers(strength) if reuse_lower else None
    with ablate_strengths(model, strength, mode=mode, eps=eps, mean=mean) as ab:
        shared = _prefix_cache(model, ab, strength, prefix, batch_size) if prefix and n else None
        while waiting < n or running is not None:
            free = batch_size - (len(running.rows) if running else 0)
            if waiting < n and (running is None or (continuous and free >= refill_at and plain_cache(running.cache))):
                rows = list(range(waiting, min(n, waiting + free)))
                waiting = rows[-1] + 1
                ab.strength = strength[rows]
                if shared is None:
                    enc = encode(rows, 0)
                    mask = enc["attention_mask"]
                    pos, past = position_ids_from_mask(mask), None
                else:
                    enc = encode(rows, len(prefix))
                    past = None  # the prefix rows, assembled below for a whole prefill
                    mask = torch.cat([enc["attention_mask"].new_ones(len(rows), len(prefix)),
                                      enc["attention_mask"]], 1)
                    pos = position_ids_from_mask(mask)[:, len(prefix):]
                split = None
                if shared is not None and lows is not None:
                    split = _prefill_from_lowest(model, ab, strength, rows, lows, enc["input_ids"], mask, pos, shared,
                                                 cache_arg, extra)
                if split is None:
                    if shared is not None:
                        past = shared.rows(rows)
                    o = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, use_cache=True,
                              **{cache_arg: past}, **extra)
                    logits, prefill_cache = o.logits[:, -1], output_cache(o)
                else:
                    order, logits, prefill_cache = split
                    rows, mask, pos = [rows[b] for b in order], mask[order], pos[order]
                scored = [None] * len(rows) if score_idx is None else _first_scores(logits, score_idx)
                for r, sc in zip(rows, scored):
                    out[r], first[r] = [], sc
                tokens, keep, done = advance(rows, logits)
                new = _Batch(rows, prefill_cache, torch.cat([mask, mask.new_ones(len(rows), 1)], 1),
                             pos[:, -1:] + 1, tokens[:, None])
            else:
                assert running is not None
                ab.strength = strength[running.rows]
                o = model(input_ids=running.tokens, attention_mask=running.mask, position_ids=running.pos,
                          use_cache=True, **{cache_arg: running.cache}, **extra)
                running.cache = output_cache(o)
                tokens, keep, done = advance(running.rows, o.logits[:, -1])
                running.mask = torch.cat([running.mask, running.mask.new_ones(len(running.rows), 1)], 1)
                running.pos, running.tokens = running.pos + 1, tokens[:, None]
                new, running = running, None
            if done:
                yield [(r, out.pop(r), first.pop(r)) for r in done]
            if keep:
                if len(keep) < len(new.rows):
                    new.select(keep)
                if running is None:
                    running = new
                else:
                    running.extend(new)


def _lowest_layers(strength: torch.Tensor) -> torch.Tensor:
    """Each row's lowest layer with a nonzero strength; the number of layers for a row that ablates nothing."""
    touched = (strength != 0).any(-1)  # [rows, layers]
    first = touched.to(torch.uint8).argmax(1)
    return torch.where(touched.any(1), first, torch.full_like(first, strength.shape[1]))


def _prefill_from_lowest(model, ab, strength: torch.Tensor, rows: list[int], lows: torch.Tensor, ids: torch.Tensor,
                         mask: torch.Tensor, pos: torch.Tensor, shared: _SharedPrefix, cache_arg: str,
                         extra: dict[str, Any]) -> tuple[list[int], torch.Tensor, Any] | None:
    """The prefill of ``rows`` (prompt rest ``ids`` after the shared prefix) in groups that skip the
    layers their ablation cannot change.

    An ablation touching no layer below ``l`` leaves layers ``0 … l-1`` as they are, so one unablated
    pass over the group's distinct prompts runs those layers up to the highest such ``l`` (no later
    layer, no unembedding); then each group of rows with the same lowest ablated layer ``l`` runs from
    ``l`` on that pass's residual, and its KV cache below ``l`` is that pass's. Unablated rows go on
    from the highest ``l``. The same logits and caches as one whole prefill (exactly so in float64).

    Returns ``(order, logits, cache)``: ``order`` the batch positions in the order of the rows of
    ``logits`` (last position) and ``cache``; None when no row has anything to skip."""
    n_layers = strength.shape[1]
    low = lows[rows].tolist()
    top = max((x for x in low if x < n_layers), default=0)
    if top == 0:
        return None
    low = [top if x == n_layers else x for x in low]
    uniq, inverse = torch.unique(ids, dim=0, return_inverse=True)  # same padded tokens: same prompt, same mask
    first = torch.full((len(uniq),), len(rows), dtype=torch.long).scatter_reduce(
        0, inverse.cpu(), torch.arange(len(rows)), reduce="amin")
    ab.strength = strength.new_zeros(len(uniq), *strength.shape[1:])
    below = shared.base.batch(len(uniq))  # receives the distinct prompts' keys and values below ``top``
    inputs = lower_layers(model, top, input_ids=uniq, attention_mask=mask[first], position_ids=pos[first],
                          use_cache=True, **{cache_argument(model.base_model.forward): below})
    order: list[int] = []
    logits, caches = [], []
    for start in sorted(set(low)):
        sel = [b for b, x in enumerate(low) if x == start]
        group = [rows[b] for b in sel]
        idx = inverse[sel]
        ab.strength = strength[group]
        with reuse_residual(model, start, inputs[start][idx.to(inputs[start].device)]):
            o = model(input_ids=ids[sel], attention_mask=mask[sel], position_ids=pos[sel], use_cache=True,
                      **{cache_arg: shared.rows(group)}, **extra)
        cache = output_cache(o)
        for layer, src in zip(cache.layers[:start], below.layers[:start]):  # skipped: the unablated pass's
            i = idx.to(src.keys.device)
            layer.keys, layer.values = src.keys[i], src.values[i]
        order += sel
        logits.append(o.logits[:, -1])
        caches.append(cache)
    return order, torch.cat(logits), _cat_caches(caches)


def _cat_caches(caches: list[Any]) -> Any:
    """One dynamic KV cache whose rows are ``caches``' rows in turn (the first cache, extended in place)."""
    merged = caches[0]
    if len(caches) > 1:
        for i, layer in enumerate(merged.layers):
            layer.keys = torch.cat([c.layers[i].keys for c in caches])
            layer.values = torch.cat([c.layers[i].values for c in caches])
    return merged


class _SharedPrefix:
    """The KV cache of the common prompt prefix, one row per distinct ablation (``inverse[i]``: row
    ``i``'s), from which each prefill group's cache is assembled; ``base``: the prefix unablated."""

    def __init__(self, cache: Any, inverse: torch.Tensor, base: SharedPrefix) -> None:
        self.cache, self.inverse, self.base = cache, inverse, base

    def rows(self, rows: list[int]) -> Any:
        return cache_rows(self.cache, self.inverse[rows])


def _prefix_cache(model, ab, strength: torch.Tensor, prefix: Sequence[int], batch_size: int) -> _SharedPrefix | None:
    """The prefix's cache under each distinct ablation of ``strength``, ``batch_size`` at a time; None
    when the cache is not made of plain dynamic layers (then prompts are prefilled whole)."""
    ab.strength = strength.new_zeros(1, *strength.shape[1:])  # unablated (a zero strength leaves every head as is)
    base = SharedPrefix.build(model, prefix)
    if base is None:
        return None
    distinct, inverse = torch.unique(strength.flatten(1), dim=0, return_inverse=True)
    distinct = distinct.view(-1, *strength.shape[1:])
    caches = []
    for b0 in range(0, len(distinct), batch_size):
        ab.strength = distinct[b0:b0 + batch_size]
        caches.append(base.under(model, 0, len(ab.strength)).cache)
    return _SharedPrefix(_cat_caches(caches), inverse.cpu(), base)


def _job_rows(model, job: Mapping[str, Any], index: int) -> tuple[list[str], list[list[Head]]]:
    """A job's prompts and one head list per prompt (a fixed head list repeated)."""
    if not isinstance(job, Mapping) or "prompts" not in job:
        raise EvaluationError(f"job {index}: a job is a dict with 'prompts' and 'heads' or 'rows', got {job!r}")
    unknown = set(job) - {"prompts", "heads", "rows", "stop"}
    if unknown:
        raise EvaluationError(f"job {index}: unknown keys {sorted(unknown)}")
    prompts = _check_prompts(job["prompts"])
    if job.get("rows") is not None and job.get("heads"):
        raise EvaluationError(f"job {index}: pass either heads= (same for every prompt) or rows= (one list per prompt), "
                              "not both")
    if job.get("rows") is not None:
        rows = _normalise_rows(model, job["rows"], len(prompts))
        assert rows is not None
        return prompts, rows
    heads = validate_heads(job.get("heads") or [], get_adapter(model).geometry)
    return prompts, [heads] * len(prompts)


def _job_stop(job: Mapping[str, Any], index: int) -> StopRule | None:
    stop = job.get("stop")
    if stop is not None and not isinstance(stop, StopRule):
        raise EvaluationError(f"job {index}: 'stop' must be a StopRule, got {type(stop).__name__}")
    return stop


def _row_key(text: str, heads: list[Head], index: int, sampling: bool, stop: StopRule | None = None) -> str:
    """What a checkpointed row is identified by: the formatted prompt, its heads, (when sampling,
    where the seed depends on it) its position in the job, and its stop rule's name if any."""
    rec = [text, [list(h) for h in sorted(heads)], index if sampling else None]
    if stop is not None:  # absent without a rule: keys of earlier checkpoints unchanged
        rec.append(stop.name)
    return hashlib.sha256(json.dumps(rec).encode()).hexdigest()[:32]


def _read_checkpoint(path: Path, digest: str) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("digest") != digest:
        log.info("generation checkpoint %s was made with other settings; starting afresh", path)
        return {}
    done: dict[str, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
            done[str(rec["key"])] = {"ids": [int(t) for t in rec["ids"]], "score": rec.get("score")}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut by an interruption
    return done


def _settings_digest(model, fmt: str, system_prompt: str | None, mode: Mode, eps: float, max_new_tokens: int,
                     sampling: bool, top_k: int, temperature: float, seed: int, score_tokens: list[int] | None,
                     mean: torch.Tensor | None = None) -> str:
    from .provenance import model_record

    rec = {"v": GENERATION_VERSION, "model": model_record(model), "format": fmt, "system_prompt": system_prompt,
           "mode": mode.value, "eps": eps, "max_new_tokens": max_new_tokens,
           "sampling": [top_k, temperature, seed] if sampling else None, "score_tokens": score_tokens}
    if mean is not None:  # mode "mean": the head means are a setting too (absent otherwise: digests unchanged)
        rec["mean_sha256"] = mean_digest(mean)
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()


def generate_many(
    model,
    tokenizer,
    jobs: Sequence[Mapping[str, Any]],
    *,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    sampling: bool = False,
    top_k: int = 5,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    desc: str | None = None,
    mean: torch.Tensor | None = None,
    continuous: bool = True,
    shared_prefix: bool = True,
    reuse_lower: bool = True,
) -> list[list[list[int]]]:
    """Generate for several jobs at once, in shared batches; returns ``out[job][prompt]`` token ids.

    Args:
        jobs: dicts with ``prompts`` and either ``heads`` (ablated for every prompt; empty: the
            unablated model) or ``rows`` (one head list per prompt), and optionally ``stop`` (a
            :class:`StopRule`: each row ends once its text settles the verdict). Typically one job
            per evaluation condition.
        batch_size: rows (prompt × job pairs) per batch. All jobs' rows are sorted by prompt token
            length (then prompt, then job), so similar lengths — and the same prompt under
            different heads — share a batch.
        checkpoint: a JSON-lines file that records every finished row (see the module doc); it
            is reused only when made with the same model and settings. Removing it is up to the
            caller.
        mean: for ``mode="mean"`` (required there), the head means (:func:`~safetyheads.ablation.head_means`).
        continuous: waiting rows join the running batch as rows finish (default); False: a new
            batch starts only when the last one is done (same tokens in float64; slower when rows end
            at very different lengths, as refusals and compliant answers do).
        shared_prefix: the token ids all prompts start with (a chat template's system block) are
            prefilled once per distinct head set and their KV cache copied into each row's (default);
            False: every row prefills its whole prompt (same tokens in float64).
        reuse_lower: with the shared prefix, a prompt's layers below a row's lowest ablated head
            are prefilled once per prompt, unablated, for all its rows (default); False: every row
            prefills every layer (same tokens in float64).
        Others: as in :func:`generate`.

    Returns:
        for every job, for every prompt, the new token ids (cut before the first EOS).
    """
    return _generate(model, tokenizer, jobs, mode=mode, eps=eps, prompt_format=prompt_format,
                     system_prompt=system_prompt, max_new_tokens=max_new_tokens, sampling=sampling, top_k=top_k,
                     temperature=temperature, seed=seed, batch_size=batch_size, progress=progress,
                     checkpoint=checkpoint, desc=desc, refusal_tokens=None, mean=mean, continuous=continuous,
                     shared_prefix=shared_prefix, reuse_lower=reuse_lower)[0]


def generate_and_score(
    model,
    tokenizer,
    jobs: Sequence[Mapping[str, Any]],
    *,
    refusal_tokens: Sequence[int],
    **kwargs: Any,
) -> tuple[list[list[list[int]]], list[list[tuple[float, float]]]]:
    """:func:`generate_many`, plus the refusal metric of every row read off its prefill for free.

    The prefill's last-position logits are the next-token distribution at the first answer
    position, under the row's ablation: exactly what :func:`safetyheads.refusal_metric.refusal_metric`
    computes in a forward pass of its own. Returns ``(ids, scores)`` with ``scores[job][prompt] =
    (P(refusal tokens), refusal log-odds)`` (float64 from the logits). Keyword arguments as for
    :func:`generate_many`.
    """
    toks = sorted({int(t) for t in refusal_tokens})
    if not toks:
        raise EvaluationError("refusal_tokens is empty")
    return _generate(model, tokenizer, jobs, refusal_tokens=toks, **kwargs)


def _generate(model, tokenizer, jobs: Sequence[Mapping[str, Any]], *, mode: Mode | str = "ua", eps: float = 1e-5,
              prompt_format: str = "chat", system_prompt: str | None = None, max_new_tokens: int = 128,
              sampling: bool = False, top_k: int = 5, temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
              progress: bool = True, checkpoint: str | Path | None = None, desc: str | None = None,
              refusal_tokens: list[int] | None = None, mean: torch.Tensor | None = None, continuous: bool = True,
              shared_prefix: bool = True, reuse_lower: bool = True) -> tuple[list[list[list[int]]], list[list[Any]]]:
    if isinstance(jobs, Mapping):
        raise TypeError("jobs must be a sequence of job dicts, not one dict")
    jobs = list(jobs)
    if not jobs:
        raise EvaluationError("no generation jobs given")
    _check_generation(max_new_tokens, sampling, top_k, temperature, seed, batch_size)
    mode_ = Mode.parse(mode)
    eps = check_eps(mode_, eps)
    mean = check_mean(model, mode_, mean)
    fmt = str(getattr(prompt_format, "value", prompt_format))
    parsed = [_job_rows(model, job, j) for j, job in enumerate(jobs)]
    stops = [_job_stop(job, j) for j, job in enumerate(jobs)]
    # format and measure every distinct prompt once
    unique: dict[str, int] = {}
    for prompts, _ in parsed:
        for p in prompts:
            unique.setdefault(p, len(unique))
    plain = list(unique)
    texts = format_prompts(tokenizer, plain, fmt, system_prompt=system_prompt)
    ids = prompt_token_ids(tokenizer, texts)
    lengths = [len(x) for x in ids]
    eos = set(_eos_ids(model, tokenizer, fmt))
    score_idx = None
    if refusal_tokens is not None:
        vocab = model.get_output_embeddings().weight.shape[0]
        if refusal_tokens[0] < 0 or refusal_tokens[-1] >= vocab:
            raise EvaluationError(f"refusal token ids must be in 0..{vocab - 1}, got {refusal_tokens}")
        score_idx = torch.tensor(refusal_tokens, dtype=torch.long)
    # rows: (job, prompt index in the job, distinct-prompt index, heads)
    rows = [(j, i, unique[p], heads[i]) for j, (prompts, heads) in enumerate(parsed) for i, p in enumerate(prompts)]
    out: list[list[list[int]]] = [[[] for _ in prompts] for prompts, _ in parsed]
    scores: list[list[Any]] = [[None for _ in prompts] for prompts, _ in parsed]
    keys = [_row_key(texts[u], h, i, sampling, stops[j]) for j, i, u, h in rows]

    def stop_fn(rule: StopRule | None) -> Callable[[list[int]], bool] | None:
        if rule is None:
            return None
        return lambda ids: rule.settled(tokenizer.decode(ids, skip_special_tokens=True))

    row_stops = [stop_fn(stops[j]) for j, _, _, _ in rows]
    path = Path(checkpoint) if checkpoint is not None else None
    done: dict[str, dict[str, Any]] = {}
    if path is not None:
        digest = _settings_digest(model, fmt, system_prompt, mode_, eps, max_new_tokens, sampling, top_k, temperature,
                                  seed, refusal_tokens, mean)
        done = _read_checkpoint(path, digest)
        if not done:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"digest": digest}) + "\n")
    todo = []
    for r, (j, i, _, _) in enumerate(rows):
        if keys[r] in done and (score_idx is None or done[keys[r]]["score"] is not None):
            out[j][i] = list(done[keys[r]]["ids"])
            scores[j][i] = None if score_idx is None else tuple(done[keys[r]]["score"])
        else:
            todo.append(r)
    if path is not None and done:
        log.info("generation: %d of %d rows reused from %s", len(rows) - len(todo), len(rows), path)
    # rows that are the same computation (same formatted prompt, heads, stop rule and, when sampling, seed
    # index: the same key) are decoded once, e.g. two methods that chose the same heads
    first_row: dict[str, int] = {}
    copies: dict[int, list[int]] = {}
    for r in todo:
        if keys[r] in first_row:
            copies.setdefault(first_row[keys[r]], []).append(r)
        else:
            first_row[keys[r]] = r
    if copies:
        log.info("generation: %d rows repeat another row's prompt and heads; decoded once",
                 sum(map(len, copies.values())))
    todo = list(first_row.values())
    todo.sort(key=lambda r: (lengths[rows[r][2]], rows[r][2], rows[r][0], rows[r][1]))
    dev = _device(model)
    strength = heads_to_strength(model, [rows[r][3] for r in todo])
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + rows[r][1]) for r in todo] if sampling else None

    # the token ids every prompt starts with, at least one token short of the shortest prompt
    prefix = ids[0][:SharedPrefix.length(ids)] if shared_prefix and ids else []

    def encode(batch: list[int], start: int) -> dict[str, torch.Tensor]:
        return pad_left(tokenizer, [ids[rows[todo[b]][2]][start:] for b in batch], device=dev)

    stream = _decode_stream(model, encode, strength, mode_, eps, max_new_tokens, eos, gens, top_k, temperature,
                            batch_size, score_idx=score_idx, mean=mean,
                            stops=[row_stops[r] for r in todo] if any(stops) else None, continuous=continuous,
                            prefix=prefix, reuse_lower=reuse_lower)
    with tqdm(total=len(rows), initial=len(rows) - len(todo), desc=desc or "generate", disable=not progress) as bar:
        for finished in stream:
            for b, toks, first in finished:
                for r2 in (todo[b], *copies.get(todo[b], ())):
                    out[rows[r2][0]][rows[r2][1]] = list(toks)
                    scores[rows[r2][0]][rows[r2][1]] = first
            if path is not None:
                with path.open("a") as f:
                    f.write("".join(json.dumps({"key": keys[todo[b]], "ids": toks,
                                                **({"score": list(first)} if first is not None else {})}) + "\n"
                                    for b, toks, first in finished))
                    f.flush()
            bar.update(sum(1 + len(copies.get(todo[b], ())) for b, _, _ in finished))
    return out, scores


def _first_scores(logits: torch.Tensor, idx: torch.Tensor) -> list[tuple[float, float]]:
    """``(P(R), log P(R) − log P(not R))`` per row of next-token logits, in float64 (as the refusal metric)."""
    from .ships import refusal_logodds

    lo = refusal_logodds(logits, idx).cpu().tolist()
    lp = torch.log_softmax(logits.double(), -1)
    pr = torch.logsumexp(lp.index_select(-1, idx.to(lp.device)), -1).exp().cpu().tolist()
    return list(zip(pr, lo))


def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    heads: Sequence[Head] = (),
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    sampling: bool = False,
    top_k: int = 5,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    rows: Sequence[Sequence[Head]] | None = None,
    desc: str | None = None,
    mean: torch.Tensor | None = None,
    shared_prefix: bool = True,
) -> list[list[int]]:
    """Like :func:`generate`, but returns each response's new token ids (cut before the first EOS);
    ``shared_prefix`` as in :func:`generate_many`."""
    prompts = _check_prompts(prompts)
    if rows is not None and len(heads):
        raise EvaluationError("pass either heads= (same for every prompt) or rows= (one list per prompt), not both")
    job: dict[str, Any] = {"prompts": prompts, "rows": rows} if rows is not None else {"prompts": prompts,
                                                                                      "heads": list(heads)}
    return generate_many(model, tokenizer, [job], mode=mode, eps=eps, prompt_format=prompt_format,
                         system_prompt=system_prompt, max_new_tokens=max_new_tokens, sampling=sampling, top_k=top_k,
                         temperature=temperature, seed=seed, batch_size=batch_size, progress=progress, desc=desc,
                         mean=mean, shared_prefix=shared_prefix)[0]


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    heads: Sequence[Head] = (),
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    sampling: bool = False,
    top_k: int = 5,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    rows: Sequence[Sequence[Head]] | None = None,
    mean: torch.Tensor | None = None,
) -> list[str]:
    """Generate a response to every prompt, with ``heads`` ablated (none: the unablated model).

    Args:
        prompts: the queries (plain text; formatted with ``prompt_format`` / ``system_prompt``).
        heads: ``(layer, head)`` pairs ablated for every prompt.
        mode, eps: the ablation (see :func:`safetyheads.ablate`; the paper: ``"ua"``, 1e-5).
        prompt_format: ``"chat"``, ``"template"`` or ``"raw"`` (:mod:`safetyheads.prompts`).
        max_new_tokens: generation length (the paper: 128).
        sampling: False = greedy (pure argmax); True = top-``top_k`` sampling at ``temperature``,
            prompt ``i`` drawing from a generator seeded with ``seed * 1_000_003 + i``
            (reproducible and independent of ``batch_size``; the global RNG is untouched).
        batch_size: prompts per batch (left-padded; KV cache on).
        rows: instead of ``heads``, one head list per prompt: prompt ``i`` ablates ``rows[i]`` —
            all in one batch (the per-query experiment).
        mean: for ``mode="mean"`` (required there), the head means (:func:`~safetyheads.ablation.head_means`).

    Returns:
        one decoded response per prompt (new tokens only, cut at EOS, special tokens skipped).
    """
    ids = generate_ids(model, tokenizer, prompts, heads=heads, mode=mode, eps=eps, prompt_format=prompt_format,
                       system_prompt=system_prompt, max_new_tokens=max_new_tokens, sampling=sampling, top_k=top_k,
                       temperature=temperature, seed=seed, batch_size=batch_size, progress=progress, rows=rows,
                       mean=mean)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
