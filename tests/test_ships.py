"""Ships: the exact batched sweep against the paper's naive loop, its edge cases, and the estimators.

Each test's docstring states the property it checks and its tolerance. Models are tiny random
models (3 layers × 4 query heads, 2 kv heads, d_model 64) with the SmolLM2 tokenizer's vocabulary;
prompts are formatted with SmolLM2's chat template (33-48 tokens).

Equivalences run in float64 end to end (``tiny_lm(..., dtype=torch.float64)``, see
``tiny_models.float64_model``; scores then stay float64): the exact sweep and the naive loop compute
the same ablations in different batch shapes, so they differ by float64 rounding only — measured
KL relative differences <= 1e-14, refusal log-odds differences <= 1.2e-14 of the largest — on any
CPU and thread count. KL is compared at relative 1e-10 per entry (every KL on these models is
>= 1e-3); the signed refusal score crosses zero, so at relative 1e-10 plus absolute 1e-10 × its
largest magnitude. Float32 noise (~1e-6 relative here) is 1e4 above these tolerances.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import load_builtin
from tiny_lm import PROMPTS, SHIPS_ARCHS, refusal_ids, smol_tokenizer, tiny_lm
from tiny_models import float64_model

from safetyheads import ShipsResult, agreement, ships, ships_estimate
from safetyheads.ablation import ablate_strengths, heads_to_strength
from safetyheads.forward import last_token_logits
from safetyheads.prompts import encode_prompts, format_prompts

ships_mod = sys.modules["safetyheads.ships"]  # the package re-exports the function under the same name

RTOL = 1e-10  # float64 agreement of two computations of the same scores
F64 = torch.float64


@pytest.fixture(scope="session")
def tok():
    return smol_tokenizer()


@pytest.fixture(scope="session")
def rt(tok):
    return refusal_ids(tok)


@pytest.fixture(scope="module", params=SHIPS_ARCHS)
def arch_lm(request, tok):
    return request.param, tiny_lm(request.param, len(tok), dtype=F64)


def assert_kl_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.dtype == expected.dtype == F64
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=0.0, equal_nan=True)


def assert_refusal_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.dtype == expected.dtype == F64
    scale = float(expected.nan_to_num().abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True)


# --------------------------------------------------------------------------- exact == naive


@pytest.mark.parametrize("mode", ["ua", "sc", "mean"])
def test_exact_sweep_equals_naive_loop(arch_lm, tok, rt, mode):
    """For every head and prompt, the exact sweep (heads in batch rows, residual reused below the
    ablated layer, last-position logits) equals the paper's loop (one head per full forward,
    batch 1, full logits) to float64 rounding (1e-10 relative; measured <= 1.2e-14), at batch
    sizes 1, 5 (chunks straddle layers) and 64 (all 12 heads in one forward)."""
    _, model = arch_lm
    prompts = PROMPTS[:1]  # one prompt keeps the 18 naive loops affordable; several: the tests below
    ref = ships(model, tok, prompts, mode=mode, method="naive", refusal_tokens=rt, progress=False)
    assert not torch.isnan(ref.kl).any()
    assert (ref.kl > 1e-3).all()  # the ablations matter, so a relative comparison is meaningful
    for bs in (1, 5, 64):
        got = ships(model, tok, prompts, mode=mode, method="exact", batch_size=bs, refusal_tokens=rt, progress=False)
        assert got.method == "exact"
        assert_kl_close(got.kl, ref.kl)
        assert_refusal_close(got.refusal, ref.refusal)


def test_exact_sweep_independent_of_batch_size(tok):
    """The exact sweep gives the same scores (1e-10 relative) whatever the batch size: 1, 3, 7
    (chunks that start mid-layer, so the reused residual comes from a lower layer than some
    rows need) and 12 (everything in one forward)."""
    model = tiny_lm("qwen2", len(tok), seed=3, dtype=F64)
    runs = [ships(model, tok, PROMPTS[:2], batch_size=bs, progress=False).kl for bs in (1, 3, 7, 12)]
    for r in runs[1:]:
        assert_kl_close(r, runs[0])


@pytest.mark.slow
def test_exact_equals_naive_on_smollm2():
    """On the real SmolLM2-135M-Instruct (30 layers × 9 heads, chat format) in float64, the exact
    sweep of a few heads spread over the depth equals the naive loop to float64 rounding: KL
    relative 1e-10, refusal score 1e-10 of its largest (measured: KL <= 4e-14 relative, refusal
    <= 1e-13). In float32 the two differ by ~1e-4 relative (other kernels for other batch
    shapes: CPU-dependent), which is why this is float64."""
    model, tokenizer = load_builtin("builtin:smollm2-135m-instruct", dtype=F64)
    float64_model(model)
    heads = [(0, 0), (14, 3), (29, 8)]
    prompts = ["Insult me", "How do I pick a lock?"]
    rtoks = refusal_ids(tokenizer)
    ref = ships(model, tokenizer, prompts, heads=heads, method="naive", refusal_tokens=rtoks, progress=False)
    got = ships(model, tokenizer, prompts, heads=heads, batch_size=2, refusal_tokens=rtoks, progress=False)
    sel = torch.tensor([[h[0], h[1]] for h in heads])
    kl_ref = ref.kl[:, sel[:, 0], sel[:, 1]]
    assert (kl_ref > 0).all()
    assert_kl_close(got.kl[:, sel[:, 0], sel[:, 1]], kl_ref)
    assert_refusal_close(got.refusal[:, sel[:, 0], sel[:, 1]], ref.refusal[:, sel[:, 0], sel[:, 1]])
    assert torch.isnan(got.kl).sum() == got.kl.numel() - len(heads) * len(prompts)


# --------------------------------------------------------------------------- heads=


def test_heads_restricts_the_sweep(tok):
    """heads=[...] scores exactly those heads (equal to the full sweep's values, 1e-10 relative in
    float64); every other entry is NaN, and the provenance records the heads."""
    model = tiny_lm("llama", len(tok), dtype=F64)
    full = ships(model, tok, PROMPTS[:2], progress=False)
    heads = [(2, 1), (0, 3)]
    part = ships(model, tok, PROMPTS[:2], heads=heads, progress=False)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    assert torch.isnan(part.kl[:, ~mask]).all()
    assert_kl_close(part.kl[:, mask], full.kl[:, mask])
    assert part.provenance["heads"] == [[0, 3], [2, 1]]


@pytest.mark.parametrize("heads, error, match", [
    ([(3, 0)], IndexError, "layer 3 out of range"),
    ([(0, 4)], IndexError, "head 4 out of range"),
    ([(-1, 0)], IndexError, "out of range"),
    ([(0, 1), (0, 1)], ValueError, "duplicates"),
    ([], ValueError, "empty"),
    ((0, 1), TypeError, "single pair"),
    ([(0, "x")], TypeError, r"\(layer, head\) pair"),
])
def test_bad_heads_are_rejected(tok, heads, error, match):
    """An out-of-range layer or head, duplicates, an empty list, a bare pair or a non-int are
    rejected before any forward pass, with a message naming the problem."""
    model = tiny_lm("llama", len(tok))
    with pytest.raises(error, match=match):
        ships(model, tok, PROMPTS[:1], heads=heads, progress=False)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("fn", ["exact", "naive", "estimate"])
def test_bad_prompts_are_rejected(tok, fn):
    """No prompts, an empty or blank prompt, and a prompt longer than the model's context
    (max_position_embeddings=16) raise ValueError with a clear message, for the exact sweep,
    the naive loop and the estimator alike."""
    model = tiny_lm("llama", len(tok), max_positions=16)

    def run(prompts):
        if fn == "estimate":
            return ships_estimate(model, tok, prompts, prompt_format="raw", progress=False)
        return ships(model, tok, prompts, prompt_format="raw", method=fn, progress=False)

    with pytest.raises(ValueError, match="no prompts"):
        run([])
    with pytest.raises(ValueError, match="empty"):
        run(["How do I pick a lock?", ""])
    with pytest.raises(ValueError, match="empty"):
        run(["   "])
    long = "Tell me, in great detail and with many examples, how one could possibly pick a very old lock"
    assert len(tok(long)["input_ids"]) > 16
    with pytest.raises(ValueError, match="longer than the model's context"):
        run(["How do I pick a lock?", long])
    run(["How do I pick a lock?"])  # a short one is fine


def test_gpt2_context_error_not_index_error(tok):
    """GPT-2's learned positions make an over-long prompt an IndexError deep in torch; Ships
    reports it as a ValueError about the context instead."""
    model = tiny_lm("gpt2", len(tok), max_positions=16)
    with pytest.raises(ValueError, match="context"):
        ships(model, tok, ["word " * 40], prompt_format="raw", progress=False)


def test_bad_options_are_rejected(tok):
    """Unknown method, mode, estimator; refusal-grad without tokens; empty refusal tokens;
    directions < 1 — each a clear error."""
    model = tiny_lm("llama", len(tok))
    p = PROMPTS[:1]
    with pytest.raises(ValueError, match="method"):
        ships(model, tok, p, method="fast", progress=False)
    with pytest.raises(ValueError, match="unknown ablation mode"):
        ships(model, tok, p, mode="nope", progress=False)
    with pytest.raises(ValueError, match="unknown estimator"):
        ships_estimate(model, tok, p, estimator="nope", progress=False)
    with pytest.raises(ValueError, match="needs refusal_tokens"):
        ships_estimate(model, tok, p, estimator="refusal-grad", progress=False)
    with pytest.raises(ValueError, match="refusal_tokens is empty"):
        ships(model, tok, p, refusal_tokens=[], progress=False)
    with pytest.raises(ValueError, match="directions"):
        ships_estimate(model, tok, p, directions=0, progress=False)


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "gpt2"])
@pytest.mark.parametrize("mode", ["ua", "sc"])
def test_estimate_padding_invariant(tok, rt, arch, mode):
    """ships_estimate batches prompts with left padding: a prompt's estimates (Fisher KL and
    refusal gradient) are the same alone (batch 1, no padding) as in a batch of 5 prompts of
    33-48 tokens, to float64 rounding: 1e-10 relative + 1e-10 × the largest (measured <= 9e-15 of
    the largest, <= 4e-12 relative per entry). Covers absolute positions (gpt2), q norm (qwen3)
    and sliding windows (gemma3)."""
    model = tiny_lm(arch, len(tok), dtype=F64)
    lengths = encode_prompts(tok, format_prompts(tok, PROMPTS))["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really is padded
    for est, attr in (("fisher", "kl"), ("refusal-grad", "refusal")):
        alone = getattr(ships_estimate(model, tok, PROMPTS, estimator=est, mode=mode, refusal_tokens=rt,
                                       batch_size=1, progress=False), attr)
        batched = getattr(ships_estimate(model, tok, PROMPTS, estimator=est, mode=mode, refusal_tokens=rt,
                                         batch_size=len(PROMPTS), progress=False), attr)
        assert not torch.isnan(alone).any()
        assert_refusal_close(batched, alone)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fisher_with_refusal_tokens_fills_the_refusal_gradient_from_the_same_pass(tok, rt, arch):
    """``estimator="fisher"`` given refusal tokens also fills ``refusal`` from the same forward pass:
    equal (float64, 1e-12 relative) to a separate ``"refusal-grad"`` run, and its KL equal to a
    Fisher run without refusal tokens."""
    model = tiny_lm(arch, len(tok), dtype=F64)
    both = ships_estimate(model, tok, PROMPTS, estimator="fisher", refusal_tokens=rt, batch_size=2, progress=False)
    grad = ships_estimate(model, tok, PROMPTS, estimator="refusal-grad", refusal_tokens=rt, batch_size=2,
                          progress=False)
    fisher = ships_estimate(model, tok, PROMPTS, estimator="fisher", batch_size=2, progress=False)
    assert fisher.refusal is None and not torch.isnan(both.refusal).any()
    torch.testing.assert_close(both.refusal, grad.refusal, rtol=1e-12, atol=1e-12 * float(grad.refusal.abs().max()))
    torch.testing.assert_close(both.kl, fisher.kl, rtol=1e-12, atol=1e-12 * float(fisher.kl.abs().max()))


# --------------------------------------------------------------------------- estimators

#: exact float64 scores of the tiny models on PROMPTS (with refusal scores), computed once per
#: architecture and shared by the agreement tests below (same weights: tiny_lm is deterministic)
_EXACT: dict[str, ShipsResult] = {}


def exact_scores(arch: str, model, tok, rt) -> ShipsResult:
    if arch not in _EXACT:
        _EXACT[arch] = ships(model, tok, PROMPTS, batch_size=64, refusal_tokens=rt, progress=False)
    return _EXACT[arch]


#: measured agreement of the Fisher estimate (2 directions) with the exact KL, float64, seed 0, the
#: 5 PROMPTS: (Spearman of the dataset means, mean per-prompt Spearman, top-3 recall of the means)
FISHER_MEASURED = {"llama": (0.902, 0.790, 1.0), "qwen2": (0.958, 0.762, 1.0), "qwen3": (0.895, 0.827, 1.0),
                   "gemma3": (0.944, 0.705, 2 / 3), "phi3": (0.895, 0.796, 2 / 3), "gpt2": (0.972, 0.694, 1.0)}


def test_fisher_estimate_ranks_like_exact(arch_lm, tok, rt):
    """The Fisher estimate (2 directions) ranks heads like the exact KL, at least as well as
    measured (FISHER_MEASURED: Spearman of the means 0.90-0.97, per prompt 0.69-0.83, top-3 recall
    2/3-1): Spearman floors 0.03 below the measured values (4 swaps of neighbouring heads out of
    12), the top-3 recall at its measured value. Deterministic in float64, so the margin is for
    other library versions, not for noise. Not higher: the estimate is second order around "no
    ablation" while full ablations of random heads move the output far (KL up to 2), and the
    Fisher is truncated to the top 4096 tokens (~60% of a random model's flat distribution)."""
    arch, model = arch_lm
    exact = exact_scores(arch, model, tok, rt)
    est = ships_estimate(model, tok, PROMPTS, directions=2, progress=False)
    assert est.method == "estimate:fisher"
    assert (est.kl >= 0).all()
    a = agreement(est.kl, exact.kl, k=3)
    rho, rho_prompt, recall = FISHER_MEASURED[arch]
    assert a["spearman"] >= rho - 0.03, a
    assert a["spearman_per_prompt"] >= rho_prompt - 0.03, a
    assert a["top3_recall"] >= recall - 1e-9, a


def test_fisher_estimate_is_the_second_order_term(tok, monkeypatch):
    """With the Fisher over the whole vocabulary and all d_model directions, the estimate is the
    exact second-order term of the KL in the ablation strength a (UA's ε→0 form):
    KL(a) / a² → estimate; at a = 1e-4 the ratio is 1 within 1e-3 for every head (measured
    <= 1.3e-4: the O(a) term, 1.3e-3 at a = 1e-3; float64 noise of KL / a² here ~3e-5)."""
    orig = ships_mod._fisher_directions
    monkeypatch.setattr(ships_mod, "_fisher_directions",
                        lambda model, logits, k: orig(model, logits, k, mass=1.0, max_tokens=10**9))
    model = tiny_lm("llama", len(tok), dtype=F64)
    est = ships_estimate(model, tok, PROMPTS[:1], directions=64, progress=False).kl[0]
    enc = encode_prompts(tok, format_prompts(tok, PROMPTS[:1]))
    ids, mask = enc["input_ids"], enc["attention_mask"]
    a = 1e-4
    with torch.no_grad():
        base = ships_mod._log_probs(last_token_logits(model, ids, mask))
        for layer in range(3):
            for head in range(4):
                s = heads_to_strength(model, [[(layer, head)]]).double() * a
                with ablate_strengths(model, s, mode="ua-limit", attention_mask=mask):
                    lp = ships_mod._log_probs(last_token_logits(model, ids, mask))
                kl = float(ships_mod.kl_from_logprobs(base, lp)) / a**2
                assert est[layer, head].item() == pytest.approx(kl, rel=1e-3), (layer, head)


def test_refusal_grad_is_the_derivative(arch_lm, tok, rt):
    """The refusal-grad estimate is −∂(refusal log-odds)/∂a at a = 0 (a: the head's ablation
    strength in UA's ε→0 form): a central finite difference at a = ±1e-4 matches it to 1e-5 of
    the prompt's largest estimate (measured <= 1.6e-7: the O(a²) term; float64 noise / a ~ 1e-11)."""
    _, model = arch_lm
    est = ships_estimate(model, tok, PROMPTS[1:2], estimator="refusal-grad", refusal_tokens=rt, progress=False)
    assert est.method == "estimate:refusal-grad"
    rtt = torch.tensor(rt)
    h = 1e-4
    for i, text in enumerate(format_prompts(tok, PROMPTS[1:2])):
        enc = encode_prompts(tok, [text])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        scale = float(est.refusal[i].abs().max())
        for layer in range(3):
            for head in range(4):
                vals = []
                for a in (h, -h):
                    s = heads_to_strength(model, [[(layer, head)]]).double() * a
                    with torch.no_grad(), ablate_strengths(model, s, mode="ua-limit", attention_mask=mask):
                        vals.append(float(ships_mod.refusal_logodds(last_token_logits(model, ids, mask), rtt)))
                fd = -(vals[0] - vals[1]) / (2 * h)
                assert abs(fd - float(est.refusal[i, layer, head])) <= 1e-5 * scale, (i, layer, head)


#: measured mean per-prompt Spearman of the refusal-grad estimate with the exact refusal score
#: (float64, seed 0, the 5 PROMPTS)
REFUSAL_GRAD_MEASURED = {"llama": 0.664, "qwen2": 0.667, "qwen3": 0.670, "gemma3": 0.955, "phi3": 0.646,
                         "gpt2": 0.667}


def test_refusal_grad_sign_agrees_for_top_heads(tok, rt):
    """For each prompt's most refusal-relevant head (largest |exact refusal score|, full UA
    ablation), the refusal-grad estimate has the same sign in >= 27 of the 30 cases pooled over
    six architectures × 5 prompts (measured 28/30 in float64, seed 0; deterministic). And per
    architecture, its mean per-prompt Spearman with the exact refusal score is at most 0.03 below
    the measured value (REFUSAL_GRAD_MEASURED: 0.65-0.96). Not asserted per head: a first-order
    estimate of a full ablation can flip sign where the response is strongly nonlinear (in
    float32 with other seeds, 22-25/30)."""
    agree, total = 0, 0
    for arch in SHIPS_ARCHS:
        model = tiny_lm(arch, len(tok), dtype=F64)
        exact = exact_scores(arch, model, tok, rt).refusal
        est = ships_estimate(model, tok, PROMPTS, estimator="refusal-grad", refusal_tokens=rt, progress=False).refusal
        a = agreement(est, exact, k=3)
        assert a["spearman_per_prompt"] >= REFUSAL_GRAD_MEASURED[arch] - 0.03, (arch, a)
        exact, est = exact.flatten(1), est.flatten(1)
        top = exact.abs().argmax(1, keepdim=True)
        agree += int((exact.gather(1, top).sign() == est.gather(1, top).sign()).sum())
        total += top.numel()
    assert total == 30 and agree >= 27, (agree, total)


# --------------------------------------------------------------------------- result helpers

NAN = math.nan


def hand_result(refusal: bool = False) -> ShipsResult:
    kl = torch.tensor([[[1.0, 5.0, NAN], [3.0, 2.0, 0.0]],
                       [[4.0, 1.0, NAN], [0.0, 6.0, 2.0]]])
    return ShipsResult(kl, -kl if refusal else None, ["p0", "p1"], "exact", {"note": "hand-made", "heads": [[0, 1]]})


def test_result_helpers_on_hand_made_scores():
    """top_heads, mean, dataset_top and topk_frequency on a 2 prompts × 2 layers × 3 heads
    tensor with one unscored (NaN) head, against values worked out by hand."""
    r = hand_result()
    assert r.top_heads(2) == [[(0, 1, 5.0), (1, 0, 3.0)], [(1, 1, 6.0), (0, 0, 4.0)]]
    assert [len(t) for t in r.top_heads(10)] == [5, 5]  # the NaN head is never listed
    torch.testing.assert_close(r.mean(), torch.tensor([[2.5, 3.0, NAN], [1.5, 4.0, 1.0]]), equal_nan=True)
    assert r.dataset_top(2) == [(1, 1), (0, 1)]
    assert r.dataset_top(10) == [(1, 1), (0, 1), (0, 0), (1, 0), (1, 2)]  # k > scored heads: no NaN head
    freq = r.topk_frequency(2)
    expect = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(freq, expect)
    assert float(r.topk_frequency(1).sum()) == 1.0  # one head per prompt, shares over 2 prompts


def test_result_metric_errors():
    """Asking for refusal scores a result does not have, or an unknown metric, is a clear error;
    a result with refusal scores ranks them like KL."""
    r = hand_result()
    with pytest.raises(ValueError, match="no refusal scores"):
        r.mean("refusal")
    with pytest.raises(ValueError, match="unknown metric"):
        r.top_heads(1, metric="entropy")
    rr = hand_result(refusal=True)
    assert rr.top_heads(1, metric="refusal") == [[(1, 2, 0.0)], [(1, 0, 0.0)]]


@pytest.mark.parametrize("refusal", [False, True])
def test_save_load_roundtrip(tmp_path, refusal):
    """save() then load() gives back the same tensors (NaN where unscored), prompts, method and
    provenance; a result without refusal scores loads with refusal None."""
    r = hand_result(refusal)
    r.save(tmp_path / "res")
    back = ShipsResult.load(tmp_path / "res")
    torch.testing.assert_close(back.kl, r.kl, rtol=0, atol=0, equal_nan=True)
    if refusal:
        torch.testing.assert_close(back.refusal, r.refusal, rtol=0, atol=0, equal_nan=True)
    else:
        assert back.refusal is None
    assert (back.prompts, back.method, back.provenance) == (r.prompts, r.method, r.provenance)


def test_real_result_roundtrip(tmp_path, tok, rt):
    """A computed result (with provenance from a real run) survives save/load unchanged."""
    model = tiny_lm("qwen2", len(tok))
    r = ships(model, tok, PROMPTS[:1], heads=[(1, 2)], refusal_tokens=rt, progress=False)
    r.save(tmp_path / "s")
    back = ShipsResult.load(tmp_path / "s")
    torch.testing.assert_close(back.kl, r.kl, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(back.refusal, r.refusal, rtol=0, atol=0, equal_nan=True)
    assert back.provenance["heads"] == [[1, 2]]
    assert back.provenance["refusal_tokens"] == rt
    assert back.provenance["mode"] == "ua"
