"""Generate the responses of ``src/safetyheads/data/labelled_responses.jsonl`` (labels are added by hand).

The labelled set measures refusal judges on the answers the embedded models actually give
(issue 13, item 3). This script makes the *unlabelled* responses, one resumable group at a time;
the labels come from a person reading every response (rule: ``src/safetyheads/data/labelled_responses.md``)
and are merged in with ``--labels``.

Groups (same prompt rows across groups where possible, so the set holds paired answers):

* ``qwen-chat-base``: Qwen2.5-Coder-0.5B-Instruct, chat template (its default system prompt), no
  ablation, 50 AdvBench + 30 HarmBench (test, standard) prompts.
* ``qwen-chat-ua5``: the same 80 prompts with heads (10,7), (14,10), (12,0), (11,12), (9,7) ablated,
  UA ε=1e-5 (SPEC §7: these break refusals).
* ``qwen-template-base`` / ``qwen-template-ua5``: the paper's ``## Query: {q}\\n## Answer:`` format,
  15 + 5 prompts each (the first of the same rows).
* ``smollm-chat-base``: SmolLM2-135M-Instruct, chat template, 25 AdvBench + 15 HarmBench prompts.
* ``smollm-template-base``: SmolLM2-135M-Instruct, the paper's template, 15 + 5 prompts (added after
  the first five groups gave only 19 off-topic answers: this format echoes the query most).

All greedy, 48 new tokens (the default run's budget), batches of 16 prompts of similar length.
Each group is appended to ``<out>/<group>.jsonl`` batch by batch; a rerun continues where it
stopped. ``--threads`` sets torch's thread count (1 is fastest on an oversubscribed CPU).

Usage::

    export SAFETYHEADS_CACHE=/work/cache/safetyheads
    nice -n 10 python bench/label_responses.py --out runs/label-responses            # generate
    python bench/label_responses.py --out runs/label-responses --labels labels.json \\
        --write src/safetyheads/data/labelled_responses.jsonl                       # merge labels

``labels.json`` maps row ``id`` to ``"refused" | "complied" | "off-topic"``, or to
``{"label": ..., "note": "why (close calls)"}``; every row needs one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from safetyheads.datasets import PromptSet, load_prompts
from safetyheads.evaluate import generate
from safetyheads.models import BUILTIN_MODELS, load_model
from safetyheads.provenance import atomic_write_text, library_versions

log = logging.getLogger("label_responses")

LABELS = ("refused", "complied", "off-topic")
QWEN = "builtin:qwen2.5-coder-0.5b-instruct"
SMOL = "builtin:smollm2-135m-instruct"
UA5 = [(10, 7), (14, 10), (12, 0), (11, 12), (9, 7)]
SEED = 2024  # prompt sample seed (AdvBench and HarmBench rows)
MAX_NEW_TOKENS = 48
BATCH = 16

#: group -> (model, prompt format, heads, n AdvBench, n HarmBench)
GROUPS: dict[str, tuple[str, str, list[tuple[int, int]], int, int]] = {
    "qwen-chat-base": (QWEN, "chat", [], 50, 30),
    "qwen-chat-ua5": (QWEN, "chat", UA5, 50, 30),
    "qwen-template-base": (QWEN, "template", [], 15, 5),
    "qwen-template-ua5": (QWEN, "template", UA5, 15, 5),
    "smollm-chat-base": (SMOL, "chat", [], 25, 15),
    "smollm-template-base": (SMOL, "template", [], 15, 5),
}


def prompt_sets() -> dict[str, PromptSet]:
    """The two prompt samples every group draws its first rows from."""
    return {
        "advbench": load_prompts("advbench", n=50, seed=SEED),
        "harmbench:standard": load_prompts("harmbench:standard", split="test", n=30, seed=SEED),
    }


def _data_record(ps: PromptSet, pos: int) -> dict[str, Any]:
    return {
        "dataset": ps.name,
        "split": ps.split,
        "row": ps.indices[pos],
        "source_sha256": ps.source_sha256,
        "sample": f"load_prompts({ps.name!r}, n={len(ps)}, seed={SEED}) position {pos}",
    }


def run_group(group: str, out: Path, sets: dict[str, PromptSet], models: dict[str, Any]) -> Path:
    """Generate one group's responses into ``out/<group>.jsonl``, one batch at a time (resumable)."""
    path = out / f"{group}.jsonl"
    model_name, fmt, heads, n_adv, n_hb = GROUPS[group]
    picks = [("advbench", i) for i in range(n_adv)] + [("harmbench:standard", i) for i in range(n_hb)]
    picks.sort(key=lambda p: (len(sets[p[0]][p[1]]), p))  # similar lengths share a batch
    done = {json.loads(ln)["id"] for ln in path.read_text().splitlines()} if path.exists() else set()

    def row_id(d: str, i: int) -> str:
        return f"{group}/{d.split(':')[0]}-{sets[d].indices[i]}"

    todo = [p for p in picks if row_id(*p) not in done]
    if not todo:
        log.info("%s: complete (%d rows)", group, len(done))
        return path
    if model_name not in models:
        models.clear()  # one model in memory at a time
        models[model_name] = load_model(model_name)
    model, tok = models[model_name]
    spec = BUILTIN_MODELS[model_name.split(":", 1)[1]]
    versions = library_versions()
    for start in range(0, len(todo), BATCH):
        chunk = todo[start:start + BATCH]
        prompts = [sets[d][i] for d, i in chunk]
        t0 = time.perf_counter()
        responses = generate(model, tok, prompts, heads=heads, mode="ua", eps=1e-5, prompt_format=fmt,
                             system_prompt=None, max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH,
                             progress=False)
        log.info("%s: %d/%d rows (batch %.0f s)", group, len(done) + start + len(chunk), len(picks),
                 time.perf_counter() - t0)
        lines = []
        for (d, i), p, r in zip(chunk, prompts, responses, strict=True):
            lines.append(json.dumps({
                "id": row_id(d, i),
                "group": group,
                "prompt": p,
                "response": r,
                "label": None,
                "model": model_name,
                "model_gguf_sha256": spec.sha256,
                "data": _data_record(sets[d], i),
                "prompt_format": fmt,
                "system_prompt": None,
                "ablation": {"heads": [list(h) for h in heads], "mode": "ua" if heads else None,
                             "eps": 1e-5 if heads else None},
                "generation": {"greedy": True, "max_new_tokens": MAX_NEW_TOKENS, "batch_size": BATCH,
                               "dtype": "float32", "device": "cpu"},
                "versions": versions,
            }, ensure_ascii=False) + "\n")
        with path.open("a", encoding="utf-8") as f:  # a crash loses at most the batch being written
            f.write("".join(lines))
    return path


def merge(out: Path, labels_path: Path, dest: Path) -> int:
    """Write every group's rows with their hand label from ``labels_path`` to ``dest``."""
    labels = json.loads(labels_path.read_text())
    rows = []
    for group in GROUPS:
        for line in (out / f"{group}.jsonl").read_text().splitlines():
            row = json.loads(line)
            entry = labels.get(row["id"])
            lab, note = (entry.get("label"), entry.get("note")) if isinstance(entry, dict) else (entry, None)
            if lab not in LABELS:
                raise SystemExit(f"row {row['id']}: label {lab!r} is not one of {LABELS}")
            row["label"] = lab
            if note:
                row["note"] = note
            rows.append(row)
    extra = set(labels) - {r["id"] for r in rows}
    if extra:
        raise SystemExit(f"labels for unknown rows: {sorted(extra)[:5]} ...")
    atomic_write_text(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/label-responses"))
    ap.add_argument("--groups", nargs="*", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--labels", type=Path, help="JSON {id: label}: merge instead of generating")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--write", type=Path, default=Path("src/safetyheads/data/labelled_responses.jsonl"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.labels:
        n = merge(args.out, args.labels, args.write)
        print(f"wrote {n} labelled rows to {args.write}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = prompt_sets()
    models: dict[str, Any] = {}
    for g in args.groups:
        run_group(g, args.out, sets, models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
