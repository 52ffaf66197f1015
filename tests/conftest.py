"""Test-suite set-up: the suite never reads or writes the user's home, and CI never skips.

Caches. Before any test module is imported (``pytest_configure``), every cache the suite could
touch is pointed at one fresh temporary folder, through the environment so that subprocesses
started by tests (``safetyheads run`` …) inherit it:

* ``SAFETYHEADS_CACHE``: the builtin models' safetensors cache. It starts empty in every session,
  so the cold path (assemble the GGUF parts, verify their sha256, dequantize, write the cache) runs
  in every CI run; later tests of the same session reuse what the first one built.
* ``HF_HOME``, ``XDG_CACHE_HOME``, ``MPLCONFIGDIR``, ``TRITON_CACHE_DIR``, ``TORCHINDUCTOR_CACHE_DIR``,
  ``TORCH_HOME``: Hugging Face, matplotlib, Triton and torch caches.

The folder is deleted at the end of the session. At the end, the suite also checks that nothing
under the real ``~/.cache/safetyheads`` changed during the session (an error at teardown if it did;
another process of yours using that cache at the same time would trip it too).

Developer override (never in CI): ``SAFETYHEADS_TEST_CACHE=/some/dir pytest …`` reuses a warm
model cache instead of building one (minutes saved per session). It is ignored, with a notice,
when ``CI=true``. Tests that must see a cold cache (``tests/test_pipeline.py``'s tiny run,
``tests/test_models.py``'s first load) make their own empty one either way.

Missing requirements. ``skip_or_fail(reason)`` skips on a developer's machine but fails when
``CI=true``: in CI a missing asset package, a model that does not load or a missing browser is
a broken setup, not a reason to skip. ``require_asset``, ``require_executable`` and
``load_builtin`` are built on it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

sys.path.insert(0, str(Path(__file__).parent))

#: environment variable -> sub-folder of the session's temporary root
REDIRECTED = {
    "SAFETYHEADS_CACHE": "safetyheads",
    "HF_HOME": "huggingface",
    "XDG_CACHE_HOME": "xdg-cache",
    "MPLCONFIGDIR": "matplotlib",
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TORCH_HOME": "torch",
}

_state: dict[str, Any] = {}


def in_ci() -> bool:
    """True when the ``CI`` environment variable says so (``true``, ``1`` or ``yes``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file and folder under ``root`` ({} if absent)."""
    if not root.exists():
        return {}
    out = {".": (0, root.stat().st_mtime_ns)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


#: the environment variable through which pytest-xdist workers find the controller's temporary root
ROOT_VAR = "SAFETYHEADS_TEST_ROOT"


def pytest_configure(config: pytest.Config) -> None:
    """Point every cache at a fresh temporary folder before test modules import anything.

    Under pytest-xdist (``make test`` runs ``-n auto``) the controller makes the folder and sets the
    variables before it starts the workers, which inherit them: all workers share one model cache (the
    builds lock it: tests/test_models.py's concurrent-build test) and one folder of shared runs
    (tests/cli_runs.py). Only the process that made the folder deletes it."""
    if _state:  # configured already (pytest in pytest)
        return
    home_cache = Path.home() / ".cache" / "safetyheads"
    _state["home_cache"] = home_cache
    _state["home_before"] = _snapshot(home_cache)
    inherited = os.environ.get(ROOT_VAR) if hasattr(config, "workerinput") else None
    if inherited:  # an xdist worker: the controller's root and variables, inherited
        _state["root"] = Path(inherited)
        _state["owner"] = False
    else:
        root = Path(tempfile.mkdtemp(prefix="safetyheads-tests-")).resolve()
        _state["root"] = root
        _state["owner"] = True
        _state["saved_env"] = {k: os.environ.get(k) for k in (*REDIRECTED, ROOT_VAR)}
        for var, sub in REDIRECTED.items():
            (root / sub).mkdir()
            os.environ[var] = str(root / sub)
        os.environ[ROOT_VAR] = str(root)
    warm = os.environ.get("SAFETYHEADS_TEST_CACHE", "").strip()
    if warm and in_ci():
        _state["notice"] = "SAFETYHEADS_TEST_CACHE is ignored under CI=true: the model cache starts empty"
    elif warm:
        os.environ["SAFETYHEADS_CACHE"] = str(Path(warm).expanduser().resolve())
        _state["warm"] = Path(os.environ["SAFETYHEADS_CACHE"])
        _state["notice"] = f"SAFETYHEADS_TEST_CACHE: reusing the model cache {os.environ['SAFETYHEADS_CACHE']}"


def warm_cache() -> Path | None:
    """The developer's ``SAFETYHEADS_TEST_CACHE`` folder in use, or None (always None in CI)."""
    return _state.get("warm")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say where the caches are (and whether a warm one is reused)."""
    root = _state.get("root")
    free = shutil.disk_usage(root).free / 1e9 if root else float("nan")
    lines = [f"safetyheads: temporary caches under {root} ({free:.1f} GB free; a pass peaks near 6 GB); "
             f"SAFETYHEADS_CACHE={os.environ.get('SAFETYHEADS_CACHE')}; CI={'yes' if in_ci() else 'no'}"]
    if _state.get("notice"):
        lines.append(f"safetyheads: {_state['notice']}")
    return lines


def pytest_unconfigure(config: pytest.Config) -> None:
    """Delete the temporary caches and put the environment back."""
    root = _state.get("root")
    if root is None:
        return
    if not _state["owner"]:  # an xdist worker: the controller deletes the folder when all are done
        _state.clear()
        return
    for var, value in _state["saved_env"].items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    shutil.rmtree(root, ignore_errors=True)
    _state.clear()


@pytest.fixture(scope="session", autouse=True)
def isolated_caches() -> Iterator[Path]:
    """The session's temporary cache root; at the end, fails if ``~/.cache/safetyheads`` changed."""
    yield _state["root"]
    warm = _state.get("warm")
    if warm is not None and warm.is_relative_to(_state["home_cache"].resolve()):
        return  # the developer asked for the cache in their home
    after = _snapshot(_state["home_cache"])
    before = _state["home_before"]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, (
        f"the test session changed {_state['home_cache']} (it must only use temporary caches): "
        f"{changed[:10]}{' …' if len(changed) > 10 else ''}"
    )


# --------------------------------------------------------------------------- skip here, fail in CI


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test on a developer's machine; fail it when ``CI=true`` (CI must have everything)."""
    if in_ci():
        pytest.fail(f"{reason} [CI=true: a missing requirement is a failure, not a skip]", pytrace=False)
    pytest.skip(reason)


def require_asset(top: str) -> Path:
    """The folder of an installed asset package (never imported); skip / fail in CI when absent."""
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        skip_or_fail(f"asset package {top} is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def require_executable(name: str, how: str) -> str:
    """The path of an executable on PATH; skip / fail in CI when absent, saying ``how`` to install it."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed; to run this test: {how}")
    return path


def load_builtin(name: str, **kw: Any) -> tuple[Any, Any]:
    """``load_model(name)``; a missing asset package skips (fails in CI). A checksum mismatch always fails."""
    from safetyheads.models import ChecksumError, ModelLoadError, load_model

    try:
        return load_model(name, **kw)
    except ChecksumError:
        raise
    except ModelLoadError as e:
        skip_or_fail(f"model {name} not available: {e}")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (restored after): tiny models run many times faster on one thread
    than on two OpenMP threads on a loaded shared 2-core CPU. Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch  # here, not at the top: conftest sets the cache variables before anything imports torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
