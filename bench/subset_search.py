"""Which ``--size`` of a method's top ``--k`` heads matter together? Every subset of that size is scored on
the attribution prompts of a ``methods_bench.py`` folder (``search.group_scores``: ``--objective asr`` —
the rise of the judged attack success of greedy answers, ties broken by the refusal log-odds drop — or
``refusal``), and the best subset is judged on the folder's held-out prompts, against the same prompts
unablated (exact McNemar) and against layer-matched random heads.

A greedy search adds one head at a time and cannot see heads that matter only together
(``bench/head_interaction.py`` measures that); an exhaustive pass over the subsets of a short list can.
The held-out prompts play no part in the choice.

Example::

    python bench/subset_search.py /work/runs/methods-1.5b-zero-k50 --method refusal-grad --k 8 --size 5 \\
        --out bench/results/subset_search_1.5b_zero.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time

import torch
from methods_folder import (  # bench/
    condition_row,
    folder_parser,
    head_labels,
    load_folder,
    method_heads,
    reuse_responses,
)
from speed_common import finish

from safetyheads.evaluate import evaluate_conditions
from safetyheads.models import load_model
from safetyheads.provenance import atomic_write_text
from safetyheads.search import group_scores
from safetyheads.stats import layer_matched_random_heads, random_control_seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = folder_parser(__doc__, method="refusal-grad", k_help="the short list: the method's top k")
    p.add_argument("--size", type=int, default=5, help="heads per subset")
    p.add_argument("--objective", default="asr", choices=["asr", "refusal"])
    p.add_argument("--random-draws", type=int, default=5)
    a = p.parse_args(argv)
    if not 1 <= a.size < a.k:
        p.error("--size must be between 1 and k - 1")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg, prompts = load_folder(a.folder)
    rt = json.loads((a.folder / "refusal_tokens.json").read_text())["tokens"]
    short = method_heads(a.folder, a.method, a.k)
    subsets = [[list(h) for h in c] for c in itertools.combinations(short, a.size)]
    out = a.folder / f"subsets-{a.method}-{a.size}of{a.k}-{a.objective}"
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(cfg["model"], dtype=getattr(torch, cfg["dtype"]))
    common = dict(mode=cfg["mode"], eps=cfg["eps"], prompt_format=cfg["prompt_format"])

    scores_path = out / "scores.json"  # the expensive part, kept for a rerun
    rec = json.loads(scores_path.read_text()) if scores_path.exists() else None
    if rec is None or rec["subsets"] != subsets:
        t0 = time.perf_counter()
        vals = group_scores(model, tok, prompts["attribution"], subsets, objective=a.objective, refusal_tokens=rt,
                            judge=cfg["judge"], max_new_tokens=cfg["max_new_tokens"], batch_size=a.batch_size,
                            progress=True, **common)
        rec = {"subsets": subsets, "scores": vals, "seconds": time.perf_counter() - t0}
        atomic_write_text(scores_path, json.dumps(rec))
    ranked = sorted(zip(rec["scores"], rec["subsets"]), key=lambda t: (-t[0], t[1]))
    best = [tuple(h) for h in ranked[0][1]]
    top_rank = [tuple(h) for h in short[:a.size]]
    top_score = rec["scores"][rec["subsets"].index([list(h) for h in top_rank])]

    name = f"{a.method}-best{a.size}of{a.k}"
    conds = [{"name": "baseline", "method": "baseline", "k": 0, "heads": []},
             {"name": f"{a.method}-top{a.size}", "method": a.method, "k": a.size, "heads": top_rank},
             {"name": name, "method": "subset-search", "k": a.size, "heads": best}]
    if best == top_rank:
        conds.pop()
    seed = a.size * 1000 + a.k
    draws = layer_matched_random_heads(model, best, a.random_draws, seed=seed, exclude=short)
    conds += [{"name": f"random{i}-{name}", "method": "random", "k": a.size, "heads": d,
               "seed": random_control_seed(seed, i), "control_for": conds[-1]["name"]} for i, d in enumerate(draws)]
    reuse_responses(a.folder, out, [c["name"] for c in conds[:2]])  # the unablated and top-size responses
    ev = evaluate_conditions(model, tok, prompts["eval"], conds, out_dir=out, judge=cfg["judge"],
                             max_new_tokens=cfg["max_new_tokens"], batch_size=a.batch_size, refusal_metric=False,
                             random_kind="layer-matched", progress=True, **common)
    by = {c.name: c for c in ev.conditions}
    base = by["baseline"]
    chosen = [condition_row(by[c["name"]], base) for c in conds[1:] if c["method"] != "random"]
    rand = [by[c["name"]].asr for c in conds if c["method"] == "random"]
    n_attr = len(prompts["attribution"])
    record = {"folder": str(a.folder), "method": a.method, "k": a.k, "size": a.size, "objective": a.objective,
              "short_list": [list(h) for h in short], "n_subsets": len(subsets), "scoring_seconds": rec["seconds"],
              "attribution_scores": {"best": ranked[0][0], "top_rank": top_score,
                                     "best_10": [[s, hs] for s, hs in ranked[:10]]},
              "baseline_asr": base.asr, "rows": chosen, "random": rand, "config": cfg}

    what = ("rise of the judged attack success (+ 0.4/N · tanh of the refusal log-odds drop)" if a.objective == "asr"
            else "mean drop of the refusal log-odds")
    lines = [f"# The best {a.size} of a method's top {a.k}, scored together — {cfg['model']}", "",
             f"`{a.folder}`: all {len(subsets)} subsets of {a.size} of {a.method}'s top {a.k} ({head_labels(short)}) scored "
             f"on the {n_attr} attribution prompts ({what}; {cfg['mode'].upper()} ablation, greedy "
             f"{cfg['max_new_tokens']} new tokens, judge `{cfg['judge']}`; {rec['seconds'] / 60:.1f} min). The best "
             f"subset and the method's own top {a.size} judged on the {len(prompts['eval'])} held-out prompts "
             f"(unablated ASR **{base.asr:.2f}**); exact McNemar against the same prompts unablated.", "",
             "| heads ablated | heads | attribution score | held-out ASR (Δ) | McNemar p |", "|---|---|---|---|---|"]
    for r in chosen:
        own = r["name"] == conds[1]["name"]  # the method's own top size, else the best subset
        label = f"{a.method} top {a.size}" if own else f"best {a.size} of top {a.k}"
        sc = top_score if own else ranked[0][0]
        p = "—" if r["p_mcnemar"] is None else f"{r['p_mcnemar']:.2g}"
        lines.append(f"| {label} | {head_labels(r['heads'])} | {sc:+.3f} | {r['asr']:.2f} ({r['delta']:+.2f}) | {p} |")
    if rand:
        lines.append(f"| layer-matched random ({len(rand)} draws, layers of the best subset) | | | "
                     f"{statistics.fmean(rand):.2f} (min {min(rand):.2f}, max {max(rand):.2f}; max Δ "
                     f"{max(rand) - base.asr:+.2f}) | |")
    ties = sum(1 for s, _ in ranked if math.isclose(s, ranked[0][0], abs_tol=1e-12))
    lines += ["", f"The ten best subsets on the attribution prompts ({ties} at the best score):", "",
              "| score | heads |", "|---|---|"]
    lines += [f"| {s:+.3f} | {head_labels(h)} |" for s, h in ranked[:10]]
    finish(lines, a.out, record)


if __name__ == "__main__":
    main()
