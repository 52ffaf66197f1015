"""Learned head masks and the refusal-direction baseline on Qwen2.5-Coder-0.5B-Instruct: time, heads, effect.

    nice -n 10 python bench/masks_bench.py --out runs/masks-bench

Resumable: every stage writes its artifact to ``--out`` (prompts, refusal tokens, the mask's
checkpoint and result, the refusal direction) and a rerun of the same command continues.

1. Attribution prompts: ``holdout_split(advbench, --n-attr, seed)`` (the first ``n_attr`` positions of
   the seeded permutation ``bench/asr_table.py`` uses, so they never overlap its held-out prompts for
   the same seed and ``n_attr <= 32``); harmless prompts ``load_prompts(--harmless, n, seed)``.
2. Refusal tokens: the model's own (``derive_refusal_tokens``, keyword:paper judge).
3. ``learn_head_mask`` (``--sparsity``, ``--steps``, ...): the learned ranking and each top-k set's
   hard-ablation validation (refusal log-odds drop on the attribution prompts, harmless KL).
4. ``refusal_direction`` (``--select``): its layer, the top heads by direct contribution, and the
   same hard-ablation validation of its top-k heads (``hard_validation``).

Writes ``summary.md`` and ``summary.json``: wall and CPU seconds per stage (the machine may be
shared: CPU seconds are the comparable figure), heads and validations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from safetyheads.datasets import holdout_split, load_prompts
from safetyheads.evaluate import derive_refusal_tokens
from safetyheads.masks import HeadMaskResult, hard_validation, learn_head_mask
from safetyheads.provenance import atomic_write_text, library_versions
from safetyheads.refusal_direction import RefusalDirection, refusal_direction


def log(*a: Any) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def _json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--n-attr", type=int, default=24)
    p.add_argument("--harmless", default="rho-benign-edgy")
    p.add_argument("--n-harmless", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-format", default="chat")
    p.add_argument("--mode", default="ua")
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--sparsity", default="l1")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--init", type=float, default=-3.0)
    p.add_argument("--lam-sparsity", type=float, default=0.01)
    p.add_argument("--lam-kl", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ks", default="1,3,5")
    p.add_argument("--select", default="separation", help="refusal-direction layer selection")
    p.add_argument("--skip-mask", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is much faster than 2 on a loaded 2-core machine)")
    a = p.parse_args(argv)
    a.ks = sorted({int(x) for x in a.ks.split(",") if x.strip()})
    return a


class Stage:
    def __init__(self, out: Path) -> None:
        self.path = out / "times.json"
        self.times: dict[str, dict[str, float]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __call__(self, name: str, fn, *args, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        r = fn(*args, **kw)
        rec = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        prev = self.times.get(name)
        if prev:  # a resumed stage adds up
            rec = {k: rec[k] + prev.get(k, 0.0) for k in rec}
        self.times[name] = rec
        _json(self.path, self.times)
        log(f"{name}: {rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU")
        return r


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    stage = Stage(a.out)
    from safetyheads.models import load_model

    model, tok = stage("load_model", load_model, a.model)
    ppath = a.out / "prompts.json"
    if not ppath.exists():
        attr, _ = holdout_split(load_prompts("advbench"), a.n_attr, seed=a.seed)
        harmless = load_prompts(a.harmless, n=a.n_harmless, seed=a.seed)
        _json(ppath, {"attribution": list(attr), "harmless": list(harmless),
                      "provenance": {"attribution": attr.provenance(), "harmless": harmless.provenance()}})
    p = json.loads(ppath.read_text())
    attr, harmless = p["attribution"], p["harmless"]
    common = dict(prompt_format=a.prompt_format, system_prompt=None)

    rpath = a.out / "refusal_tokens.json"
    if not rpath.exists():
        rt = stage("refusal_tokens", derive_refusal_tokens, model, tok, attr, batch_size=len(attr), **common)
        _json(rpath, {"tokens": rt, "strings": [tok.decode([t]) for t in rt]})
    rt = json.loads(rpath.read_text())["tokens"]
    log("refusal tokens", [tok.decode([t]) for t in rt])

    mask = None
    mstem = a.out / f"mask_{a.sparsity}"
    if not a.skip_mask:
        if not mstem.with_suffix(".json").exists():
            last = [time.perf_counter()]

            def cb(step: int, rec: dict) -> None:
                now = time.perf_counter()
                log(f"step {step}: objective {rec['objective']:.3f} refusal {rec['refusal']:.3f} kl {rec['kl']:.4f} "
                    f"penalty {rec['penalty']:.2f} ({now - last[0]:.1f} s)")
                last[0] = now

            res = stage("mask", learn_head_mask, model, tok, attr, harmless=harmless, mode=a.mode, eps=a.eps,
                        sparsity=a.sparsity, lam_sparsity=a.lam_sparsity, lam_kl=a.lam_kl, steps=a.steps, lr=a.lr,
                        init=a.init, seed=a.seed, refusal_tokens=rt, batch_size=a.batch_size,
                        checkpoint=a.out / f"mask_{a.sparsity}.ckpt", validate_ks=a.ks, callback=cb, **common)
            res.save(mstem)
        mask = HeadMaskResult.load(mstem)

    dstem = a.out / f"refusal_direction_{a.select}"
    if not dstem.with_suffix(".json").exists():
        rd = stage(f"refusal_direction_{a.select}", refusal_direction, model, tok, attr, harmless, select=a.select,
                   refusal_tokens=rt, batch_size=a.batch_size, **common)
        rd.save(dstem)
    rd = RefusalDirection.load(dstem)
    vpath = a.out / f"refusal_direction_{a.select}_validation.json"
    if not vpath.exists():
        vals = [stage(f"rd_validate_k{k}", hard_validation, model, tok, attr, harmless=harmless,
                      heads=rd.top_heads(k), refusal_tokens=rt, mode=a.mode, eps=a.eps, batch_size=a.batch_size,
                      **common).to_json() for k in a.ks]
        _json(vpath, vals)
    rd_vals = json.loads(vpath.read_text())

    times = json.loads((a.out / "times.json").read_text())
    lines = [f"# Learned head masks and the refusal direction — {a.model}", "",
             f"{len(attr)} AdvBench attribution prompts (holdout_split seed {a.seed}), {len(harmless)} harmless "
             f"prompts ({a.harmless}), prompt format `{a.prompt_format}` (template default system prompt), "
             f"{a.mode.upper()} ε={a.eps:g}; torch threads {a.threads}. Refusal tokens: "
             f"{[tok.decode([t]) for t in rt]}.", "",
             "Validation: the top-k heads fully ablated (`ablate`); refusal drop = mean refusal log-odds on the "
             "attribution prompts, unablated minus ablated (positive = less refusal); KL = mean next-token KL "
             "at the last position of the harmless prompts (nats).", "",
             "| method | k | heads | refusal log-odds (base → ablated) | drop | harmless KL |", "|---|---|---|---|---|---|"]
    summary: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                               "refusal_tokens": rt, "times": times, "versions": library_versions()}
    if mask is not None:
        for v in mask.validation:
            lines.append(f"| mask ({a.sparsity}) | {v.k} | {v.heads} | {v.refusal_base:.2f} → {v.refusal_ablated:.2f} "
                         f"| {v.refusal_drop:+.2f} | {v.harmless_kl:.3f} |")
        summary["mask"] = {"top10": [list(h) for h in mask.ranking[:10]],
                           "strengths_top10": [float(mask.strengths[h]) for h in mask.ranking[:10]],
                           "validation": [v.to_json() for v in mask.validation],
                           "objective_before": mask.objective_before, "objective_after": mask.objective_after,
                           "n_heads_strength_gt_0.5": int((mask.strengths > 0.5).sum()), "config": mask.config}
    for v in rd_vals:
        lines.append(f"| refusal direction (layer {rd.layer}, {a.select}) | {v['k']} | {[tuple(h) for h in v['heads']]} "
                     f"| {v['refusal_base']:.2f} → {v['refusal_ablated']:.2f} | {v['refusal_drop']:+.2f} "
                     f"| {v['harmless_kl']:.3f} |")
    summary["refusal_direction"] = {"layer": rd.layer, "select": a.select, "top10": [list(t) for t in rd.top(10)],
                                    "scores": rd.scores.tolist(), "validation": rd_vals}
    lines += ["", "Top-10 heads:", ""]
    if mask is not None:
        lines.append(f"- mask: {[(h, round(float(mask.strengths[h]), 3)) for h in mask.ranking[:10]]}")
        lines.append(f"- mask objective before {mask.objective_before} → after {mask.objective_after}")
    lines.append(f"- refusal direction: {[(t[0], t[1], round(t[2], 3)) for t in rd.top(10)]}")
    lines.append(f"- refusal direction per-layer {a.select} score: {[round(x, 2) for x in rd.scores.tolist()]}")
    lines += ["", "Seconds per stage (wall / CPU): " + ", ".join(
        f"{k} {v['wall_s']:.0f} / {v['cpu_s']:.0f}" for k, v in times.items()), "",
        "Command: `" + " ".join(sys.argv) + "`"]
    text = "\n".join(lines) + "\n"
    atomic_write_text(a.out / "summary.md", text)
    _json(a.out / "summary.json", summary)
    print(text)
    return summary


if __name__ == "__main__":
    main()
