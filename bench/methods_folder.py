"""Reading a ``bench/methods_bench.py`` folder, for the scripts that take one further
(``bench/head_interaction.py``, ``bench/subset_search.py``): its settings and prompts, a method's heads
at k, its stored responses, and one condition's row."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any


def folder_parser(doc: str, *, method: str, k_help: str) -> argparse.ArgumentParser:
    """The arguments every script that takes a folder further has: the folder, a method of its table and
    that method's top ``--k``, the generation batch, threads and ``--out``; the script adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", type=Path, help="a methods_bench.py output folder")
    p.add_argument("--method", default=method, help="a method of the folder's methods.json rows")
    p.add_argument("--k", type=int, default=8, help=k_help)
    p.add_argument("--batch-size", type=int, default=64, help="generation rows per batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the markdown table here (and .json beside it)")
    return p


def load_folder(folder: Path) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """``(bench config, prompt sets)``: the settings every result of the folder was made with, and its
    ``attribution`` / ``eval`` / ``harmless`` / ``train_harmless`` prompts."""
    cfg = json.loads((folder / "bench_config.json").read_text())["config"]
    return cfg, json.loads((folder / "prompts.json").read_text())


def method_heads(folder: Path, method: str, k: int) -> list[tuple[int, int]]:
    """The heads the folder's ``methods.json`` reports for ``method`` at ``k``, in their order. The
    refusal gradient ranks every head, so its top k at a k the table has no row for is read from its
    stored ranking (``refusal_grad.json``; the rows are that ranking's prefixes)."""
    rows = json.loads((folder / "methods.json").read_text())["rows"]
    for r in rows:
        if r["method"] == method and r["k"] == k:
            return [tuple(h) for h in r["heads"]]
    if method == "refusal-grad" and (folder / "refusal_grad.json").exists():
        from safetyheads.ships import ShipsResult

        return [tuple(h) for h in ShipsResult.load(folder / "refusal_grad").dataset_top(k, metric="refusal")]
    have = sorted({(r["method"], r["k"]) for r in rows})
    sys.exit(f"{folder}/methods.json has no row for {method} k={k}; it has {have}")


def reuse_responses(folder: Path, out: Path, names: list[str]) -> None:
    """Copy the folder's responses of ``names`` into ``out/responses``; the evaluation loads a copy only if
    its recorded settings (model, prompts, ablation, heads, generation) equal the new condition's."""
    (out / "responses").mkdir(parents=True, exist_ok=True)
    for c in names:
        for suffix in (".jsonl", ".config.json"):
            src = folder / "responses" / f"{c}{suffix}"
            if src.exists() and not (out / "responses" / src.name).exists():
                shutil.copyfile(src, out / "responses" / src.name)


def condition_row(c, base) -> dict[str, Any]:
    """A held-out condition against the unablated one: heads, ASR, its rise, exact McNemar p."""
    return {"name": c.name, "heads": [list(h) for h in c.heads], "asr": c.asr, "delta": c.asr - base.asr,
            "p_mcnemar": c.paired.get("asr", {}).get("p_value")}


def head_labels(heads) -> str:
    return " ".join(f"L{x}H{y}" for x, y in heads)
