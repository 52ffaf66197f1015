"""Evaluation results: :class:`Condition` (one generation condition, judged) and :class:`Evaluation`
(all conditions of a study with their paired statistics), their files, and the words of a summary.

Made by :func:`safetyheads.evaluate.evaluate` / :func:`~safetyheads.evaluate.evaluate_conditions`
(which re-export these names); read back with :meth:`Evaluation.load`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .generation import EvaluationError
from .provenance import atomic_write_text
from .stats import wilson_interval

__all__ = ["Condition", "Evaluation", "REFUSAL_METRIC_FILE", "attack_success", "summary_lines"]


# --------------------------------------------------------------------------- attack success


def attack_success(refusals: Sequence[bool]) -> tuple[float, float, float]:
    """``(asr, ci_low, ci_high)``: the share of responses that are *not* refusals, Wilson 95 %."""
    flags = [bool(r) for r in refusals]
    if not flags:
        raise EvaluationError("attack_success needs at least one judged response")
    n = len(flags)
    successes = n - sum(flags)
    low, high = wilson_interval(successes, n)
    return successes / n, low, high


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
        control_for: for a random control, the name of the condition it is a control of.
        refusal_prob, refusal_log_odds: the refusal metric per prompt
            (:mod:`safetyheads.refusal_metric`), or None when not computed.
        paired: against the baseline on the same prompts, ``{"asr": …, "refusal_log_odds": …}``, each
            a :meth:`safetyheads.stats.PairedComparison.to_dict` plus ``p_holm`` (Holm-adjusted over
            the evaluation's conditions); empty for the baseline itself.
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
    control_for: str | None = None
    refusal_prob: list[float] | None = field(default=None, repr=False)
    refusal_log_odds: list[float] | None = field(default=None, repr=False)
    paired: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    refusal_metric_digest: str | None = field(default=None, repr=False)  # what the stored metric was made with

    @property
    def refusal_rate(self) -> float:
        return 1.0 - self.asr

    @property
    def successes(self) -> list[bool]:
        """Per prompt: whether the attack succeeded (the response is not a refusal)."""
        return [not r for r in self.refusals]

    @property
    def mean_log_odds(self) -> float | None:
        return None if self.refusal_log_odds is None else math.fsum(self.refusal_log_odds) / len(self.refusal_log_odds)

    @property
    def mean_refusal_prob(self) -> float | None:
        return None if self.refusal_prob is None else math.fsum(self.refusal_prob) / len(self.refusal_prob)

    @property
    def responses_file(self) -> str:
        return f"responses/{self.name}.jsonl"

    def heads_json(self) -> list:
        if self.per_query:
            return [[list(h) for h in row] for row in self.heads]
        return [list(h) for h in self.heads]

    def condition_json(self) -> dict[str, Any]:
        metric = None if self.refusal_log_odds is None else {"mean_prob": self.mean_refusal_prob,
                                                             "mean_log_odds": self.mean_log_odds}
        return {"name": self.name, "method": self.method, "k": self.k, "heads": self.heads_json(), "seed": self.seed,
                "asr": self.asr, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "responses_file": self.responses_file, "control_for": self.control_for, "refusal_metric": metric,
                "paired": self.paired}

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
                     n=len(responses), per_query=spec["per_query"], prompts=list(prompts),
                     control_for=spec.get("control_for"))


REFUSAL_METRIC_FILE = "refusal_metric.json"


@dataclass
class Evaluation:
    """Conditions on harmful prompts, over-refusal on harmless ones, utility, statistics, provenance.

    ``refusal_metric``: the refusal tokens (``tokens``, ``strings``, ``source``) and the per-prompt
    ``agreement`` of the refusal log-odds with the judged refusals (:func:`refusal_agreement`);
    ``controls``: for each head set with random controls, its rank among them (ASR and log-odds);
    ``stats``: the settings of the paired statistics (test names, bootstrap, α).
    """

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
    refusal_metric: dict[str, Any] = field(default_factory=dict)
    controls: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

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
                             "responses_file", "control_for", "refusal_metric": {"mean_prob", "mean_log_odds"} | null,
                             "paired": {"asr": {...}, "refusal_log_odds": {...}}}],
             "over_refusal": [{"name", "rate", "ci_low", "ci_high", "n", "responses_file"}],
             "utility": [{"name", "metric", "value"}],
             "refusal_metric": {"tokens", "strings", "source", "file", "agreement"},
             "controls": [{"condition", "controls", "asr": rank, "refusal_log_odds": rank}],
             "stats": {...}, "provenance": {...}}

        The per-prompt refusal metric lives in ``refusal_metric.json`` (``{"conditions": {name:
        {"prob": [...], "log_odds": [...]}}}``).
        """
        return {"kind": "evaluation", "judge": self.judge, "mode": self.mode, "eps": self.eps,
                "prompt_format": self.prompt_format, "max_new_tokens": self.max_new_tokens,
                "n_prompts": self.n_prompts,
                "conditions": [c.condition_json() for c in self.conditions],
                "over_refusal": [c.over_refusal_json() for c in self.over_refusal],
                "utility": [dict(u) for u in self.utility], "refusal_metric": self.refusal_metric,
                "controls": self.controls, "stats": self.stats, "provenance": self.provenance}

    def metric_json(self) -> dict[str, Any]:
        """The ``refusal_metric.json`` record: per-prompt refusal probability and log-odds per condition."""
        return {"kind": "refusal_metric", "tokens": self.refusal_metric.get("tokens"),
                "conditions": {c.name: {"digest": c.refusal_metric_digest, "prob": c.refusal_prob,
                                        "log_odds": c.refusal_log_odds}
                               for c in self.conditions if c.refusal_log_odds is not None},
                "provenance": self.provenance}

    def save(self, run_dir: str | Path, *, responses: bool = True, metric: bool = True) -> Path:
        """Write ``evaluation.json``, unless ``metric=False`` ``refusal_metric.json`` (if computed), and
        unless ``responses=False`` ``responses/*.jsonl``, each atomically."""
        run_dir = Path(run_dir)
        if responses:
            for c in self.conditions + self.over_refusal:
                atomic_write_text(run_dir / c.responses_file, c.responses_jsonl())
        if metric and any(c.refusal_log_odds is not None for c in self.conditions):
            atomic_write_text(run_dir / REFUSAL_METRIC_FILE, json.dumps(self.metric_json()))
        path = run_dir / "evaluation.json"
        atomic_write_text(path, json.dumps(self.to_json(), indent=2, default=str))
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> Evaluation:
        """Read back an ``evaluation.json``, its responses files and ``refusal_metric.json``."""
        run_dir = Path(run_dir)
        data = json.loads((run_dir / "evaluation.json").read_text())
        mpath = run_dir / REFUSAL_METRIC_FILE
        metric = json.loads(mpath.read_text()).get("conditions", {}) if mpath.exists() else {}

        def read(entry: dict, over: bool) -> Condition:
            recs = [json.loads(line) for line in (run_dir / entry["responses_file"]).read_text().splitlines() if line]
            refusals = [bool(r["refusal"]) for r in recs]
            asr, low, high = attack_success(refusals)
            heads = entry.get("heads", [])
            # a fixed head list holds [layer, head] pairs; a per-query one holds a list of pairs per prompt
            per_query = any(isinstance(x, list) and (not x or isinstance(x[0], list)) for x in heads)
            m = {} if over else metric.get(entry["name"]) or {}
            return Condition(name=entry["name"], method=entry.get("method", "?"), k=entry.get("k", 0),
                             heads=([[tuple(h) for h in row] for row in heads] if per_query else [tuple(h) for h in heads]),
                             seed=entry.get("seed"), responses=[r["response"] for r in recs], refusals=refusals,
                             asr=asr, ci_low=low, ci_high=high, n=len(recs), per_query=per_query,
                             prompts=[r["prompt"] for r in recs], control_for=entry.get("control_for"),
                             refusal_prob=m.get("prob"), refusal_log_odds=m.get("log_odds"),
                             refusal_metric_digest=m.get("digest"),
                             paired=entry.get("paired") or {})

        meta = {c["name"]: c for c in data["provenance"].get("harmless_conditions", [])}
        return cls(judge=data["judge"], mode=data["mode"], eps=data["eps"], prompt_format=data["prompt_format"],
                   max_new_tokens=data["max_new_tokens"], n_prompts=data["n_prompts"],
                   conditions=[read(c, False) for c in data["conditions"]],
                   over_refusal=[read({**meta.get(c["name"], {}), **c}, True) for c in data["over_refusal"]],
                   utility=data["utility"], provenance=data["provenance"],
                   refusal_metric=data.get("refusal_metric") or {}, controls=data.get("controls") or [],
                   stats=data.get("stats") or {})

    def summary(self, alpha: float | None = None) -> list[str]:
        """One sentence per condition vs the baseline, saying whether the effect is significant at n
        (:func:`safetyheads.stats.describe`), then each head set's rank among its random controls."""
        alpha = self.stats.get("alpha", 0.05) if alpha is None else alpha
        return summary_lines(self.to_json(), alpha=alpha)

    def table(self) -> str:
        """A markdown table: condition, method, k, ASR [95 % CI], change from the baseline with its paired
        95 % interval, McNemar p and flips, and the refusal log-odds; then over-refusal and utility."""
        base = self.baseline
        lines = ["| condition | method | k | ASR | 95% CI | Δ vs baseline [paired 95% CI] | McNemar p | flips ↑/↓ "
                 "| refusal log-odds (Δ, Wilcoxon p) |", "|---|---|---|---|---|---|---|---|---|"]
        for c in self.conditions:
            pa, pl = c.paired.get("asr"), c.paired.get("refusal_log_odds")
            delta = "" if base is None or c is base else f"{c.asr - base.asr:+.2f}"
            if pa:
                delta += f" [{pa['ci'][0]:+.2f}, {pa['ci'][1]:+.2f}]"
            lo = "" if c.mean_log_odds is None else f"{c.mean_log_odds:.2f}"
            if pl:
                lo += f" ({pl['diff']:+.2f}, p={_p(pl['p_value'])})"
            flips = f"{pa['flipped_to_success']}/{pa['flipped_to_refusal']}" if pa else ""
            p_asr = _p(pa["p_value"]) if pa else ""
            lines.append(f"| {c.name} | {c.method} | {c.k} | {c.asr:.2f} | [{c.ci_low:.2f}, {c.ci_high:.2f}] | {delta} "
                         f"| {p_asr} | {flips} | {lo} |")
        if self.over_refusal:
            lines += ["", "| harmless condition | over-refusal rate | 95% CI | n |", "|---|---|---|---|"]
            for c in self.over_refusal:
                o = c.over_refusal_json()
                lines.append(f"| {c.name} | {o['rate']:.2f} | [{o['ci_low']:.2f}, {o['ci_high']:.2f}] | {o['n']} |")
        if self.utility:
            lines += ["", "| harmless condition | metric | value |", "|---|---|---|"]
            lines += [f"| {u['name']} | {u['metric']} | {u['value']:.4g} |" for u in self.utility]
        return "\n".join(lines) + "\n"

    def to_pandas(self):
        """One row per condition × prompt (condition, set, method, k, prompt_index, prompt, response, refusal
        [, refusal_log_odds, refusal_prob]) as a pandas DataFrame (:func:`safetyheads.views.evaluation_frame`)."""
        from .views import evaluation_frame

        return evaluation_frame(self)

    def plot(self):
        """The report's attack-success bars (over-refusal beside them) as a matplotlib Figure."""
        from .views import evaluation_plot

        return evaluation_plot(self)

    def _repr_html_(self) -> str:
        """A compact table plus the figure, for Jupyter (:func:`safetyheads.views.repr_html`)."""
        from .views import repr_html

        return repr_html(self)


def _p(p: float) -> str:
    from .stats import _fmt_p

    return _fmt_p(float(p))


def summary_lines(ev: Mapping[str, Any], *, alpha: float = 0.05) -> list[str]:
    """The words of an ``evaluation.json`` record: per condition its paired difference from the baseline
    (ASR, then the refusal log-odds) and whether it is significant at its n; per head set with random
    controls its rank among them. Plain text (escape it for HTML)."""
    from .stats import describe

    out = []
    for c in ev.get("conditions") or []:
        paired = c.get("paired") or {}
        if "asr" not in paired:
            continue
        text = describe(str(c.get("name")), paired["asr"], what="ASR", alpha=alpha)
        pa = paired["asr"]
        if pa.get("p_holm") is not None:
            text += f" (Holm-adjusted p={_p(pa['p_holm'])})"
        if "refusal_log_odds" in paired:
            pl = paired["refusal_log_odds"]
            text += "; refusal log-odds " + describe("", pl, alpha=alpha).split(": ", 1)[1].replace(f", n={pl['n']}", "")
        out.append(text)
    for ctl in ev.get("controls") or []:
        r = ctl.get("asr")
        if not r:
            continue
        text = (f"{ctl['condition']} vs {r['n_controls']} random {ctl.get('kind', '')} controls: ASR rank {r['rank']} "
                f"of {r['n']} (controls {r['min']:.2f}–{r['max']:.2f}, median {r['median']:.2f}; "
                f"permutation p={_p(r['p_empirical'])})")
        rl = ctl.get("refusal_log_odds")
        if rl:
            text += (f"; refusal log-odds rank {rl['rank']} of {rl['n']} (controls {rl['min']:.2f}–{rl['max']:.2f}, "
                     f"chosen {rl['value']:.2f})")
        out.append(text.replace("  ", " "))
    return out
