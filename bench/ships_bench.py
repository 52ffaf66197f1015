"""Ships speed and agreement: naive loop vs exact sweep vs gradient estimates, measured in one run.

    python bench/ships_bench.py                          # 0.5B model, 3 AdvBench prompts, all heads
    python bench/ships_bench.py --naive-heads 24         # time the naive loop on 24 heads, extrapolate
    python bench/ships_bench.py --heads-subset 56 --naive-heads 8 --batch-sizes 28   # quick run

What it measures (all in this process, on this machine, one after the other):

1. exact sweep (``ships(method="exact")``): heads in batch rows, residual reused below the ablated
   layer, last-position logits. With several ``--batch-sizes`` each is timed on the first prompt and
   the fastest is used for the full run.
2. naive loop (``method="naive"``, the paper's: one head per full forward, batch 1, full logits) on
   ``--naive-heads`` random heads (default: all). Each prompt costs 1 + K forward passes; the full
   loop's time is extrapolated as ``measured × (1 + H_all) / (1 + K)`` per prompt — said so in the
   output. KL scores of the timed heads are compared with the exact sweep's. The exact sweep and the
   naive loop run interleaved, prompt by prompt, and both wall and CPU time are reported: on a shared
   machine other processes' load changes wall times by several × within minutes.
3. ``ships_estimate`` (Fisher, ``--directions``) vs the exact KL, and ``refusal-grad`` vs the exact
   refusal score: time ratio and :func:`safetyheads.agreement` (Spearman of the mean scores,
   mean per-prompt Spearman, top-10 recall).

Targets (issue): exact >= 5x faster than naive with KL equal to relative 1e-4; estimate >= 50x
faster than exact with Spearman >= 0.8 and top-10 recall >= 0.7.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

import safetyheads as sh
from safetyheads.datasets import load_prompts

REFUSAL_OPENINGS = ("I'm sorry", "Sorry", "I cannot", "I can't", "As an AI", "I apologize", "I am sorry",
                    "Unfortunately")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def refusal_token_ids(tokenizer) -> list[int]:
    """First token of typical refusal openings, deduplicated (order kept)."""
    out: list[int] = []
    for text in REFUSAL_OPENINGS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids[0] not in out:
            out.append(ids[0])
    return out


def timed(fn):
    """(result, wall seconds, CPU seconds of this process, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=3, help="AdvBench prompts (seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-format", default="chat")
    ap.add_argument("--batch-size", type=int, default=None, help="exact sweep batch size (skips the trial)")
    ap.add_argument("--batch-sizes", default="28,56,112,168",
                    help="batch sizes to try on the first prompt when --batch-size is not given")
    ap.add_argument("--heads-subset", type=int, default=None,
                    help="restrict everything exact to K random heads (quick run)")
    ap.add_argument("--naive-heads", type=int, default=None,
                    help="time the naive loop on K random heads of those and extrapolate (default: all)")
    ap.add_argument("--directions", default="1,2,4", help="Fisher directions to try")
    ap.add_argument("--estimate-batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="time each estimate this many times, keep the fastest")
    ap.add_argument("--refusal-tokens", choices=("fixed", "derive"), default="fixed",
                    help="fixed: first tokens of typical refusals; derive: evaluate.derive_refusal_tokens")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()

    from safetyheads.models import load_model

    (model, tok), t_load, _ = timed(lambda: load_model(args.model))
    g = sh.head_geometry(model)
    prompts = list(load_prompts("advbench", n=args.prompts, seed=args.seed))
    log(f"loaded {args.model} in {t_load:.1f} s: {g.n_layers} layers × {g.n_heads} heads; "
        f"{len(prompts)} AdvBench prompts; torch threads {torch.get_num_threads()}")
    if args.refusal_tokens == "derive":
        from safetyheads.evaluate import derive_refusal_tokens

        rt = derive_refusal_tokens(model, tok, prompts, prompt_format=args.prompt_format)
    else:
        rt = refusal_token_ids(tok)
    log(f"refusal tokens: {rt} = {[tok.decode([t]) for t in rt]}")

    rng = random.Random(args.seed)
    all_heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
    universe = sorted(rng.sample(all_heads, args.heads_subset)) if args.heads_subset else all_heads
    heads_arg = None if len(universe) == len(all_heads) else universe
    common = dict(prompt_format=args.prompt_format, progress=False)

    # 1. exact sweep: batch-size trial on the first prompt
    trial, trial_kl = {}, {}
    if args.batch_size is None:
        for bs in [int(x) for x in args.batch_sizes.split(",")]:
            r, t, _ = timed(lambda bs=bs: sh.ships(model, tok, prompts[:1], heads=heads_arg, batch_size=bs,
                                                   refusal_tokens=rt, **common))
            trial[bs], trial_kl[bs] = t, r.kl[0].double()
            log(f"exact sweep, prompt 1, batch size {bs}: {t:.1f} s")
        best_bs = min(trial, key=trial.get)
    else:
        best_bs = args.batch_size

    # 2. exact sweep and naive loop (K heads, extrapolated), interleaved prompt by prompt so that load
    #    from other processes on a shared machine hits both alike; wall and CPU time both recorded
    k = min(args.naive_heads or len(universe), len(universe))
    naive_heads = sorted(rng.sample(universe, k)) if k < len(universe) else universe
    ex_parts, nv_parts, per_prompt = [], [], []
    t_exact = c_exact = t_naive = c_naive = 0.0
    for i, p in enumerate(prompts):
        r, t, c = timed(lambda p=p: sh.ships(model, tok, [p], heads=heads_arg, batch_size=best_bs,
                                             refusal_tokens=rt, **common))
        ex_parts.append(r)
        ex_t = t
        t_exact, c_exact = t_exact + t, c_exact + c
        log(f"prompt {i + 1}: exact sweep of {len(universe)} heads (batch {best_bs}) {t:.1f} s wall, {c:.1f} s CPU")
        r, t, c = timed(lambda p=p: sh.ships(model, tok, [p], heads=naive_heads, method="naive",
                                             refusal_tokens=rt, **common))
        nv_parts.append(r)
        t_naive, c_naive = t_naive + t, c_naive + c
        per_prompt.append((ex_t, t))
        log(f"prompt {i + 1}: naive loop of {k} heads {t:.1f} s wall, {c:.1f} s CPU")
    exact_kl = torch.cat([r.kl for r in ex_parts])
    exact_ref = torch.cat([r.refusal for r in ex_parts])
    naive_kl = torch.cat([r.kl for r in nv_parts])
    naive_ref = torch.cat([r.refusal for r in nv_parts])
    scale = (1 + len(universe)) / (1 + k)
    t_naive_full, c_naive_full = t_naive * scale, c_naive * scale
    sel = torch.tensor(naive_heads)
    kl_n = naive_kl[:, sel[:, 0], sel[:, 1]].double()
    kl_e = exact_kl[:, sel[:, 0], sel[:, 1]].double()
    rel = (kl_e - kl_n).abs() / kl_n.abs().clamp(min=1e-30)
    max_rel = float(rel.max())
    worst_kl = float(kl_n.flatten()[rel.argmax()])
    big = kl_n >= 1e-3
    max_rel_big = float(rel[big].max()) if big.any() else math.nan
    # float32 noise floor: the same exact sweep at two batch sizes (only the batch shape differs)
    floor = math.nan
    if len(trial_kl) > 1:
        a, b = list(trial_kl.values())[:2]
        keep = ~torch.isnan(a)
        floor = float(((a - b).abs()[keep] / b.abs()[keep].clamp(min=1e-30)).max())
    ref_n = naive_ref[:, sel[:, 0], sel[:, 1]].double()
    ref_e = exact_ref[:, sel[:, 0], sel[:, 1]].double()
    max_abs_ref = float((ref_e - ref_n).abs().max())
    max_rel_ref = float(((ref_e - ref_n).abs() / ref_n.abs().clamp(min=1e-30)).max())
    log(f"naive loop, {k} heads × {len(prompts)} prompts: {t_naive:.1f} s "
        f"(extrapolated to {len(universe)} heads: {t_naive_full:.1f} s); max rel KL diff {max_rel:.2e} "
        f"(at KL {worst_kl:.2e}; {max_rel_big:.2e} over KL >= 1e-3); exact vs exact at another batch size {floor:.2e}")

    load_after_sweeps = os.getloadavg()

    # 3. estimates
    est_rows = []
    def fastest(fn):
        runs = [timed(fn) for _ in range(max(1, args.repeat))]
        return runs[0][0], min(t for _, t, _ in runs), min(c for _, _, c in runs)

    for d in [int(x) for x in args.directions.split(",")]:
        est, t, c = fastest(lambda d=d: sh.ships_estimate(model, tok, prompts, estimator="fisher", directions=d,
                                                          batch_size=args.estimate_batch_size, **common))
        a = sh.agreement(est.kl, exact_kl, k=10)
        est_rows.append({"estimator": f"fisher, {d} direction{'s' if d > 1 else ''}", "seconds": t, "cpu_s": c, **a})
        log(f"fisher d={d}: {t:.1f} s {a}")
    est, t, c = fastest(lambda: sh.ships_estimate(model, tok, prompts, estimator="refusal-grad", refusal_tokens=rt,
                                                  batch_size=args.estimate_batch_size, **common))
    a = sh.agreement(est.refusal, exact_ref, k=10)
    # sign agreement on the exact top-10 heads by mean refusal drop
    keep = ~torch.isnan(exact_ref[0])
    m_ex = torch.where(keep, exact_ref.nanmean(0), torch.tensor(-math.inf)).flatten()
    top = m_ex.topk(min(10, int(keep.sum()))).indices
    sign = float((est.refusal.mean(0).flatten()[top] > 0).double().mean())
    est_rows.append({"estimator": "refusal-grad (vs exact refusal score)", "seconds": t, "cpu_s": c, **a,
                     "sign_top10": sign})
    log(f"refusal-grad: {t:.1f} s {a} sign(top-10 exact) {sign:.2f}")

    # --------------------------------------------------------------- report
    subset_note = "" if heads_arg is None else f" (random subset of {len(universe)} of {len(all_heads)} heads)"
    print(f"\n## Ships bench: {args.model}, {len(prompts)} AdvBench prompts ({args.prompt_format} format), "
          f"{g.n_layers}×{g.n_heads} heads{subset_note}\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu; "
          f"refusal tokens {[tok.decode([t]) for t in rt]}. Load average (1/5/15 min) at the start "
          f"{load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, after the sweeps "
          f"{load_after_sweeps[0]:.1f}/{load_after_sweeps[1]:.1f}/{load_after_sweeps[2]:.1f}, at the end "
          f"{os.getloadavg()[0]:.1f}/{os.getloadavg()[1]:.1f}/{os.getloadavg()[2]:.1f} (this process counts ~1-2).\n")
    if trial:
        print("Exact sweep batch-size trial (first prompt): " +
              ", ".join(f"{bs}: {fmt_s(t)}" for bs, t in trial.items()) + f" → using {best_bs}\n")
    extrap = "" if k == len(universe) else f"; extrapolated from {k} random heads: time × (1+{len(universe)})/(1+{k})"
    print("| method | wall time | CPU time | vs naive (wall / CPU) | KL max rel. diff vs naive | "
          "refusal max abs (rel) diff |")
    print("|---|---|---|---|---|---|")
    print(f"| naive loop (batch 1, full logits){extrap} | {fmt_s(t_naive_full)} | {fmt_s(c_naive_full)} | 1× | — | — |")
    print(f"| exact sweep (batch {best_bs}) | {fmt_s(t_exact)} | {fmt_s(c_exact)} | "
          f"**{t_naive_full / t_exact:.1f}× / {c_naive_full / c_exact:.1f}×** | "
          f"{max_rel:.1e} | {max_abs_ref:.1e} ({max_rel_ref:.1e}) |")
    print()
    print(f"KL relative differences, exact vs naive, {kl_n.numel()} (prompt, head) pairs: max {max_rel:.1e} "
          f"(at a head with KL {worst_kl:.1e}), max over the {int(big.sum())} pairs with KL ≥ 1e-3: {max_rel_big:.1e}. "
          f"Float32 noise floor (the exact sweep of prompt 1 at batch sizes {list(trial_kl)[:2]}, nothing else "
          f"different): max rel. diff {floor:.1e}.\n")
    print("Per prompt (wall): " + "; ".join(
        f"prompt {i + 1}: exact {te:.0f} s, naive {tn:.0f} s for {k} heads → {tn * scale / te:.1f}× extrapolated"
        for i, (te, tn) in enumerate(per_prompt)) + ".\n")
    print(f"The exact sweep and the naive loop ran interleaved, prompt by prompt. Estimate times: fastest of "
          f"{max(1, args.repeat)} runs each. CPU time = this process's, all threads (less sensitive than wall "
          f"time to other processes on a shared machine).\n")
    print("| estimate | wall time | CPU time | vs exact (wall / CPU) | Spearman (means) | per-prompt Spearman "
          "| top-10 recall |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for r in est_rows:
        rec = next(v for key, v in r.items() if key.startswith("top") and key.endswith("_recall"))
        extra = f" (sign of exact top-10: {r['sign_top10']:.2f})" if "sign_top10" in r else ""
        print(f"| {r['estimator']}{extra} | {fmt_s(r['seconds'])} | {fmt_s(r['cpu_s'])} | "
              f"**{t_exact / r['seconds']:.1f}× / {c_exact / r['cpu_s']:.1f}×** | "
              f"{r['spearman']:.3f} | {r['spearman_per_prompt']:.3f} | {rec:.2f} |")
        rows.append({**r, "speedup_vs_exact": t_exact / r["seconds"], "cpu_speedup_vs_exact": c_exact / r["cpu_s"]})
    print()
    ok_exact = min(t_naive_full / t_exact, c_naive_full / c_exact) >= 5 and max_rel <= 1e-4

    def meets(r: dict) -> bool:  # the estimate target
        return (min(r["speedup_vs_exact"], r["cpu_speedup_vs_exact"]) >= 50 and r["spearman"] >= 0.8
                and r.get("top10_recall", 0) >= 0.7)

    ok_est = [r["estimator"] for r in rows if r["estimator"].startswith("fisher") and meets(r)]
    print(f"Targets (both wall and CPU ratios): exact ≥ 5× naive at rel. 1e-4: {'met' if ok_exact else 'NOT met'}; "
          f"KL estimate ≥ 50× exact with Spearman ≥ 0.8 and top-10 recall ≥ 0.7: "
          f"{'met by ' + ', '.join(ok_est) if ok_est else 'NOT met'}"
          + "".join(f"; refusal-grad (signed score, vs exact refusal score): "
                    f"{'met' if meets(r) else 'NOT met'}"
                    for r in rows if r["estimator"].startswith("refusal-grad")) + ".")
    out = {"model": args.model, "n_prompts": len(prompts), "n_heads": len(universe), "batch_size": best_bs,
           "batch_trial_s": trial, "exact_s": t_exact, "exact_cpu_s": c_exact, "naive_measured_s": t_naive,
           "naive_measured_cpu_s": c_naive, "naive_heads": k, "naive_extrapolated_s": t_naive_full,
           "naive_extrapolated_cpu_s": c_naive_full, "kl_max_rel_diff": max_rel, "kl_worst_value": worst_kl,
           "kl_max_rel_diff_kl_ge_1e-3": max_rel_big, "float32_floor_rel": floor, "refusal_max_abs_diff": max_abs_ref,
           "estimates": rows, "refusal_tokens": rt, "load_s": t_load}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
