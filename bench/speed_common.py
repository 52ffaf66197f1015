"""What the A-vs-B speed scripts share: alternating timed repeats, min/median, the markdown rows
(``bench/utility_kl_speed.py``, ``bench/asr_search_speed.py``); and :func:`finish`, the output files
of every bench script that writes a table and its record (also ``bench/head_interaction.py``,
``bench/subset_search.py``)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetyheads.provenance import atomic_write_text, library_versions


def alternate(paths: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[tuple[float, float]]],
                                                                          dict[str, Any]]:
    """Run every path ``repeats`` times, alternating; ``(times, last results)`` with ``times[name]`` a list
    of ``(wall s, CPU s)``."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, run in paths.items():
            w, c = time.perf_counter(), time.process_time()
            results[name] = run()
            times[name].append((time.perf_counter() - w, time.process_time() - c))
    return times, results


def min_median(times: list[tuple[float, float]], i: int) -> tuple[float, float]:
    """Min and median of the wall (``i=0``) or CPU (``i=1``) seconds."""
    xs = [t[i] for t in times]
    return min(xs), statistics.median(xs)


def timing_row(label: str, times: list[tuple[float, float]], *extra: str) -> str:
    (wmin, wmed), (cmin, cmed) = min_median(times, 0), min_median(times, 1)
    return "| " + " | ".join([label, f"{wmin:.1f}", f"{wmed:.1f}", f"{cmin:.1f}", f"{cmed:.1f}", *extra]) + " |"


def ratios(times: dict[str, list[tuple[float, float]]], old: str, new: str) -> tuple[float, float]:
    """Median wall and CPU ratios ``old / new``."""
    return (min_median(times[old], 0)[1] / min_median(times[new], 0)[1],
            min_median(times[old], 1)[1] / min_median(times[new], 1)[1])


def finish(lines: list[str], out: Path | None, record: dict[str, Any]) -> None:
    """Print the table (with the command line); with ``out``, write it and ``record`` (.json beside it)."""
    text = "\n".join([*lines, "", "Command: `" + " ".join(["python", *sys.argv]) + "`"]) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
        atomic_write_text(out.with_suffix(".json"),
                          json.dumps({**record, "argv": sys.argv, "versions": library_versions()}, indent=2,
                                     default=str))
