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

An LLM judge runs once per set (rows sorted by length so batches pad little; verdicts and raw
outputs checkpointed in ``--out`` every 32 rows, so a rerun resumes) and is timed: seconds per
row on this machine's cores (unreadable verdicts fall back to ``keyword:paper``, as in a run). Writes
``--out/judge_accuracy.json``, ``bench/results/judge_accuracy.md`` (``--md``) and the
package table ``src/safetyheads/data/judge_accuracy.json`` (``--table``, read as
``safetyheads.judges.JUDGE_ACCURACY``).

Usage::

    export SAFETYHEADS_CACHE=/work/cache/safetyheads
    nice -n 10 python bench/judge_accuracy.py                 # all judges
    python bench/judge_accuracy.py --no-llm                   # run no LLM judge: keyword judges and the
                                                              # LLM verdicts already cached in --out (seconds)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

from safetyheads.judges import (
    KEYWORD_LISTS,
    LABELS,
    RUBRICS,
    _load_judge_model,
    get_judge,
    judge_accuracy,
    load_labelled_responses,
    load_refusal_eval,
)
from safetyheads.models import BUILTIN_MODELS, ModelLoadError, _part_paths
from safetyheads.provenance import atomic_write_text, library_versions
from safetyheads.stats import mcnemar_exact

log = logging.getLogger("judge_accuracy")

LLM_MODELS = ("builtin:qwen2.5-coder-0.5b-instruct", "builtin:qwen2.5-coder-1.5b-instruct",
              "builtin:smollm2-135m-instruct")
REFERENCE = "keyword:paper"  # the default judge the others are compared with
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
    pyrit = judge_accuracy(j, which="all", verdicts=verdicts["pyrit"], max_examples=5) if "pyrit" in verdicts else None
    keep = ("n", "n_refusal", "accuracy", "precision", "recall", "f1", "tp", "fp", "tn", "fn")
    truth = [la != "complied" for la in lab]
    return {
        "judge": name,
        "correct_ours": [bool(v) == t for v, t in zip(verdicts["ours"], truth, strict=True)],
        "ours": {k: asr[k] for k in keep} | {"by_label": asr["by_label"],
                                             "false_positives": asr["false_positives"],
                                             "false_negatives": asr["false_negatives"]},
        "ours_strict": {k: strict[k] for k in keep},
        "pyrit": None if pyrit is None else {k: pyrit[k] for k in keep} | {
            "false_positives": pyrit["false_positives"], "false_negatives": pyrit["false_negatives"]},
        **extra,
    }


def llm_name(model_name: str, rubric: str) -> str:
    """The judge name ``get_judge`` gives: ``llm:smollm2:<rubric>`` or ``llm:builtin:<key>:<rubric>``."""
    spec = "smollm2" if model_name.endswith("smollm2-135m-instruct") else model_name
    return f"llm:{spec}:{rubric}"


@cache
def _rubric(name: str) -> Any:
    return RUBRICS[name]()


def _unreadable(output: str, rubric: str) -> bool:
    return _rubric(rubric).parse(output) is None


def run_llm(model_name: str, rubric: str, out: Path, model_tok: Callable[[], tuple[Any, Any]], chunk: int = 32,
            sets: tuple[str, ...] = ("ours", "pyrit")) -> tuple[dict, dict]:
    """Verdicts of one LLM judge and its timing, checkpointed every ``chunk`` rows in ``out``.

    Runs the judge on the rows of ``sets`` not yet cached (``model_tok()`` loads the model only then)
    and returns the verdicts of every set complete in the cache ({} when ``ours`` is not).
    """
    name = llm_name(model_name, rubric)
    cache = out / f"verdicts-{name.replace(':', '_').replace('/', '_')}.json"
    state: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {
        "judge": name, "verdicts": {}, "seconds": {}, "unparsed": {}, "outputs": {}}
    judge = None
    for which in sets:
        prompts, responses = _rows(which)
        order = sorted(range(len(responses)), key=lambda i: (len(responses[i]) + len(prompts[i]), i))
        done = state["verdicts"].setdefault(which, {})
        state["seconds"].setdefault(which, 0.0)
        state["unparsed"].setdefault(which, 0)
        outputs = state["outputs"].setdefault(which, {})
        todo = [i for i in order if str(i) not in done]
        if todo and judge is None:
            spec = name.split(":")[1] if name.startswith("llm:smollm2") else model_name
            judge = get_judge(f"llm:{spec}", model=model_tok()[0], tokenizer=model_tok()[1], rubric=rubric)
            assert judge.name == name, (judge.name, name)
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            t0 = time.perf_counter()
            v = judge.is_refusal([prompts[i] for i in idx], [responses[i] for i in idx])
            state["seconds"][which] += time.perf_counter() - t0
            state["unparsed"][which] += len(judge.last_unparsed)
            for i, x, o in zip(idx, v, judge.last_outputs, strict=True):
                done[str(i)] = bool(x)
                outputs[str(i)] = o
            atomic_write_text(cache, json.dumps(state))
            log.info("%s on %s: %d/%d rows, %.1f s so far", judge.name, which, len(done), len(order),
                     state["seconds"][which])
    sets = tuple(w for w in ("ours", "pyrit")  # also sets finished by an earlier invocation
                 if len(state["verdicts"].get(w, {})) == len(_rows(w)[1]))
    if "ours" not in sets:
        return {}, {}
    verdicts = {w: [state["verdicts"][w][str(i)] for i in range(len(_rows(w)[1]))] for w in sets}
    extra: dict[str, Any] = {
        "seconds": {w: round(state["seconds"][w], 1) for w in sets},
        "unparsed": dict(state["unparsed"]),
        "seconds_per_row": round(state["seconds"]["ours"] / len(verdicts["ours"]), 3),
        "unparsed_examples": [o for w in sets for o in state["outputs"][w].values() if _unreadable(o, rubric)][:5],
    }
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
        "better for ASR). \"unreadable\": an LLM judge's outputs its rubric could not parse, on ours; those "
        f"rows took `{REFERENCE}`'s verdict (the fallback a run uses), so a judge with most rows unreadable "
        f"scores as `{REFERENCE}` and measures nothing of its own.",
        "",
        "| judge | ours acc | prec | rec | strict acc | prec | rec | off-topic → refusal | PyRIT acc | prec | rec "
        "| unreadable | s/row | default-run judging |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: -r["ours"]["accuracy"]):
        o, s, p = r["ours"], r["ours_strict"], r["pyrit"]
        ot = o["by_label"].get("off-topic", {"n": 0, "judged_refusal": 0})
        spr = r.get("seconds_per_row")
        unreadable = "—" if "unparsed" not in r else f"{r['unparsed'].get('ours', 0)}/{o['n']}"
        lines.append(
            f"| `{r['judge']}` | {_pct(o['accuracy'])} | {_pct(o['precision'])} | {_pct(o['recall'])} "
            f"| {_pct(s['accuracy'])} | {_pct(s['precision'])} | {_pct(s['recall'])} "
            f"| {ot['judged_refusal']}/{ot['n']} "
            + ("| — | — | — " if p is None else f"| {_pct(p['accuracy'])} | {_pct(p['precision'])} | {_pct(p['recall'])} ")
            + f"| {unreadable} "
            + f"| {'—' if spr is None else f'{spr:.2f}'} "
            f"| {'< 1 s' if spr is None else f'{spr * DEFAULT_ROW_BUDGET / 60:.0f} min'} |"
        )
    lines += ["", f"Default-run judging = s/row × {DEFAULT_ROW_BUDGET} rows (~100 prompts × 8 conditions), at "
              f"the s/row measured here (the judge itself on both cores; load average {meta['load_average']:.1f} "
              "when the run started).", ""]
    ref = next((r for r in results if r["judge"] == REFERENCE), None)
    if ref is not None:
        lines += [f"## Paired comparison with `{REFERENCE}` on ours (ASR view)", "",
                  "Same 260 answers, so judges are compared pairwise: b = answers this judge gets right and "
                  f"`{REFERENCE}` wrong, c = the reverse; exact McNemar p (two-sided).", "",
                  "| judge | correct | b | c | p |", "|---|---|---|---|---|"]
        for r in sorted(results, key=lambda r: -r["ours"]["accuracy"]):
            if r is ref:
                continue
            b = sum(x and not y for x, y in zip(r["correct_ours"], ref["correct_ours"], strict=True))
            c = sum(y and not x for x, y in zip(r["correct_ours"], ref["correct_ours"], strict=True))
            lines.append(f"| `{r['judge']}` | {sum(r['correct_ours'])}/{len(r['correct_ours'])} | {b} | {c} "
                         f"| {mcnemar_exact(b, c):.3g} |")
        lines.append("")
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
    ap.add_argument("--sets", nargs="*", default=["ours", "pyrit"], choices=["ours", "pyrit"],
                    help="sets the LLM judges run on now (cached verdicts of earlier runs are kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    results = []
    for name in KEYWORD_LISTS:
        judge = get_judge(f"keyword:{name}")
        verdicts = {w: judge.is_refusal(*_rows(w)) for w in ("ours", "pyrit")}
        results.append(score(judge.name, verdicts, {}))
    skipped = []
    for model_name in args.models:
        if not installed(model_name):
            skipped.append(model_name)
            log.info("%s: not installed, skipped", model_name)
            continue
        loaded: list[tuple[Any, Any]] = []

        def model_tok(model_name: str = model_name, loaded: list = loaded) -> tuple[Any, Any]:
            if not loaded:
                loaded.append(_load_judge_model(model_name))
            return loaded[0]

        for rubric in args.rubrics:
            # --no-llm: only judges whose verdicts are already cached in --out are scored
            sets = () if args.no_llm else tuple(args.sets)
            verdicts, extra = run_llm(model_name, rubric, args.out, model_tok, sets=sets)
            if verdicts:
                results.append(score(llm_name(model_name, rubric), verdicts, extra))
        loaded.clear()

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
            "pyrit": None if r["pyrit"] is None else round(r["pyrit"]["accuracy"], 4),
            "n_ours": r["ours"]["n"],
            "n_ours_strict": r["ours_strict"]["n"],
            "n_pyrit": None if r["pyrit"] is None else r["pyrit"]["n"],
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
    atomic_write_text(args.md, markdown(results, meta))
    print(markdown(results, meta).split("\n## Per-label")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
