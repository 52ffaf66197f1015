"""Evaluation: generation under ablation, refusal judges, attack success (SPEC §4).

* :func:`generate` — batched generation (KV cache, left padding) with heads ablated through
  :func:`safetyheads.ablate`; greedy by default, or top-k sampling with per-prompt seeds.
* :func:`attack_success` — ASR = share of responses that are *not* refusals, with a Wilson 95 %
  interval.
* :func:`evaluate` — one head set against the unablated baseline and random-head controls, and
  utility on harmless prompts; :func:`evaluate_conditions` — any list of conditions (the big
  comparison tables), resumable from a folder.
* :func:`derive_refusal_tokens` — the tokens that start the model's own refusals (for the signed
  refusal score of :func:`safetyheads.ships`).
* :func:`per_query_heads` — each prompt's own top-k Ships heads (the paper's per-query experiment).

Generation is deterministic and uses its own decoding loop (one prefill, then one token per step
with the model's KV cache; rows that finish leave the batch, so the cost follows the tokens actually
generated). The model's ``generation_config`` is not consulted: greedy decoding is pure argmax (no
repetition penalty or other defaults a checkpoint may ship). Sampling is top-k (default 5) at
temperature T (default 1): prompt ``i`` of the list draws from its own ``torch.Generator`` seeded
with ``seed * 1_000_003 + i``, so its samples do not depend on the batch size or on the other
prompts in its batch (up to float rounding of padded batches), and the global torch RNG is not
touched. Responses are decoded from the new tokens only, cut at the first end-of-sequence token
(the tokenizer's and the model's EOS ids, plus the chat template's end-of-turn token when the
prompt format is ``chat``), with special tokens skipped.

Utility on harmless prompts is measured two ways: the over-refusal rate (the judge on harmless
responses, unablated vs ablated) and the mean per-token KL(unablated ‖ ablated) of the next-token
distributions teacher-forced along the *unablated* response (metric ``"kl_teacher_forced"``):
for each harmless prompt, the prompt plus its baseline response is run once unablated and once
ablated, and the KL over the full vocabulary is averaged over every position from the last prompt
token through the last response token (token-weighted over all prompts). Two forward passes per
prompt: cheap on a CPU, unlike zero-shot benchmark suites.

A results folder holds ``evaluation.json`` (schema in :meth:`Evaluation.to_json`) and
``responses/<condition>.jsonl`` (one line per prompt: ``prompt``, ``response``, ``refusal``; per-query
conditions add that prompt's ``heads``), each with a ``responses/<condition>.config.json`` recording
what produced it. All files are written atomically; :func:`evaluate_conditions` given the folder
again reloads every condition whose responses are complete and were made with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .ablation import Head, Mode, ablate, check_eps
from .adapters import get_adapter, validate_heads
from .forward import position_ids_from_mask
from .prompts import encode_prompts, format_prompts, prompt_format_info
from .provenance import atomic_write_text, model_record, prompts_digest, provenance

__all__ = [
    "Condition",
    "Evaluation",
    "EvaluationError",
    "attack_success",
    "derive_refusal_tokens",
    "evaluate",
    "evaluate_conditions",
    "generate",
    "generate_ids",
    "per_query_heads",
    "random_heads",
    "refusal_tokens_from",
    "teacher_forced_kl",
    "wilson_interval",
]

log = logging.getLogger("safetyheads")

Z95 = 1.959963984540054
"""The two-sided 95 % normal quantile used by the Wilson interval."""

GENERATION_VERSION = 1
"""Bumped when generation changes in a way that invalidates stored responses."""

UTILITY_METRIC = "kl_teacher_forced"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class EvaluationError(ValueError):
    """Bad evaluation input (no prompts, unknown judge, bad condition, a model that never refuses, …)."""


# --------------------------------------------------------------------------- attack success


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n`` (default 95 %)."""
    if n <= 0:
        raise EvaluationError("the Wilson interval needs n >= 1")
    if not 0 <= successes <= n:
        raise EvaluationError(f"successes must be in 0..{n}, got {successes}")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def attack_success(refusals: Sequence[bool]) -> tuple[float, float, float]:
    """``(asr, ci_low, ci_high)``: the share of responses that are *not* refusals, Wilson 95 %."""
    flags = [bool(r) for r in refusals]
    if not flags:
        raise EvaluationError("attack_success needs at least one judged response")
    n = len(flags)
    successes = n - sum(flags)
    low, high = wilson_interval(successes, n)
    return successes / n, low, high


# --------------------------------------------------------------------------- generation


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
    return ("cache" if "cache" in params else "past_key_values"), (
        {"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _pick(logits: torch.Tensor, generators: list[torch.Generator] | None, top_k: int, temperature: float) -> torch.Tensor:
    """Next token per row: argmax, or a top-k sample at ``temperature`` from each row's generator."""
    if generators is None:
        return logits.argmax(-1)
    vals, idx = (logits / temperature).topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(vals, dim=-1).cpu()
    picks = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
    return idx.gather(1, picks.to(idx.device))[:, 0]


@torch.no_grad()
def _decode_batch(model, enc: dict[str, torch.Tensor], ctx_rows: list[list[Head]] | None, heads: list[Head], mode: Mode,
                  eps: float, max_new_tokens: int, eos: set[int], generators: list[torch.Generator] | None,
                  top_k: int, temperature: float) -> list[list[int]]:
    """Greedy / sampled decoding of one left-padded batch with a KV cache.

    Rows that reach EOS or ``max_new_tokens`` leave the batch (their cache rows are dropped), so
    the cost follows the tokens actually generated.
    """
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = ids.shape[0]
    active = list(range(n))  # batch row -> prompt position in this batch
    out: list[list[int]] = [[] for _ in range(n)]
    pos = position_ids_from_mask(mask)
    cur, cache = ids, None
    cache_arg, extra = _forward_style(model)
    ablation = ablate(model, mode=mode, eps=eps, rows=ctx_rows) if ctx_rows is not None else ablate(model, heads, mode=mode, eps=eps)
    with ablation as ab:
        for _ in range(max_new_tokens):
            o = model(input_ids=cur, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg: cache}, **extra)
            cache = _cache_of(o)
            gens = None if generators is None else [generators[j] for j in active]
            nxt = _pick(o.logits[:, -1].float(), gens, top_k, temperature)
            keep = []
            for b, (j, t) in enumerate(zip(active, nxt.tolist())):
                if t in eos:
                    continue
                out[j].append(t)
                if len(out[j]) < max_new_tokens:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=ids.device)
                cache.reorder_cache(sel)
                mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
                active = [active[b] for b in keep]
                if ab.strength.shape[0] > 1:
                    ab.strength = ab.strength[sel.cpu()]
            cur = nxt[:, None]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
    return out


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
) -> list[list[int]]:
    """Like :func:`generate`, but returns each response's new token ids (cut before the first EOS)."""
    prompts = _check_prompts(prompts)
    _check_generation(max_new_tokens, sampling, top_k, temperature, seed, batch_size)
    mode_ = Mode.parse(mode)
    eps = check_eps(mode_, eps)
    if rows is not None and len(heads):
        raise EvaluationError("pass either heads= (same for every prompt) or rows= (one list per prompt), not both")
    rows_ = _normalise_rows(model, rows, len(prompts))
    heads_ = validate_heads(heads, get_adapter(model).geometry)
    fmt = str(getattr(prompt_format, "value", prompt_format))
    texts = format_prompts(tokenizer, prompts, fmt, system_prompt=system_prompt)
    eos = set(_eos_ids(model, tokenizer, fmt))
    lengths = [len(encode_prompts(tokenizer, [t])["input_ids"][0]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))  # similar lengths share a batch
    out: list[list[int]] = [[] for _ in texts]
    dev = _device(model)
    with tqdm(total=len(texts), desc=desc or "generate", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = encode_prompts(tokenizer, [texts[i] for i in idx], device=dev)
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in idx] if sampling else None
            batch_rows = [rows_[i] for i in idx] if rows_ is not None else None
            for i, toks in zip(idx, _decode_batch(model, enc, batch_rows, heads_, mode_, eps, max_new_tokens, eos, gens,
                                                  top_k, temperature)):
                out[i] = toks
            bar.update(len(idx))
    return out


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
        batch_size: prompts per ``model.generate`` call (left-padded; KV cache on).
        rows: instead of ``heads``, one head list per prompt: prompt ``i`` ablates ``rows[i]`` —
            all in one batch (the per-query experiment).

    Returns:
        one decoded response per prompt (new tokens only, cut at EOS, special tokens skipped).
    """
    ids = generate_ids(model, tokenizer, prompts, heads=heads, mode=mode, eps=eps, prompt_format=prompt_format,
                       system_prompt=system_prompt, max_new_tokens=max_new_tokens, sampling=sampling, top_k=top_k,
                       temperature=temperature, seed=seed, batch_size=batch_size, progress=progress, rows=rows)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids]


# --------------------------------------------------------------------------- judges


def _get_judge(judge: Any):
    from .judges import get_judge

    if isinstance(judge, str):
        try:
            return get_judge(judge)
        except ValueError as e:
            raise EvaluationError(str(e)) from e
    if not callable(getattr(judge, "is_refusal", None)):
        raise EvaluationError(f"judge must be a name such as 'keyword:paper' or an object with is_refusal(), got {judge!r}")
    return judge


def _judge_name(judge: Any) -> str:
    return str(getattr(judge, "name", type(judge).__name__))


def _run_judge(judge: Any, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
    verdicts = [bool(v) for v in judge.is_refusal(list(prompts), list(responses))]
    if len(verdicts) != len(responses):
        raise EvaluationError(f"judge {_judge_name(judge)} returned {len(verdicts)} verdicts for {len(responses)} responses")
    return verdicts


# --------------------------------------------------------------------------- refusal tokens


def refusal_tokens_from(first_tokens: Sequence[int | None], refusals: Sequence[bool]) -> list[int]:
    """The refusal-start tokens given each response's first token and the judge's verdict.

    A token is kept if it starts more refusals than compliant responses (so a token such as
    ``"I"`` that starts "I cannot" and "I'd be happy to" equally often is dropped). Responses with
    no token (``None``: the model ended at once) are ignored. Sorted by how many refusals each
    token starts, most first (ties by id).

    Raises:
        EvaluationError: lengths differ, no response is a refusal, or every refusal token starts at
            least as many compliant responses.
    """
    if len(first_tokens) != len(refusals):
        raise EvaluationError(f"{len(first_tokens)} first tokens but {len(refusals)} verdicts")
    ref: Counter[int] = Counter()
    comp: Counter[int] = Counter()
    for t, r in zip(first_tokens, refusals):
        if t is None:
            continue
        (ref if r else comp)[int(t)] += 1
    if not ref:
        raise EvaluationError(
            f"the model refused none of the {len(refusals)} prompts (with a first token), so there are no refusal "
            "tokens: it does not refuse these prompts (e.g. SmolLM2, an unaligned model) — the signed refusal score "
            "needs a model that refuses"
        )
    keep = [t for t in ref if ref[t] > comp[t]]
    if not keep:
        raise EvaluationError(
            "every token that starts a refusal starts at least as many compliant responses; no token separates them"
        )
    return sorted(keep, key=lambda t: (-ref[t], t))


def derive_refusal_tokens(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    judge: Any = "keyword:paper",
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    progress: bool = False,
) -> list[int]:
    """Tokens that start the model's own refusals, from its greedy unablated answers to ``prompts``.

    The first generated token of every response the judge calls a refusal, minus tokens that
    start at least as many compliant responses (:func:`refusal_tokens_from`). For
    ``ships(..., refusal_tokens=...)`` and ``ships_estimate(estimator="refusal-grad", ...)``.

    Raises:
        EvaluationError: no prompts, an unknown judge, or a model that never refuses them.
    """
    prompts = _check_prompts(prompts)
    judge_ = _get_judge(judge)
    ids = generate_ids(model, tokenizer, prompts, prompt_format=prompt_format, system_prompt=system_prompt,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                       desc="refusal tokens")
    responses = [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
    refusals = _run_judge(judge_, prompts, responses)
    return refusal_tokens_from([t[0] if t else None for t in ids], refusals)


# --------------------------------------------------------------------------- head choices


def per_query_heads(ships_result, k: int, metric: str = "kl") -> list[list[Head]]:
    """Each prompt's own top-``k`` heads of a :class:`~safetyheads.ShipsResult`, best first."""
    if not isinstance(k, int) or k < 1:
        raise EvaluationError(f"k must be a positive int, got {k!r}")
    scores = ships_result.metric(metric)
    scored = int((~torch.isnan(scores.flatten(1))).sum(1).min())
    if k > scored:
        raise EvaluationError(f"k={k} is larger than the number of heads scored per prompt ({scored})")
    return [[(layer, head) for layer, head, _ in row] for row in ships_result.top_heads(k, metric)]


def random_heads(model, k: int, *, exclude: Sequence[Head] = (), seed: int = 0) -> list[Head]:
    """``k`` heads drawn uniformly without replacement from all heads except ``exclude`` (sorted).

    Deterministic for a given ``seed`` (``random.Random(seed)``).
    """
    g = get_adapter(model).geometry
    banned = set(validate_heads(exclude, g))
    pool = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads) if (layer, h) not in banned]
    if not isinstance(k, int) or k < 1:
        raise EvaluationError(f"k must be a positive int, got {k!r}")
    if k > len(pool):
        raise EvaluationError(f"cannot draw {k} random heads: only {len(pool)} heads are left after excluding {len(banned)}")
    return sorted(random.Random(seed).sample(pool, k))


def random_control_seed(seed: int, i: int) -> int:
    """The seed of random control draw ``i`` (``seed * 1000 + i``, as the pipeline uses)."""
    return seed * 1000 + i


# --------------------------------------------------------------------------- results


@dataclass
class Condition:
    """One generation condition and its judged responses.

    Attributes:
        name: unique, file-safe (``responses/<name>.jsonl``).
        method: how the heads were chosen: ``"baseline"``, ``"ships-mean"``, ``"ships-per-query"``,
            ``"sahara"``, ``"refusal"``, ``"random"``, …
        k: number of heads (per prompt for per-query conditions).
        heads: ``[(layer, head), …]``, or for per-query conditions one such list per prompt.
        seed: the random draw's seed for ``random`` conditions, else None.
        responses, refusals: one per prompt.
        asr, ci_low, ci_high: attack success (share of non-refusals) and its Wilson 95 % interval.
        n: number of prompts.
        per_query: whether ``heads`` holds one list per prompt.
        prompts: the prompts the responses answer.
    """

    name: str
    method: str
    k: int
    heads: list
    seed: int | None
    responses: list[str]
    refusals: list[bool]
    asr: float
    ci_low: float
    ci_high: float
    n: int
    per_query: bool = False
    prompts: list[str] = field(default_factory=list, repr=False)

    @property
    def refusal_rate(self) -> float:
        return 1.0 - self.asr

    @property
    def responses_file(self) -> str:
        return f"responses/{self.name}.jsonl"

    def heads_json(self) -> list:
        if self.per_query:
            return [[list(h) for h in row] for row in self.heads]
        return [list(h) for h in self.heads]

    def condition_json(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "k": self.k, "heads": self.heads_json(), "seed": self.seed,
                "asr": self.asr, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "responses_file": self.responses_file}

    def over_refusal_json(self) -> dict[str, Any]:
        """Refusal rate (share of refusals) with its Wilson 95 % interval."""
        low, high = wilson_interval(sum(self.refusals), self.n)
        return {"name": self.name, "rate": self.refusal_rate, "ci_low": low, "ci_high": high, "n": self.n,
                "responses_file": self.responses_file}

    def responses_jsonl(self) -> str:
        lines = []
        for i, (p, r, f) in enumerate(zip(self.prompts, self.responses, self.refusals)):
            rec: dict[str, Any] = {"prompt": p, "response": r, "refusal": f}
            if self.per_query:
                rec["heads"] = [list(h) for h in self.heads[i]]
            lines.append(json.dumps(rec, ensure_ascii=False))
        return "".join(line + "\n" for line in lines)


def _make_condition(spec: dict, prompts: list[str], responses: list[str], refusals: list[bool]) -> Condition:
    asr, low, high = attack_success(refusals)
    return Condition(name=spec["name"], method=spec["method"], k=spec["k"], heads=spec["heads"], seed=spec["seed"],
                     responses=list(responses), refusals=list(refusals), asr=asr, ci_low=low, ci_high=high,
                     n=len(responses), per_query=spec["per_query"], prompts=list(prompts))


@dataclass
class Evaluation:
    """Conditions on harmful prompts, over-refusal on harmless ones, utility, provenance."""

    judge: str
    mode: str
    eps: float
    prompt_format: str
    max_new_tokens: int
    n_prompts: int
    conditions: list[Condition]
    over_refusal: list[Condition] = field(default_factory=list)
    utility: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def condition(self, name: str) -> Condition:
        for c in self.conditions + self.over_refusal:
            if c.name == name:
                return c
        raise KeyError(f"no condition {name!r}; have {[c.name for c in self.conditions + self.over_refusal]}")

    @property
    def baseline(self) -> Condition | None:
        """The first unablated condition on the harmful prompts."""
        return next((c for c in self.conditions if c.method == "baseline"), None)

    @property
    def ablated(self) -> Condition | None:
        """The condition named ``"ablated"`` (what :func:`evaluate` makes from ``heads=``)."""
        return next((c for c in self.conditions if c.name == "ablated"), None)

    @property
    def random(self) -> list[Condition]:
        """The random-head controls."""
        return [c for c in self.conditions if c.method == "random"]

    def to_json(self) -> dict[str, Any]:
        """The ``evaluation.json`` record::

            {"kind": "evaluation", "judge", "mode", "eps", "prompt_format", "max_new_tokens", "n_prompts",
             "conditions": [{"name", "method", "k", "heads", "seed", "asr", "ci_low", "ci_high", "n",
                             "responses_file"}],
             "over_refusal": [{"name", "rate", "ci_low", "ci_high", "n", "responses_file"}],
             "utility": [{"name", "metric", "value"}], "provenance": {...}}
        """
        return {"kind": "evaluation", "judge": self.judge, "mode": self.mode, "eps": self.eps,
                "prompt_format": self.prompt_format, "max_new_tokens": self.max_new_tokens,
                "n_prompts": self.n_prompts,
                "conditions": [c.condition_json() for c in self.conditions],
                "over_refusal": [c.over_refusal_json() for c in self.over_refusal],
                "utility": [dict(u) for u in self.utility], "provenance": self.provenance}

    def save(self, run_dir: str | Path, *, responses: bool = True) -> Path:
        """Write ``evaluation.json`` (and, unless ``responses=False``, ``responses/*.jsonl``) atomically."""
        run_dir = Path(run_dir)
        if responses:
            for c in self.conditions + self.over_refusal:
                atomic_write_text(run_dir / c.responses_file, c.responses_jsonl())
        path = run_dir / "evaluation.json"
        atomic_write_text(path, json.dumps(self.to_json(), indent=2, default=str))
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> Evaluation:
        """Read back an ``evaluation.json`` and its responses files."""
        run_dir = Path(run_dir)
        data = json.loads((run_dir / "evaluation.json").read_text())

        def read(entry: dict, over: bool) -> Condition:
            recs = [json.loads(line) for line in (run_dir / entry["responses_file"]).read_text().splitlines() if line]
            refusals = [bool(r["refusal"]) for r in recs]
            asr, low, high = attack_success(refusals)
            heads = entry.get("heads", [])
            # a fixed head list holds [layer, head] pairs; a per-query one holds a list of pairs per prompt
            per_query = any(isinstance(x, list) and (not x or isinstance(x[0], list)) for x in heads)
            return Condition(name=entry["name"], method=entry.get("method", "?"), k=entry.get("k", 0),
                             heads=([[tuple(h) for h in row] for row in heads] if per_query else [tuple(h) for h in heads]),
                             seed=entry.get("seed"), responses=[r["response"] for r in recs], refusals=refusals,
                             asr=asr, ci_low=low, ci_high=high, n=len(recs), per_query=per_query,
                             prompts=[r["prompt"] for r in recs])

        meta = {c["name"]: c for c in data["provenance"].get("harmless_conditions", [])}
        return cls(judge=data["judge"], mode=data["mode"], eps=data["eps"], prompt_format=data["prompt_format"],
                   max_new_tokens=data["max_new_tokens"], n_prompts=data["n_prompts"],
                   conditions=[read(c, False) for c in data["conditions"]],
                   over_refusal=[read({**meta.get(c["name"], {}), **c}, True) for c in data["over_refusal"]],
                   utility=data["utility"], provenance=data["provenance"])

    def table(self) -> str:
        """A markdown table: condition, method, k, ASR [95 % CI], change from the baseline."""
        base = self.baseline
        lines = ["| condition | method | k | ASR | 95% CI | Δ vs baseline |", "|---|---|---|---|---|---|"]
        for c in self.conditions:
            delta = "" if base is None or c is base else f"{c.asr - base.asr:+.2f}"
            lines.append(f"| {c.name} | {c.method} | {c.k} | {c.asr:.2f} | [{c.ci_low:.2f}, {c.ci_high:.2f}] | {delta} |")
        if self.over_refusal:
            lines += ["", "| harmless condition | over-refusal rate | 95% CI | n |", "|---|---|---|---|"]
            for c in self.over_refusal:
                o = c.over_refusal_json()
                lines.append(f"| {c.name} | {o['rate']:.2f} | [{o['ci_low']:.2f}, {o['ci_high']:.2f}] | {o['n']} |")
        if self.utility:
            lines += ["", "| harmless condition | metric | value |", "|---|---|---|"]
            lines += [f"| {u['name']} | {u['metric']} | {u['value']:.4g} |" for u in self.utility]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- conditions


def _normalise_condition(model, spec: Mapping[str, Any], n_prompts: int) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise EvaluationError(f"a condition must be a dict with name, method, k, heads|rows; got {spec!r}")
    unknown = set(spec) - {"name", "method", "k", "heads", "rows", "seed"}
    if unknown:
        raise EvaluationError(f"condition {spec.get('name')!r}: unknown keys {sorted(unknown)}")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise EvaluationError(f"condition name {name!r} must be non-empty and use only letters, digits and ._+=-")
    if spec.get("rows") is not None and spec.get("heads"):
        raise EvaluationError(f"condition {name!r}: give heads= or rows=, not both")
    g = get_adapter(model).geometry
    per_query = spec.get("rows") is not None
    if per_query:
        rows = list(spec["rows"])
        if len(rows) != n_prompts:
            raise EvaluationError(f"condition {name!r}: rows has {len(rows)} head lists for {n_prompts} prompts")
        heads: list = [validate_heads(r, g) for r in rows]
        sizes = {len(r) for r in heads}
        k_found = max(sizes)
    else:
        heads = validate_heads(spec.get("heads") or [], g)
        if len(set(heads)) != len(heads):
            raise EvaluationError(f"condition {name!r}: duplicate heads {heads}")
        k_found = len(heads)
    k = spec.get("k", k_found)
    if k != k_found:
        raise EvaluationError(f"condition {name!r}: k={k} but it has {k_found} heads" + (" per prompt" if per_query else ""))
    method = spec.get("method") or ("baseline" if k_found == 0 else "heads")
    seed = spec.get("seed")
    return {"name": name, "method": str(method), "k": int(k), "heads": heads, "seed": None if seed is None else int(seed),
            "per_query": per_query}


def _settings(model, tokenizer, *, mode: str, eps: float, prompt_format: str, system_prompt: str | None,
              max_new_tokens: int, sampling: bool, top_k: int, temperature: float, seed: int) -> dict[str, Any]:
    rec = model_record(model)
    return {"generation_version": GENERATION_VERSION, "model": rec,
            "prompt_format": prompt_format_info(prompt_format, system_prompt, tokenizer=tokenizer),
            "mode": mode, "eps": eps, "max_new_tokens": max_new_tokens,
            "sampling": {"top_k": top_k, "temperature": temperature, "seed": seed} if sampling else None}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _condition_config(settings: dict, spec: dict, prompts: list[str]) -> dict[str, Any]:
    heads = [[list(h) for h in r] for r in spec["heads"]] if spec["per_query"] else [list(h) for h in spec["heads"]]
    return {**settings, "prompts_sha256": prompts_digest(prompts), "n": len(prompts), "heads": heads,
            "per_query": spec["per_query"]}


def _load_responses(out_dir: Path, spec: dict, config: dict, prompts: list[str]) -> tuple[list[str], list[bool], str] | None:
    """Stored responses of a condition if complete and made with ``config``; else None."""
    jsonl = out_dir / "responses" / f"{spec['name']}.jsonl"
    meta = out_dir / "responses" / f"{spec['name']}.config.json"
    if not (jsonl.exists() and meta.exists()):
        return None
    try:
        stored = json.loads(meta.read_text())
        recs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    if stored.get("digest") != _digest(config):
        log.info("condition %s: stored responses were made with other settings; regenerating", spec["name"])
        return None
    if len(recs) != len(prompts) or any(r.get("prompt") != p for r, p in zip(recs, prompts)):
        return None
    return [r["response"] for r in recs], [bool(r["refusal"]) for r in recs], stored.get("judge", "")


def _run_condition(model, tokenizer, prompts: list[str], spec: dict, settings: dict, judge: Any,
                   out_dir: Path | None, gen_kw: dict[str, Any]) -> Condition:
    config = _condition_config(settings, spec, prompts)
    loaded = _load_responses(out_dir, spec, config, prompts) if out_dir is not None else None
    if loaded is not None:
        responses, refusals, judged_by = loaded
        if judged_by == _judge_name(judge):
            log.info("condition %s: loaded %d responses from %s", spec["name"], len(responses), out_dir)
            return _make_condition(spec, prompts, responses, refusals)
        log.info("condition %s: loaded responses, re-judging with %s", spec["name"], _judge_name(judge))
    else:
        kw = dict(gen_kw)
        if spec["per_query"]:
            kw["rows"] = spec["heads"]
        else:
            kw["heads"] = spec["heads"]
        responses = generate(model, tokenizer, prompts, **kw)
    refusals = _run_judge(judge, prompts, responses)
    cond = _make_condition(spec, prompts, responses, refusals)
    if out_dir is not None:
        atomic_write_text(out_dir / cond.responses_file, cond.responses_jsonl())  # the jsonl first:
        atomic_write_text(out_dir / "responses" / f"{spec['name']}.config.json",  # it counts only with this
                          json.dumps({"digest": _digest(config), "judge": _judge_name(judge), "config": config},
                                     indent=2, default=str))
    return cond


# --------------------------------------------------------------------------- utility


@torch.no_grad()
def teacher_forced_kl(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    head_sets: Mapping[str, Sequence[Head]],
    *,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, float]:
    """Mean per-token KL(unablated ‖ ablated) of next-token distributions along given responses.

    Each prompt is formatted, followed by its (unablated) response tokens, and run once unablated
    and once per head set; the KL over the full vocabulary (float64) is averaged over every
    position from the last prompt token through the last response token, token-weighted over all
    prompts. Returns ``{name: mean KL}`` for each entry of ``head_sets``.
    """
    prompts = _check_prompts(prompts, "harmless prompts")
    if len(responses) != len(prompts):
        raise EvaluationError(f"{len(prompts)} prompts but {len(responses)} responses")
    mode_ = Mode.parse(mode)
    eps = check_eps(mode_, eps)
    g = get_adapter(model).geometry
    sets = {name: validate_heads(h, g) for name, h in head_sets.items()}
    texts = format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt)
    seqs: list[tuple[list[int], int]] = []  # (ids, number of scored positions)
    for text, resp in zip(texts, responses):
        p_ids = encode_prompts(tokenizer, [text])["input_ids"][0].tolist()
        r_ids = list(tokenizer(resp, add_special_tokens=False)["input_ids"]) if resp else []
        seqs.append((p_ids + r_ids, len(r_ids) + 1))
    totals = {name: 0.0 for name in sets}
    count = 0
    dev = _device(model)
    pad = _pad_id(tokenizer, _eos_ids(model, tokenizer, str(getattr(prompt_format, "value", prompt_format))))
    bar = tqdm(total=len(seqs), desc="utility KL", disable=not progress)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (s, _) in enumerate(chunk):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        keep = max(n for _, n in chunk)
        sel = torch.zeros(len(chunk), keep, dtype=torch.bool)
        for i, (_, n) in enumerate(chunk):
            sel[i, keep - n:] = True
        ids, mask = ids.to(dev), mask.to(dev)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask),
                  "use_cache": False}
        if _forward_style(model)[1]:
            inputs["logits_to_keep"] = keep
        base = F.log_softmax(model(**inputs).logits[:, -keep:].double(), -1)[sel.to(dev)]
        count += int(sel.sum())
        for name, heads in sets.items():
            with ablate(model, heads, mode=mode_, eps=eps):
                lp = F.log_softmax(model(**inputs).logits[:, -keep:].double(), -1)[sel.to(dev)]
            totals[name] += float(F.kl_div(lp, base, log_target=True, reduction="sum"))
        bar.update(len(chunk))
    bar.close()
    return {name: totals[name] / count for name in sets}


# --------------------------------------------------------------------------- drivers


def evaluate_conditions(
    model,
    tokenizer,
    prompts: Sequence[str],
    conditions: Sequence[Mapping[str, Any]],
    *,
    out_dir: str | Path | None = None,
    harmless: Sequence[str] | None = None,
    harmless_conditions: Sequence[Mapping[str, Any]] | None = None,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    judge: Any = "keyword:paper",
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    sampling: bool = False,
    top_k: int = 5,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    utility: bool = True,
    progress: bool = True,
) -> Evaluation:
    """Generate, judge and score every condition; resumable through ``out_dir``.

    Args:
        prompts: harmful queries.
        conditions: dicts with ``name`` (unique, file-safe), ``method``, ``k`` (optional, checked),
            and ``heads`` (``[(layer, head), …]``; empty = unablated) or ``rows`` (one head list per
            prompt: the per-query experiment); ``seed`` (optional) records a random draw's seed.
        out_dir: if given, each condition's responses are written there as soon as they are done,
            and a condition whose responses file is complete and was made with the same model,
            prompts, format, ablation, heads and generation settings is loaded instead of
            regenerated (re-judged if the judge differs); ``evaluation.json`` is written at the end.
        harmless: harmless prompts for over-refusal and utility.
        harmless_conditions: conditions run on ``harmless`` (``heads`` only). Default: an unablated
            ``harmless-baseline`` plus ``harmless-<name>`` for every condition with heads that is
            neither random nor per-query.
        utility: compute the teacher-forced KL of each ablated harmless condition against the
            unablated harmless responses (needs an unablated harmless condition).
        Others: as in :func:`generate`.
    """
    prompts = _check_prompts(prompts)
    judge_ = _get_judge(judge)
    mode_ = Mode.parse(mode)
    eps = check_eps(mode_, eps)
    fmt = str(getattr(prompt_format, "value", prompt_format))
    _check_generation(max_new_tokens, sampling, top_k, temperature, seed, batch_size)
    specs = [_normalise_condition(model, c, len(prompts)) for c in conditions]
    if not specs:
        raise EvaluationError("no conditions given")
    harmless_list = None if harmless is None else _check_prompts(harmless, "harmless prompts")
    h_specs: list[dict[str, Any]] = []
    if harmless_list is not None:
        if harmless_conditions is None:
            harmless_conditions = [{"name": "harmless-baseline", "method": "baseline", "k": 0, "heads": []}] + [
                {"name": f"harmless-{s['name']}", "method": s["method"], "k": s["k"], "heads": s["heads"]}
                for s in specs if s["k"] and not s["per_query"] and s["method"] != "random"]
        h_specs = [_normalise_condition(model, c, len(harmless_list)) for c in harmless_conditions]
        if any(s["per_query"] for s in h_specs):
            raise EvaluationError("harmless conditions take heads=, not per-query rows=")
    elif harmless_conditions:
        raise EvaluationError("harmless_conditions given without harmless prompts")
    names = [s["name"] for s in specs + h_specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvaluationError(f"duplicate condition names: {dup}")

    out = Path(out_dir) if out_dir is not None else None
    settings = _settings(model, tokenizer, mode=mode_.value, eps=eps, prompt_format=fmt, system_prompt=system_prompt,
                         max_new_tokens=max_new_tokens, sampling=sampling, top_k=top_k, temperature=temperature,
                         seed=seed)
    gen_kw = dict(mode=mode_, eps=eps, prompt_format=fmt, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                  sampling=sampling, top_k=top_k, temperature=temperature, seed=seed, batch_size=batch_size,
                  progress=progress)
    results = []
    for s in specs:
        results.append(_run_condition(model, tokenizer, prompts, s, settings, judge_, out, gen_kw))
        log.info("condition %s: ASR %.3f [%.3f, %.3f] (n=%d)", s["name"], results[-1].asr, results[-1].ci_low,
                 results[-1].ci_high, results[-1].n)
    over = [_run_condition(model, tokenizer, harmless_list, s, settings, judge_, out, gen_kw)
            for s in h_specs] if harmless_list is not None else []
    util: list[dict[str, Any]] = []
    if utility and over:
        base = next((c for c in over if c.k == 0), None)
        ablated = {c.name: c.heads for c in over if c.k > 0}
        if base is None:
            log.warning("no unablated harmless condition: utility KL skipped")
        elif ablated:
            kls = teacher_forced_kl(model, tokenizer, harmless_list, base.responses, ablated, mode=mode_, eps=eps,
                                    prompt_format=fmt, system_prompt=system_prompt,
                                    batch_size=max(1, min(4, batch_size)), progress=progress)
            util = [{"name": name, "metric": UTILITY_METRIC, "value": v} for name, v in kls.items()]
    prov = provenance(model, prompts, prompt_format=prompt_format_info(fmt, system_prompt, tokenizer=tokenizer),
                      mode=mode_.value, eps=eps, seed=seed, judge=_judge_name(judge_),
                      generation={"max_new_tokens": max_new_tokens, "decoding": "top-k sampling" if sampling else "greedy",
                                  "top_k": top_k if sampling else None, "temperature": temperature if sampling else None,
                                  "seed": seed if sampling else None, "batch_size": batch_size,
                                  "generation_version": GENERATION_VERSION},
                      utility_metric={"name": UTILITY_METRIC,
                                      "definition": "mean per-token KL(unablated || ablated) of the next-token "
                                                    "distributions, teacher-forced along the unablated response to "
                                                    "each harmless prompt (last prompt token through last response "
                                                    "token, token-weighted)"},
                      harmless=None if harmless_list is None else {"n": len(harmless_list),
                                                                   "sha256": prompts_digest(harmless_list)},
                      harmless_conditions=[{"name": c.name, "method": c.method, "k": c.k, "heads": c.heads_json()}
                                           for c in over])
    if hasattr(harmless, "provenance") and callable(harmless.provenance):
        prov["harmless"] = harmless.provenance()
    ev = Evaluation(judge=_judge_name(judge_), mode=mode_.value, eps=eps, prompt_format=fmt,
                    max_new_tokens=max_new_tokens, n_prompts=len(prompts), conditions=results, over_refusal=over,
                    utility=util, provenance=prov)
    if out is not None:
        ev.save(out, responses=False)
    return ev


def evaluate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    heads: Sequence[Head] = (),
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    judge: Any = "keyword:paper",
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    random_controls: int = 5,
    seed: int = 0,
    harmless: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    out_dir: str | Path | None = None,
) -> Evaluation:
    """Ablate ``heads``: ASR unablated vs ablated, random-head controls, and utility.

    Conditions: ``baseline`` (unablated), ``ablated`` (``heads``; method ``"heads"``) and
    ``random0`` … (``random_controls`` draws of ``len(heads)`` heads, uniform over all heads except
    ``heads``; draw ``i`` uses ``random.Random(seed * 1000 + i)``, recorded as the condition's seed).
    With ``harmless`` prompts: over-refusal of ``harmless-baseline`` vs ``harmless-ablated`` and the
    teacher-forced KL of the ablation along the unablated harmless responses. Greedy decoding.
    ``out_dir`` makes it resumable as in :func:`evaluate_conditions`.
    """
    heads_ = validate_heads(heads, get_adapter(model).geometry)
    if len(set(heads_)) != len(heads_):
        raise EvaluationError(f"duplicate heads in {heads_}")
    if not isinstance(random_controls, int) or random_controls < 0:
        raise EvaluationError(f"random_controls must be an int >= 0, got {random_controls!r}")
    conds: list[dict[str, Any]] = [{"name": "baseline", "method": "baseline", "k": 0, "heads": []}]
    h_conds: list[dict[str, Any]] = [{"name": "harmless-baseline", "method": "baseline", "k": 0, "heads": []}]
    if heads_:
        conds.append({"name": "ablated", "method": "heads", "k": len(heads_), "heads": heads_})
        h_conds.append({"name": "harmless-ablated", "method": "heads", "k": len(heads_), "heads": heads_})
        for i in range(random_controls):
            s = random_control_seed(seed, i)
            conds.append({"name": f"random{i}", "method": "random", "k": len(heads_), "seed": s,
                          "heads": random_heads(model, len(heads_), exclude=heads_, seed=s)})
    return evaluate_conditions(model, tokenizer, prompts, conds, out_dir=out_dir, harmless=harmless,
                               harmless_conditions=h_conds if harmless is not None else None, mode=mode, eps=eps,
                               judge=judge, prompt_format=prompt_format, system_prompt=system_prompt,
                               max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=progress)
