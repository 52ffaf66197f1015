"""Learned sparse head masks: per-head ablation strengths optimised to break refusal.

Every head gets an ablation strength ``a ∈ [0, 1]`` — the engine's strength tensor
(:func:`~safetyheads.ablation.ablate_strengths`, ``[rows, layers, heads]``, 1 = fully ablated in
the chosen ``mode``, 0 = untouched, fractional values interpolate: for ``ua`` the head's query is
scaled by ``1 − a(1 − ε)``, for ``sc``/``zero`` its output). Gradients flow through the strength,
so the strengths can be *learned*: Adam lowers

    J(a) = mean refusal log-odds(harmful prompts | a)
           + λ_KL · mean KL(p(·|harmless) ‖ p(·|harmless, a))
           + λ_sparsity · penalty(a)

where the refusal log-odds is ``log Σ_{y∈R} p_y − log Σ_{y∉R} p_y`` at the last prompt position
(``R``: the model's own refusal-start tokens, :func:`~safetyheads.evaluate.derive_refusal_tokens`)
and KL is taken at the last position of harmless prompts against the unablated model. Two
parametrisations (small strategies, :data:`SPARSITY`):

``l1``             ``a = sigmoid(θ)``; penalty ``Σ a`` (L1 on the strengths).
``hard-concrete``  stochastic gates ``a = clamp(sigmoid((log u − log(1−u) + θ)/β)(ζ−γ) + γ, 0, 1)``
                   with ``u ~ U(0, 1)`` per prompt and head (Louizos et al. 2018, β=2/3, γ=−0.1,
                   ζ=1.1); penalty ``Σ P(a ≠ 0)`` (expected L0). The deterministic gate is
                   ``clamp(sigmoid(θ)(ζ−γ) + γ, 0, 1)``.

Heads are ranked by θ (higher = more ablated; θ has no ties where the strengths saturate), and the
top-``k`` set of each ``k`` in ``validate_ks`` is checked by *hard* ablation with
:func:`~safetyheads.ablation.ablate`: the exact drop of the mean refusal log-odds on the
attribution prompts and the mean harmless KL with those heads fully ablated.

Reproducible: the model's parameters are frozen during the run and their ``requires_grad`` flags
restored; batches come in a fixed order (the prompts in chunks of ``batch_size``, cycled); the
hard-concrete noise of step ``t`` is drawn from a generator seeded by ``(seed, t)``, so a run resumed
from a checkpoint (:func:`learn_head_mask` with ``checkpoint=``) gives the same result as an
uninterrupted one. Only the last position's logits are computed (``logits_to_keep=1``) and the
prompts are tokenized once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .ablation import Head, Mode, ablate, ablate_strengths, check_eps
from .adapters import get_adapter
from .forward import input_device, position_ids_from_mask
from .prompts import encode_prompts, format_prompts, prompt_format_info
from .provenance import load_tensors_json, model_record, prompts_digest, provenance, save_tensors_json

__all__ = ["SPARSITY", "HeadMaskResult", "MaskValidation", "hard_validation", "learn_head_mask", "mask_heads"]

SPARSITY = ("l1", "hard-concrete")

# hard-concrete constants (Louizos, Welling & Kingma 2018)
_BETA, _GAMMA, _ZETA = 2.0 / 3.0, -0.1, 1.1


# --------------------------------------------------------------------------- parametrisations
# Each maps the parameters θ [L, H] to strengths; small and declarative, one per sparsity kind.


def _l1_train(theta: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """l1: ``sigmoid(θ)``, the same for every row (no noise)."""
    return torch.sigmoid(theta)[None]


def _l1_eval(theta: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(theta)


def _l1_penalty(theta: torch.Tensor) -> torch.Tensor:
    """L1 of the strengths (they are positive)."""
    return torch.sigmoid(theta).sum()


def _hc_train(theta: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """hard-concrete: one stretched, clamped concrete sample per row and head."""
    u = torch.rand((rows, *theta.shape), generator=generator, dtype=theta.dtype).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + theta) / _BETA)
    return (s * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


def _hc_eval(theta: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(theta) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


def _hc_penalty(theta: torch.Tensor) -> torch.Tensor:
    """Expected number of nonzero gates (the L0 relaxation)."""
    return torch.sigmoid(theta - _BETA * math.log(-_GAMMA / _ZETA)).sum()


_PARAMS: dict[str, tuple[Callable, Callable, Callable]] = {
    "l1": (_l1_train, _l1_eval, _l1_penalty),
    "hard-concrete": (_hc_train, _hc_eval, _hc_penalty),
}


# --------------------------------------------------------------------------- results


@dataclass
class MaskValidation:
    """The top-``k`` heads of a mask, fully ablated (hard, via :func:`~safetyheads.ablation.ablate`)."""

    k: int
    heads: list[Head]
    refusal_base: float
    """mean refusal log-odds on the attribution prompts, unablated"""
    refusal_ablated: float
    """the same with the ``k`` heads ablated"""
    refusal_drop: float
    """``refusal_base − refusal_ablated`` (positive: ablation lowers refusal)"""
    harmless_kl: float
    """mean KL(unablated ‖ ablated) of the next-token distribution at the last harmless-prompt position (nats)"""

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "heads": [list(h) for h in self.heads], "refusal_base": self.refusal_base,
                "refusal_ablated": self.refusal_ablated, "refusal_drop": self.refusal_drop,
                "harmless_kl": self.harmless_kl}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MaskValidation:
        return cls(int(d["k"]), [(int(a), int(b)) for a, b in d["heads"]], float(d["refusal_base"]),
                   float(d["refusal_ablated"]), float(d["refusal_drop"]), float(d["harmless_kl"]))


@dataclass
class HeadMaskResult:
    """A learned head mask: parameters, strengths, the ranking and its hard-ablation validation.

    ``theta`` ``[L, H]`` are the learned parameters (sigmoid logits or hard-concrete log α);
    ``strengths`` ``[L, H]`` the deterministic strengths they give; ``ranking`` every head, the most
    ablated first. ``objective_before`` / ``objective_after`` are the full objective over all
    prompts at the deterministic strengths of the initial and final parameters (keys ``refusal``,
    ``kl``, ``penalty``, ``objective``); ``history`` one record per optimisation step (its batch's
    values).
    """

    theta: torch.Tensor
    strengths: torch.Tensor
    ranking: list[Head]
    validation: list[MaskValidation]
    objective_before: dict[str, float]
    objective_after: dict[str, float]
    history: list[dict[str, float]]
    refusal_tokens: list[int]
    config: dict[str, Any]
    provenance: dict[str, Any]
    seconds: float = 0.0
    prompts: list[str] = field(default_factory=list)
    harmless: list[str] = field(default_factory=list)

    def top_heads(self, k: int) -> list[Head]:
        """The ``k`` heads with the highest learned strength (θ), best first."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k > len(self.ranking):
            raise ValueError(f"k={k} exceeds the number of heads ({len(self.ranking)})")
        return list(self.ranking[:k])

    def validated(self, k: int) -> MaskValidation:
        """The hard-ablation validation of the top-``k`` set (``k`` must be in ``validate_ks``)."""
        for v in self.validation:
            if v.k == k:
                return v
        raise KeyError(f"k={k} was not validated; validated: {[v.k for v in self.validation]}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "head_mask", "ranking": [list(h) for h in self.ranking],
                "validation": [v.to_json() for v in self.validation],
                "objective_before": self.objective_before, "objective_after": self.objective_after,
                "history": self.history, "refusal_tokens": self.refusal_tokens, "config": self.config,
                "provenance": self.provenance, "seconds": self.seconds, "prompts": self.prompts,
                "harmless": self.harmless}

    def save(self, stem: str | Path) -> None:
        """Write ``stem.safetensors`` (theta, strengths) and ``stem.json`` (everything else)."""
        save_tensors_json(stem, {"theta": self.theta, "strengths": self.strengths}, self.to_json())

    @classmethod
    def load(cls, stem: str | Path) -> HeadMaskResult:
        tensors, m = load_tensors_json(stem)
        if m.get("kind") != "head_mask":
            raise ValueError(f"{stem} is not a head-mask result (kind {m.get('kind')!r})")
        return cls(tensors["theta"], tensors["strengths"], [(int(a), int(b)) for a, b in m["ranking"]],
                   [MaskValidation.from_json(v) for v in m["validation"]], m["objective_before"],
                   m["objective_after"], m["history"], m["refusal_tokens"], m["config"], m["provenance"],
                   m.get("seconds", 0.0), m.get("prompts", []), m.get("harmless", []))

    def to_pandas(self):
        """One row per head (layer, head, theta, strength, rank)
        as a tidy pandas DataFrame (:func:`safetyheads.views.mask_frame`)."""
        from .views import mask_frame

        return mask_frame(self)

    def plot(self, top: int = 5):
        """Layer × head heatmap of the learned strengths,
        the ``top`` heads numbered (a matplotlib Figure)."""
        from .views import mask_plot

        return mask_plot(self, top=top)

    def _repr_html_(self) -> str:
        """A compact table plus the figure, for Jupyter (:func:`safetyheads.views.repr_html`)."""
        from .views import repr_html

        return repr_html(self)


def mask_heads(result: HeadMaskResult, k: int) -> list[Head]:
    """The top-``k`` heads of a learned mask (one call for method tables)."""
    return result.top_heads(k)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _frozen_eval(model) -> Iterator[None]:
    """Parameters frozen and dropout off; both restored exactly on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(training)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)


class _Batches:
    """The prompts tokenized once, in fixed chunks of ``batch_size`` (left-padded), on the input device."""

    def __init__(self, model, tokenizer, prompts: Sequence[str], prompt_format, system_prompt, batch_size: int):
        texts = format_prompts(tokenizer, prompts, prompt_format, system_prompt=system_prompt)
        max_len = getattr(model.config, "max_position_embeddings", None)
        dev = input_device(model)
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        for b0 in range(0, len(texts), batch_size):
            enc = encode_prompts(tokenizer, texts[b0:b0 + batch_size])
            if max_len is not None and enc["input_ids"].shape[1] > max_len:
                raise ValueError(f"a prompt in {b0}..{b0 + batch_size - 1} has {enc['input_ids'].shape[1]} tokens, "
                                 f"longer than the model's context ({max_len})")
            if (enc["attention_mask"].sum(1) == 0).any():
                raise ValueError(f"a prompt in {b0}..{b0 + batch_size - 1} is empty after tokenization")
            self.chunks.append((enc["input_ids"].to(dev), enc["attention_mask"].to(dev)))
        self.n = len(texts)

    def __len__(self) -> int:
        return len(self.chunks)


def _last_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the last position only, ``[batch, vocab]``, at least float32 (differentiable)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                logits_to_keep=1)
    logits = out.logits[:, -1]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _refusal_logodds(logits: torch.Tensor, refusal_tokens: torch.Tensor) -> torch.Tensor:
    from .ships import refusal_logodds

    return refusal_logodds(logits, refusal_tokens)


def _kl(base_lp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ ablated) per row, float64."""
    lp = F.log_softmax(logits.double(), -1)
    return F.kl_div(lp, base_lp.to(lp.device), log_target=True, reduction="none").sum(-1)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- checkpoint


def _ckpt_save(path: Path, theta: torch.Tensor, opt: torch.optim.Adam, step: int, history: list, digest: str) -> None:
    """One safetensors file (tensors + the JSON state in its metadata), written atomically: never half a checkpoint."""
    st = opt.state.get(theta, {})
    tensors = {"theta": theta.detach().clone()}
    if st:
        tensors.update(exp_avg=st["exp_avg"], exp_avg_sq=st["exp_avg_sq"],
                       adam_step=torch.as_tensor(st["step"], dtype=torch.float32).reshape(1))
    meta = {"kind": "head_mask_checkpoint", "digest": digest, "step": str(step), "history": json.dumps(history)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ckpt_load(path: Path, theta: torch.Tensor, opt: torch.optim.Adam, digest: str) -> tuple[int, list]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("kind") != "head_mask_checkpoint":
        raise ValueError(f"{path} is not a head-mask checkpoint")
    if meta.get("digest") != digest:
        raise ValueError(f"checkpoint {path} was written by a different mask configuration (digest "
                         f"{meta.get('digest')} != {digest}); use another checkpoint path or delete it")
    with torch.no_grad():
        theta.copy_(tensors["theta"])
    if "exp_avg" in tensors:
        opt.state[theta] = {"step": tensors["adam_step"].reshape(()).clone(), "exp_avg": tensors["exp_avg"].clone(),
                            "exp_avg_sq": tensors["exp_avg_sq"].clone()}
    return int(meta["step"]), list(json.loads(meta["history"]))


# --------------------------------------------------------------------------- main


def learn_head_mask(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    harmless: Sequence[str],
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    sparsity: str = "l1",
    lam_sparsity: float = 0.01,
    lam_kl: float = 1.0,
    steps: int = 60,
    lr: float = 0.1,
    init: float = -3.0,
    seed: int = 0,
    refusal_tokens: Sequence[int] | None = None,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    batch_size: int = 8,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
    validate_ks: Sequence[int] = (1, 3, 5),
    judge: Any = "keyword:paper",
    callback: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
) -> HeadMaskResult:
    """Learn per-head ablation strengths that lower refusal, sparsely and with little harm elsewhere.

    Args:
        model, tokenizer: a supported Hugging Face causal LM and its tokenizer.
        prompts: harmful attribution prompts (the refusal log-odds is lowered on these).
        harmless: harmless prompts for the KL penalty (the next-token distribution at their last
            position should stay as unablated).
        mode, eps: the ablation whose strengths are learned (``"ua"``, ``"sc"``, ``"zero"``; ``"ua"`` at
            strength 1 is exactly the hard UA ablation of :func:`~safetyheads.ablation.ablate`).
        sparsity: ``"l1"`` (sigmoid strengths, L1 penalty) or ``"hard-concrete"`` (L0 gates).
        lam_sparsity: weight of the sparsity penalty (a sum over heads).
        lam_kl: weight of the mean harmless KL (nats).
        steps: Adam steps; each uses one chunk of harmful and one chunk of harmless prompts, cycled.
        lr: Adam learning rate on θ.
        init: initial θ of every head (−3: strength 0.047 for ``l1``; gates mostly closed for
            ``hard-concrete``).
        seed: seeds the hard-concrete noise (step ``t`` uses a generator seeded by ``(seed, t)``).
        refusal_tokens: refusal-start token ids; ``None`` derives the model's own from its greedy
            answers to ``prompts`` (:func:`~safetyheads.evaluate.derive_refusal_tokens`, ``judge``).
        prompt_format, system_prompt: see :mod:`safetyheads.prompts`.
        batch_size: prompts per forward (harmful and harmless chunks alike).
        checkpoint: path of a checkpoint file (one safetensors file: θ, Adam's state, the step and the
            history in its metadata; written atomically) saved every ``checkpoint_every`` steps and at the end; an existing one of the same configuration is
            resumed (a different configuration is refused). A finished checkpoint skips training.
        validate_ks: the top-``k`` sets validated by hard ablation.
        callback: called as ``callback(step, record)`` after every step (e.g. to log, or to stop by
            raising).
        progress: a tqdm bar over the steps.

    Returns:
        :class:`HeadMaskResult`.

    Raises:
        ValueError: empty prompt lists, an unknown sparsity or mode that cannot be learned, bad
            hyperparameters, or a checkpoint of another configuration.
    """
    if sparsity not in _PARAMS:
        raise ValueError(f"unknown sparsity {sparsity!r}; choose one of {list(SPARSITY)}")
    mode = Mode.parse(mode)
    if mode not in (Mode.UA, Mode.SC, Mode.ZERO):
        raise ValueError(f"mode {mode.value!r} is not supported for learned masks; use 'ua', 'sc' or 'zero'")
    eps = check_eps(mode, eps)
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if len(harmless) == 0:
        raise ValueError("harmless is empty: the KL penalty needs harmless prompts")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    for name, v in (("lam_sparsity", lam_sparsity), ("lam_kl", lam_kl)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    g = get_adapter(model).geometry
    ks = sorted({int(k) for k in validate_ks})
    if ks and (ks[0] < 1 or ks[-1] > g.n_total):
        raise ValueError(f"validate_ks must lie in 1..{g.n_total}, got {list(validate_ks)}")
    t0 = time.perf_counter()
    prompts, harmless = list(prompts), list(harmless)
    if refusal_tokens is None:
        from .evaluate import derive_refusal_tokens

        refusal_tokens = derive_refusal_tokens(model, tokenizer, prompts, judge=judge, prompt_format=prompt_format,
                                               system_prompt=system_prompt, batch_size=max(batch_size, 16))
    rt = torch.as_tensor(list(refusal_tokens), dtype=torch.long)
    if rt.numel() == 0:
        raise ValueError("refusal_tokens is empty")
    train, evaluate_theta, penalty_fn = _PARAMS[sparsity]
    config = {"mode": mode.value, "eps": eps, "sparsity": sparsity, "lam_sparsity": float(lam_sparsity),
              "lam_kl": float(lam_kl), "steps": steps, "lr": float(lr), "init": float(init), "seed": seed,
              "batch_size": batch_size, "validate_ks": ks,
              "prompt_format": prompt_format_info(prompt_format, system_prompt, tokenizer=tokenizer)}
    # everything the trajectory depends on (steps is not: a longer run continues a shorter one)
    digest = _digest({**{k: v for k, v in config.items() if k not in ("steps", "validate_ks")},
                      "model": model_record(model), "prompts": prompts_digest(prompts),
                      "harmless": prompts_digest(harmless), "refusal_tokens": rt.tolist()})

    harm = _Batches(model, tokenizer, prompts, prompt_format, system_prompt, batch_size)
    safe = _Batches(model, tokenizer, harmless, prompt_format, system_prompt, batch_size)
    theta = torch.full((g.n_layers, g.n_heads), float(init), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr, foreach=False)

    def batch_sums(s_harm: torch.Tensor, s_safe: torch.Tensor, hi: int, si: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of refusal log-odds over harmful chunk hi, sum of KL over harmless chunk si) under the strengths."""
        ref = _refusal_logodds(_ablated_logits(model, harm.chunks[hi], s_harm, mode, eps), rt).sum()
        kl = _kl(base_lps[si], _ablated_logits(model, safe.chunks[si], s_safe, mode, eps)).sum()
        return ref, kl

    with _frozen_eval(model):
        with torch.no_grad():
            base_lps = [F.log_softmax(_last_logits(model, ids, mask).double(), -1) for ids, mask in safe.chunks]

        @torch.no_grad()
        def full_objective(th: torch.Tensor) -> dict[str, float]:
            s = evaluate_theta(th)[None]
            ref = sum(float(_objective_refusal(model, harm.chunks[i], s, mode, eps, rt)) for i in range(len(harm)))
            kl = sum(float(_kl(base_lps[i], _ablated_logits(model, safe.chunks[i], s, mode, eps)).sum())
                     for i in range(len(safe)))
            pen = float(penalty_fn(th))
            r, k = ref / harm.n, kl / safe.n
            return {"refusal": r, "kl": k, "penalty": pen, "objective": r + lam_kl * k + lam_sparsity * pen}

        before = full_objective(torch.full_like(theta, float(init)))
        start, history = 0, []
        ckpt = Path(checkpoint) if checkpoint is not None else None
        if ckpt is not None and ckpt.exists():
            start, history = _ckpt_load(ckpt, theta, opt, digest)
            if start > steps:
                raise ValueError(f"checkpoint {ckpt} is at step {start}, past steps={steps}: pass steps >= {start} "
                                 "or another checkpoint path")
            history = history[:start]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=min(start, steps), desc=f"head mask ({sparsity})")
        for step in range(start, steps):
            hi, si = step % len(harm), step % len(safe)
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + step)
            n_h, n_s = harm.chunks[hi][0].shape[0], safe.chunks[si][0].shape[0]
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                strength = train(theta, n_h + n_s, gen)  # [1 or n_h + n_s, L, H]
                rows = strength.shape[0] > 1
                ref, kl = batch_sums(strength[:n_h] if rows else strength, strength[n_h:] if rows else strength, hi, si)
                pen = penalty_fn(theta)
                loss = ref / n_h + lam_kl * kl / n_s + lam_sparsity * pen
                loss.backward()
            opt.step()
            rec = {"step": step + 1, "objective": float(loss.detach()), "refusal": float(ref.detach()) / n_h,
                   "kl": float(kl.detach()) / n_s, "penalty": float(pen.detach())}
            history.append(rec)
            if callback is not None:
                callback(step + 1, rec)
            if ckpt is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                _ckpt_save(ckpt, theta, opt, step + 1, history, digest)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(refusal=f"{rec['refusal']:.2f}", kl=f"{rec['kl']:.3f}")
        if bar is not None:
            bar.close()
        th = theta.detach().clone()
        after = full_objective(th)
        strengths = evaluate_theta(th)
        order = sorted(range(th.numel()), key=lambda i: (-float(th.flatten()[i]), i))
        ranking = [(i // g.n_heads, i % g.n_heads) for i in order]
        validation = [_validate(model, harm, safe, base_lps, ranking[:k], k, mode, eps, rt) for k in ks]
    prov = provenance(model, prompts, prompt_format=prompt_format_info(prompt_format, system_prompt,
                                                                       tokenizer=tokenizer),
                      mode=mode.value, eps=eps, seed=seed, system_prompt=system_prompt,
                      harmless={"n": len(harmless), "sha256": prompts_digest(harmless),
                                **({"data": harmless.provenance()} if callable(getattr(harmless, "provenance", None))
                                   else {})},
                      refusal_tokens=rt.tolist(), method=f"learned head mask ({sparsity})",
                      steps_resumed_from=start)
    return HeadMaskResult(th, strengths.detach(), ranking, validation, before, after, history, rt.tolist(),
                          config, prov, time.perf_counter() - t0, prompts, harmless)


def _ablated_logits(model, chunk, strength, mode, eps) -> torch.Tensor:
    ids, mask = chunk
    with ablate_strengths(model, strength, mode=mode, eps=eps):
        return _last_logits(model, ids, mask)


def _objective_refusal(model, chunk, strength, mode, eps, rt) -> torch.Tensor:
    return _refusal_logodds(_ablated_logits(model, chunk, strength, mode, eps), rt).sum()


@torch.no_grad()
def _validate(model, harm: _Batches, safe: _Batches, base_lps, heads: list[Head], k: int, mode: Mode, eps: float,
              rt: torch.Tensor) -> MaskValidation:
    """Hard ablation of ``heads`` with :func:`ablate`: exact refusal drop and harmless KL."""
    base = ablated = 0.0
    for ids, mask in harm.chunks:
        base += float(_refusal_logodds(_last_logits(model, ids, mask), rt).sum())
        with ablate(model, heads, mode=mode, eps=eps):
            ablated += float(_refusal_logodds(_last_logits(model, ids, mask), rt).sum())
    kl = 0.0
    for (ids, mask), blp in zip(safe.chunks, base_lps):
        with ablate(model, heads, mode=mode, eps=eps):
            kl += float(_kl(blp, _last_logits(model, ids, mask)).sum())
    base, ablated = base / harm.n, ablated / harm.n
    return MaskValidation(k, list(heads), base, ablated, base - ablated, kl / safe.n)


def hard_validation(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    harmless: Sequence[str],
    heads: Sequence[Head],
    refusal_tokens: Sequence[int],
    mode: Mode | str = "ua",
    eps: float = 1e-5,
    prompt_format: str = "chat",
    system_prompt: str | None = None,
    batch_size: int = 8,
) -> MaskValidation:
    """Any head set, fully ablated: the drop of the mean refusal log-odds on ``prompts`` and the mean harmless
    KL — the numbers :func:`learn_head_mask` reports for its top-k sets, for comparing other methods' heads."""
    mode = Mode.parse(mode)
    eps = check_eps(mode, eps)
    heads = list(get_adapter(model).check_heads(heads))
    rt = torch.as_tensor(list(refusal_tokens), dtype=torch.long)
    if rt.numel() == 0:
        raise ValueError("refusal_tokens is empty")
    harm = _Batches(model, tokenizer, list(prompts), prompt_format, system_prompt, batch_size)
    safe = _Batches(model, tokenizer, list(harmless), prompt_format, system_prompt, batch_size)
    with _frozen_eval(model):  # the same kernels as learn_head_mask's own validation
        with torch.no_grad():
            base_lps = [F.log_softmax(_last_logits(model, ids, mask).double(), -1) for ids, mask in safe.chunks]
        return _validate(model, harm, safe, base_lps, heads, len(heads), mode, eps, rt)
