"""Figures of a run: Ships and Sahara heatmaps, attack success with intervals, cross-run overlap.

Every function draws on its own :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot,
no display, no global state) and writes a PNG at ``DPI``; the ``*_figure`` functions return the
Figure instead (what the result objects' ``.plot()`` shows, see :mod:`safetyheads.views`). Inputs are the result objects of
:mod:`safetyheads.ships` / :mod:`safetyheads.sahara` or the plain dicts of ``evaluation.json`` and
:func:`safetyheads.compare.compare_runs`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

DPI = 120

#: colour of each kind of condition (by the start of its ``method``)
CATEGORY_COLORS = {
    "baseline": "#7f7f7f",
    "sahara": "#d62728",
    "ships": "#ff7f0e",
    "refusal": "#9467bd",
    "random": "#9ecae1",
    "other": "#2ca02c",
}
CATEGORY_LABELS = {
    "baseline": "baseline (no ablation)",
    "sahara": "Sahara safety heads",
    "ships": "top mean-Ships heads",
    "refusal": "refusal-score heads",
    "random": "random heads (control)",
    "other": "other",
}
METRIC_LABELS = {
    "kl": "mean Ships: KL(unablated ‖ ablated), nats",
    "refusal": "mean drop of refusal log-odds",
}


def category(method: str | None, name: str = "") -> str:
    """Which kind of condition it is, from its ``method`` (``"sahara"``, ``"ships-kl (exact)"`` …) or,
    without one, its ``name`` (``"harmless-sahara-top3"`` → ``"sahara"``)."""
    m = (method or "").lower() or (name or "").lower().removeprefix("harmless-")
    for key in ("baseline", "sahara", "ships", "refusal", "random"):
        if m.startswith(key):
            return key
    return "other"


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# --------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def _as_matrix(x: Any, metric: str) -> tuple[np.ndarray, str | None]:
    """``[L, H]`` float array from a ShipsResult (its mean), a 3-D per-prompt tensor or a 2-D one."""
    method = None
    if hasattr(x, "mean") and hasattr(x, "kl"):  # ShipsResult
        method = getattr(x, "method", None)
        x = x.mean(metric)
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=float)
    if a.ndim == 3:
        with np.errstate(all="ignore"):
            finite = np.isfinite(a)
            a = np.where(finite.any(0), np.nansum(np.where(finite, a, 0.0), 0) / np.maximum(finite.sum(0), 1), np.nan)
    if a.ndim != 2:
        raise ValueError(f"expected a [layers, heads] or [prompts, layers, heads] array, got shape {a.shape}")
    return a, method


def _grid_size(n_layers: int, n_heads: int) -> tuple[float, float]:
    """Figure size: cells ~0.3 in wide, ~0.22 in tall, so a report can show two side by side."""
    width = min(13.0, max(5.8, 0.3 * n_heads + 3.0))
    height = min(11.0, max(3.8, 0.22 * n_layers + 1.9))
    return width, height


def _ticks(ax, n_layers: int, n_heads: int) -> None:
    step_l = 1 if n_layers <= 32 else math.ceil(n_layers / 32)
    step_h = 1 if n_heads <= 32 else math.ceil(n_heads / 32)
    ax.set_yticks(range(0, n_layers, step_l))
    ax.set_xticks(range(0, n_heads, step_h))
    fs = 9 if max(n_layers, n_heads) <= 32 else 7.5
    ax.tick_params(labelsize=fs)
    ax.set_xlabel("head", fontsize=10)
    ax.set_ylabel("layer", fontsize=10)


def _heat(ax, fig, a: np.ndarray, *, signed: bool, cbar_label: str, cmap: str | None = None):
    finite = a[np.isfinite(a)]
    if signed:
        m = float(np.abs(finite).max()) if finite.size else 1.0
        m = m if m > 0 else 1.0
        norm = Normalize(-m, m)
        cm = colormaps[cmap or "RdBu_r"].with_extremes(bad="#d9d9d9")
    else:
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        if lo >= 0 and hi > 0:  # heavy-tailed, non-negative (KL): square-root colour scale
            norm = PowerNorm(0.5, vmin=0.0, vmax=hi)
            cbar_label += " (√ scale)"
        else:
            norm = Normalize(lo, hi if hi > lo else lo + 1.0)
        cm = colormaps[cmap or "viridis"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cm, norm=norm, aspect="auto", interpolation="nearest")
    cax = ax.inset_axes([1.03, 0.0, 0.045, 1.0])  # exactly as tall as the heatmap
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(cbar_label, fontsize=10)
    cb.ax.tick_params(labelsize=9)
    return im


def _mark(ax, layer: int, head: int, text: str, color: str = "#ff1744", lw: float = 2.0) -> None:
    ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor=color, linewidth=lw))
    if text:
        ax.text(head, layer, text, ha="center", va="center", fontsize=9, fontweight="bold", color="white",
                bbox=dict(boxstyle="round,pad=0.12", fc=color, ec="none", alpha=0.9))


def top_cells(a: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` highest finite cells of a 2-D array as ``(layer, head, value)``, best first."""
    flat = np.where(np.isfinite(a), a, -np.inf).ravel()
    order = np.argsort(-flat, kind="stable")[: min(k, flat.size)]
    return [(int(i) // a.shape[1], int(i) % a.shape[1], float(flat[i])) for i in order if np.isfinite(flat[i])]


# --------------------------------------------------------------------------- Ships


def ships_heatmap(ships_result_or_tensor: Any, path: str | Path, metric: str = "kl", title: str | None = None,
                  top: int = 5) -> Path:
    """Write :func:`ships_heatmap_figure` as a PNG at ``path``; returns the path."""
    return _save(ships_heatmap_figure(ships_result_or_tensor, metric=metric, title=title, top=top), path)


def ships_heatmap_figure(ships_result_or_tensor: Any, metric: str = "kl", title: str | None = None,
                         top: int = 5) -> Figure:
    """Layer × head heatmap of the mean Ships score, the ``top`` heads outlined and numbered.

    Args:
        ships_result_or_tensor: a :class:`~safetyheads.ships.ShipsResult` (its mean over prompts of
            ``metric`` is drawn), a ``[prompts, layers, heads]`` tensor (NaN-aware mean) or a
            ``[layers, heads]`` one.
        metric: ``"kl"`` (non-negative, √ colour scale) or ``"refusal"`` (signed, diverging colours).
    """
    a, method = _as_matrix(ships_result_or_tensor, metric)
    n_layers, n_heads = a.shape
    fig = _new_figure(*_grid_size(n_layers, n_heads))
    ax = fig.add_subplot()
    _heat(ax, fig, a, signed=metric == "refusal", cbar_label=METRIC_LABELS.get(metric, metric))
    best = top_cells(a, top)
    for rank, (layer, head, _) in enumerate(best, 1):
        _mark(ax, layer, head, str(rank))
    _ticks(ax, n_layers, n_heads)
    if title is None:
        title = f"Ships ({metric}{', ' + method if method else ''}) — mean over prompts"
    ax.set_title(title, fontsize=11.5)
    if best:
        items = [f"{r}. {head_label(la, h)} ({v:.3g})" for r, (la, h, v) in enumerate(best, 1)]
        caption = "top: " + "   ".join(items[:3]) + ("\n        " + "   ".join(items[3:]) if len(items) > 3 else "")
        ax.annotate(caption, xy=(0, 0), xycoords="axes fraction", xytext=(0, -36), textcoords="offset points",
                    ha="left", va="top", fontsize=9.5)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- Sahara


def sahara_heatmaps(sahara_result: Any, n_layers: int, n_heads: int, dir: str | Path) -> list[Path]:
    """One heatmap per greedy step: each candidate's score for G ∪ {h}, the chosen head outlined.

    Heads already in G are hatched; heads not scored (prefilter) are grey. Files are
    ``dir/sahara_step{i}.png`` (1-based); returns their paths in step order.
    """
    out_dir = Path(dir)
    return [_save(sahara_step_figure(sahara_result, i, n_layers, n_heads), out_dir / f"sahara_step{i}.png")
            for i in range(1, len(sahara_result.steps) + 1)]


def sahara_step_figure(sahara_result: Any, step: int, n_layers: int, n_heads: int, *, name: str = "Sahara",
                       score_label: str = "score of G ∪ {h}: Σ principal angles (rad)") -> Figure:
    """The heatmap of greedy step ``step`` (1-based) of a Sahara / search result (see
    :func:`sahara_heatmaps`); ``name`` and ``score_label`` title it and label its colour bar."""
    if not 1 <= step <= len(sahara_result.steps):
        raise ValueError(f"step must be in 1..{len(sahara_result.steps)}, got {step!r}")
    chosen_before: list[tuple[int, int]] = [tuple(s.chosen) for s in sahara_result.steps[: step - 1]]
    st = sahara_result.steps[step - 1]
    a = st.as_matrix(n_layers, n_heads).double().numpy()
    fig = _new_figure(*_grid_size(n_layers, n_heads))
    ax = fig.add_subplot()
    _heat(ax, fig, a, signed=False, cbar_label=score_label, cmap="magma")
    for layer, head in chosen_before:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, hatch="xx", edgecolor="#444444",
                               linewidth=0.8))
    layer, head = st.chosen
    _mark(ax, layer, head, "★", color="#00c853", lw=2.5)
    _ticks(ax, n_layers, n_heads)
    g = "{" + ", ".join(head_label(*h) for h in chosen_before) + "}" if chosen_before else "∅"
    ax.set_title(f"{name} step {step}: G = {g} + h → chose {head_label(layer, head)} (score {st.score:.4g})",
                 fontsize=10.5)
    handles = [Patch(facecolor="none", edgecolor="#00c853", linewidth=2, label="chosen at this step")]
    if chosen_before:
        handles.append(Patch(facecolor="none", edgecolor="#444444", hatch="xx", label="already in G"))
    if np.isnan(a).sum() > len(chosen_before) + 1:
        handles.append(Patch(facecolor="#d9d9d9", label="not scored (prefilter)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=len(handles), fontsize=8,
              frameon=False)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- evaluation


def _interval(c: dict, value_key: str) -> tuple[float, float, float]:
    v = float(c[value_key])
    lo, hi = c.get("ci_low"), c.get("ci_high")
    if lo is None or hi is None:
        n = int(c.get("n") or 0)
        lo, hi = wilson(round(v * n), n) if n else (v, v)
    return v, max(0.0, v - float(lo)), max(0.0, float(hi) - v)


def _bars(ax, rows: Sequence[dict], value_key: str, ylabel: str, strip: str = "") -> tuple[set[str], float | None]:
    cats = set()
    baseline = None
    for x, c in enumerate(rows):
        v, lo, hi = _interval(c, value_key)
        cat = category(c.get("method"), c.get("name", ""))
        if cat == "baseline" and baseline is None:
            baseline = v
        cats.add(cat)
        ax.bar(x, v, color=CATEGORY_COLORS[cat], edgecolor="#333333" if cat != "random" else "#3182bd",
               hatch="//" if cat == "random" else None, linewidth=0.8, width=0.72, zorder=2)
        ax.errorbar(x, v, yerr=[[lo], [hi]], fmt="none", ecolor="black", capsize=4, linewidth=1.1, zorder=3)
        pa = (c.get("paired") or {}).get("asr") or {}
        star = "*" if pa.get("p_value") is not None and float(pa["p_value"]) < 0.05 else ""  # paired exact McNemar
        ax.text(x, min(1.0, v + hi) + 0.02, f"{v:.2f}{star}", ha="center", va="bottom", fontsize=8.5)
    if baseline is not None:
        ax.axhline(baseline, color="#333333", linestyle="--", linewidth=1.1, zorder=1)
    ns = {c.get("n") for c in rows}
    same_n = len(ns) == 1
    labels = []
    for c in rows:
        label = str(c.get("name", "?"))
        if strip and label.startswith(strip) and len(label) > len(strip):
            label = label[len(strip):]
        labels.append(label if same_n or c.get("n") is None else f"{label} (n={c['n']})")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=30, ha="right", rotation_mode="anchor", fontsize=8.5)
    ax.set_ylim(0, 1.1)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="#e0e0e0", zorder=0)
    ax.set_axisbelow(True)
    if same_n and None not in ns:
        ax.text(0.01, 0.99, f"n = {ns.pop()} prompts each", transform=ax.transAxes, ha="left", va="top", fontsize=8,
                color="#555555")
    return cats, baseline


def asr_bars(evaluation: dict, path: str | Path) -> Path:
    """Write :func:`asr_bars_figure` as a PNG at ``path``; returns the path."""
    return _save(asr_bars_figure(evaluation), path)


def asr_bars_figure(evaluation: dict) -> Figure:
    """Attack success rate per condition with its (Wilson) interval; over-refusal beside it if present.

    Bars are coloured by kind (baseline grey, Sahara red, Ships orange, refusal-score purple);
    random-head controls are pale blue and hatched; the dashed line is the baseline rate.
    """
    def numeric(c: dict, key: str) -> bool:
        try:
            return math.isfinite(float(c.get(key)))
        except (TypeError, ValueError):
            return False

    conds = [c for c in evaluation.get("conditions") or [] if numeric(c, "asr")]
    over = [c for c in evaluation.get("over_refusal") or [] if numeric(c, "rate")]
    if not conds and not over:
        raise ValueError("evaluation has no conditions to plot")
    width = 2.0 + 0.8 * len(conds) + (1.0 + 0.8 * len(over) if over else 0)
    fig = _new_figure(min(16.0, max(7.0, width)), 4.6)
    ratios = ([max(len(conds), 1)] if conds else []) + ([max(len(over), 1) + 0.5] if over else [])
    gs = fig.add_gridspec(1, len(ratios), width_ratios=ratios, wspace=0.3)
    cats: set[str] = set()
    baselines = []
    if conds:
        ax = fig.add_subplot(gs[0])
        c, b = _bars(ax, conds, "asr", "attack success rate")
        cats |= c
        if b is not None:
            baselines.append(f"baseline ASR {b:.2f}")
        judge = evaluation.get("judge")
        ax.set_title("Attack success on harmful prompts" + (f"\n(judge: {judge})" if judge else ""), fontsize=10.5)
    if over:
        ax2 = fig.add_subplot(gs[-1])
        c, b = _bars(ax2, over, "rate", "refusal rate", strip="harmless-")
        cats |= c
        if b is not None:
            baselines.append(f"baseline over-refusal {b:.2f}")
        ax2.set_title("Over-refusal on harmless prompts\n(lower is better)", fontsize=10.5)
    order = [c for c in CATEGORY_COLORS if c in cats]
    handles = [Patch(facecolor=CATEGORY_COLORS[c], edgecolor="#3182bd" if c == "random" else "#333333",
                     hatch="//" if c == "random" else None, label=CATEGORY_LABELS[c]) for c in order]
    for b in baselines:
        handles.append(Line2D([], [], color="#333333", linestyle="--", label=b))
    handles.append(Line2D([], [], color="black", marker="_", markersize=10, linestyle="none",
                          label="error bars: 95 % Wilson interval"))
    if any(((c.get("paired") or {}).get("asr") or {}).get("p_value") is not None for c in conds):
        handles.append(Line2D([], [], linestyle="none", label="* paired exact McNemar p < 0.05 vs baseline"))
    last = fig.axes[-1]
    last.legend(handles=handles, loc="center left", bbox_to_anchor=(1.03, 0.5), fontsize=8.5, frameon=False)
    return fig


# --------------------------------------------------------------------------- comparison


def overlap_plot(comparison: dict, path: str | Path) -> Path:
    """Cross-run overlap (from :func:`safetyheads.compare.compare_runs`).

    Left: where each run's Sahara heads (★) and top-k mean-Ships heads (●) sit in relative depth
    (layer / n_layers), one row per run, so models of different size can be read together. Right:
    per pair of runs, the Jaccard overlap of Sahara heads and of top-k Ships heads and the Spearman
    correlation of mean Ships — over heads when the grids match, over relative-depth bins when not
    (pairs compared by depth are marked "depth").
    """
    runs = comparison.get("runs") or []
    pairs = comparison.get("pairs") or []
    k = comparison.get("k")
    fig = _new_figure(13.0, max(3.8, 1.0 + 0.75 * len(runs)))
    gs = fig.add_gridspec(1, 2, width_ratios=[1.15, 1.0], wspace=0.3)
    ax = fig.add_subplot(gs[0])
    for row, r in enumerate(runs):
        n_layers = r.get("n_layers") or 1
        ships_top = [tuple(h) for h in r.get("ships_top") or []]
        sahara_heads = [tuple(h) for h in r.get("sahara_heads") or []]
        if ships_top:
            xs = [(la + 0.5) / n_layers for la, _ in ships_top]
            ax.scatter(xs, [row - 0.22] * len(xs), s=34, color="#ff7f0e", alpha=0.6, edgecolor="#7f3f00", zorder=3,
                       label=f"top-{k} mean-Ships heads" if row == 0 else None)
        if sahara_heads:
            xs = [(la + 0.5) / n_layers for la, _ in sahara_heads]
            ax.scatter(xs, [row + 0.05] * len(xs), s=130, marker="*", color="#d62728", edgecolor="#5a0000", zorder=4,
                       label="Sahara heads" if row == 0 else None)
            for (la, h), x in zip(sahara_heads, xs):
                ax.annotate(head_label(la, h), (x, row + 0.05), xytext=(0, -8), textcoords="offset points",
                            ha="center", va="top", fontsize=7.5, color="#5a0000")
    ax.set_yticks(range(len(runs)))
    ax.set_yticklabels([f"{r.get('name')}\n{r.get('n_layers')}×{r.get('n_heads')}" for r in runs], fontsize=8.5)
    ax.set_ylim(len(runs) - 0.45, -0.55)
    ax.set_xlim(-0.04, 1.04)
    ax.set_xlabel("relative depth (layer + ½) / n_layers")
    ax.set_title("Where each run's heads are", fontsize=11)
    ax.grid(axis="x", color="#e0e0e0")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8.5, frameon=False)

    ax2 = fig.add_subplot(gs[1])
    metrics = [("sahara_jaccard", "Sahara Jaccard", "#d62728"), ("ships_topk_jaccard", f"top-{k} Ships Jaccard", "#ff7f0e"),
               ("ships_spearman", "Spearman ρ (mean Ships)", "#1f77b4")]
    width = 0.26
    for j, (key, label, color) in enumerate(metrics):
        for i, p in enumerate(pairs):
            v = p.get(key)
            x = i + (j - 1) * width
            if v is None or (isinstance(v, float) and math.isnan(v)):
                ax2.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="#777777")
                continue
            ax2.bar(x, v, width=width, color=color, label=label if i == 0 else None, zorder=2)
            ax2.text(x, v + (0.02 if v >= 0 else -0.02), f"{v:.2f}", ha="center", va="bottom" if v >= 0 else "top",
                     fontsize=7.5)
    ax2.axhline(0, color="#333333", linewidth=0.8)
    ax2.set_xticks(range(len(pairs)))
    ax2.set_xticklabels([f"{p['a']}\nvs {p['b']}" + ("\n(depth)" if p.get("basis") == "relative-depth" else "")
                         for p in pairs], fontsize=8)
    lo = min([0.0] + [p.get("ships_spearman") or 0.0 for p in pairs])
    ax2.set_ylim(min(-0.1, lo - 0.15), 1.12)
    ax2.set_xlim(-0.6, max(len(pairs), 1) - 0.4)
    ax2.set_title("Overlap per pair of runs", fontsize=11)
    ax2.grid(axis="y", color="#e0e0e0", zorder=0)
    ax2.set_axisbelow(True)
    if pairs:
        ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=8.5, frameon=False)
    return _save(fig, path)
