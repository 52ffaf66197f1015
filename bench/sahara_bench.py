"""Sahara speed: exhaustive greedy search vs prefiltered ("estimate", "exact-subset"), one run.

    python bench/sahara_bench.py                               # 32 prompts, 3 steps, exhaustive step 1
    python bench/sahara_bench.py --prompts 16 --exhaustive-steps 0   # prefiltered runs only
    python bench/sahara_bench.py --exhaustive-steps 3          # the full exhaustive search (hours on CPU)

For each prefilter it times ``sahara(..., prefilter=P, prefilter_k=K, steps=S)`` end to end (the
prefilter included) and reports the heads picked and their scores. The exhaustive search (every head
at every step, the paper's procedure) costs ``L·H`` candidate evaluations per step; ``--exhaustive-steps
1`` runs only its first step — enough to check whether the prefiltered runs pick the same first head —
and the measured cost per candidate gives the exhaustive cost of more steps.

Target (issue): prefiltered 3 steps on 32 prompts in at most 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import safetyheads as sh
from safetyheads.datasets import load_prompts


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=32, help="AdvBench prompts (seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-format", default="chat")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--preset", default="official", help="official (rank 1) or paper (rank 3)")
    ap.add_argument("--prefilters", default="estimate,exact-subset")
    ap.add_argument("--prefilter-k", type=int, default=24)
    ap.add_argument("--exhaustive-steps", type=int, default=1, help="0: skip the exhaustive search")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)

    from safetyheads.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    g = sh.head_geometry(model)
    n_all = g.n_layers * g.n_heads
    prompts = list(load_prompts("advbench", n=args.prompts, seed=args.seed))
    log(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s: {g.n_layers}×{g.n_heads} heads, "
        f"{len(prompts)} prompts, torch threads {torch.get_num_threads()}")
    kw = dict(prompt_format=args.prompt_format, preset=args.preset, batch_size=args.batch_size, progress=False)

    runs = []
    for pf in [p for p in args.prefilters.split(",") if p]:
        t = time.perf_counter()
        res = sh.sahara(model, tok, prompts, steps=args.steps, prefilter=pf, prefilter_k=args.prefilter_k, **kw)
        dt = time.perf_counter() - t
        runs.append({"name": f"prefilter={pf}, k={args.prefilter_k}", "steps": args.steps, "seconds": dt,
                     "heads": [list(h) for h in res.heads], "scores": [s.score for s in res.steps],
                     "kept": res.config["kept"], "candidates_scored": sum(len(s.scores) for s in res.steps)})
        log(f"{pf}: {dt:.0f} s, heads {res.heads}, scores {[round(s.score, 4) for s in res.steps]}")

    exhaustive = None
    if args.exhaustive_steps > 0:
        t = time.perf_counter()
        res = sh.sahara(model, tok, prompts, steps=args.exhaustive_steps, **kw)
        dt = time.perf_counter() - t
        scored = sum(len(s.scores) for s in res.steps)
        step1 = res.steps[0].scores
        order = sorted(step1, key=lambda h: -step1[h])
        exhaustive = {"name": f"exhaustive, {args.exhaustive_steps} step(s)", "steps": args.exhaustive_steps,
                      "seconds": dt, "heads": [list(h) for h in res.heads], "scores": [s.score for s in res.steps],
                      "candidates_scored": scored, "per_candidate_s": dt / scored,
                      "top10_step1": [list(h) for h in order[:10]]}
        for r in runs:
            first = tuple(r["heads"][0])
            r["first_head_rank_in_exhaustive"] = order.index(first) + 1
            r["first_head_agrees"] = first == order[0]
            kept = {tuple(h) for h in r["kept"]}
            r["exhaustive_top10_in_kept"] = sum(h in kept for h in order[:10])
            r["exhaustive_top1_in_kept"] = order[0] in kept
        log(f"exhaustive: {dt:.0f} s for {scored} candidates ({dt / scored:.1f} s each), heads {res.heads}")

    # --------------------------------------------------------------- report
    print(f"\n## Sahara bench: {args.model}, {len(prompts)} AdvBench prompts ({args.prompt_format} format), "
          f"preset {args.preset}, {args.steps} steps, {g.n_layers}×{g.n_heads} = {n_all} heads\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu; batch size {args.batch_size}\n")
    print("| run | time | candidates scored | heads picked (layer, head) | scores (rad) | first head = exhaustive's? |")
    print("|---|---|---|---|---|---|")
    for r in runs + ([exhaustive] if exhaustive else []):
        if r is exhaustive:
            agree = "—"
        elif exhaustive is None:
            agree = "not checked"
        else:
            agree = (f"{'yes' if r['first_head_agrees'] else 'no'} (its rank in exhaustive step 1: "
                     f"{r['first_head_rank_in_exhaustive']}; exhaustive top-10 in kept: {r['exhaustive_top10_in_kept']}/10)")
        heads = ", ".join(f"({a}, {b})" for a, b in r["heads"])
        scores = ", ".join(f"{s:.3f}" for s in r["scores"])
        print(f"| {r['name']} | {fmt_s(r['seconds'])} | {r['candidates_scored']} | {heads} | {scores} | {agree} |")
    print()
    if exhaustive:
        per = exhaustive["per_candidate_s"]
        est_full = per * sum(n_all - s for s in range(args.steps))
        print(f"Exhaustive cost: {per:.1f} s per candidate on {len(prompts)} prompts (measured over "
              f"{exhaustive['candidates_scored']} candidates, including the unablated pass); "
              f"{args.steps} exhaustive steps ≈ {fmt_s(est_full)} (extrapolated). "
              f"Exhaustive step-1 top 10: {', '.join(f'({a}, {b})' for a, b in exhaustive['top10_step1'])}.\n")
    met = [r["name"] for r in runs if r["seconds"] <= 600 and r["steps"] >= 3]
    if len(prompts) >= 32 and args.steps >= 3:
        print(f"Target (prefiltered 3 steps on 32 prompts ≤ 10 min): {'met by ' + '; '.join(met) if met else 'NOT met'}.")
    out = {"model": args.model, "n_prompts": len(prompts), "preset": args.preset, "runs": runs,
           "exhaustive": exhaustive}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
