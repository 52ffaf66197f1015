"""Do a method's heads break refusal one by one, or only together? For a ``methods_bench.py`` folder and
one of its head sets (``--method``, ``--k``), the held-out attack success of its first ``--split`` heads, of
the remaining heads alone, and of all ``k``, against the same prompts unablated.

If the heads acted independently, the prompts all ``k`` heads flip would be about the prompts either part
flips. Prompts that only the whole set flips (refused with either part ablated, answered with both) are
what a backup does: heads that matter only once the others are gone. The table counts them per prompt
and tests the whole set against the union of its parts (exact McNemar on the discordant prompts: flipped
by the whole set and by neither part, vs flipped by a part and not by the whole set).

The folder's unablated and top-k responses are reused when their settings match (the evaluation checks
model, prompts, ablation and generation settings); only the remaining heads' condition is generated.

Example::

    python bench/head_interaction.py /work/runs/methods-0.5b-zero --method refusal-search --k 8 --split 5 \\
        --out bench/results/interaction_0.5b_zero.md
"""

from __future__ import annotations

import argparse

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
from safetyheads.stats import mcnemar_exact


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = folder_parser(__doc__, method="refusal-search", k_help="the head set: the method's top k")
    p.add_argument("--split", type=int, default=5, help="the first part: its first SPLIT heads; the rest: the others")
    a = p.parse_args(argv)
    if not 1 <= a.split < a.k:
        p.error("--split must be between 1 and k - 1")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg, sets = load_folder(a.folder)
    prompts = sets["eval"]
    heads = method_heads(a.folder, a.method, a.k)
    first, rest = heads[:a.split], heads[a.split:]
    name = {"all": f"{a.method}-top{a.k}", "first": f"{a.method}-top{a.split}",
            "rest": f"{a.method}-heads{a.split + 1}to{a.k}"}
    conds = [{"name": "baseline", "method": "baseline", "k": 0, "heads": []},
             {"name": name["first"], "method": a.method, "k": len(first), "heads": first},
             {"name": name["rest"], "method": a.method, "k": len(rest), "heads": rest},
             {"name": name["all"], "method": a.method, "k": a.k, "heads": heads}]
    out = a.folder / f"interaction-{a.method}-{a.split}of{a.k}"
    reuse_responses(a.folder, out, ["baseline", name["first"], name["all"]])

    model, tok = load_model(cfg["model"], dtype=getattr(torch, cfg["dtype"]))
    ev = evaluate_conditions(model, tok, prompts, conds, out_dir=out, judge=cfg["judge"],
                             max_new_tokens=cfg["max_new_tokens"], batch_size=a.batch_size, mode=cfg["mode"],
                             eps=cfg["eps"], prompt_format=cfg["prompt_format"], refusal_metric=False, progress=True)
    by = {c.name: c for c in ev.conditions}
    base = by["baseline"]
    comply = {key: [not r for r in by[n].refusals] for key, n in name.items()}
    comply["baseline"] = [not r for r in base.refusals]
    flip = {key: [c and not b for c, b in zip(comply[key], comply["baseline"])] for key in name}
    union = [f or r for f, r in zip(flip["first"], flip["rest"])]
    only_all = sum(x and not u for x, u in zip(flip["all"], union))  # flipped by the whole set, by neither part
    only_part = sum(u and not x for x, u in zip(flip["all"], union))  # flipped by a part, not by the whole set
    rows = []
    for key in ("first", "rest", "all"):
        rows.append({"part": key, **condition_row(by[name[key]], base),
                     "flips": [sum(flip[key]), sum(b and not c_ for c_, b in zip(comply[key], comply["baseline"]))]})
    n = len(prompts)
    additive = rows[0]["delta"] + rows[1]["delta"]
    record = {"folder": str(a.folder), "method": a.method, "k": a.k, "split": a.split, "n": n,
              "baseline_asr": base.asr, "rows": rows, "sum_of_parts_delta": additive,
              "union_of_part_flips": sum(union), "flipped_only_by_all": only_all, "flipped_only_by_a_part": only_part,
              "p_all_vs_union": mcnemar_exact(only_all, only_part), "config": cfg}

    hs = {key: head_labels(r["heads"]) for key, r in zip(("first", "rest", "all"), rows)}
    lines = [f"# Heads alone and together — {cfg['model']}", "",
             f"{n} held-out prompts of `{a.folder}` ({cfg['prompt_format']} format, {cfg['mode'].upper()} "
             f"ablation, greedy {cfg['max_new_tokens']} new tokens, judge `{cfg['judge']}`), unablated ASR "
             f"**{base.asr:.2f}**. {a.method}'s top {a.k}, split after head {a.split}. Exact McNemar against the "
             "same prompts unablated; flips: refused → answered / answered → refused.", "",
             "| heads ablated | heads | ASR (Δ) | McNemar p | flips ↑ / ↓ |", "|---|---|---|---|---|"]
    labels = {"first": f"first {a.split}", "rest": f"heads {a.split + 1}–{a.k} alone", "all": f"all {a.k}"}
    for key, r in zip(("first", "rest", "all"), rows):
        p = "—" if r["p_mcnemar"] is None else f"{r['p_mcnemar']:.2g}"
        lines.append(f"| {labels[key]} | {hs[key]} | {r['asr']:.2f} ({r['delta']:+.2f}) | {p} | "
                     f"{r['flips'][0]} / {r['flips'][1]} |")
    lines += ["", f"Sum of the two parts' rises: {additive:+.2f}; the whole set's: {rows[2]['delta']:+.2f}. "
              f"Prompts flipped by either part: {sum(union)}; by the whole set: {rows[2]['flips'][0]}, of which "
              f"**{only_all} by neither part alone**, while {only_part} flipped by a part are not flipped by the "
              f"whole set (exact McNemar, whole set vs union of parts: p = {record['p_all_vs_union']:.2g})."]
    finish(lines, a.out, record)


if __name__ == "__main__":
    main()
