"""The paper's per-query experiment (its Table 1): ablate each prompt's *own* top Ships heads.

For every held-out prompt: the exact Ships sweep of all heads on that prompt (KL of the last-position
next-token distribution, :func:`safetyheads.ships`), then greedy generation with nothing ablated,
with the prompt's own top-1 and top-3 heads ablated, and with layer-matched random heads ablated
(the same layers as the top-1 / top-3 heads, seeded per prompt), judged by keyword judges. With
``--signed`` (chat presets) the same sweep also gives each head's signed refusal effect, and the
prompt's own top-1 / top-3 heads by that score are ablated too.

    nice -n 10 .venv/bin/python bench/per_query.py --preset paper --n 100          # resumable
    nice -n 10 .venv/bin/python bench/per_query.py --preset chat --n 100 --signed

Settings follow the preset (``safetyheads.presets``): the Ships sweep reads the prompt in the
preset's Ships format, generation uses its evaluation format, ε and mode are the preset's;
``--max-new-tokens`` overrides the preset's generation length. Held-out prompts: the evaluation part
of ``holdout_split(advbench, 32, 400, seed=0)`` (the study's split), the first ``--n`` of them.

Resumable: each prompt's Ships scores are saved as soon as its sweep ends, and each group of
prompts' generations as soon as they end (``<run>/ships/NNNN.json``, ``<run>/gen/NNNN.json``); run
the same command again to continue, or with a larger ``--n`` to extend. The summary
(``bench/results/per_query_<model>_<preset>.md`` / ``.json``) is rewritten from whatever is done.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from safetyheads.config import RunConfig
from safetyheads.datasets import holdout_split, load_prompts
from safetyheads.evaluate import derive_refusal_tokens, generate
from safetyheads.judges import get_judge
from safetyheads.models import load_model
from safetyheads.provenance import atomic_write_text, library_versions, model_record
from safetyheads.ships import ships
from safetyheads.stats import holm, layer_matched_heads, paired_comparison, wilson_interval

RESULTS = Path(__file__).parent / "results"
JUDGES = ("keyword:paper", "keyword:paper-prototype", "keyword:gcg")
SPLIT = {"dataset": "advbench", "n_attribution": 32, "n_eval": 400, "seed": 0}


def _short(model: str) -> str:
    return model.split(":")[-1].split("/")[-1].replace(".gguf", "")


def held_out(n: int):
    """The first ``n`` prompts of the study's held-out split, and the attribution part."""
    attribution, evaluation = holdout_split(load_prompts(SPLIT["dataset"]), SPLIT["n_attribution"], SPLIT["n_eval"],
                                            seed=SPLIT["seed"])
    if n > len(evaluation):
        raise SystemExit(f"--n {n} > {len(evaluation)} held-out prompts")
    return attribution, evaluation.subset(list(range(n)), note=f"first {n}")


def conditions_for(i: int, rec: dict, geometry, signed: bool) -> dict[str, list[list[int]]]:
    """The head sets ablated for prompt ``i``: none, its own top-1/top-3, layer-matched random ones."""
    top = [tuple(h) for h in rec["top_kl"]]
    out = {"baseline": [], "top1": top[:1], "top3": top[:3],
           "random1": layer_matched_heads(geometry, top[:1], seed=1_000 + i),
           "random3": layer_matched_heads(geometry, top[:3], seed=2_000 + i)}
    if signed and rec.get("top_refusal"):
        ref = [tuple(h) for h in rec["top_refusal"]]
        out["signed-top1"], out["signed-top3"] = ref[:1], ref[:3]
    return {k: [list(h) for h in v] for k, v in out.items()}


def summarise(run: Path, meta: dict) -> dict:
    """Per-condition ASR per judge with Wilson intervals and paired tests, from the finished prompts."""
    recs = [json.loads(p.read_text()) for p in sorted((run / "gen").glob("*.json"))]
    recs = [r for r in recs if "responses" in r]
    out = {**meta, "n_done": len(recs), "judges": {}, "top1_heads": Counter(), "seconds": {}}
    if not recs:
        return out
    names = list(recs[0]["responses"])
    for judge_name in JUDGES:
        j = get_judge(judge_name)
        success = {c: [not x for x in j.is_refusal([r["prompt"] for r in recs], [r["responses"][c] for r in recs])]
                   for c in names}
        rows = {}
        for c in names:
            k = sum(success[c])
            lo, hi = wilson_interval(k, len(recs))
            rows[c] = {"asr": k / len(recs), "ci": [lo, hi], "n": len(recs)}
            if c != "baseline":
                rows[c]["vs_baseline"] = paired_comparison(success["baseline"], success[c]).to_dict()
        for a, b in (("top1", "random1"), ("top3", "random3"), ("signed-top1", "random1"), ("signed-top3", "random3")):
            if a in success:
                rows[a][f"vs_{b}"] = paired_comparison(success[b], success[a]).to_dict()
        ps = [rows[c]["vs_baseline"]["p_value"] for c in names if c != "baseline"]
        for c, p in zip([c for c in names if c != "baseline"], holm(ps), strict=True):
            rows[c]["vs_baseline"]["p_holm"] = p
        out["judges"][judge_name] = rows
    out["top1_heads"] = Counter(f"L{r['conditions']['top1'][0][0]}H{r['conditions']['top1'][0][1]}" for r in recs).most_common(10)
    ship_s = [json.loads((run / "ships" / f"{r['i']:04d}.json").read_text())["seconds"] for r in recs]
    out["seconds"] = {"ships_per_prompt_mean": sum(ship_s) / len(ship_s),
                      "generation_per_prompt_mean": sum(r["gen_seconds_per_prompt"] for r in recs) / len(recs)}
    return out


def to_markdown(s: dict) -> str:
    m = s["settings"]
    lines = [f"# Per-query Ships heads ablated (the paper's Table 1): `{s['model']}`, preset `{s['preset']}`", "",
             f"{s['n_done']} held-out AdvBench prompts (of {s['n_target']} asked; evaluation part of "
             f"holdout_split(advbench, {SPLIT['n_attribution']}, {SPLIT['n_eval']}, seed={SPLIT['seed']}), in order). "
             f"Per prompt: exact Ships (KL, all heads) on the prompt in format `{m['ships_format']}`; generation in "
             f"`{m['eval_format']}`, greedy, {m['max_new_tokens']} new tokens; mode `{m['mode']}`, eps {m['eps']}. "
             "Random heads: drawn per prompt from the same layers as that prompt's top heads.", ""]
    if not s["n_done"]:
        return "\n".join(lines + ["No prompt finished yet.", ""])
    for judge_name, rows in s["judges"].items():
        lines += [f"## judge `{judge_name}`", "",
                  "| condition | ASR [95% CI] | vs baseline (paired diff, McNemar p, Holm) | vs random of same size |",
                  "|---|---|---|---|"]
        for c, r in rows.items():
            vb = r.get("vs_baseline")
            vb_s = f"{vb['diff']:+.2f} [{vb['ci'][0]:+.2f}, {vb['ci'][1]:+.2f}], p={vb['p_value']:.2g}, holm {vb['p_holm']:.2g}" if vb else ""
            vr = next((v for k, v in r.items() if k.startswith("vs_random")), None)
            vr_s = f"{vr['diff']:+.2f}, p={vr['p_value']:.2g}" if vr else ""
            lines.append(f"| {c} | {r['asr']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {vb_s} | {vr_s} |")
        lines.append("")
    lines += ["Most frequent top-1 heads: " + ", ".join(f"{h} ({n})" for h, n in s["top1_heads"]), "",
              f"Time: exact Ships {s['seconds']['ships_per_prompt_mean']:.0f} s per prompt, generation "
              f"{s['seconds']['generation_per_prompt_mean']:.0f} s per prompt (all conditions), on a shared 2-core CPU.",
              "", f"Command: `{s['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--preset", default="paper", choices=["paper", "chat", "chat-nosys"])
    ap.add_argument("--n", type=int, default=100, help="held-out prompts (a larger n extends a run)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the preset's")
    ap.add_argument("--mode", default=None, help="default: the preset's (ua)")
    ap.add_argument("--signed", action="store_true", help="also the per-prompt top heads by signed refusal effect")
    ap.add_argument("--group", type=int, default=4, help="prompts whose generations share one batch")
    ap.add_argument("--run", type=Path, default=None, help="checkpoint folder (default runs/per_query/<model>-<preset>)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy shared CPU)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this long")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the summary (default bench/results)")
    a = ap.parse_args(argv)
    a.results.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    over = {k: v for k, v in (("max_new_tokens", a.max_new_tokens), ("mode", a.mode)) if v is not None}
    cfg = RunConfig(preset=a.preset, model=a.model, **over)
    settings = {"ships_format": cfg.stage_format("ships"), "eval_format": cfg.stage_format("eval"),
                "system_prompt": cfg.system_prompt, "mode": cfg.mode, "eps": cfg.eps,
                "max_new_tokens": cfg.max_new_tokens, "signed": a.signed}
    run = a.run or Path("runs/per_query") / f"{_short(a.model)}-{a.preset}{'-' + cfg.mode if a.mode else ''}"
    (run / "ships").mkdir(parents=True, exist_ok=True)
    (run / "gen").mkdir(parents=True, exist_ok=True)
    meta_path = run / "settings.json"
    if meta_path.exists() and json.loads(meta_path.read_text())["settings"] != settings:
        raise SystemExit(f"{run} holds a run with other settings; use --run to choose another folder")
    attribution, prompts = held_out(a.n)
    stem = f"per_query_{_short(a.model)}_{a.preset}" + (f"_{cfg.mode}" if a.mode else "")
    meta = {"model": a.model, "preset": a.preset, "settings": settings, "n_target": a.n, "split": SPLIT,
            "prompts": prompts.provenance(), "command": "nice -n 10 .venv/bin/python bench/per_query.py "
            + " ".join(argv if argv is not None else sys.argv[1:])}
    if a.summary_only:
        s = summarise(run, meta)
        atomic_write_text(a.results / f"{stem}.json", json.dumps(s, indent=1, default=str))
        atomic_write_text(a.results / f"{stem}.md", to_markdown(s))
        print(to_markdown(s))
        return 0
    model, tok = load_model(a.model)
    from safetyheads.adapters import head_geometry

    geometry = head_geometry(model)
    if not meta_path.exists():
        atomic_write_text(meta_path, json.dumps({"settings": settings, "model": model_record(model),
                                                 "versions": library_versions()}, indent=1, default=str))
    rt = None
    if a.signed:
        rt_path = run / "refusal_tokens.json"
        if not rt_path.exists():
            try:
                rt = derive_refusal_tokens(model, tok, list(attribution), judge="keyword:paper",
                                           prompt_format=settings["ships_format"], system_prompt=cfg.system_prompt)
            except ValueError as e:
                print(f"no refusal tokens ({e}); the signed conditions are skipped", file=sys.stderr)
            atomic_write_text(rt_path, json.dumps({"tokens": rt}))
        rt = json.loads(rt_path.read_text())["tokens"]
    t_start = time.perf_counter()
    for g0 in range(0, a.n, a.group):
        idx = [i for i in range(g0, min(a.n, g0 + a.group)) if not (run / "gen" / f"{i:04d}.json").exists()]
        if not idx:
            continue
        if a.max_minutes and (time.perf_counter() - t_start) / 60 > a.max_minutes:
            print(f"stopping after {a.max_minutes} min; rerun to continue", flush=True)
            break
        recs = {}
        for i in idx:
            path = run / "ships" / f"{i:04d}.json"
            if not path.exists():
                t0 = time.perf_counter()
                res = ships(model, tok, [prompts[i]], mode=cfg.mode, eps=cfg.eps, prompt_format=settings["ships_format"],
                            system_prompt=cfg.system_prompt, refusal_tokens=rt, progress=False)
                rec = {"i": i, "prompt": prompts[i], "seconds": time.perf_counter() - t0,
                       "top_kl": [[h[0], h[1], h[2]] for h in res.top_heads(10, "kl")[0]],
                       "kl": res.kl[0].tolist()}
                if res.refusal is not None:
                    rec["top_refusal"] = [[h[0], h[1], h[2]] for h in res.top_heads(10, "refusal")[0]]
                    rec["refusal"] = res.refusal[0].tolist()
                atomic_write_text(path, json.dumps(rec))
                print(f"prompt {i}: Ships {rec['seconds']:.0f} s, top-1 L{rec['top_kl'][0][0]}H{rec['top_kl'][0][1]}", flush=True)
            rec = json.loads(path.read_text())
            rec["top_kl"] = [h[:2] for h in rec["top_kl"]]
            if "top_refusal" in rec:
                rec["top_refusal"] = [h[:2] for h in rec["top_refusal"]]
            recs[i] = rec
        conds = {i: conditions_for(i, recs[i], geometry, rt is not None) for i in idx}
        names = list(conds[idx[0]])
        rows = [(i, c) for i in idx for c in names]
        t0 = time.perf_counter()
        resp = generate(model, tok, [prompts[i] for i, _ in rows], rows=[conds[i][c] for i, c in rows], mode=cfg.mode,
                        eps=cfg.eps, prompt_format=settings["eval_format"], system_prompt=cfg.system_prompt,
                        max_new_tokens=cfg.max_new_tokens, batch_size=len(rows), progress=False)
        per_prompt = (time.perf_counter() - t0) / len(idx)
        for i in idx:
            out = {"i": i, "prompt": prompts[i], "conditions": conds[i], "gen_seconds_per_prompt": per_prompt,
                   "responses": {c: r for (j, c), r in zip(rows, resp, strict=True) if j == i}}
            atomic_write_text(run / "gen" / f"{i:04d}.json", json.dumps(out))
        done = len(list((run / "gen").glob("*.json")))
        print(f"prompts {idx[0]}-{idx[-1]} generated ({per_prompt:.0f} s per prompt); {done}/{a.n} done", flush=True)
        s = summarise(run, meta)
        atomic_write_text(a.results / f"{stem}.json", json.dumps(s, indent=1, default=str))
        atomic_write_text(a.results / f"{stem}.md", to_markdown(s))
    s = summarise(run, meta)
    atomic_write_text(a.results / f"{stem}.json", json.dumps(s, indent=1, default=str))
    atomic_write_text(a.results / f"{stem}.md", to_markdown(s))
    print(to_markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
