"""Evaluation: attack success under ablation, judged, with paired statistics (SPEC §4).

* :func:`evaluate` — one head set against the unablated baseline and random-head controls
  (layer-matched by default), and utility on harmless prompts; :func:`evaluate_conditions` — any
  list of conditions (the big comparison tables), resumable from a folder.
* :func:`attack_success` — ASR = share of responses that are *not* refusals, with a Wilson 95 %
  interval.
* :func:`derive_refusal_tokens` — the tokens that start the model's own refusals (for the signed
  refusal score of :func:`safetyheads.ships` and the refusal metric).
* :func:`per_query_heads` — each prompt's own top-k Ships heads (the paper's per-query experiment).
* Generation lives in :mod:`safetyheads.generation` (:func:`generate`, :func:`generate_ids`,
  :func:`generate_many` are re-exported here), statistics in :mod:`safetyheads.stats`
  (``wilson_interval`` re-exported), the continuous refusal metric in
  :mod:`safetyheads.refusal_metric`.

An evaluation generates every condition that is not already stored *together*: all (condition,
prompt) rows in shared batches, each row ablating its own heads (:func:`generate_many`). Every
condition is compared with the baseline on the same prompts: exact McNemar test on the attack
success flags, the paired bootstrap interval of the ASR difference, and the prompts flipped each
way; the same for the refusal log-odds (Wilcoxon signed-rank); Holm-adjusted p-values over the
conditions; and each head set's rank among its random controls (:attr:`Evaluation.controls`).
:meth:`Evaluation.summary` says in words which effects are significant at the evaluation's n.

Utility on harmless prompts is measured two ways: the over-refusal rate (the judge on harmless
responses, unablated vs ablated) and the mean per-token KL(unablated ‖ ablated) of the next-token
distributions teacher-forced along the *unablated* response (metric ``"kl_teacher_forced"``):
for each harmless prompt, the prompt plus its baseline response is run once unablated and once
ablated, and the KL over the full vocabulary is averaged over every position from the last prompt
token through the last response token (token-weighted over all prompts). Two forward passes per
prompt: cheap on a CPU, unlike zero-shot benchmark suites.

A results folder holds ``evaluation.json`` (schema in :meth:`Evaluation.to_json`),
``refusal_metric.json`` (per-prompt refusal probability and log-odds of every condition) and
``responses/<condition>.jsonl`` (one line per prompt: ``prompt``, ``response``, ``refusal``; per-query
conditions add that prompt's ``heads``), each with a ``responses/<condition>.config.json`` recording
what produced it. All files are written atomically (generation also checkpoints every finished
batch); :func:`evaluate_conditions` given the folder again reloads every condition whose responses
are complete and were made with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .ablation import Head, Mode, ablate, check_eps, check_mean, mean_digest
from .adapters import get_adapter, validate_heads
from .evaluation import (
    REFUSAL_METRIC_FILE,
    Condition,
    Evaluation,
    _make_condition,
    attack_success,
    summary_lines,
)
from .forward import SharedPrefix, cache_argument, captured_inputs, position_ids_from_mask, reuse_residual
from .generation import (
    GENERATION_VERSION,
    EvaluationError,
    StopRule,
    _check_generation,
    _check_prompts,
    _device,
    _eos_ids,
    _forward_style,
    _pad_id,
    generate,
    generate_and_score,
    generate_ids,
    generate_many,
)
from .prompts import format_prompts, prompt_format_info, prompt_token_ids
from .provenance import atomic_write_text, model_record, prompts_digest, provenance
from .refusal_metric import _get_judge, _judge_name, _run_judge, derive_refusal_tokens, refusal_tokens_from
from .stats import (
    StatsError,
    layer_matched_heads,
    paired_comparison,
    random_control_seed,
    rank_among,
    uniform_random_heads,
    wilson_interval,
)

__all__ = [
    "Condition",
    "Evaluation",
    "EvaluationError",
    "attack_success",
    "derive_refusal_tokens",
    "eval_prompt_sets",
    "eval_slug",
    "evaluate",
    "evaluate_conditions",
    "generate",
    "generate_ids",
    "generate_many",
    "layer_matched_random",
    "per_query_heads",
    "random_control",
    "random_control_seed",
    "random_heads",
    "refusal_tokens_from",
    "summary_lines",
    "teacher_forced_kl",
    "wilson_interval",
]

log = logging.getLogger("safetyheads")

UTILITY_METRIC = "kl_teacher_forced"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")

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

    Deterministic for a given ``seed`` (``random.Random(seed)``). The uniform null; evaluations
    default to the layer-matched one (:func:`layer_matched_random`).
    """
    try:
        return uniform_random_heads(model, k, exclude=exclude, seed=seed)
    except StatsError as e:
        raise EvaluationError(str(e)) from None


def layer_matched_random(model, heads: Sequence[Head], *, seed: int = 0, exclude: Sequence[Head] = ()) -> list[Head]:
    """Random heads from the same layers as ``heads`` (as many per layer), never ``heads`` or ``exclude``
    (:func:`safetyheads.stats.layer_matched_heads`)."""
    try:
        return layer_matched_heads(model, heads, seed=seed, exclude=exclude)
    except StatsError as e:
        raise EvaluationError(str(e)) from None


RANDOM_KINDS = ("layer-matched", "uniform")
"""How random control heads are drawn: from the chosen heads' layers, or uniformly over all heads."""


def random_control(model, heads: Sequence[Head], *, kind: str = "layer-matched", seed: int = 0,
                   exclude: Sequence[Head] = ()) -> list[Head]:
    """One random control for ``heads``: ``kind="layer-matched"`` (default) or ``"uniform"`` (``len(heads)``
    heads from all heads except ``heads`` and ``exclude``)."""
    if kind == "layer-matched":
        return layer_matched_random(model, heads, seed=seed, exclude=exclude)
    if kind == "uniform":
        return random_heads(model, len(heads), exclude=list(heads) + list(exclude), seed=seed)
    raise EvaluationError(f"unknown random control kind {kind!r}; choose one of {list(RANDOM_KINDS)}")


# --------------------------------------------------------------------------- evaluation datasets


def eval_slug(name: str) -> str:
    """A file-safe folder name for an evaluation dataset (``harmbench:standard`` → ``harmbench-standard``)."""
    base = Path(name).name if ("/" in name or "\\" in name) else name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")


def eval_prompt_sets(dataset: str, eval_datasets: Sequence[str], *, n_attribution: int, n_eval: int, seed: int = 0,
                     column: str | None = None):
    """``(attribution, [(name, PromptSet), …])``: the attribution prompts (the seeded hold-out split of
    ``dataset``) and one held-out evaluation set per name of ``eval_datasets`` — the split's evaluation
    part for ``dataset`` itself, else a seeded sample of ``n_eval`` prompts of that dataset (all of it
    if smaller, with a warning), any prompt of the attribution set removed first.

    Raises:
        DatasetError: unknown names, bad files, or too few prompts for the split.
    """
    from .datasets import holdout_split, load_prompts

    harmful = load_prompts(dataset, column=column)
    attribution, held_out = holdout_split(harmful, n_attribution, n_eval, seed=seed)
    seen = set(attribution)
    sets = []
    for name in eval_datasets:
        if name == dataset:
            sets.append((name, held_out))
            continue
        ps = load_prompts(name)
        keep = [i for i, p in enumerate(ps) if p not in seen]
        if len(keep) < len(ps):
            log.info("eval dataset %s: %d prompts also in the attribution set removed", name, len(ps) - len(keep))
            ps = ps.subset(keep, note="minus the attribution prompts")
        if len(ps) > n_eval:
            import random

            ps = ps.subset(sorted(random.Random(seed).sample(range(len(ps)), n_eval)), note=f"sample(n={n_eval}, seed={seed})")
        elif len(ps) < n_eval:
            log.warning("eval dataset %s has %d prompts, fewer than n_eval=%d: all are used", name, len(ps), n_eval)
        sets.append((name, ps))
    return attribution, sets


# --------------------------------------------------------------------------- conditions


def _normalise_condition(model, spec: Mapping[str, Any], n_prompts: int) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise EvaluationError(f"a condition must be a dict with name, method, k, heads|rows; got {spec!r}")
    unknown = set(spec) - {"name", "method", "k", "heads", "rows", "seed", "control_for"}
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
    control_for = spec.get("control_for")
    if control_for is not None and not isinstance(control_for, str):
        raise EvaluationError(f"condition {name!r}: control_for must be the name of another condition")
    return {"name": name, "method": str(method), "k": int(k), "heads": heads, "seed": None if seed is None else int(seed),
            "per_query": per_query, "control_for": control_for}


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


GENERATION_CHECKPOINT = "responses/.generation.ckpt.jsonl"


def _run_conditions(model, tokenizer, groups: list[tuple[list[str], list[dict]]], settings: dict, judge: Any,
                    out_dir: Path | None, gen_kw: dict[str, Any], score_tokens: list[int] | None = None,
                    stop: StopRule | None = None,
                    ) -> tuple[list[list[Condition]], dict[str, tuple[list[float], list[float]]]]:
    """Every condition of every ``(prompts, specs)`` group: loaded from ``out_dir`` when stored with the
    same settings, else generated — all missing conditions of all groups together, in shared batches
    (:func:`generate_many`, checkpointed per batch in ``out_dir``) — then judged and written.

    With ``score_tokens``, the refusal metric of the first group's generated conditions is read off
    the generation's prefill (:func:`generate_and_score`) and returned as ``{name: (prob, log_odds)}``.
    With ``stop``, the first group's rows end once their verdict is settled (:class:`StopRule`; the
    rule's name is part of those conditions' stored settings)."""

    def config_of(g: int, spec: dict, prompts: list[str]) -> dict[str, Any]:
        config = _condition_config(settings, spec, prompts)
        if stop is not None and g == 0:  # absent otherwise: digests of full-response conditions unchanged
            config["stop_at_verdict"] = stop.name
        return config

    loaded: dict[tuple[int, int], tuple[list[str], list[bool] | None]] = {}
    fresh_scores: dict[str, tuple[list[float], list[float]]] = {}
    todo: list[tuple[int, int]] = []
    for g, (prompts, specs) in enumerate(groups):
        for s, spec in enumerate(specs):
            got = None
            if out_dir is not None:
                got = _load_responses(out_dir, spec, config_of(g, spec, prompts), prompts)
            if got is None:
                todo.append((g, s))
                continue
            responses, refusals, judged_by = got
            if judged_by == _judge_name(judge):
                log.info("condition %s: loaded %d responses from %s", spec["name"], len(responses), out_dir)
                loaded[g, s] = (responses, refusals)
            else:
                log.info("condition %s: loaded responses, re-judging with %s", spec["name"], _judge_name(judge))
                loaded[g, s] = (responses, None)
    if todo:
        jobs = [{"prompts": groups[g][0], ("rows" if groups[g][1][s]["per_query"] else "heads"): groups[g][1][s]["heads"],
                 "stop": stop if g == 0 else None} for g, s in todo]
        log.info("generating %d conditions (%d rows) in shared batches", len(todo), sum(len(j["prompts"]) for j in jobs))
        ckpt = None if out_dir is None else out_dir / GENERATION_CHECKPOINT
        if score_tokens is not None:
            ids, scores = generate_and_score(model, tokenizer, jobs, refusal_tokens=score_tokens, checkpoint=ckpt,
                                             **gen_kw)
            for (g, s), sc in zip(todo, scores):
                if g == 0:
                    fresh_scores[groups[g][1][s]["name"]] = ([p for p, _ in sc], [lo for _, lo in sc])
        else:
            ids = generate_many(model, tokenizer, jobs, checkpoint=ckpt, **gen_kw)
        for (g, s), rows in zip(todo, ids):
            loaded[g, s] = ([tokenizer.decode(t, skip_special_tokens=True) for t in rows], None)
    out: list[list[Condition]] = []
    for g, (prompts, specs) in enumerate(groups):
        conds = []
        for s, spec in enumerate(specs):
            responses, refusals = loaded[g, s]
            fresh = refusals is None
            if refusals is None:
                refusals = _run_judge(judge, prompts, responses)
            cond = _make_condition(spec, prompts, responses, refusals)
            if out_dir is not None and fresh:
                config = config_of(g, spec, prompts)
                atomic_write_text(out_dir / cond.responses_file, cond.responses_jsonl())  # the jsonl first:
                atomic_write_text(out_dir / "responses" / f"{spec['name']}.config.json",  # it counts only with this
                                  json.dumps({"digest": _digest(config), "judge": _judge_name(judge), "config": config},
                                             indent=2, default=str))
            conds.append(cond)
        out.append(conds)
    if out_dir is not None:
        (out_dir / GENERATION_CHECKPOINT).unlink(missing_ok=True)
    return out, fresh_scores


# --------------------------------------------------------------------------- refusal metric and statistics


def _first_tokens(tokenizer, responses: Sequence[str]) -> list[int | None]:
    out: list[int | None] = []
    for r in responses:
        ids = tokenizer(r, add_special_tokens=False)["input_ids"] if r else []
        out.append(int(ids[0]) if ids else None)
    return out


def _refusal_metrics(model, tokenizer, conds: list[Condition], refusal_tokens: Sequence[int] | None, settings: dict,
                     out_dir: Path | None, metric_kw: dict[str, Any],
                     fresh: Mapping[str, tuple[list[float], list[float]]] | None = None) -> dict[str, Any]:
    """Fill each condition's per-prompt refusal metric; returns the evaluation's ``refusal_metric`` record.

    Refusal tokens: ``refusal_tokens`` if given, else the first tokens of the baseline's refusals
    (:func:`refusal_tokens_from` on the baseline responses, re-encoded). Cached in ``out_dir`` with
    the settings that made it.
    """
    from .refusal_metric import refusal_agreement, refusal_metric_many

    source = "given"
    if refusal_tokens is None:
        base = next((c for c in conds if c.method == "baseline" and c.k == 0), None)
        if base is None:
            return {"skipped": "no refusal tokens given and no baseline condition to derive them from"}
        try:
            refusal_tokens = refusal_tokens_from(_first_tokens(tokenizer, base.responses), base.refusals)
        except EvaluationError as e:
            log.warning("refusal metric skipped: %s", e)
            return {"skipped": str(e)}
        source = f"first tokens of the refusals among the {base.name} responses (re-encoded)"
    tokens = sorted({int(t) for t in refusal_tokens})
    record: dict[str, Any] = {"tokens": tokens, "strings": [tokenizer.decode([t]) for t in tokens], "source": source,
                              "file": REFUSAL_METRIC_FILE,
                              "definition": "at the first answer position: prob = P(refusal tokens); log_odds = "
                                            "log P(refusal tokens) - log P(other tokens)"}
    digests = {c.name: _digest({**_condition_config(settings, {"heads": c.heads, "per_query": c.per_query}, c.prompts),
                                "tokens": tokens}) for c in conds}
    cached: dict[str, Any] = {}
    path = out_dir / REFUSAL_METRIC_FILE if out_dir is not None else None
    if path is not None and path.exists():
        try:
            stored = json.loads(path.read_text()).get("conditions") or {}
            cached = {name: v for name, v in stored.items() if v.get("digest") == digests.get(name)}
        except (OSError, json.JSONDecodeError, AttributeError):
            cached = {}
    for name, (prob, log_odds) in (fresh or {}).items():  # read off the generation's prefill
        if name in digests:
            cached[name] = {"digest": digests[name], "prob": list(prob), "log_odds": list(log_odds)}
    todo = [c for c in conds if c.name not in cached]
    if todo:
        jobs = [{"prompts": c.prompts, ("rows" if c.per_query else "heads"): c.heads} for c in todo]
        for c, m in zip(todo, refusal_metric_many(model, tokenizer, jobs, refusal_tokens=tokens, **metric_kw)):
            cached[c.name] = {"digest": digests[c.name], **m.to_dict()}
    for c in conds:
        c.refusal_prob, c.refusal_log_odds = list(cached[c.name]["prob"]), list(cached[c.name]["log_odds"])
        c.refusal_metric_digest = digests[c.name]
    if path is not None:
        atomic_write_text(path, json.dumps({"kind": "refusal_metric", "tokens": tokens,
                                            "conditions": {c.name: cached[c.name] for c in conds}}))
    lo = [v for c in conds for v in c.refusal_log_odds or []]
    ref = [v for c in conds for v in c.refusals]
    record["agreement"] = {"all_conditions": refusal_agreement(lo, ref)}
    base = next((c for c in conds if c.method == "baseline" and c.k == 0), None)
    if base is not None:
        record["agreement"]["baseline"] = refusal_agreement(base.refusal_log_odds, base.refusals)
    return record


def _paired_statistics(conds: list[Condition], *, n_boot: int, seed: int, alpha: float,
                       random_kind: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Fill each condition's ``paired`` (vs the first baseline; Holm-adjusted over the conditions) and
    return the controls' ranks and the ``stats`` record."""
    from .stats import holm

    base = next((c for c in conds if c.method == "baseline" and c.k == 0), None)
    stats_rec: dict[str, Any] = {"alpha": alpha, "baseline": None if base is None else base.name, "n_boot": n_boot,
                                 "seed": seed, "interval": "paired percentile bootstrap of the mean difference, 95 %",
                                 "tests": {"asr": "exact McNemar (two-sided binomial on the discordant prompts)",
                                           "refusal_log_odds": "Wilcoxon signed-rank (two-sided)"},
                                 "multiplicity": "Holm over the conditions compared with the baseline (p_holm)",
                                 "random_controls": random_kind}
    if base is None:
        return [], stats_rec
    others = [c for c in conds if c is not base]
    for c in others:
        c.paired = {"asr": paired_comparison(base.successes, c.successes, metric="asr", binary=True, n_boot=n_boot,
                                             seed=seed).to_dict()}
        if c.refusal_log_odds is not None and base.refusal_log_odds is not None:
            c.paired["refusal_log_odds"] = paired_comparison(base.refusal_log_odds, c.refusal_log_odds,
                                                             metric="refusal_log_odds", binary=False, n_boot=n_boot,
                                                             seed=seed).to_dict()
    for key in ("asr", "refusal_log_odds"):
        have = [c for c in others if key in c.paired]
        for c, p in zip(have, holm([c.paired[key]["p_value"] for c in have])):
            c.paired[key]["p_holm"] = p
    controls = []
    by_name = {c.name: c for c in conds}
    for name in dict.fromkeys(c.control_for for c in conds if c.control_for):
        chosen = by_name.get(name)
        ctl = [c for c in conds if c.control_for == name]
        if chosen is None:
            log.warning("random controls name %r as their condition, but there is no such condition", name)
            continue
        rec: dict[str, Any] = {"condition": name, "controls": [c.name for c in ctl], "kind": random_kind or "",
                               "asr": rank_among(chosen.asr, [c.asr for c in ctl], higher_is_better=True)}
        if chosen.mean_log_odds is not None and all(c.mean_log_odds is not None for c in ctl):
            rec["refusal_log_odds"] = rank_among(chosen.mean_log_odds, [c.mean_log_odds for c in ctl],
                                                 higher_is_better=False)
        controls.append(rec)
    return controls, stats_rec


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
    mean: torch.Tensor | None = None,
    reuse_lower: bool = True,
) -> dict[str, float]:
    """Mean per-token KL(unablated ‖ ablated) of next-token distributions along given responses.

    Each prompt is formatted, followed by its (unablated) response tokens, and run once unablated
    and once per head set; the KL over the full vocabulary (float64) is averaged over every
    position from the last prompt token through the last response token, token-weighted over all
    prompts. Returns ``{name: mean KL}`` for each entry of ``head_sets`` (0 for an empty set, not
    run). ``mean``: for ``mode="mean"`` (required there), the head means
    (:func:`~safetyheads.ablation.head_means`). ``reuse_lower``: a head set's forward starts at its
    lowest ablated layer, on the unablated pass's residual there (the layers below cannot change;
    the same KL, exactly so in float64).
    """
    prompts = _check_prompts(prompts, "harmless prompts")
    if len(responses) != len(prompts):
        raise EvaluationError(f"{len(prompts)} prompts but {len(responses)} responses")
    mode_ = Mode.parse(mode)
    eps = check_eps(mode_, eps)
    mean = check_mean(model, mode_, mean)
    g = get_adapter(model).geometry
    sets = {name: validate_heads(h, g) for name, h in head_sets.items()}
    texts = format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt)
    seqs: list[tuple[list[int], int]] = []  # (ids, number of scored positions)
    p_rows = prompt_token_ids(tokenizer, texts)
    for p_ids, resp in zip(p_rows, responses):
        r_ids = list(tokenizer(resp, add_special_tokens=False)["input_ids"]) if resp else []
        seqs.append((p_ids + r_ids, len(r_ids) + 1))
    # the prompts' common prefix (chat template's system block) runs once per head set (ua-limit: prefill only)
    n_pre = SharedPrefix.length(p_rows) if len(p_rows) > 1 and mode_ is not Mode.UA_LIMIT else 0
    prefix = SharedPrefix.build(model, p_rows[0][:n_pre]) if n_pre else None
    n_pre = len(prefix) if prefix is not None else 0
    totals = {name: 0.0 for name in sets}
    count = 0
    dev = _device(model)
    pad = _pad_id(tokenizer, _eos_ids(model, tokenizer, str(getattr(prompt_format, "value", prompt_format))))
    sets = {name: heads for name, heads in sets.items() if heads}  # an empty set changes nothing: KL 0
    low = {name: min(layer for layer, _ in heads) if reuse_lower else 0 for name, heads in sets.items()}
    prefixes = {}
    if prefix is not None:
        for name, heads in sets.items():
            with torch.no_grad(), ablate(model, heads, mode=mode_, eps=eps, mean=mean):
                prefixes[name] = prefix.under(model, low[name])
    bar = tqdm(total=len(seqs), desc="utility KL", disable=not progress)
    for start in range(0, len(seqs), batch_size):
        chunk = [(s[n_pre:], n) for s, n in seqs[start:start + batch_size]]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), n_pre + width, dtype=torch.long)
        mask[:, :n_pre] = 1
        for i, (s, _) in enumerate(chunk):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, n_pre + width - len(s):] = 1
        keep = max(n for _, n in chunk)
        sel = torch.zeros(len(chunk), keep, dtype=torch.bool)
        for i, (_, n) in enumerate(chunk):
            sel[i, keep - n:] = True
        ids, mask = ids.to(dev), mask.to(dev)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)[:, n_pre:],
                  "use_cache": prefix is not None}
        if _forward_style(model)[1]:
            inputs["logits_to_keep"] = keep

        def past(p, rows=len(chunk)):
            return {} if p is None else {cache_argument(model.forward): p.batch(rows)}

        with captured_inputs(model, layers=set(low.values()) - {0}) as below:  # each set's start, unablated
            base = F.log_softmax(model(**inputs, **past(prefix)).logits[:, -keep:].double(), -1)[sel.to(dev)]
        count += int(sel.sum())
        for name, heads in sets.items():
            with ablate(model, heads, mode=mode_, eps=eps, mean=mean), reuse_residual(model, low[name], below[low[name]]):
                lp = F.log_softmax(model(**inputs, **past(prefixes.get(name))).logits[:, -keep:].double(),
                                   -1)[sel.to(dev)]
            totals[name] += float(F.kl_div(lp, base, log_target=True, reduction="sum"))
        del below
        bar.update(len(chunk))
    bar.close()
    return {name: totals[name] / count if name in sets else 0.0 for name in head_sets}


def _stored_utility(out: Path | None, settings: dict, sets: Mapping[str, Sequence[Head]], compute) -> dict[str, float]:
    """``compute(sets)`` (the utility KL of each head set), reusing the values ``out/utility_kl.json`` holds
    for head sets of an earlier call with the same ``settings`` (each set's KL depends only on its own
    heads, the harmless prompts and their unablated responses) and storing the new ones there."""
    def key(heads: Sequence[Head]) -> str:
        return json.dumps(sorted([int(a), int(b)] for a, b in heads))

    path = None if out is None else out / "utility_kl.json"
    digest = _digest({**settings, "metric": UTILITY_METRIC})
    stored = json.loads(path.read_text()) if path is not None and path.exists() else {}
    values: dict[str, float] = stored.get("values", {}) if stored.get("digest") == digest else {}
    todo = {name: heads for name, heads in sets.items() if key(heads) not in values}
    if todo:
        log.info("utility KL: %d head set(s) to compute, %d stored", len(todo), len(sets) - len(todo))
        values.update({key(todo[name]): v for name, v in compute(todo).items()})
        if path is not None:
            atomic_write_text(path, json.dumps({"digest": digest, "config": settings, "values": values}, indent=1))
    return {name: values[key(heads)] for name, heads in sets.items()}


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
    refusal_tokens: Sequence[int] | None = None,
    refusal_metric: bool = True,
    n_boot: int = 10_000,
    stats_seed: int = 0,
    alpha: float = 0.05,
    random_kind: str | None = None,
    mean: torch.Tensor | None = None,
    stop_at_verdict: bool = False,
) -> Evaluation:
    """Generate, judge and score every condition; paired statistics vs the baseline; resumable through ``out_dir``.

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
        refusal_tokens: the refusal tokens of the continuous refusal metric
            (:mod:`safetyheads.refusal_metric`); None: derived from the baseline's refusals.
        refusal_metric: compute that metric for every harmful condition (one forward pass per
            prompt and condition) with its paired statistics and its agreement with the judge.
        n_boot, stats_seed, alpha: the paired bootstrap and the significance level of the words in
            :meth:`Evaluation.summary` (:mod:`safetyheads.stats`). Every condition is compared with the
            first baseline on the same prompts; a condition's ``control_for`` key names the head set
            it is a random control of (its rank among its controls is reported).
        random_kind: how the random controls were drawn (recorded only).
        mean: for ``mode="mean"`` (required there), the head means every condition is ablated with
            (:func:`~safetyheads.ablation.head_means`); their sha256 is part of each condition's settings.
        batch_size: rows (prompt × condition pairs) per generation batch: all conditions that are
            not loaded from ``out_dir`` are generated together (:func:`generate_many`).
        stop_at_verdict: end each harmful prompt's response as soon as the judge's verdict is settled
            (a keyword judge's refusal phrase has appeared, :meth:`KeywordJudge.refusal_settled`):
            the same verdicts, ASR and statistics, at a fraction of the decoding (a refusal stops
            after its phrase), but the stored refusals are cut there — re-judging them with another
            judge needs full responses. Harmless prompts (over-refusal, utility KL) are always
            generated in full. Ignored (logged) for judges that cannot settle early (LLM judges).
        Others: as in :func:`generate`.
    """
    prompt_set, prompts = prompts, _check_prompts(prompts)
    judge_ = _get_judge(judge)
    mode_ = Mode.parse(mode)
    eps = check_eps(mode_, eps)
    mean = check_mean(model, mode_, mean)
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
    if mean is not None:  # mode "mean": stored responses count only for the same head means
        settings["mean_sha256"] = mean_digest(mean)
    gen_kw = dict(mode=mode_, eps=eps, prompt_format=fmt, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                  sampling=sampling, top_k=top_k, temperature=temperature, seed=seed, batch_size=batch_size,
                  progress=progress, mean=mean)
    groups = [(prompts, specs)] + ([(harmless_list, h_specs)] if harmless_list is not None else [])
    score_tokens = sorted({int(t) for t in refusal_tokens}) if refusal_metric and refusal_tokens else None
    stop = None
    if stop_at_verdict:
        settled = getattr(judge_, "refusal_settled", None)
        if callable(settled):
            stop = StopRule(f"{_judge_name(judge_)}: refusal phrase", settled)
        else:
            log.info("judge %s cannot settle a verdict early: generating full responses", _judge_name(judge_))
    done, fresh = _run_conditions(model, tokenizer, groups, settings, judge_, out, gen_kw, score_tokens, stop)
    results, over = done[0], (done[1] if harmless_list is not None else [])
    for c in results:
        log.info("condition %s: ASR %.3f [%.3f, %.3f] (n=%d)", c.name, c.asr, c.ci_low, c.ci_high, c.n)
    metric_rec: dict[str, Any] = {}
    if refusal_metric:
        metric_rec = _refusal_metrics(model, tokenizer, results, refusal_tokens, settings, out,
                                      dict(mode=mode_, eps=eps, prompt_format=fmt, system_prompt=system_prompt,
                                           batch_size=batch_size, progress=progress, mean=mean), fresh)
    controls, stats_rec = _paired_statistics(results, n_boot=n_boot, seed=stats_seed, alpha=alpha,
                                             random_kind=random_kind)
    util: list[dict[str, Any]] = []
    if utility and over:
        base = next((c for c in over if c.k == 0), None)
        ablated = {c.name: c.heads for c in over if c.k > 0}
        if base is None:
            log.warning("no unablated harmless condition: utility KL skipped")
        elif ablated:
            kl_batch = max(1, min(4, batch_size))
            kls = _stored_utility(out, {**settings, "harmless_sha256": prompts_digest(harmless_list),
                                        "responses_sha256": prompts_digest(base.responses),
                                        "batch_size": kl_batch}, ablated,
                                  lambda todo: teacher_forced_kl(
                                      model, tokenizer, harmless_list, base.responses, todo, mode=mode_, eps=eps,
                                      prompt_format=fmt, system_prompt=system_prompt, batch_size=kl_batch,
                                      progress=progress, mean=mean))
            util = [{"name": name, "metric": UTILITY_METRIC, "value": v} for name, v in kls.items()]
    prov = provenance(model, prompts, prompt_format=prompt_format_info(fmt, system_prompt, tokenizer=tokenizer),
                      mode=mode_.value, eps=eps, seed=seed, judge=_judge_name(judge_),
                      generation={"max_new_tokens": max_new_tokens, "decoding": "top-k sampling" if sampling else "greedy",
                                  "top_k": top_k if sampling else None, "temperature": temperature if sampling else None,
                                  "seed": seed if sampling else None, "batch_size": batch_size,
                                  "generation_version": GENERATION_VERSION,
                                  "stop_at_verdict": None if stop is None else stop.name},
                      utility_metric={"name": UTILITY_METRIC,
                                      "definition": "mean per-token KL(unablated || ablated) of the next-token "
                                                    "distributions, teacher-forced along the unablated response to "
                                                    "each harmless prompt (last prompt token through last response "
                                                    "token, token-weighted)"},
                      harmless=None if harmless_list is None else {"n": len(harmless_list),
                                                                   "sha256": prompts_digest(harmless_list)},
                      harmless_conditions=[{"name": c.name, "method": c.method, "k": c.k, "heads": c.heads_json()}
                                           for c in over])
    if mean is not None:
        prov["mean_sha256"] = mean_digest(mean)
    if hasattr(harmless, "provenance") and callable(harmless.provenance):
        prov["harmless"] = harmless.provenance()
    if callable(getattr(prompt_set, "provenance", None)):  # a PromptSet: its file sha256 and row indices too
        prov["data"] = {**prompt_set.provenance(), "sha256": prompts_digest(prompts)}
    ev = Evaluation(judge=_judge_name(judge_), mode=mode_.value, eps=eps, prompt_format=fmt,
                    max_new_tokens=max_new_tokens, n_prompts=len(prompts), conditions=results, over_refusal=over,
                    utility=util, provenance=prov, refusal_metric=metric_rec, controls=controls, stats=stats_rec)
    for line in ev.summary():
        log.info("%s", line)
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
    random_kind: str = "layer-matched",
    refusal_tokens: Sequence[int] | None = None,
    refusal_metric: bool = True,
    mean: torch.Tensor | None = None,
) -> Evaluation:
    """Ablate ``heads``: ASR unablated vs ablated, random-head controls, paired statistics, utility.

    Conditions: ``baseline`` (unablated), ``ablated`` (``heads``; method ``"heads"``) and
    ``random0`` … (``random_controls`` random head sets, controls of ``ablated``): with
    ``random_kind="layer-matched"`` (default) as many heads from each layer as ``heads`` has there,
    never one of ``heads``; with ``"uniform"`` ``len(heads)`` heads uniform over all other heads.
    Draw ``i`` uses ``random.Random(seed * 1000 + i)``, recorded as the condition's seed. Every
    condition gets its paired statistics against the baseline and the refusal metric (see
    :func:`evaluate_conditions`). With ``harmless`` prompts: over-refusal of ``harmless-baseline``
    vs ``harmless-ablated`` and the teacher-forced KL of the ablation along the unablated harmless
    responses. Greedy decoding. ``out_dir`` makes it resumable as in :func:`evaluate_conditions`.
    ``mean``: for ``mode="mean"`` (required there), the head means (:func:`~safetyheads.ablation.head_means`).
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
            conds.append({"name": f"random{i}", "method": "random", "k": len(heads_), "seed": s, "control_for": "ablated",
                          "heads": random_control(model, heads_, kind=random_kind, seed=s)})
    elif random_kind not in RANDOM_KINDS:
        raise EvaluationError(f"unknown random control kind {random_kind!r}; choose one of {list(RANDOM_KINDS)}")
    return evaluate_conditions(model, tokenizer, prompts, conds, out_dir=out_dir, harmless=harmless,
                               harmless_conditions=h_conds if harmless is not None else None, mode=mode, eps=eps,
                               judge=judge, prompt_format=prompt_format, system_prompt=system_prompt,
                               max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=progress,
                               refusal_tokens=refusal_tokens, refusal_metric=refusal_metric,
                               random_kind=random_kind if heads_ and random_controls else None, mean=mean)
