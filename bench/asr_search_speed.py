"""The attack-success search objective (``search_heads(objective="asr")``): each candidate's answers
generated on their own (``batch_size`` = the number of prompts: one candidate per generation) vs several
candidates' answers generated together in shared batches (``batch_size`` = ``--together`` × prompts), in
one run, on the same prompts and candidates.

One search step over ``--heads`` (no prefilter, no signed effects), each path ``--repeats`` times,
alternating; reported: the min and median wall and CPU seconds of each, the ratio alone/together, the
head each path chooses and the largest difference of the candidate scores (float32: a batch of other
rows rounds differently; tests/test_search.py checks the scores equal in float64).

Example::

    python bench/asr_search_speed.py --out bench/results/asr_search_speed_cpu_0.5b.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from speed_common import alternate, finish, ratios, timing_row

from safetyheads.datasets import load_prompts
from safetyheads.models import load_model
from safetyheads.refusal_metric import derive_refusal_tokens
from safetyheads.search import search_heads

#: the first eight heads of the 0.5B zero-ablation refusal-gradient pool (bench/results/methods_0.5b_zero.md)
DEFAULT_HEADS = "12.2,8.3,4.11,14.10,8.13,0.11,12.7,11.5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dataset", default="advbench")
    p.add_argument("--n-prompts", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--heads", default=DEFAULT_HEADS, help="candidates: ',' between layer.head")
    p.add_argument("--mode", default="zero")
    p.add_argument("--together", type=int, default=4, help="candidates per generation on the batched path")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write a markdown table here (and .json beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    heads = [tuple(int(x) for x in h.split(".")) for h in a.heads.split(",")]
    model, tok = load_model(a.model)
    prompts = list(load_prompts(a.dataset, n=a.n_prompts, seed=0))
    rt = derive_refusal_tokens(model, tok, prompts, max_new_tokens=8)
    batch = {"alone": len(prompts), "together": a.together * len(prompts)}
    paths = {name: (lambda bs=bs: search_heads(model, tok, prompts, objective="asr", steps=1, mode=a.mode,
                                               candidates=heads, refusal_tokens=rt, max_new_tokens=a.max_new_tokens,
                                               batch_size=bs, signed=False, progress=False))
             for name, bs in batch.items()}
    times, found = alternate(paths, a.repeats)
    s0, s1 = found["alone"].steps[0].scores, found["together"].steps[0].scores
    diff = max(abs(s0[h] - s1[h]) for h in heads)
    ratio_wall, ratio_cpu = ratios(times, "alone", "together")
    rows = [timing_row(f"{label} (batch {batch[name]} rows)", times[name],
                       f"L{found[name].heads[0][0]}H{found[name].heads[0][1]}")
            for name, label in (("alone", "one candidate per generation"),
                                ("together", f"{a.together} candidates per generation"))]
    lines = [f"# Attack-success search step — {a.model}", "",
             f"{len(prompts)} `{a.dataset}` prompts, {len(heads)} candidates ({a.heads}), mode {a.mode}, greedy "
             f"{a.max_new_tokens} new tokens judged by keyword:paper (rows end once a refusal phrase appears), "
             f"{a.threads} torch threads, {a.repeats} alternating repeats; each call also generates the unablated "
             "answers once.", "",
             "| path | wall min (s) | wall median (s) | CPU min (s) | CPU median (s) | head chosen |",
             "|---|---|---|---|---|---|", *rows, "",
             f"Median ratio alone / together: **{ratio_wall:.2f}× wall, {ratio_cpu:.2f}× CPU**. Largest difference "
             f"of a candidate's score between the paths: {diff:.1e} (float32)."]
    finish(lines, a.out, {"args": {k: str(v) for k, v in vars(a).items()}, "times": times,
                          "scores": {k: {f"{h[0]}.{h[1]}": v for h, v in r.steps[0].scores.items()}
                                     for k, r in found.items()},
                          "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu, "max_diff": diff})


if __name__ == "__main__":
    main()
