"""Real ``safetyheads`` runs on SmolLM2-135M, made once per test session and shared by test modules.

Each run costs tens of seconds of CPU, so tests/test_cli.py, tests/test_resume.py and
tests/test_provenance.py share the same folders: :func:`shared` builds a named run the first time
any module asks for it and returns the cached result afterwards, re-raising the original error if the
build failed — once per session, also when pytest-xdist spreads the modules over several worker processes.

:func:`result_files` reads every result a run folder holds (JSON, JSONL, safetensors) in a form
that compares equal between two runs exactly when their results are the same: tensors bit for bit,
JSON equal except the wall-clock fields (:data:`TIMING_KEYS`).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

MODEL = "builtin:smollm2-135m-instruct"

#: the smallest run that still reaches every checkpoint: 2 attribution prompts both scored exactly (a
#: per-prompt checkpoint with one still to do), 2 Sahara steps, 2 held-out + 1 harmless prompt, 3 new
#: tokens; 7 conditions × their prompts = 12 generated rows = 2 generation batches of 8 (test_resume
#: interrupts the evaluation between them: --eval-batch-size must reach the generation)
BASE = ["--model", MODEL, "--n-attribution", "2", "--n-ships-exact", "2", "--n-eval", "2", "--n-harmless", "1",
        "--max-new-tokens", "3", "--steps", "2", "--prefilter-k", "3", "--random-controls", "1", "--batch-size", "8",
        "--eval-batch-size", "8", "--quiet"]

#: the reference run (made by the subcommands) and the run test_resume interrupts: BASE under the paper's
#: preset, so the preset goes end to end through every subcommand — and its exact Ships sweep reads the
#: raw query (9 tokens, not the chat template's 39: the sweep, a forward pass per head, is most of a run)
SMALL = [*BASE, "--preset", "paper"]

#: the ``--mode sc`` run: the package defaults (chat template, default system prompt: what a new user's
#: first run does, on a cold cache), another seed (so another split and random control), one prompt
#: scored exactly
SC_RUN = ["--mode", "sc", "--seed", "1", "--n-ships-exact", "1"]

#: the ``--mode mean`` run: the reference's preset and seed (the same prompts in the same formats, so its
#: Ships scores differ from the reference's only by the mode); every stage gets the run's saved head
#: means; no exact sweep, to stay cheap
MEAN_RUN = ["--mode", "mean", "--n-ships-exact", "0", "--preset", "paper"]

#: keys whose values are wall-clock facts, not results
TIMING_KEYS = frozenset({"created", "seconds"})

#: files of a run folder that are not results (log, rendered report, plots)
NOT_RESULTS = ("run.log", "report.html")

_cache: dict[str, tuple[bool, Any]] = {}


def cli(*args: str, timeout: float = 3600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m safetyheads.cli ARGS`` in a subprocess (the real entry point), output captured."""
    r = subprocess.run([sys.executable, "-m", "safetyheads.cli", *args], capture_output=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    # decoded by hand: text=True would turn the carriage returns of a progress bar into newlines
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    return r


def timed_cli(*args: str, **kw: Any) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = cli(*args, **kw)
    return r, time.perf_counter() - t0


def check(r: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    """Fail with the command's stderr if it did not exit 0."""
    assert r.returncode == 0, f"{what}: exit {r.returncode}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


def shared(tmp_path_factory, name: str, build: Callable[[Path], Any]) -> Any:
    """``build(folder)`` once per session for ``name``; later calls return its result (or re-raise its error).

    Once per session, not per process: under pytest-xdist the first worker to ask builds the run under a
    file lock in the session's shared root (``SAFETYHEADS_TEST_ROOT``, tests/conftest.py) and pickles the
    outcome beside it; a worker that asks meanwhile waits on the lock, then reads the outcome."""
    if name not in _cache:
        root = os.environ.get("SAFETYHEADS_TEST_ROOT")
        base = (Path(root) if root else tmp_path_factory.getbasetemp()) / "shared-runs"
        base.mkdir(parents=True, exist_ok=True)
        outcome = base / f"{name}.pickle"
        with FileLock(str(base / f"{name}.lock")):
            if outcome.exists():
                _cache[name] = pickle.loads(outcome.read_bytes())
            else:
                try:
                    result: tuple[bool, Any] = (True, build(base / name))
                except Exception as e:  # noqa: BLE001 - re-raised for every test that needs this run
                    result = (False, e)
                try:
                    blob = pickle.dumps(result)
                except Exception:  # noqa: BLE001 - an error that does not pickle still reaches the others
                    blob = pickle.dumps((False, RuntimeError(f"building shared run {name} failed: {result[1]!r}")))
                outcome.write_bytes(blob)
                _cache[name] = result
    ok, value = _cache[name]
    if not ok:
        raise value
    return value


def build_with_subcommands(out: Path) -> dict[str, Any]:
    """The SMALL study made stage by stage: ``ships``, ``sahara``, ``evaluate``, then ``report``."""
    steps = {}
    for cmd in ("ships", "sahara", "evaluate"):
        r, s = timed_cli(cmd, *SMALL, "--out", str(out))
        steps[cmd] = (check(r, f"safetyheads {cmd}"), s)
    r, s = timed_cli("report", str(out))
    steps["report"] = (check(r, "safetyheads report"), s)
    return {"out": out, "steps": steps}


def build_run(extra: list[str], *, cold_cache: bool = False) -> Callable[[Path], dict[str, Any]]:
    """A builder for ``safetyheads run BASE + extra`` in one process. ``cold_cache``: the run gets its own
    empty model cache (``<out>-cold-cache``, returned as ``"cache"``), so it takes the cold path (assemble,
    verify, dequantize, cache) whatever ran before it, a developer's warm SAFETYHEADS_TEST_CACHE included."""
    def build(out: Path) -> dict[str, Any]:
        cache = out.parent / f"{out.name}-cold-cache" if cold_cache else None
        if cache is not None:
            assert not cache.exists(), cache
        env = {"SAFETYHEADS_CACHE": str(cache)} if cache is not None else None
        r, s = timed_cli("run", *BASE, *extra, "--out", str(out), env=env)
        return {"out": out, "result": check(r, f"safetyheads run {' '.join(extra)}"), "seconds": s, "cache": cache,
                "args": ["run", *BASE, *extra, "--out", str(out)]}
    return build


def mean_run(tmp_path_factory) -> dict[str, Any]:
    """The shared ``run BASE + MEAN_RUN`` (test_cli and test_provenance)."""
    return shared(tmp_path_factory, "mode-mean", build_run(MEAN_RUN))


def sc_run(tmp_path_factory) -> dict[str, Any]:
    """The shared ``run BASE + SC_RUN`` (UA's sibling: SC mode, seed 1, chat defaults), made on a cold model cache of its
    own: tests/test_pipeline.py checks the cold path on it, test_cli and test_provenance its results."""
    return shared(tmp_path_factory, "mode-sc-seed1", build_run(SC_RUN, cold_cache=True))


def reference(tmp_path_factory) -> dict[str, Any]:
    """The shared reference run (SMALL, built by the subcommands)."""
    return shared(tmp_path_factory, "reference", build_with_subcommands)


def _strip(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def result_files(run: Path) -> dict[str, Any]:
    """Every result file under ``run`` by relative path: JSON (timing keys dropped), JSONL text, and
    safetensors as ``{name: (dtype, shape, raw bytes)}`` so that equality means bit-identical."""
    import torch
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if not p.is_file() or rel in NOT_RESULTS or rel.startswith("plots/"):
            continue
        if p.suffix == ".json":
            out[rel] = _strip(json.loads(p.read_text()))
        elif p.suffix == ".jsonl":
            out[rel] = p.read_text()
        elif p.suffix == ".safetensors":
            out[rel] = {k: (str(v.dtype), tuple(v.shape), v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                        for k, v in load_file(str(p)).items()}
        else:
            out[rel] = p.read_bytes()
    return out


def diff_results(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two :func:`result_files` maps (empty when equal)."""
    out = [f"only in first: {k}" for k in sorted(set(a) - set(b))]
    out += [f"only in second: {k}" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k]:
            if isinstance(a[k], dict) and isinstance(b[k], dict):
                keys = sorted(kk for kk in set(a[k]) | set(b[k]) if a[k].get(kk) != b[k].get(kk))
                out.append(f"{k}: differs in {keys}")
            else:
                out.append(f"{k}: differs")
    return out
