"""Generation throughput of an evaluation: one condition at a time (the old path) vs all conditions in
shared batches (``generate_many``), in one run, on the same prompts and heads.

"before": for each condition, ``generate_ids`` on its prompts in batches of ``--before-batch-size``
(what ``evaluate_conditions`` did per condition). "after": ``generate_many`` over all conditions at
once, rows sorted by prompt length, ``--after-batch-sizes`` rows per batch (each row ablating its
own heads; rows leave the batch at EOS; ``--stop-batch-sizes``: also at the judge's verdict;
``--continuous-batch-sizes``: and waiting rows join the running batch; ``--prefix-batch-sizes``: and the
chat template's common prefix is prefilled once per condition, its KV cache shared; ``--lower-batch-sizes``:
and each prompt's layers below a row's lowest ablated head are prefilled once, unablated, for all its rows).
Every pass but the last two kinds prefills whole prompts (``shared_prefix=False``). All greedy, the same ``--max-new-tokens``. Reported:
generated tokens per wall second and per CPU second of this process (on a shared machine the CPU
seconds are the steadier measure), the ratio after/before, the 1-minute load average before and
after each pass, and how many responses are token-identical between the paths (float32: batch
composition can flip a near-tie; in float64 they are identical, see tests/test_generation.py).

Example::

    nice -n 10 python bench/eval_speed.py --after-batch-sizes 16,64 --stop-batch-sizes 64 \
        --out bench/results/eval_speed_cpu_0.5b.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from safetyheads.datasets import holdout_split, load_prompts
from safetyheads.generation import StopRule, generate_ids, generate_many
from safetyheads.judges import get_judge
from safetyheads.models import load_model
from safetyheads.provenance import library_versions
from safetyheads.stats import layer_matched_heads, uniform_random_heads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--n-prompts", type=int, default=32, help="held-out AdvBench prompts (the default run's split)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--before-batch-size", type=int, default=16,
                   help="the old per-condition batch (RunConfig default); 0: skip that pass (ratios and "
                        "identical responses are then against the first pass run)")
    p.add_argument("--after-batch-sizes", default="64", help="comma-separated row batch sizes for generate_many")
    p.add_argument("--heads", default="11.7,10.11,14.11",
                   help="the chosen head set, layer.head (default: Sahara's top-3 of the 0.5B default run)")
    p.add_argument("--stop-batch-sizes", default="64",
                   help="comma-separated row batch sizes for generate_many with stop_at_verdict (the judge's "
                        "StopRule on every row); empty: skip")
    p.add_argument("--continuous-batch-sizes", default="",
                   help="comma-separated row batch sizes for generate_many with stop_at_verdict and continuous "
                        "batching (waiting rows join the batch as rows finish); the other passes use fixed batches")
    p.add_argument("--prefix-batch-sizes", default="",
                   help="comma-separated row batch sizes for continuous generate_many with stop_at_verdict and the "
                        "shared prefix KV cache (every layer prefilled per row)")
    p.add_argument("--lower-batch-sizes", default="",
                   help="comma-separated row batch sizes for the prefix passes' path plus the prefill of each "
                        "prompt's layers below a row's lowest ablated head once per prompt (reuse_lower)")
    p.add_argument("--judge", default="keyword:paper", help="the keyword judge of the stop rule and the verdicts")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown report here (and .json beside it)")
    a = p.parse_args(argv)
    a.after_batch_sizes = [int(x) for x in a.after_batch_sizes.split(",") if x.strip()]
    a.stop_batch_sizes = [int(x) for x in a.stop_batch_sizes.split(",") if x.strip()]
    a.continuous_batch_sizes = [int(x) for x in a.continuous_batch_sizes.split(",") if x.strip()]
    a.prefix_batch_sizes = [int(x) for x in a.prefix_batch_sizes.split(",") if x.strip()]
    a.lower_batch_sizes = [int(x) for x in a.lower_batch_sizes.split(",") if x.strip()]
    a.heads = [tuple(int(v) for v in h.split(".")) for h in a.heads.split(",") if h.strip()]
    return a


def conditions(model, heads: list[tuple[int, int]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Baseline, the chosen heads, one layer-matched and one uniform random draw (4 conditions)."""
    return [("baseline", []), ("chosen", heads),
            ("random-layer-matched", layer_matched_heads(model, heads, seed=0)),
            ("random-uniform", uniform_random_heads(model, len(heads), exclude=heads, seed=0))]


def load1() -> float:
    return os.getloadavg()[0]


def timed(fn):
    l0, t0, c0 = load1(), time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0, l0, load1()


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    _, prompts = holdout_split(load_prompts("advbench"), 16, a.n_prompts, seed=0)
    prompts = list(prompts)
    conds = conditions(model, a.heads)
    kw = dict(max_new_tokens=a.max_new_tokens, progress=False)
    runs = []

    def before():
        return [generate_ids(model, tok, prompts, heads=h, batch_size=a.before_batch_size, shared_prefix=False,
                             **kw) for _, h in conds]

    judge = get_judge(a.judge)

    def verdicts(ids):
        return [judge.is_refusal(prompts, [tok.decode(t, skip_special_tokens=True) for t in rows]) for rows in ids]

    ref = want = None
    ref_stopping = False  # the reference's rows are full answers (stopped rows are only compared by verdict)
    if a.before_batch_size:
        ref, wall, cpu, l0, l1 = timed(before)
        want = verdicts(ref)
        n_tok = sum(len(t) for rows in ref for t in rows)
        runs.append({"path": f"before: one condition at a time, batch {a.before_batch_size}", "tokens": n_tok,
                     "wall_s": wall, "cpu_s": cpu, "load_before": l0, "load_after": l1, "identical": None,
                     "same_verdicts": None})
        print(json.dumps(runs[-1]), flush=True)  # each pass as soon as it is done (a long run may be cut)
    stop = StopRule(f"{judge.name}: refusal phrase", judge.refusal_settled)
    passes = ([(bs, False, False, False, False) for bs in a.after_batch_sizes]
              + [(bs, True, False, False, False) for bs in a.stop_batch_sizes]
              + [(bs, True, True, False, False) for bs in a.continuous_batch_sizes]
              + [(bs, True, True, True, False) for bs in a.prefix_batch_sizes]
              + [(bs, True, True, True, True) for bs in a.lower_batch_sizes])
    for bs, stopping, continuous, shared, lower in passes:
        jobs = [{"prompts": prompts, "heads": h, "stop": stop if stopping else None} for _, h in conds]
        got, wall, cpu, l0, l1 = timed(lambda bs=bs, jobs=jobs, c=continuous, sp=shared, lo=lower: generate_many(
            model, tok, jobs, batch_size=bs, continuous=c, shared_prefix=sp, reuse_lower=lo, **kw))
        if ref is None:  # no before pass: the first pass is the reference
            ref, want, ref_stopping = got, verdicts(got), stopping
        same = sum(x == y for rows_a, rows_b in zip(got, ref) for x, y in zip(rows_a, rows_b))
        agree = sum(x == y for va, vb in zip(verdicts(got), want) for x, y in zip(va, vb))
        runs.append({"path": f"after: all conditions in shared batches, {'continuous' if continuous else 'fixed'} "
                             f"batch of {bs} rows" + (f", stop at verdict ({judge.name})" if stopping else "")
                             + (", shared prefix KV" if shared else "")
                             + (", layers below the lowest ablated head prefilled once per prompt" if lower else ""),
                     "tokens": sum(len(t) for rows in got for t in rows), "wall_s": wall, "cpu_s": cpu,
                     "load_before": l0, "load_after": l1,
                     "identical": same if stopping == ref_stopping else None, "same_verdicts": agree})
        print(json.dumps(runs[-1]), flush=True)
    total = len(conds) * len(prompts)
    base = runs[0]
    lines = [f"# Evaluation generation speed — {a.model}", "",
             f"{len(conds)} conditions ({', '.join(n for n, _ in conds)}) × {len(prompts)} held-out AdvBench prompts "
             f"× ≤ {a.max_new_tokens} new tokens, greedy, float32, torch threads {torch.get_num_threads()}, "
             f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}).", "",
             "Rows/s is the measure that counts for an evaluation (a stopped row generates fewer tokens for the "
             "same verdict); tokens/s is the decoder's throughput.", "",
             "| path | tokens | wall s | rows/s (wall) | tokens/s (wall) | CPU s | tokens/CPU-s | × rows/s wall | "
             "× tokens/s CPU | load avg (1 min) before → after | responses identical to the first pass | verdicts equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ident = "—" if r["identical"] is None else f"{r['identical']}/{total}"
        agree = "—" if r["same_verdicts"] is None else f"{r['same_verdicts']}/{total}"
        lines.append(f"| {r['path']} | {r['tokens']} | {r['wall_s']:.0f} | {total / r['wall_s']:.2f} | "
                     f"{r['tokens'] / r['wall_s']:.1f} | {r['cpu_s']:.0f} | {r['tokens'] / r['cpu_s']:.1f} | "
                     f"{base['wall_s'] / r['wall_s']:.2f} | "
                     f"{(r['tokens'] / r['cpu_s']) / (base['tokens'] / base['cpu_s']):.2f} | "
                     f"{r['load_before']:.1f} → {r['load_after']:.1f} | {ident} | {agree} |")
    lines += ["", "Command: `" + " ".join([Path(sys.executable).name] + sys.argv) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    for r in runs[1:]:
        print(f"ratio after/before ({r['path']}): rows/s wall {base['wall_s'] / r['wall_s']:.2f}×, "
              f"tokens/s CPU {(r['tokens'] / r['cpu_s']) / (base['tokens'] / base['cpu_s']):.2f}×")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                          "conditions": conds, "runs": runs,
                                                          "versions": library_versions()}, indent=2))


if __name__ == "__main__":
    main()
