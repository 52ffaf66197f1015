"""Teacher-forced harmless KL (the evaluation's utility metric): every layer run for each head set
(``reuse_lower=False``, the old path) vs each head set's forward started at its lowest ablated layer on
the unablated pass's residual (``reuse_lower=True``), in one run, on the same prompts, answers and heads.

The answers are the model's own greedy answers to the harmless prompts (generated once, untimed). Each
path runs ``--repeats`` times, alternating; reported: the min and median wall and CPU seconds of each,
the ratio old/new, and the largest relative difference of the KLs (float32 noise: the two paths add
the same numbers in another order; tests/test_evaluate.py checks them equal in float64).

Example::

    python bench/utility_kl_speed.py --out bench/results/utility_kl_cpu_0.5b.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from speed_common import alternate, finish, ratios, timing_row

from safetyheads.datasets import load_prompts
from safetyheads.evaluate import teacher_forced_kl
from safetyheads.generation import generate
from safetyheads.models import load_model

#: two head sets of the 0.5B default run: the refusal search's top-3 and Sahara's top-3
DEFAULT_SETS = "10.7,14.10,7.13;11.7,10.11,14.11"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--harmless", default="rho-benign-edgy")
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sets", default=DEFAULT_SETS, help="head sets: ';' between sets, ',' between layer.head")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per forward (the evaluation's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write a markdown table here (and .json beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    sets = {f"set{i}": [tuple(int(x) for x in h.split(".")) for h in s.split(",")]
            for i, s in enumerate(a.sets.split(";"))}
    model, tok = load_model(a.model)
    prompts = list(load_prompts(a.harmless, n=a.n_prompts, seed=0))
    answers = generate(model, tok, prompts, max_new_tokens=a.max_new_tokens, progress=False)
    paths = {name: (lambda reuse=reuse: teacher_forced_kl(model, tok, prompts, answers, sets, batch_size=a.batch_size,
                                                          reuse_lower=reuse))
             for name, reuse in (("every", False), ("lowest", True))}
    times, kls = alternate(paths, a.repeats)
    diff = max(abs(kls["lowest"][n] - kls["every"][n]) / max(abs(kls["every"][n]), 1e-30) for n in sets)
    ratio_wall, ratio_cpu = ratios(times, "every", "lowest")
    lines = [f"# Teacher-forced harmless KL — {a.model}", "",
             f"{len(prompts)} `{a.harmless}` prompts with the model's own greedy answers ({a.max_new_tokens} new "
             f"tokens), {len(sets)} head sets ({a.sets}), batch {a.batch_size}, {a.threads} torch threads, "
             f"{a.repeats} alternating repeats.", "",
             "| path | wall min (s) | wall median (s) | CPU min (s) | CPU median (s) |", "|---|---|---|---|---|",
             timing_row("every layer (reuse_lower=False)", times["every"]),
             timing_row("from the lowest ablated layer", times["lowest"]), "",
             f"Median ratio every-layer / from-lowest: **{ratio_wall:.2f}× wall, {ratio_cpu:.2f}× CPU**. "
             f"Largest relative KL difference between the paths: {diff:.1e} (float32)."]
    finish(lines, a.out, {"args": {k: str(v) for k, v in vars(a).items()}, "times": times, "kl": kls,
                          "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu, "max_rel_diff": diff})


if __name__ == "__main__":
    main()
