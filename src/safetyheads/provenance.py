"""What every result records: model, data, prompt format, ablation mode and ε, seed, versions.

Results are data: :func:`save_tensors_json` writes a JSON file (metadata, small tables) beside a
safetensors file (score tensors), both atomically; :func:`load_tensors_json` reads them back.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .adapters import get_adapter


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    out = {"python": platform.python_version()}
    for pkg in ("safetyheads", "torch", "transformers", "safetensors", "numpy", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 over the prompt texts (order-sensitive), to recognise the same data later."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def model_record(model) -> dict[str, Any]:
    """Where the model came from and its head geometry."""
    g = get_adapter(model).geometry
    source = getattr(model, "_safetyheads_source", None) or getattr(model.config, "_name_or_path", None)
    param = next(model.parameters())
    return {
        "source": source,
        "model_type": g.model_type,
        "n_layers": g.n_layers,
        "n_heads": g.n_heads,
        "n_kv_heads": g.n_kv_heads,
        "head_dim": g.head_dim,
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
    }


def provenance(model, prompts: Sequence[str], *, prompt_format: Any = None, mode: str | None = None,
               eps: float | None = None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance block stored with every result."""
    data = getattr(prompts, "provenance", None)
    record: dict[str, Any] = {
        "model": model_record(model),
        "data": data() if callable(data) else {"n": len(prompts), "sha256": prompts_digest(prompts)},
        "prompt_format": prompt_format,
        "mode": mode,
        "eps": eps,
        "seed": seed,
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    record.update(extra)
    return record


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temp file + rename): readers never see half a file."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_tensors_json(stem: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``stem.safetensors`` (the tensors) and ``stem.json`` (everything else), atomically."""
    stem = Path(stem)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}
    _atomic_write(stem.with_suffix(".safetensors"), lambda tmp: save_file(tensors, tmp))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=2, default=str))


def load_tensors_json(stem: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read back what :func:`save_tensors_json` wrote."""
    stem = Path(stem)
    return load_file(str(stem.with_suffix(".safetensors"))), json.loads(stem.with_suffix(".json").read_text())
