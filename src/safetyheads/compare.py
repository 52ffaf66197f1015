"""Do two runs find the same safety heads? Overlap of Sahara heads and Ships rankings across runs.

The paper's "models fine-tuned from the same base share safety heads" as a command: for every pair
of run folders, the Jaccard overlap of their Sahara heads, the Jaccard overlap of their top-k
mean-Ships heads, and the Spearman rank correlation of their mean Ships scores.

Heads are compared by identity ``(layer, head)`` only when both runs have the same grid
(``n_layers × n_heads``: the same model, or fine-tunes of one base). Models of different size in
one family (Qwen2.5-Coder 0.5B: 24×14, 1.5B: 28×12) have no head-to-head correspondence, so
those pairs are compared on *relative depth*: each head's layer maps to bin
``floor(layer · B / n_layers)`` with ``B = min(n_layers_a, n_layers_b)``; Jaccard is then over the
multisets of bins the heads fall in, and Spearman is over the per-bin profile of the layers'
highest mean Ships. Every pair says which it was (``basis``, ``compared``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .provenance import atomic_write_text
from .report import RunData, load_run

Head = tuple[int, int]


class NotARunError(ValueError):
    """A folder given to compare holds no run (no config.json and no Ships, Sahara or evaluation result)."""


# --------------------------------------------------------------------------- measures


def jaccard(a: Iterable, b: Iterable) -> float | None:
    """|A ∩ B| / |A ∪ B| of two sets; None when both are empty (undefined)."""
    a, b = set(a), set(b)
    if not a and not b:
        return None
    return len(a & b) / len(a | b)


def multiset_jaccard(a: Iterable, b: Iterable) -> float | None:
    """Σ min(count) / Σ max(count) of two multisets (equals :func:`jaccard` for sets)."""
    ca, cb = Counter(a), Counter(b)
    union = sum((ca | cb).values())
    if union == 0:
        return None
    return sum((ca & cb).values()) / union


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, int]:
    """Spearman ρ over the positions finite in both (ties averaged) and how many there were.

    None when fewer than 3 such positions or when either side is constant there.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3:
        return None, n
    rx, ry = _rank(x[ok]), _rank(y[ok])
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    if denom == 0:
        return None, n
    return float(np.clip((rx * ry).sum() / denom, -1.0, 1.0)), n


def depth_bin(layer: int, n_layers: int, n_bins: int) -> int:
    """The relative-depth bin of ``layer``: ``floor(layer · n_bins / n_layers)``."""
    return min(n_bins - 1, (layer * n_bins) // n_layers)


def depth_profile(mean: np.ndarray, n_bins: int) -> np.ndarray:
    """Per relative-depth bin, the mean over its layers of each layer's highest head score."""
    n_layers = mean.shape[0]
    with np.errstate(all="ignore"):
        per_layer = np.array([np.nanmax(row) if np.isfinite(row).any() else np.nan for row in mean])
    out = np.full(n_bins, np.nan)
    for b in range(n_bins):
        vals = [per_layer[la] for la in range(n_layers) if depth_bin(la, n_layers, n_bins) == b]
        vals = [v for v in vals if np.isfinite(v)]
        if vals:
            out[b] = float(np.mean(vals))
    return out


# --------------------------------------------------------------------------- per run


def _ships_choice(run: RunData, ships: str):
    """(ShipsResult or None, description) by preference ``"auto"``, ``"exact"``, ``"estimate"``.

    ``"auto"``: the exact scores unless the estimate covers more prompts (a default run scores one
    prompt exactly, as a check, and all attribution prompts by the estimate: a dataset-level
    comparison wants the latter)."""
    if ships not in ("auto", "exact", "estimate"):
        raise ValueError(f"ships must be 'auto', 'exact' or 'estimate', got {ships!r}")
    order = {"auto": ("exact", "estimate"), "exact": ("exact",), "estimate": ("estimate",)}[ships]
    if ships == "auto" and run.ships is not None and run.ships_estimate is not None \
            and len(run.ships_estimate.prompts) > len(run.ships.prompts):
        order = ("estimate", "exact")
    for which in order:
        res = run.ships if which == "exact" else run.ships_estimate
        if res is not None:
            stem = "ships" if which == "exact" else "ships_estimate"
            return res, f"{stem} ({res.method}, {len(res.prompts)} prompts)"
    return None, "not run"


def _summarise(run: RunData, k: int, metric: str, ships: str) -> dict[str, Any]:
    res, source = _ships_choice(run, ships)
    mean = None
    top: list[Head] = []
    notes = []
    if res is not None:
        try:
            mean = res.mean(metric).double().numpy()
            finite = int(np.isfinite(mean).sum())
            top = [tuple(h) for h in res.dataset_top(min(k, finite), metric)] if finite else []
        except ValueError as e:  # e.g. no refusal scores in this result
            notes.append(f"Ships {metric}: {e}")
            mean, source = None, f"no {metric} scores"
    grid = run.grid
    sahara = [tuple(h) for h in run.sahara.heads] if run.sahara is not None else None

    def depth(heads) -> float | None:  # mean relative depth (layer + ½) / n_layers, in [0, 1]
        return None if not heads or not grid else float(np.mean([(h[0] + 0.5) / grid[0] for h in heads]))

    return {
        "summary": {
            "name": run.name, "path": str(run.path), "model": run.model, "dataset": run.dataset,
            "prompt_format": run.prompt_format, "mode": run.mode,
            "n_layers": grid[0] if grid else None, "n_heads": grid[1] if grid else None,
            "sahara_heads": [list(h) for h in sahara] if sahara is not None else None,
            "ships_source": source, "ships_top": [list(h) for h in top], "notes": notes + run.errors,
            "sahara_depth": depth(sahara), "ships_top_depth": depth(top),
        },
        "mean": mean, "top": top, "sahara": sahara,
        "grid": grid,
    }


def _fmt(h: Head) -> str:
    return f"L{h[0]}H{h[1]}"


def _compare_pair(a: dict, b: dict, k: int) -> dict[str, Any]:
    sa, sb = a["summary"], b["summary"]
    out: dict[str, Any] = {"a": sa["name"], "b": sb["name"], "grid_a": a["grid"], "grid_b": b["grid"]}
    notes = []
    same = a["grid"] is not None and a["grid"] == b["grid"]
    out["same_grid"] = same
    if a["grid"] is None or b["grid"] is None:
        notes.append("head grid unknown for " + " and ".join(s["name"] for s, r in ((sa, a), (sb, b)) if r["grid"] is None))
    for side, r in (("a", a), ("b", b)):
        if r["sahara"] is None:
            notes.append(f"Sahara not run in {out[side]}")
        if r["mean"] is None:
            notes.append(f"Ships not run in {out[side]}")

    # heads basis (same grid only)
    heads: dict[str, Any] = {}
    if same:
        if a["sahara"] is not None and b["sahara"] is not None:
            heads["sahara_jaccard"] = jaccard(a["sahara"], b["sahara"])
            heads["sahara_shared"] = [list(h) for h in sorted(set(a["sahara"]) & set(b["sahara"]))]
        if a["mean"] is not None and b["mean"] is not None:
            heads["ships_topk_jaccard"] = jaccard(a["top"], b["top"])
            heads["ships_topk_shared"] = [list(h) for h in sorted(set(a["top"]) & set(b["top"]))]
            heads["ships_spearman"], heads["spearman_n"] = spearman(a["mean"], b["mean"])

    # relative-depth basis (always computed when both grids are known)
    depth: dict[str, Any] = {}
    if a["grid"] is not None and b["grid"] is not None:
        n_bins = min(a["grid"][0], b["grid"][0])
        depth["bins"] = n_bins

        def bins(hs: list[Head], grid) -> list[int]:
            return [depth_bin(h[0], grid[0], n_bins) for h in hs]

        if a["sahara"] is not None and b["sahara"] is not None:
            depth["sahara_jaccard"] = multiset_jaccard(bins(a["sahara"], a["grid"]), bins(b["sahara"], b["grid"]))
            depth["sahara_bins"] = [bins(a["sahara"], a["grid"]), bins(b["sahara"], b["grid"])]
            depth["sahara_shared_bins"] = sorted(set(depth["sahara_bins"][0]) & set(depth["sahara_bins"][1]))
        if a["mean"] is not None and b["mean"] is not None:
            depth["ships_topk_jaccard"] = multiset_jaccard(bins(a["top"], a["grid"]), bins(b["top"], b["grid"]))
            depth["ships_spearman"], depth["spearman_n"] = spearman(depth_profile(a["mean"], n_bins),
                                                                    depth_profile(b["mean"], n_bins))
    out["heads"] = heads if same else None
    out["depth"] = depth or None

    primary = heads if same else depth
    out["basis"] = "heads" if same else "relative-depth"
    for key in ("sahara_jaccard", "ships_topk_jaccard", "ships_spearman", "spearman_n"):
        out[key] = primary.get(key)
    out["sahara_shared"] = primary.get("sahara_shared") if same else None
    out["ships_topk_shared"] = primary.get("ships_topk_shared") if same else None
    if same:
        L, H = a["grid"]
        out["compared"] = (f"same grid {L}×{H}: heads compared by identity (layer, head); Jaccard of Sahara heads "
                           f"and of top-{k} mean-Ships heads; Spearman over the {heads.get('spearman_n', 0)} heads "
                           "scored in both")
    elif depth:
        out["compared"] = (f"different grids {a['grid'][0]}×{a['grid'][1]} vs {b['grid'][0]}×{b['grid'][1]}: no "
                           f"head-to-head correspondence, so relative depth: layers mapped to {depth['bins']} bins "
                           f"(floor(layer·{depth['bins']}/n_layers)); Jaccard over the multisets of bins of the Sahara "
                           f"heads and of the top-{k} mean-Ships heads; Spearman over the per-bin profile of each "
                           "layer's highest mean Ships")
    else:
        out["compared"] = "nothing: a head grid is unknown"
    if sa.get("ships_source", "").split(" ")[0] != sb.get("ships_source", "").split(" ")[0]:
        notes.append(f"Ships sources differ: {sa['ships_source']} vs {sb['ships_source']}")
    out["notes"] = notes
    return out


def _unique_names(runs: list[RunData]) -> None:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return
    for r in runs:  # same folder names under different parents: use more of the path
        parts = Path(r.path).resolve().parts
        r.name = "/".join(parts[-2:])
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        for i, r in enumerate(runs):
            r.name = f"{r.name}#{i}"


def compare_runs(run_dirs: Sequence[str | Path], k: int = 10, *, metric: str = "kl", ships: str = "auto") -> dict:
    """Overlap of the safety heads of every pair of runs.

    Args:
        run_dirs: two or more run folders.
        k: how many top mean-Ships heads to compare.
        metric: the Ships score ranked (``"kl"`` or ``"refusal"``).
        ships: which Ships result of a run: ``"auto"`` (exact ``ships.*``, else ``ships_estimate.*``),
            ``"exact"`` or ``"estimate"``.
    Raises:
        NotARunError: a folder holds no run.
    Returns:
        ``{"k", "metric", "runs": [per-run summary], "pairs": [per-pair measures]}``; each pair has
        ``basis`` (``"heads"`` or ``"relative-depth"``), ``compared`` (in words), ``sahara_jaccard``,
        ``ships_topk_jaccard``, ``ships_spearman`` (None where not computable), and the measures on
        both bases under ``heads`` / ``depth``.
    """
    if len(run_dirs) < 2:
        raise ValueError("compare_runs needs at least two run folders")
    if k < 1:
        raise ValueError("k must be >= 1")
    runs = [load_run(d) for d in run_dirs]
    for r in runs:
        if r.config_file is None and all(x is None for x in (r.ships, r.ships_estimate, r.sahara, r.evaluation)):
            raise NotARunError(f"{r.path} is not a safetyheads run folder: it has no config.json and no Ships, "
                               "Sahara or evaluation result" + (f" ({'; '.join(r.errors)})" if r.errors else ""))
    _unique_names(runs)
    data = [_summarise(r, k, metric, ships) for r in runs]
    pairs = [_compare_pair(data[i], data[j], k) for i in range(len(data)) for j in range(i + 1, len(data))]
    return {"k": k, "metric": metric, "ships": ships, "runs": [d["summary"] for d in data], "pairs": pairs}


# --------------------------------------------------------------------------- output


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _heads_md(hs) -> str:
    if hs is None:
        return "not run"
    return ", ".join(_fmt(h) for h in hs) or "—"


def to_markdown(comparison: dict) -> str:
    """The comparison as markdown: runs, a table of pairs, and what each pair compared."""
    k = comparison["k"]
    lines = ["# Safety-head overlap between runs", "",
             "| run | model | grid | dataset | prompt format | mode | Sahara heads | Ships used | "
             f"relative depth: Sahara / top-{k} Ships |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in comparison["runs"]:
        grid = f"{r['n_layers']}×{r['n_heads']}" if r["n_layers"] else "?"
        depth = f"{_num(r.get('sahara_depth'))} / {_num(r.get('ships_top_depth'))}"
        lines.append(f"| {r['name']} | {r['model']} | {grid} | {r['dataset']} | {r['prompt_format']} | {r['mode']} | "
                     f"{_heads_md(r['sahara_heads'])} | {r['ships_source']} | {depth} |")
    lines += ["", f"| run A | run B | compared on | Sahara Jaccard | top-{k} Ships Jaccard | Spearman ρ (mean Ships) | "
                  "shared heads |", "|---|---|---|---|---|---|---|"]
    for p in comparison["pairs"]:
        basis = "heads" if p["basis"] == "heads" else f"relative depth ({(p.get('depth') or {}).get('bins', '?')} bins)"
        shared = []
        if p.get("sahara_shared"):
            shared.append("Sahara: " + _heads_md(p["sahara_shared"]))
        if p.get("ships_topk_shared"):
            shared.append("Ships: " + _heads_md(p["ships_topk_shared"]))
        if p["basis"] != "heads" and (p.get("depth") or {}).get("sahara_shared_bins"):
            shared.append("Sahara depth bins: " + ", ".join(map(str, p["depth"]["sahara_shared_bins"])))
        rho = _num(p["ships_spearman"]) + (f" (n={p['spearman_n']})" if p.get("spearman_n") else "")
        lines.append(f"| {p['a']} | {p['b']} | {basis} | {_num(p['sahara_jaccard'])} | {_num(p['ships_topk_jaccard'])} | "
                     f"{rho} | {'; '.join(shared) or '—'} |")
    lines += ["", "What was compared:", "",
              "- relative depth: mean (layer + ½) / layers of a run's heads (0 = first layer, 1 = last)."]
    for p in comparison["pairs"]:
        lines.append(f"- **{p['a']} vs {p['b']}**: {p['compared']}.")
        for n in p["notes"]:
            lines.append(f"  - note: {n}")
    lines.append("")
    return "\n".join(lines)


def write_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path, k: int = 10, *, metric: str = "kl",
                     ships: str = "auto") -> Path:
    """Write ``compare.json``, ``compare.md`` and ``compare.png`` into ``out_dir``; returns ``out_dir``."""
    from .plots import overlap_plot

    out = Path(out_dir)
    result = compare_runs(run_dirs, k, metric=metric, ships=ships)  # bad input: nothing written
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2))
    atomic_write_text(out / "compare.md", to_markdown(result))
    overlap_plot(result, out / "compare.png")
    return out
