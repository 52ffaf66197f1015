"""Installable as users expect: the wheel builds offline from the sources, holds the package data,
and installs into a clean virtual environment where ``import safetyheads`` and the ``safetyheads``
console script run.

The clean venv has no system site-packages and the wheel is installed with ``--no-deps
--no-index``; its dependencies (torch, transformers, …) are found through PYTHONPATH pointing at
this interpreter's site-packages, where ``safetyheads`` itself is only an editable hook (``.pth``
files are not read from PYTHONPATH), so the package imported is the wheel's. The sources are copied
first, so the build writes nothing into the checkout.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "safetyheads"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources, offline (no index, no build isolation)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src-copy"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", src / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    out = work / "dist"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")  # nothing into $HOME
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src),
          "-w", str(out)], cwd=work, env=env)
    wheels = list(out.glob("safetyheads-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_holds_the_package_and_its_data(wheel):
    """Every module and every file of src/safetyheads/data is in the wheel, the console script is
    declared, and pandas is a dependency."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for f in PKG.glob("*.py"):
        assert f"safetyheads/{f.name}" in names, f.name
    data = [f for f in (PKG / "data").iterdir() if f.is_file()]
    assert data
    for f in data:
        assert f"safetyheads/data/{f.name}" in names, f"package data {f.name} is missing from the wheel"
    assert "safetyheads = safetyheads.cli:app" in entry
    assert "Requires-Dist: pandas" in meta
    assert 'Provides-Extra: assets' in meta


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv(wheel, tmp_path):
    """In a fresh venv (no system site-packages), the wheel installs with --no-deps --no-index;
    `import safetyheads` there imports the wheel's copy, its package data and asset pins are
    readable, and `safetyheads --help` runs."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")  # nothing into $HOME
    env.pop("PYTHONPATH", None)
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], env=env)
    deps = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(deps))
    code = ("import importlib.resources as r, safetyheads, safetyheads.assets as a; "
            "print(safetyheads.__file__); print(len(a.pins())); "
            "print(r.files('safetyheads').joinpath('data', 'refusal_keywords.json').is_file())")
    out = _run([str(py), "-c", code], env=env, cwd=tmp_path).stdout.split()
    assert Path(out[0]).resolve().is_relative_to(venv.resolve()), f"imported {out[0]}, not the wheel's copy"
    assert int(out[1]) > 0 and out[2] == "True"
    helped = _run([str(bindir / "safetyheads"), "--help"], env=env, cwd=tmp_path).stdout
    for command in ("run", "ships", "sahara", "evaluate", "report", "surgery", "compare"):
        assert command in helped
