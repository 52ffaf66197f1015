"""Results you can look at: tidy DataFrames, the report's figures and compact HTML for notebooks.

The result classes delegate here (``ShipsResult.to_pandas()``, ``.plot()``, ``_repr_html_`` …, and
the same on :class:`~safetyheads.search.SearchResult` / :class:`~safetyheads.sahara.SaharaResult`,
:class:`~safetyheads.evaluation.Evaluation` and :class:`~safetyheads.masks.HeadMaskResult`), so a
result shown in Jupyter is a small table plus a heatmap, and ``to_pandas()`` is one row per
observation:

* Ships — one row per prompt × layer × head: ``prompt_index, prompt, layer, head, kl`` and
  ``refusal`` when the result has refusal scores (NaN where a head was not scored);
* search / Sahara — one row per step × candidate: ``step, layer, head, score, chosen`` (and
  ``harmless_kl, rejected`` with a harmless-KL constraint);
* evaluation — one row per condition × prompt: ``condition, set, method, k, prompt_index, prompt,
  response, refusal`` and ``refusal_log_odds, refusal_prob`` when the refusal metric was computed
  (``set``: ``"harmful"`` for attack conditions, ``"harmless"`` for over-refusal ones);
* head masks — one row per head: ``layer, head, theta, strength, rank`` (1 = most ablated).

Figures are the report's own (:mod:`safetyheads.plots`), returned as :class:`matplotlib.figure.Figure`
(Agg canvas: nothing is displayed or written). pandas is imported only when a frame is asked for.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["evaluation_frame", "evaluation_plot", "figure_png", "mask_frame", "mask_plot", "repr_html",
           "search_frame", "search_grid", "search_plot", "ships_frame", "ships_plot"]

TOP_ROWS = 10  # rows of the HTML tables


def _pandas():
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover - pandas is a dependency
        raise ImportError("to_pandas() needs pandas: pip install pandas") from e
    return pd


# --------------------------------------------------------------------------- frames


def ships_frame(res: Any) -> pd.DataFrame:
    """One row per prompt × layer × head (prompt-major, then layer, then head) of a ShipsResult."""
    pd = _pandas()
    kl = res.kl.detach().cpu().double()
    n_p, n_l, n_h = kl.shape
    if len(res.prompts) != n_p:
        raise ValueError(f"the result has {len(res.prompts)} prompts but scores for {n_p}")
    idx = [(p, la, h) for p in range(n_p) for la in range(n_l) for h in range(n_h)]
    data: dict[str, Any] = {
        "prompt_index": [i[0] for i in idx],
        "prompt": [res.prompts[i[0]] for i in idx],
        "layer": [i[1] for i in idx],
        "head": [i[2] for i in idx],
        "kl": kl.reshape(-1).numpy(),
    }
    if res.refusal is not None:
        data["refusal"] = res.refusal.detach().cpu().double().reshape(-1).numpy()
    df = pd.DataFrame(data)
    df.attrs["method"] = res.method
    return df


def search_frame(res: Any) -> pd.DataFrame:
    """One row per step × candidate of a search / Sahara result (steps 1-based, candidates sorted)."""
    pd = _pandas()
    constrained = any(st.harmless_kl is not None for st in res.steps)
    rows = []
    for i, st in enumerate(res.steps, 1):
        rejected = {tuple(h) for h in st.rejected}
        for (layer, head), score in sorted(st.scores.items()):
            row: dict[str, Any] = {"step": i, "layer": int(layer), "head": int(head), "score": float(score),
                                   "chosen": (layer, head) == tuple(st.chosen)}
            if constrained:
                hk = (st.harmless_kl or {}).get((layer, head))
                row["harmless_kl"] = math.nan if hk is None else float(hk)
                row["rejected"] = (layer, head) in rejected
            rows.append(row)
    cols = ["step", "layer", "head", "score", "chosen"] + (["harmless_kl", "rejected"] if constrained else [])
    df = pd.DataFrame(rows, columns=cols)
    df.attrs["kind"] = getattr(res, "kind", "search")
    return df


def _conditions(ev: Any) -> list[tuple[str, Any]]:
    return [("harmful", c) for c in ev.conditions] + [("harmless", c) for c in ev.over_refusal]


def evaluation_frame(ev: Any) -> pd.DataFrame:
    """One row per condition × prompt of an Evaluation (attack conditions, then over-refusal ones)."""
    pd = _pandas()
    metric = any(c.refusal_log_odds is not None for _, c in _conditions(ev))
    rows = []
    for which, c in _conditions(ev):
        for i, (prompt, response, refusal) in enumerate(zip(c.prompts, c.responses, c.refusals)):
            row: dict[str, Any] = {"condition": c.name, "set": which, "method": c.method, "k": c.k,
                                   "prompt_index": i, "prompt": prompt, "response": response,
                                   "refusal": bool(refusal)}
            if metric:
                row["refusal_log_odds"] = math.nan if c.refusal_log_odds is None else float(c.refusal_log_odds[i])
                row["refusal_prob"] = math.nan if c.refusal_prob is None else float(c.refusal_prob[i])
            rows.append(row)
    cols = ["condition", "set", "method", "k", "prompt_index", "prompt", "response", "refusal"]
    return pd.DataFrame(rows, columns=cols + (["refusal_log_odds", "refusal_prob"] if metric else []))


def mask_frame(res: Any) -> pd.DataFrame:
    """One row per head of a HeadMaskResult (layer-major): learned θ, strength and rank in the ranking."""
    pd = _pandas()
    theta = res.theta.detach().cpu().double()
    strengths = res.strengths.detach().cpu().double()
    rank = {tuple(h): i for i, h in enumerate(res.ranking, 1)}
    n_l, n_h = theta.shape
    rows = [{"layer": la, "head": h, "theta": float(theta[la, h]), "strength": float(strengths[la, h]),
             "rank": rank.get((la, h), 0)} for la in range(n_l) for h in range(n_h)]
    return pd.DataFrame(rows, columns=["layer", "head", "theta", "strength", "rank"])


# --------------------------------------------------------------------------- figures


def ships_plot(res: Any, metric: str = "kl", top: int = 5) -> Figure:
    """The report's Ships heatmap (mean over prompts of ``metric``) as a Figure."""
    from .plots import ships_heatmap_figure

    return ships_heatmap_figure(res, metric=metric, top=top)


def search_grid(res: Any) -> tuple[int, int]:
    """``(n_layers, n_heads)`` of a search result: its provenance's model, else the scored heads."""
    m = (res.provenance or {}).get("model")
    if isinstance(m, dict) and m.get("n_layers") and m.get("n_heads"):
        return int(m["n_layers"]), int(m["n_heads"])
    heads = [h for st in res.steps for h in st.scores] + [tuple(h) for h in res.heads]
    if not heads:
        raise ValueError("the search result has no steps to plot")
    return max(h[0] for h in heads) + 1, max(h[1] for h in heads) + 1


_SCORE_LABELS = {
    "subspace": "score of G ∪ {h}: Σ principal angles (rad)",
    "refusal": "score of G ∪ {h}: drop of refusal log-odds",
    "kl": "score of G ∪ {h}: KL(unablated ‖ ablated), nats",
}


def search_plot(res: Any, step: int | None = None) -> Figure:
    """The report's heatmap of one greedy step (1-based; default the last) of a search / Sahara result."""
    from .plots import sahara_step_figure

    if not res.steps:
        raise ValueError("the search result has no steps to plot")
    step = len(res.steps) if step is None else step
    n_layers, n_heads = search_grid(res)
    objective = (res.config or {}).get("objective", "subspace")
    name = "Sahara" if getattr(res, "kind", "") == "sahara" else f"search ({objective})"
    return sahara_step_figure(res, step, n_layers, n_heads, name=name,
                              score_label=_SCORE_LABELS.get(objective, "score of G ∪ {h}"))


def evaluation_plot(ev: Any) -> Figure:
    """The report's attack-success bars (with over-refusal beside them) as a Figure."""
    from .plots import asr_bars_figure

    return asr_bars_figure(ev.to_json())


def mask_plot(res: Any, top: int = 5) -> Figure:
    """Layer × head heatmap of a learned mask's deterministic strengths, the ``top`` heads numbered."""
    from .plots import ships_heatmap_figure

    return ships_heatmap_figure(res.strengths, metric="mask strength", top=top,
                                title=f"learned head mask ({(res.config or {}).get('sparsity', 'mask')}): "
                                      "ablation strength per head")


# --------------------------------------------------------------------------- HTML


def figure_png(fig: Figure, dpi: int = 80) -> str:
    """The figure as a base64 PNG (for a ``data:`` URI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(title: str, table: str, fig: Figure | None, alt: str) -> str:
    img = ""
    if fig is not None:
        img = (f'<div><img alt="{html.escape(alt)}" style="max-width:640px" '
               f'src="data:image/png;base64,{figure_png(fig)}"></div>')
    return f"<div class=\"safetyheads-result\"><p><b>{html.escape(title)}</b></p>{table}{img}</div>"


def _safe_fig(make) -> Figure | None:
    try:
        return make()
    except (ValueError, KeyError):
        return None


def repr_html(obj: Any) -> str:
    """A compact HTML table plus an inline PNG of the result's figure (what Jupyter shows)."""
    from .evaluation import Evaluation
    from .masks import HeadMaskResult
    from .search import SearchResult
    from .ships import ShipsResult

    if isinstance(obj, ShipsResult):
        n_p, n_l, n_h = obj.kl.shape
        mean_kl = obj.mean("kl")
        mean_ref = obj.mean("refusal") if obj.refusal is not None else None
        rows = [(r, f"L{la}H{h}", float(mean_kl[la, h])) + ((float(mean_ref[la, h]),) if mean_ref is not None else ())
                for r, (la, h) in enumerate(obj.dataset_top(TOP_ROWS), 1)]
        cols = ["rank", "head", "mean KL"] + (["mean refusal drop"] if mean_ref is not None else [])
        title = f"ShipsResult ({obj.method}): {n_p} prompts × {n_l} layers × {n_h} heads; top heads by mean KL"
        return _html(title, _table(cols, rows), _safe_fig(lambda: ships_plot(obj)), "Ships heatmap")
    if isinstance(obj, SearchResult):
        rows = [(i, f"L{st.chosen[0]}H{st.chosen[1]}", float(st.score), len(st.scores),
                 "" if obj.signed is None or tuple(st.chosen) not in obj.signed else float(obj.signed[tuple(st.chosen)]))
                for i, st in enumerate(obj.steps, 1)]
        objective = (obj.config or {}).get("objective", "subspace")
        title = f"{type(obj).__name__} ({objective}): heads {[f'L{a}H{b}' for a, b in obj.heads]}"
        return _html(title, _table(["step", "chosen", "score", "candidates", "signed effect"], rows),
                     _safe_fig(lambda: search_plot(obj)), "search step heatmap")
    if isinstance(obj, Evaluation):
        rows = [(c.name, c.method, c.k, c.n, c.asr, f"[{c.ci_low:.2f}, {c.ci_high:.2f}]",
                 math.nan if c.mean_log_odds is None else c.mean_log_odds) for c in obj.conditions]
        rows += [(c.name, "over-refusal", c.k, c.n, c.refusal_rate, "", math.nan) for c in obj.over_refusal]
        title = f"Evaluation: {obj.n_prompts} prompts, judge {obj.judge}, mode {obj.mode} (ASR; over-refusal rate)"
        return _html(title, _table(["condition", "method", "k", "n", "ASR / rate", "95% CI", "refusal log-odds"], rows),
                     _safe_fig(lambda: evaluation_plot(obj)), "attack success per condition")
    if isinstance(obj, HeadMaskResult):
        rows = [(r, f"L{la}H{h}", float(obj.theta[la, h]), float(obj.strengths[la, h]))
                for r, (la, h) in enumerate(obj.ranking[:TOP_ROWS], 1)]
        vals = [(v.k, v.refusal_drop, v.harmless_kl) for v in obj.validation]
        table = _table(["rank", "head", "theta", "strength"], rows)
        if vals:
            table += _table(["k (hard top-k)", "refusal drop", "harmless KL"], vals)
        return _html("HeadMaskResult: heads ranked by learned strength", table, _safe_fig(lambda: mask_plot(obj)),
                     "head mask heatmap")
    raise TypeError(f"no HTML view for {type(obj).__name__}")
