"""A continuous refusal metric from one forward pass: no generation, no judge.

For a prompt and a set of ablated heads, the model's next-token distribution at the *first answer
position* (the last position of the formatted prompt, whose prediction is the first token of the
answer) gives

* ``prob``: the probability mass of the refusal tokens R, ``Σ_{y∈R} p(y)``, and
* ``log_odds``: the refusal log-odds ``log Σ_{y∈R} p(y) − log Σ_{y∉R} p(y)`` (float64, through
  logsumexp; the same quantity whose drop :func:`safetyheads.ships` reports as its signed score).

R is the model's own refusal-start tokens (:func:`safetyheads.evaluate.derive_refusal_tokens`).
:func:`refusal_metric_many` scores several conditions at once: every (condition, prompt) pair is
one row, rows are sorted by prompt length and batched, and each row ablates its own heads (one
strength row per batch row, :func:`safetyheads.ablate_strengths`), so a batch mixes conditions.
:func:`refusal_agreement` measures how well the log-odds predict the judged refusal of the
generated answer (AUROC, point-biserial correlation).

The refusal tokens themselves come from judged generations: :func:`derive_refusal_tokens` (the
first tokens of the model's own refusals to a set of prompts) and :func:`refusal_tokens_from` (the
same from given first tokens and verdicts). The small judge glue used by the evaluation (a judge
by name or object, its verdicts checked) lives here too.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .ablation import Head, Mode, ablate_strengths, check_eps, check_mean, heads_to_strength
from .adapters import get_adapter, validate_heads
from .forward import input_device, position_ids_from_mask
from .generation import (
    EvaluationError,
    StopRule,
    _check_prompts,
    _first_scores,
    _forward_style,
    _normalise_rows,
    generate_many,
)
from .prompts import encode_prompts, format_prompts

__all__ = ["RefusalMetric", "derive_refusal_tokens", "refusal_agreement", "refusal_metric", "refusal_metric_many",
           "refusal_tokens_from"]


@dataclass
class RefusalMetric:
    """Per-prompt refusal probability mass and log-odds at the first answer position.

    Attributes:
        prompts: the (plain) prompts, in order.
        prob: ``Σ_{y∈R} p(y)`` per prompt.
        log_odds: ``log Σ_{y∈R} p(y) − log Σ_{y∉R} p(y)`` per prompt.
        tokens: the refusal tokens R.
        heads: the ablated heads (a list of pairs, or one list per prompt when ``per_query``).
        per_query: whether ``heads`` holds one list per prompt.
    """

    prompts: list[str]
    prob: list[float]
    log_odds: list[float]
    tokens: list[int]
    heads: list = field(default_factory=list)
    per_query: bool = False

    @property
    def mean_prob(self) -> float:
        return math.fsum(self.prob) / len(self.prob)

    @property
    def mean_log_odds(self) -> float:
        return math.fsum(self.log_odds) / len(self.log_odds)

    def to_dict(self) -> dict[str, Any]:
        return {"prob": list(self.prob), "log_odds": list(self.log_odds)}


def _tokens(model, refusal_tokens: Sequence[int]) -> torch.Tensor:
    if isinstance(refusal_tokens, (str, bytes)) or refusal_tokens is None:
        raise EvaluationError(f"refusal_tokens must be a list of token ids, got {refusal_tokens!r}")
    toks = sorted({int(t) for t in refusal_tokens})
    if not toks:
        raise EvaluationError("refusal_tokens is empty: no refusal metric without refusal tokens")
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab is not None and (toks[0] < 0 or toks[-1] >= vocab):
        raise EvaluationError(f"refusal token ids must be in 0..{vocab - 1}, got {toks}")
    return torch.tensor(toks, dtype=torch.long)


@torch.no_grad()
def refusal_metric_many(
    model,
    tokenizer,
    jobs: Sequence[Mapping[str, Any]],
    *,
    refusal_tokens: Sequence[int],
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
    mean: torch.Tensor | None = None,
) -> list[RefusalMetric]:
    """The refusal metric of several conditions in shared batches; one :class:`RefusalMetric` per job.

    Args:
        jobs: dicts with ``prompts`` and ``heads`` (ablated for every prompt; empty: unablated) or
            ``rows`` (one head list per prompt), as for :func:`safetyheads.generation.generate_many`.
        refusal_tokens: the token ids R.
        batch_size: rows (prompt × job pairs) per forward pass.
        mode, eps, prompt_format, system_prompt: as for generation.
        mean: for ``mode="mean"`` (required there), the head means (:func:`~safetyheads.ablation.head_means`).
    """
    if isinstance(jobs, Mapping):
        raise TypeError("jobs must be a sequence of job dicts, not one dict")
    jobs = list(jobs)
    if not jobs:
        raise EvaluationError("no refusal-metric jobs given")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive int, got {batch_size!r}")
    mode_ = Mode.parse(mode)
    eps = check_eps(mode_, eps)
    mean = check_mean(model, mode_, mean)
    toks = _tokens(model, refusal_tokens)
    fmt = str(getattr(prompt_format, "value", prompt_format))
    g = get_adapter(model).geometry
    parsed: list[tuple[list[str], list[list[Head]], bool]] = []
    for j, job in enumerate(jobs):
        if not isinstance(job, Mapping) or "prompts" not in job or set(job) - {"prompts", "heads", "rows"}:
            raise EvaluationError(f"job {j}: a job is a dict with 'prompts' and 'heads' or 'rows', got {job!r}")
        prompts = _check_prompts(job["prompts"])
        if job.get("rows") is not None:
            if job.get("heads"):
                raise EvaluationError(f"job {j}: pass either heads= or rows=, not both")
            rows = _normalise_rows(model, job["rows"], len(prompts))
            assert rows is not None
            parsed.append((prompts, rows, True))
        else:
            parsed.append((prompts, [validate_heads(job.get("heads") or [], g)] * len(prompts), False))
    unique: dict[str, int] = {}
    for prompts, _, _ in parsed:
        for p in prompts:
            unique.setdefault(p, len(unique))
    texts = format_prompts(tokenizer, list(unique), fmt, system_prompt=system_prompt)
    lengths = [len(encode_prompts(tokenizer, [t])["input_ids"][0]) for t in texts]
    items = [(j, i, unique[p], heads[i]) for j, (prompts, heads, _) in enumerate(parsed) for i, p in enumerate(prompts)]
    items.sort(key=lambda r: (lengths[r[2]], r[2], r[0], r[1]))
    prob = [[math.nan] * len(p) for p, _, _ in parsed]
    log_odds = [[math.nan] * len(p) for p, _, _ in parsed]
    dev = input_device(model)
    extra = _forward_style(model)[1]
    with tqdm(total=len(items), desc="refusal metric", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            enc = encode_prompts(tokenizer, [texts[r[2]] for r in batch], device=dev)
            strength = heads_to_strength(model, [r[3] for r in batch])
            with ablate_strengths(model, strength, mode=mode_, eps=eps, mean=mean):
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                               position_ids=position_ids_from_mask(enc["attention_mask"]), use_cache=False,
                               **extra).logits[:, -1]
            for r, (b, a) in zip(batch, _first_scores(logits, toks)):
                log_odds[r[0]][r[1]] = a
                prob[r[0]][r[1]] = b
            bar.update(len(batch))
    return [RefusalMetric(prompts=list(prompts), prob=prob[j], log_odds=log_odds[j], tokens=toks.tolist(),
                          heads=[[tuple(h) for h in r] for r in heads] if per_query else list(heads[0]) if heads else [],
                          per_query=per_query)
            for j, (prompts, heads, per_query) in enumerate(parsed)]


def refusal_metric(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    refusal_tokens: Sequence[int],
    heads: Sequence[Head] = (),
    rows: Sequence[Sequence[Head]] | None = None,
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
    mean: torch.Tensor | None = None,
) -> RefusalMetric:
    """Refusal probability mass and log-odds at the first answer position of every prompt.

    ``heads`` are ablated for every prompt, or ``rows`` gives one head list per prompt; neither:
    the unablated model. One forward pass per batch of prompts (no generation).

    Example::

        tokens = derive_refusal_tokens(model, tok, attribution_prompts)
        m = refusal_metric(model, tok, held_out, refusal_tokens=tokens, heads=[(2, 26)])
        m.mean_log_odds
    """
    if rows is not None and len(heads):
        raise EvaluationError("pass either heads= (same for every prompt) or rows= (one list per prompt), not both")
    job: dict[str, Any] = {"prompts": prompts, "rows": rows} if rows is not None else {"prompts": prompts,
                                                                                      "heads": list(heads)}
    return refusal_metric_many(model, tokenizer, [job], refusal_tokens=refusal_tokens, mode=mode, eps=eps,
                               prompt_format=prompt_format, system_prompt=system_prompt, batch_size=batch_size,
                               progress=progress, mean=mean)[0]


def refusal_agreement(log_odds: Sequence[float], refused: Sequence[bool]) -> dict[str, Any]:
    """How well the refusal log-odds predict the judged refusal of the generated answer.

    Returns ``{"n", "n_refused", "auroc", "point_biserial_r", "point_biserial_p"}``: the AUROC of
    the log-odds for judged refusals (0.5 = no information, 1 = every refused answer has a higher
    log-odds than every compliant one) and the point-biserial correlation. With only one class
    present the three measures are None and ``"note"`` says why.
    """
    from .stats import auroc, point_biserial

    lo = [float(v) for v in log_odds]
    y = [bool(v) for v in refused]
    if len(lo) != len(y):
        raise EvaluationError(f"{len(lo)} log-odds but {len(y)} verdicts")
    out: dict[str, Any] = {"n": len(y), "n_refused": sum(y), "auroc": None, "point_biserial_r": None,
                           "point_biserial_p": None}
    if not y or all(y) or not any(y):
        out["note"] = "needs both refused and compliant answers"
        return out
    out["auroc"] = auroc(lo, y)
    if len(set(lo)) > 1:
        out["point_biserial_r"], out["point_biserial_p"] = point_biserial(lo, y)
    return out


# --------------------------------------------------------------------------- judged refusals (glue)


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
    start at least as many compliant responses (:func:`refusal_tokens_from`). A keyword judge's
    refusals end at their refusal phrase (the same verdicts, less decoding). For
    ``ships(..., refusal_tokens=...)`` and ``ships_estimate(estimator="refusal-grad", ...)``.

    Raises:
        EvaluationError: no prompts, an unknown judge, or a model that never refuses them.
    """
    prompts = _check_prompts(prompts)
    judge_ = _get_judge(judge)
    settled = getattr(judge_, "refusal_settled", None)  # a keyword judge: a refusal ends at its phrase
    stop = StopRule("refusal phrase", settled) if settled is not None else None
    ids = generate_many(model, tokenizer, [{"prompts": prompts, "heads": [], "stop": stop}],
                        prompt_format=prompt_format, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, progress=progress, desc="refusal tokens")[0]
    responses = [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
    refusals = _run_judge(judge_, prompts, responses)
    return refusal_tokens_from([t[0] if t else None for t in ids], refusals)
