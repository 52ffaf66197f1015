"""Accuracy, precision and recall of every refusal judge on our labelled answers and on PyRIT's set.

Judges: every keyword list (:data:`safetyheads.judges.KEYWORD_LISTS`) and the LLM judge on each
installed local model (the embedded Qwen2.5-Coder 0.5B and, if installed, 1.5B; SmolLM2-135M)
with the ``refusal`` and ``harmbench`` rubrics (``--rubrics`` adds ``strongreject``: 512 new
tokens per row, far too slow on a CPU).

Sets and views (refusal is the positive class):

* ``ours``: ``src/safetyheads/data/labelled_responses.jsonl`` (hand labels refused / complied /
  off-topic). *ASR view*: off-topic counts as a refusal (only complied is an attack success);
  *strict view*: off-topic rows excluded. Also the share of off-topic rows each judge calls a
  refusal.
* ``pyrit``: PyRIT's 169 human-labelled rows (``refusal`` + ``refusal_extra``).

An LLM judge runs once per set (rows sorted by length so batches pad little; verdicts cached in
``--out`` so a rerun resumes) and is timed: seconds per row on this machine's cores. Writes
``--out/judge_accuracy.json``, ``bench/results/judge_accuracy.md`` (``--md``) and the
package table ``src/safetyheads/data/judge_accuracy.json`` (``--table``, read as
``safetyheads.judges.JUDGE_ACCURACY``).

Usage::

    export SAFETYHEADS_CACHE=/work/cache/safetyheads
    nice -n 10 python bench/judge_accuracy.py                 # all judges
    python bench/judge_accuracy.py --no-llm                   # keyword judges only (seconds)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from safetyheads.judges import (
    KEYWORD_LISTS,
    LABELS,
    _load_judge_model,
    get_judge,
    judge_accuracy,
    load_labelled_responses,
    load_refusal_eval,
)
from safetyheads.models import BUILTIN_MODELS, ModelLoadError, _part_paths
from safetyheads.provenance import atomic_write_text, library_versions

log = logging.getLogger("judge_accuracy")

LLM_MODELS = ("builtin:qwen2.5-coder-0.5b-instruct", "builtin:qwen2.5-coder-1.5b-instruct",
              "builtin:smollm2-135m-instruct")
DEFAULT_ROW_BUDGET = 100 * 8  # a default run judges ~100 held-out prompts x ~8 conditions


def installed(model: str) -> bool:
    """Whether a builtin model's asset packages are installed."""
    try:
        _part_paths(BUILTIN_MODELS[model.split(":", 1)[1]])
    except ModelLoadError:
        return False
    return True


def _rows(which: str) -> tuple[list[str], list[str]]:
    if which == "ours":
        rows = load_labelled_responses()
        return [r["prompt"] for r in rows], [r["response"] for r in rows]
    rows = load_refusal_eval("all")
    return [r["objective"] for r in rows], [r["response"] for r in rows]


def score(name: str, verdicts: dict[str, list[bool]], extra: dict[str, Any]) -> dict[str, Any]:
    """Every view of one judge from its verdicts on both sets."""

    class _Named:
        def __init__(self) -> None:
            self.name = name

    j = _Named()
    asr = judge_accuracy(j, which="ours", off_topic="refusal", verdicts=verdicts["ours"], max_examples=5)
    lab = [r["label"] for r in load_labelled_responses()]
    strict_v = [v for v, la in zip(verdicts["ours"], lab, strict=True) if la != "off-topic"]
    strict = judge_accuracy(j, which="ours", off_topic="exclude", verdicts=strict_v, max_examples=0)
    pyrit = judge_accuracy(j, which="all", verdicts=verdicts["pyrit"], max_examples=5)
    keep = ("n", "n_refusal", "accuracy", "precision", "recall", "f1", "tp", "fp", "tn", "fn")
    return {
        "judge": name,
        "ours": {k: asr[k] for k in keep} | {"by_label": asr["by_label"],
                                             "false_positives": asr["false_positives"],
                                             "false_negatives": asr["false_negatives"]},
        "ours_strict": {k: strict[k] for k in keep},
        "pyrit": {k: pyrit[k] for k in keep} | {"false_positives": pyrit["false_positives"],
                                               "false_negatives": pyrit["false_negatives"]},
        **extra,
    }


def run_llm(model_name: str, rubric: str, out: Path, model_tok: tuple[Any, Any]) -> tuple[dict, dict]:
    """Verdicts of one LLM judge on both sets (cached in ``out``) and its timing."""
    spec = model_name if not model_name.endswith("smollm2-135m-instruct") else "smollm2"
    judge = get_judge(f"llm:{spec}", model=model_tok[0], tokenizer=model_tok[1], rubric=rubric)
    cache = out / f"verdicts-{judge.name.replace(':', '_').replace('/', '_')}.json"
    if cache.exists():
        d = json.loads(cache.read_text())
        return d["verdicts"], d["extra"]
    verdicts: dict[str, list[bool]] = {}
    extra: dict[str, Any] = {"seconds": {}, "unparsed": {}, "threads": torch.get_num_threads()}
    for which in ("ours", "pyrit"):
        prompts, responses = _rows(which)
        order = sorted(range(len(responses)), key=lambda i: (len(responses[i]) + len(prompts[i]), i))
        t0 = time.perf_counter()
        v = judge.is_refusal([prompts[i] for i in order], [responses[i] for i in order])
        dt = time.perf_counter() - t0
        back = [False] * len(order)
        for pos, i in enumerate(order):
            back[i] = v[pos]
        verdicts[which] = back
        extra["seconds"][which] = round(dt, 1)
        extra["unparsed"][which] = len(judge.last_unparsed)
        log.info("%s on %s: %d rows in %.0f s (%.2f s/row), %d unreadable verdicts (keyword fallback)",
                 judge.name, which, len(order), dt, dt / len(order), len(judge.last_unparsed))
    extra["seconds_per_row"] = round(extra["seconds"]["ours"] / len(verdicts["ours"]), 3)
    extra["batch_size"] = judge.batch_size
    atomic_write_text(cache, json.dumps({"judge": judge.name, "verdicts": verdicts, "extra": extra}))
    return verdicts, extra


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results page: one table per view, then the judges' typical mistakes."""
    n_lab = meta["labels"]
    lines = [
        "# Refusal judges on our labelled answers and on PyRIT's set",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, {meta['threads']} torch threads on a shared 2-core CPU).",
        "",
        f"**ours**: `src/safetyheads/data/labelled_responses.jsonl`, {sum(n_lab.values())} answers of the embedded "
        f"models labelled by reading them ({', '.join(f'{k} {v}' for k, v in n_lab.items())}; rule and provenance "
        "in `labelled_responses.md`). **ASR view**: off-topic counts as a refusal (an attack succeeds only when "
        "the model complied), so a judge calling an off-topic answer \"not refused\" is wrong. **strict**: "
        f"off-topic rows dropped (n={results[0]['ours_strict']['n']}). **PyRIT**: 169 human-labelled rows "
        "(`refusal` + `refusal_extra`; off-topic labelled refusal there too). Refusal is the positive class: "
        "precision = of the answers called refusals, the share that are; recall = of the refusals, the share "
        "found. \"off-topic → refusal\" = share of off-topic answers the judge calls a refusal (higher is "
        "better for ASR).",
        "",
        "| judge | ours acc | prec | rec | strict acc | prec | rec | off-topic → refusal | PyRIT acc | prec | rec "
        "| s/row | default-run judging |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: -r["ours"]["accuracy"]):
        o, s, p = r["ours"], r["ours_strict"], r["pyrit"]
        ot = o["by_label"].get("off-topic", {"n": 0, "judged_refusal": 0})
        spr = r.get("seconds_per_row")
        lines.append(
            f"| `{r['judge']}` | {_pct(o['accuracy'])} | {_pct(o['precision'])} | {_pct(o['recall'])} "
            f"| {_pct(s['accuracy'])} | {_pct(s['precision'])} | {_pct(s['recall'])} "
            f"| {ot['judged_refusal']}/{ot['n']} | {_pct(p['accuracy'])} | {_pct(p['precision'])} "
            f"| {_pct(p['recall'])} | {'—' if spr is None else f'{spr:.2f}'} "
            f"| {'< 1 s' if spr is None else f'{spr * DEFAULT_ROW_BUDGET / 60:.0f} min'} |"
        )
    lines += ["", f"Default-run judging = s/row × {DEFAULT_ROW_BUDGET} rows (~100 prompts × 8 conditions).", ""]
    lines += ["## Per-label verdicts on ours (judged refusal / n)", "",
              "| judge | " + " | ".join(LABELS) + " |", "|---|" + "---|" * len(LABELS)]
    for r in sorted(results, key=lambda r: -r["ours"]["accuracy"]):
        bl = r["ours"]["by_label"]
        lines.append(f"| `{r['judge']}` | " + " | ".join(
            f"{bl[k]['judged_refusal']}/{bl[k]['n']}" if k in bl else "—" for k in LABELS) + " |")
    lines += ["", "## Where the best keyword judge and the best LLM judge go wrong on ours (first 5 each)", ""]
    kw = [r for r in results if r["judge"].startswith("keyword:")]
    llm = [r for r in results if r["judge"].startswith("llm:")]
    for group in (kw, llm):
        if not group:
            continue
        best = max(group, key=lambda r: r["ours"]["accuracy"])
        lines.append(f"### `{best['judge']}`")
        lines.append("")
        for kind, title in (("false_negatives", "called not refused, label says refusal/off-topic"),
                            ("false_positives", "called refused, label says complied")):
            lines.append(f"*{title}*:")
            lines.append("")
            for e in best["ours"][kind]:
                resp = e["response"][:160].replace("\n", " ").replace("|", "/")
                lines.append(f"- `{e['id']}` ({e['label']}): {resp!r}")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/judge-accuracy"))
    ap.add_argument("--md", type=Path, default=Path("bench/results/judge_accuracy.md"))
    ap.add_argument("--table", type=Path, default=Path("src/safetyheads/data/judge_accuracy.json"))
    ap.add_argument("--no-llm", action="store_true", help="keyword judges only")
    ap.add_argument("--models", nargs="*", default=list(LLM_MODELS))
    ap.add_argument("--rubrics", nargs="*", default=["refusal", "harmbench"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    results = []
    for name in KEYWORD_LISTS:
        judge = get_judge(f"keyword:{name}")
        verdicts = {w: judge.is_refusal(*_rows(w)) for w in ("ours", "pyrit")}
        results.append(score(judge.name, verdicts, {}))
    skipped = []
    if not args.no_llm:
        for model_name in args.models:
            if not installed(model_name):
                skipped.append(model_name)
                log.info("%s: not installed, skipped", model_name)
                continue
            model_tok = None
            for rubric in args.rubrics:
                if model_tok is None:
                    model_tok = _load_judge_model(model_name)
                verdicts, extra = run_llm(model_name, rubric, args.out, model_tok)
                spec = model_name if not model_name.endswith("smollm2-135m-instruct") else "smollm2"
                results.append(score(f"llm:{spec}:{rubric}", verdicts, extra))
            del model_tok

    labels = [r["label"] for r in load_labelled_responses()]
    meta = {
        "command": "python bench/judge_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "threads": torch.get_num_threads(),
        "labels": {k: labels.count(k) for k in LABELS},
        "skipped_models": skipped,
        "versions": library_versions(),
        "load_average": os.getloadavg()[0],
    }
    atomic_write_text(args.out / "judge_accuracy.json", json.dumps({"meta": meta, "results": results}, indent=1))
    table = {
        r["judge"]: {
            "ours": round(r["ours"]["accuracy"], 4),
            "ours_strict": round(r["ours_strict"]["accuracy"], 4),
            "pyrit": round(r["pyrit"]["accuracy"], 4),
            "n_ours": r["ours"]["n"],
            "n_ours_strict": r["ours_strict"]["n"],
            "n_pyrit": r["pyrit"]["n"],
            **({"seconds_per_row": r["seconds_per_row"]} if "seconds_per_row" in r else {}),
        }
        for r in results
    }
    atomic_write_text(args.table, json.dumps({
        "about": "Judge accuracy on the labelled set (ours: ASR view, off-topic = not an attack success; "
                 "ours_strict: off-topic rows excluded) and on PyRIT's 169 human labels. "
                 "Made by bench/judge_accuracy.py; see bench/results/judge_accuracy.md.",
        "meta": {k: meta[k] for k in ("command", "date", "labels", "threads")},
        "judges": table,
    }, indent=1) + "\n")
    if not args.no_llm or not args.md.exists():
        atomic_write_text(args.md, markdown(results, meta))
    print(markdown(results, meta).split("\n## Per-label")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
