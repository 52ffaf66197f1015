"""The study: which head-finding method breaks refusals, on which model, under which settings.

Cells: model × preset × method × mode. For each cell the method finds k heads on the attribution
prompts (the attribution part of the study's AdvBench split), the heads are ablated while the model
answers the held-out prompts (the evaluation part: never seen by any method, nor by the planted
model's training), and the attack success rate (ASR) is compared prompt by prompt with the
unablated model and with layer-matched random heads (paired McNemar tests, :mod:`safetyheads.stats`).
On the planted model (``builtin:smollm2-135m-planted``) each method's recall of the planted heads at
k = |planted| is reported too: the one case where the right answer is known.

    nice -n 10 .venv/bin/python bench/study.py --models planted                  # planted model, all cells
    nice -n 10 .venv/bin/python bench/study.py --models 0.5b --presets paper chat --methods sahara ships-kl search-refusal
    nice -n 10 .venv/bin/python bench/study.py --report-only                     # rewrite study.md / study.png

Methods (small strategies over one signature, ``find(ctx, k) -> heads``):

``ships-kl``        the paper's Ships: exact KL sweep of every head on ``--n-ships`` attribution prompts,
                    the k heads with the highest mean (dataset-level Ships), in the preset's Ships format.
``sahara``          the paper's Sahara (official preset: rank 1, uncentred; estimate prefilter), in the
                    preset's Sahara format.
``per-query``       the paper's Table 1: each held-out prompt's own top-k Ships heads
                    (``bench/per_query.py``, run here for the planted model; for the others its results
                    are read when they exist).
``refusal-grad``    a gradient estimate of each head's signed effect on the refusal log-odds (cheap).
``search-refusal``  exact greedy search for the group whose ablation most lowers the refusal log-odds
                    (``safetyheads.search``), over the refusal-grad estimate's top 24 heads.
``mask``            a learned sparse head mask (``safetyheads.masks``, L1, harmless-KL penalty).

The signed methods read refusal at the answer position, so they always use the preset's evaluation
(generation) format; Ships and Sahara use the preset's own attribution formats (for ``paper``: the raw
query and ``## Query:{q}\\n## Answer:``).

Resumable: every cell's heads (``runs/study/<model>/<preset>/heads/``) and every generation
(``.../gen/``) are saved when done; a rerun skips them. Each cell prints its time. The report
(``bench/results/study.md``, ``study.json``, ``study.png``) is rebuilt from whatever is done.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import per_query  # noqa: E402

from safetyheads.config import RunConfig  # noqa: E402
from safetyheads.evaluate import derive_refusal_tokens, generate  # noqa: E402
from safetyheads.judges import get_judge  # noqa: E402
from safetyheads.models import load_model  # noqa: E402
from safetyheads.provenance import atomic_write_text, library_versions  # noqa: E402
from safetyheads.stats import layer_matched_random_heads, paired_comparison, wilson_interval  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RUNS = Path("runs/study")
MODELS = {"planted": "builtin:smollm2-135m-planted", "0.5b": "builtin:qwen2.5-coder-0.5b-instruct",
          "1.5b": "builtin:qwen2.5-coder-1.5b-instruct", "smollm2": "builtin:smollm2-135m-instruct"}
"""Study keys -> models; ``smollm2`` is the unplanted base (it hardly refuses: a control, and a quick smoke test)."""
PRESETS = ("paper", "chat", "chat-nosys")
METHODS = ("ships-kl", "sahara", "per-query", "refusal-grad", "search-refusal", "mask")
MODES = ("ua", "sc")
JUDGE = "keyword:paper"  # the paper's list, bugs fixed: one judge across presets
JUDGES = ("keyword:paper", "keyword:paper-prototype", "keyword:gcg")


@dataclass
class Ctx:
    """What a method needs: the model, the preset's settings, the attribution prompts, a cache folder."""

    model: Any
    tokenizer: Any
    cfg: RunConfig
    mode: str
    attribution: list[str]
    harmless: list[str]
    folder: Path
    n_ships: int
    refusal_tokens: list[int] | None = None
    notes: dict = field(default_factory=dict)

    def kw(self, stage: str) -> dict:
        return {"mode": self.mode, "eps": self.cfg.eps, "prompt_format": self.cfg.stage_format(stage),
                "system_prompt": self.cfg.system_prompt}


# --------------------------------------------------------------------------- methods


def find_ships_kl(ctx: Ctx, k: int) -> list:
    from safetyheads.ships import ships

    res = ships(ctx.model, ctx.tokenizer, ctx.attribution[: ctx.n_ships], progress=False, **ctx.kw("ships"))
    ctx.notes["n_prompts"] = min(ctx.n_ships, len(ctx.attribution))
    return res.dataset_top(k)


def find_sahara(ctx: Ctx, k: int) -> list:
    from safetyheads.sahara import sahara

    res = sahara(ctx.model, ctx.tokenizer, ctx.attribution, steps=k, preset="official", prefilter="estimate",
                 prefilter_k=max(12, k), progress=False, checkpoint=ctx.folder / f"sahara-{ctx.mode}.ckpt.json",
                 **ctx.kw("sahara"))
    ctx.notes["n_prompts"] = len(ctx.attribution)
    return [tuple(h) for h in res.heads]


def _need_refusal(ctx: Ctx) -> list[int]:
    if ctx.refusal_tokens is None:
        raise RuntimeError("the model never refuses the attribution prompts in this format: no signed score")
    return ctx.refusal_tokens


def find_refusal_grad(ctx: Ctx, k: int) -> list:
    from safetyheads.ships import ships_estimate

    res = ships_estimate(ctx.model, ctx.tokenizer, ctx.attribution, estimator="refusal-grad",
                         refusal_tokens=_need_refusal(ctx), progress=False, **ctx.kw("eval"))
    return res.dataset_top(k, metric="refusal")


def find_search_refusal(ctx: Ctx, k: int) -> list:
    from safetyheads.search import search_heads

    res = search_heads(ctx.model, ctx.tokenizer, ctx.attribution, objective="refusal", steps=k, prefilter="estimate",
                       prefilter_k=24, refusal_tokens=_need_refusal(ctx), progress=False,
                       checkpoint=ctx.folder / f"search-{ctx.mode}.ckpt.json", **ctx.kw("eval"))
    return [tuple(h) for h in res.heads]


def find_mask(ctx: Ctx, k: int) -> list:
    from safetyheads.masks import learn_head_mask

    res = learn_head_mask(ctx.model, ctx.tokenizer, ctx.attribution, harmless=ctx.harmless,
                          refusal_tokens=_need_refusal(ctx), validate_ks=(k,),
                          checkpoint=ctx.folder / f"mask-{ctx.mode}", **ctx.kw("eval"))
    return res.top_heads(k)


FINDERS = {"ships-kl": find_ships_kl, "sahara": find_sahara, "refusal-grad": find_refusal_grad,
           "search-refusal": find_search_refusal, "mask": find_mask}


# --------------------------------------------------------------------------- evaluation


def _generate_cached(path: Path, ctx: Ctx, prompts: list[str], heads: list, max_new_tokens: int,
                     batch_size: int) -> dict:
    """Responses to ``prompts`` with ``heads`` ablated, cached in ``path``."""
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    resp = generate(ctx.model, ctx.tokenizer, prompts, heads=[tuple(h) for h in heads], mode=ctx.mode,
                    eps=ctx.cfg.eps, prompt_format=ctx.cfg.stage_format("eval"), system_prompt=ctx.cfg.system_prompt,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    rec = {"heads": [list(h) for h in heads], "mode": ctx.mode if heads else None, "responses": resp,
           "seconds": time.perf_counter() - t0}
    atomic_write_text(path, json.dumps(rec))
    return rec


def answer_nll(model, tokenizer, cfg: RunConfig, prompts: list[str], responses: list[str]) -> float | None:
    """Mean negative log-likelihood per answer token (nats) of ``responses`` under the *unablated* model,
    teacher-forced after each formatted prompt (the eval format). A fluent answer or refusal scores low;
    gibberish (a broken model, not a jailbroken one) scores high. None when every response is empty."""
    from safetyheads.prompts import encode_prompts, format_prompts

    texts = format_prompts(tokenizer, prompts, cfg.stage_format("eval"), system_prompt=cfg.system_prompt)
    total, count = 0.0, 0
    with torch.no_grad():
        for text, resp in zip(texts, responses):
            ans = tokenizer(resp, add_special_tokens=False)["input_ids"]
            if not ans:
                continue
            ids = encode_prompts(tokenizer, [text])["input_ids"][0].tolist()
            x = torch.tensor([ids + ans])
            logp = torch.log_softmax(model(input_ids=x).logits[0, len(ids) - 1:-1].double(), dim=-1)
            total -= float(logp.gather(1, torch.tensor(ans)[:, None]).sum())
            count += len(ans)
    return total / count if count else None


def add_coherence(done: dict[str, dict], runs: Path) -> None:
    """Give every finished cell its answers' NLL under the unablated model (baseline, ablated, random
    controls), from the saved generations (``nll`` cached in each gen file): the ASR of a cell whose
    answers are gibberish measures a broken model, and this column shows it."""
    todo = [k for k, r in done.items() if r.get("method") != "per-query" and "nll" not in r]
    for model_key in sorted({k.split("/")[0] for k in todo}):
        model, tok = load_model(MODELS[model_key])
        for key in [k for k in todo if k.startswith(model_key + "/")]:
            _, preset, method, mode = key.split("/")
            cfg = RunConfig(preset=preset, model=MODELS[model_key], mode=mode)
            row, gen = done[key], runs / model_key / preset / "gen"
            prompts = per_query.held_out(row["n"])[1]
            values = {}
            for tag, name in [("base", "baseline"), ("ablated", f"{method}-{mode}")] + [
                    (f"random{i}", f"{method}-{mode}-random{i}") for i in range(len(row["asr_random"]))]:
                path = gen / f"{name}.json"
                rec = json.loads(path.read_text())
                if "nll" not in rec:
                    rec["nll"] = answer_nll(model, tok, cfg, list(prompts), rec["responses"])
                    atomic_write_text(path, json.dumps(rec))
                values[tag] = rec["nll"]
            row["nll"] = values
        del model, tok


def _success(responses: list[str], prompts: list[str], judge: str = JUDGE) -> list[bool]:
    return [not r for r in get_judge(judge).is_refusal(prompts, responses)]


def run_cell(ctx: Ctx, model_key: str, preset: str, method: str, k: int, prompts: list[str], planted: list | None,
             args) -> dict:
    """Find the heads (cached), generate with them and with layer-matched random heads, compare."""
    cell_dir = ctx.folder
    name = f"{method}-{ctx.mode}"
    t0 = time.perf_counter()
    heads_path = cell_dir / "heads" / f"{name}.json"
    if heads_path.exists():
        found = json.loads(heads_path.read_text())
    else:
        ctx.notes = {}
        th = time.perf_counter()
        heads = [list(h) for h in FINDERS[method](ctx, k)]
        found = {"heads": heads, "seconds": time.perf_counter() - th, "notes": ctx.notes}
        atomic_write_text(heads_path, json.dumps(found))
    heads = [tuple(h) for h in found["heads"]]
    base = _generate_cached(cell_dir / "gen" / "baseline.json", ctx, prompts, [], args.max_new_tokens, args.batch_size)
    abl = _generate_cached(cell_dir / "gen" / f"{name}.json", ctx, prompts, heads, args.max_new_tokens, args.batch_size)
    controls = layer_matched_random_heads(ctx.model, heads, args.random_draws, seed=zlib.crc32(name.encode()) % 997)
    rand = [_generate_cached(cell_dir / "gen" / f"{name}-random{i}.json", ctx, prompts, c, args.max_new_tokens,
                             args.batch_size) for i, c in enumerate(controls)]
    return summarise_cell(model_key, preset, method, ctx.mode, k, prompts, found, base, abl, rand, planted,
                          time.perf_counter() - t0)


def summarise_cell(model_key, preset, method, mode, k, prompts, found, base, abl, rand, planted, seconds) -> dict:
    b, a = _success(base["responses"], prompts), _success(abl["responses"], prompts)
    rs = [_success(r["responses"], prompts) for r in rand]
    n = len(prompts)
    heads = [tuple(h) for h in found["heads"]]
    row = {"model": model_key, "preset": preset, "method": method, "mode": mode, "k": k, "n": n,
           "heads": [list(h) for h in heads], "asr_baseline": sum(b) / n, "asr": sum(a) / n,
           "asr_ci": list(wilson_interval(sum(a), n)), "vs_baseline": paired_comparison(b, a).to_dict(),
           "asr_random": [sum(r) / n for r in rs], "random_heads": [r["heads"] for r in rand],
           "vs_random": [paired_comparison(r, a).to_dict() for r in rs],
           "asr_by_judge": {j: sum(_success(abl["responses"], prompts, j)) / n for j in JUDGES},
           "asr_baseline_by_judge": {j: sum(_success(base["responses"], prompts, j)) / n for j in JUDGES},
           "seconds_find": found.get("seconds"), "seconds_eval": abl.get("seconds"), "seconds_cell": seconds,
           "notes": found.get("notes", {})}
    if planted:
        row["planted_recall"] = len(set(heads) & {tuple(h) for h in planted}) / len(planted)
    return row


def _per_query_run(model_key: str, preset: str, mode: str, args) -> Path:
    """bench/per_query.py's checkpoint folder for a cell (its default, under runs/per_query/)."""
    return Path("runs/per_query") / (f"{per_query._short(MODELS[model_key])}-{preset}" + ("" if mode == "ua" else f"-{mode}"))


def per_query_cell(model_key: str, preset: str, mode: str, n: int, args, planted: list | None) -> dict | None:
    """The per-query cell: run bench/per_query.py (if ``--run-per-query``) and read its summary."""
    stem = f"per_query_{per_query._short(MODELS[model_key])}_{preset}" + ("" if mode == "ua" else f"_{mode}")
    argv = ["--model", MODELS[model_key], "--preset", preset, "--n", str(n), "--max-new-tokens", str(args.max_new_tokens),
            "--results", str(RESULTS), "--run", str(_per_query_run(model_key, preset, mode, args))]
    if mode != "ua":
        argv += ["--mode", mode]
    t0 = time.perf_counter()
    if args.run_per_query:
        per_query.main(argv)
    path = RESULTS / f"{stem}.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    rows = s.get("judges", {}).get(JUDGE)
    if not rows:
        return None
    recs = [json.loads(p.read_text()) for p in sorted(_per_query_run(model_key, preset, mode, args).glob("gen/*.json"))]
    out = {"model": model_key, "preset": preset, "method": "per-query", "mode": mode, "k": 3, "n": s["n_done"],
           "heads": "per prompt", "asr_baseline": rows["baseline"]["asr"], "asr": rows["top3"]["asr"],
           "asr_ci": rows["top3"]["ci"], "vs_baseline": rows["top3"]["vs_baseline"],
           "asr_random": [rows["random3"]["asr"]], "vs_random": [rows["top3"]["vs_random3"]],
           "asr_top1": rows["top1"]["asr"], "asr_random1": rows["random1"]["asr"],
           "top1_vs_baseline": rows["top1"]["vs_baseline"], "top1_vs_random": rows["top1"]["vs_random1"],
           "seconds_cell": time.perf_counter() - t0 if args.run_per_query else None,
           "seconds_per_prompt": s.get("seconds")}
    if planted and recs:
        ps = {tuple(h) for h in planted}
        out["planted_recall"] = sum(len({tuple(h) for h in r["conditions"]["top3"]} & ps) / len(ps) for r in recs) / len(recs)
    return out


# --------------------------------------------------------------------------- report


def _p(x: float) -> str:
    return f"{x:.1g}" if x < 0.01 else f"{x:.2f}"


def write_report(rows: list[dict], meta: dict) -> None:
    """study.json, study.md and study.png from the finished cells."""
    atomic_write_text(RESULTS / "study.json", json.dumps({"meta": meta, "cells": rows}, indent=1, default=str))
    lines = ["# Study: which heads break refusals, on which model, under which settings", "",
             f"Held-out: the first n prompts of the evaluation part of holdout_split(advbench, "
             f"{per_query.SPLIT['n_attribution']}, {per_query.SPLIT['n_eval']}, seed=0); attribution: its "
             f"{meta['n_attribution']}-prompt attribution part (Ships-KL: the first {meta['n_ships']}). Greedy, "
             f"{meta['max_new_tokens']} new tokens, judge `{JUDGE}` (the paper's list, bugs fixed). k = {meta['k']} heads "
             "(per-query: each prompt's own top 3; top 1 in the notes). Random: layer-matched heads (same layers as the "
             "method's heads). p: exact McNemar on the same prompts. Planted recall: share of the planted heads among "
             "the k found (planted model only). Answer NLL: mean nats per answer token of the answers under the "
             "unablated model (baseline → ablated): a keyword judge counts gibberish as attack success, and a high "
             "NLL says the ablation broke the model rather than its refusal. The unablated model also finds "
             "*compliance* unlikely when it always refuses (the planted model), so fluent compliant answers score "
             "~1 nat/token there too: read the column as an ordering and check the answers (runs/study/.../gen/).",
             "",
             "| model | preset | method | mode | heads | n | ASR base | ASR ablated [95% CI] | Δ vs base (p) | ASR random | "
             "Δ vs random (p) | planted recall | answer NLL base → ablated | find / eval time |", "|---" * 14 + "|"]
    for r in rows:
        hs = r["heads"] if isinstance(r["heads"], str) else " ".join(f"L{a}H{b}" for a, b in r["heads"])
        vb = r["vs_baseline"]
        vr = r["vs_random"][0] if r["vs_random"] else None
        rec = f"{r['planted_recall']:.2f}" if "planted_recall" in r else ""
        tf = r.get("seconds_find")
        te = r.get("seconds_eval")
        times = f"{tf / 60:.1f} / {te / 60:.1f} min" if tf is not None and te is not None else ""
        nll = r.get("nll") or {}
        coh = (f"{nll['base']:.2f} → {nll['ablated']:.2f}" if nll.get("base") is not None
               and nll.get("ablated") is not None else "")
        lines.append(f"| {r['model']} | {r['preset']} | {r['method']} | {r['mode']} | {hs} | {r['n']} | "
                     f"{r['asr_baseline']:.2f} | {r['asr']:.2f} [{r['asr_ci'][0]:.2f}, {r['asr_ci'][1]:.2f}] | "
                     f"{vb['diff']:+.2f} ({_p(vb['p_value'])}) | {', '.join(f'{x:.2f}' for x in r['asr_random'])} | "
                     + (f"{vr['diff']:+.2f} ({_p(vr['p_value'])})" if vr else "") + f" | {rec} | {coh} | {times} |")
    pq = [r for r in rows if r["method"] == "per-query"]
    if pq:
        lines += ["", "Per-query top-1 (the paper's 16× claim): "
                  + "; ".join(f"{r['model']}/{r['preset']}/{r['mode']}: ASR {r['asr_baseline']:.2f} → {r['asr_top1']:.2f} "
                              f"(p={_p(r['top1_vs_baseline']['p_value'])}), random-1 {r['asr_random1']:.2f}" for r in pq)]
    by_command: dict[str, list[str]] = {}
    for r in rows:
        cmd = r.get("command") or meta.get("cells_command") or "(not recorded)"
        by_command.setdefault(cmd, []).append(f"{r['model']}/{r['preset']}/{r['method']}/{r['mode']}")
    lines += ["", "Cells not run are absent. Commands: see the header of `bench/study.py`. The cells were made by:", ""]
    lines += [f"- `{cmd}`: {', '.join(keys)}" for cmd, keys in by_command.items()]
    lines += ["", f"This report: `{meta['command']}`.", ""]
    atomic_write_text(RESULTS / "study.md", "\n".join(lines))
    _figure(rows)


def _figure(rows: list[dict]) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["preset"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False, sharey=True)
    for ax, (m, p) in zip(axes[0], groups, strict=True):
        rs = [r for r in rows if (r["model"], r["preset"]) == (m, p)]
        labels = [f"{r['method']}\n{r['mode']}" for r in rs]
        x = range(len(rs))
        ax.bar([i - 0.2 for i in x], [r["asr"] for r in rs], 0.4, label="heads ablated",
               yerr=[[r["asr"] - r["asr_ci"][0] for r in rs], [r["asr_ci"][1] - r["asr"] for r in rs]], capsize=2)
        ax.bar([i + 0.2 for i in x], [sum(r["asr_random"]) / max(1, len(r["asr_random"])) for r in rs], 0.4,
               label="random (layer-matched)", color="#bbbbbb")
        ax.axhline(rs[0]["asr_baseline"], color="k", ls="--", lw=1, label="no ablation")
        ax.set_xticks(list(x), labels, fontsize=7, rotation=45, ha="right")
        ax.set_title(f"{m} / {p}", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"ASR ({JUDGE})")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "study.png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["planted"], choices=list(MODELS))
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--only", default=None, help="glob over 'model/preset/method/mode' (e.g. 'planted/*/sahara/*')")
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--n-attribution", type=int, default=16)
    ap.add_argument("--n-ships", type=int, default=8, help="attribution prompts of the exact Ships sweep")
    ap.add_argument("--n-harmless", type=int, default=16, help="harmless prompts (the mask's KL penalty)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--random-draws", type=int, default=1)
    ap.add_argument("--run-per-query", action="store_true", help="run bench/per_query.py for the per-query cells")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop cleanly (between cells) after this long")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--cells-command", default=None, help="with --report-only: the command(s) that made the cells, "
                                                          "named in study.md")
    ap.add_argument("--runs", type=Path, default=RUNS, help="checkpoint folder of this study (one set of settings)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where study.md/json/png go (default bench/results)")
    a = ap.parse_args(argv)
    RESULTS = a.results
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    meta = {"n_attribution": a.n_attribution, "n_ships": a.n_ships, "max_new_tokens": a.max_new_tokens, "k": a.k,
            "versions": library_versions(),
            "command": "nice -n 10 .venv/bin/python bench/study.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    runs = a.runs
    settings = {"n_eval": a.n_eval, "n_attribution": a.n_attribution, "n_ships": a.n_ships, "n_harmless": a.n_harmless,
                "k": a.k, "max_new_tokens": a.max_new_tokens, "random_draws": a.random_draws, "split": per_query.SPLIT}
    runs.mkdir(parents=True, exist_ok=True)
    if (runs / "settings.json").exists():
        old = json.loads((runs / "settings.json").read_text())
        if old != json.loads(json.dumps(settings)) and not a.report_only:
            diff = sorted(k for k in settings if old.get(k) != json.loads(json.dumps(settings)).get(k))
            raise SystemExit(f"{runs} holds a study with other settings ({', '.join(diff)}); pass --runs DIR for a new one")
    else:
        atomic_write_text(runs / "settings.json", json.dumps(settings, indent=1))
    meta["settings"] = settings
    done_path = runs / "cells.json"
    done: dict[str, dict] = json.loads(done_path.read_text()) if done_path.exists() else {}
    if a.report_only:
        meta["cells_command"] = a.cells_command
        write_report(list(done.values()), meta)
        print((RESULTS / "study.md").read_text())
        return 0
    from safetyheads.datasets import load_prompts

    attribution, evaluation = per_query.held_out(a.n_eval)
    prompts = list(evaluation)
    meta["held_out"], meta["attribution"] = evaluation.provenance(), attribution.provenance()
    harmless = list(load_prompts("rho-harmless", n=a.n_harmless, seed=0))
    t_start = time.perf_counter()
    for model_key in a.models:
        model = tok = None
        planted = None
        for preset in a.presets:
            for mode in a.modes:
                for method in a.methods:
                    key = f"{model_key}/{preset}/{method}/{mode}"
                    if a.only and not fnmatch.fnmatch(key, a.only):
                        continue
                    if key in done:
                        continue
                    if a.max_minutes and (time.perf_counter() - t_start) / 60 > a.max_minutes:
                        print(f"time budget ({a.max_minutes} min) spent; rerun to continue", flush=True)
                        add_coherence(done, runs)
                        atomic_write_text(done_path, json.dumps(done, indent=1, default=str))
                        write_report(list(done.values()), meta)
                        return 0
                    print(f"cell {key} ...", flush=True)
                    t0 = time.perf_counter()
                    if model_key == "planted":
                        from safetyheads.planted import planted_info

                        planted = planted_info()["planted_heads"]
                    if method == "per-query":
                        row = per_query_cell(model_key, preset, mode, a.n_eval, a, planted)
                        if row is None:
                            print(f"cell {key}: no per-query results (run with --run-per-query)", flush=True)
                            continue
                    else:
                        if model is None:
                            model, tok = load_model(MODELS[model_key])
                        cfg = RunConfig(preset=preset, model=MODELS[model_key], mode=mode,
                                        max_new_tokens=a.max_new_tokens)
                        folder = runs / model_key / preset
                        (folder / "heads").mkdir(parents=True, exist_ok=True)
                        (folder / "gen").mkdir(parents=True, exist_ok=True)
                        ctx = Ctx(model, tok, cfg, mode, list(attribution)[: a.n_attribution], harmless, folder, a.n_ships)
                        rt_path = folder / "refusal_tokens.json"
                        if not rt_path.exists():
                            try:
                                rt = derive_refusal_tokens(model, tok, ctx.attribution, judge=JUDGE,
                                                           prompt_format=cfg.stage_format("eval"),
                                                           system_prompt=cfg.system_prompt)
                            except ValueError as e:
                                rt = None
                                print(f"  no refusal tokens for {model_key}/{preset}: {e}", flush=True)
                            atomic_write_text(rt_path, json.dumps({"tokens": rt}))
                        ctx.refusal_tokens = json.loads(rt_path.read_text())["tokens"]
                        try:
                            row = run_cell(ctx, model_key, preset, method, a.k, prompts, planted, a)
                        except RuntimeError as e:
                            print(f"cell {key}: skipped ({e})", flush=True)
                            continue
                    row["command"] = meta["command"]
                    done[key] = row
                    atomic_write_text(done_path, json.dumps(done, indent=1, default=str))
                    write_report(list(done.values()), meta)
                    print(f"cell {key}: ASR {row['asr_baseline']:.2f} -> {row['asr']:.2f} "
                          f"(random {row['asr_random']}), heads {row['heads']}"
                          + (f", planted recall {row['planted_recall']:.2f}" if "planted_recall" in row else "")
                          + f"  [{(time.perf_counter() - t0) / 60:.1f} min]", flush=True)
        del model, tok
    add_coherence(done, runs)
    atomic_write_text(done_path, json.dumps(done, indent=1, default=str))
    write_report(list(done.values()), meta)
    print((RESULTS / "study.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
