"""Sahara: principal angles, the greedy search against a brute-force reference, checkpoints, errors.

Each test's docstring states the property it checks and its tolerance. Models are tiny random
models (3 layers × 4 query heads, 12 candidate heads) with the SmolLM2 tokenizer's vocabulary, in
float64 end to end (``tiny_lm(..., dtype=torch.float64)``, see ``tiny_models.float64_model``), so
two computations of the same score agree to float64 rounding on any CPU; prompts use SmolLM2's
chat template.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from tiny_lm import PROMPTS, smol_tokenizer, tiny_lm

from safetyheads import SaharaResult, ablate, sahara
from safetyheads.prompts import encode_prompts, format_prompts

sahara_mod = sys.modules["safetyheads.sahara"]  # the package re-exports the function under the same name
search_mod = sys.modules["safetyheads.search"]  # the greedy engine sahara() runs on
principal_angles, subspace, generalized_ships = (sahara_mod.principal_angles, sahara_mod.subspace,
                                                 sahara_mod.generalized_ships)

P7 = PROMPTS + ["Tell me a joke about cats", "What is the capital of France?"]
ANGLE_TOL = 1e-10  # rad: two float64 computations of the same Sahara score


@pytest.fixture(scope="session")
def tok():
    return smol_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_lm("llama", len(tok), dtype=torch.float64)


def basis(*cols: torch.Tensor) -> torch.Tensor:
    return torch.stack(cols, 1).double()


def e(i: int, n: int = 6) -> torch.Tensor:
    v = torch.zeros(n, dtype=torch.float64)
    v[i] = 1
    return v


# --------------------------------------------------------------------------- principal angles


def test_identical_subspaces_have_zero_angles():
    """The same span, in the same or any other orthonormal basis (rotated, sign-flipped columns),
    has all principal angles 0 (to 1e-12)."""
    g = torch.Generator().manual_seed(0)
    A = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64)).Q
    R = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64)).Q
    for B in (A, A @ R, A * torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)):
        ang = principal_angles(A, B)
        assert ang.shape == (3,)
        assert ang.abs().max() < 1e-12


def test_orthogonal_subspaces_have_right_angles():
    """span(e0, e1) and span(e2, e3) are at π/2 in each dimension (to 1e-12), and sign flips
    of the basis vectors change nothing."""
    A, B = basis(e(0), e(1)), basis(e(2), e(3))
    torch.testing.assert_close(principal_angles(A, B), torch.full((2,), math.pi / 2, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(principal_angles(-A, B * torch.tensor([1.0, -1.0], dtype=torch.float64)),
                               torch.full((2,), math.pi / 2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_known_30_60_degree_case():
    """A = span(e0, e1); B = span(cos30°·e0 + sin30°·e2, cos60°·e1 + sin60°·e3): the angles are
    π/6 and π/3, ascending, to 1e-12, whatever the order and signs of B's columns."""
    c30, s30, c60, s60 = math.cos(math.pi / 6), math.sin(math.pi / 6), math.cos(math.pi / 3), math.sin(math.pi / 3)
    A = basis(e(0), e(1))
    b1, b2 = c30 * e(0) + s30 * e(2), c60 * e(1) + s60 * e(3)
    expect = torch.tensor([math.pi / 6, math.pi / 3], dtype=torch.float64)
    for B in (basis(b1, b2), basis(b2, -b1)):
        torch.testing.assert_close(principal_angles(A, B), expect, rtol=0, atol=1e-12)
        torch.testing.assert_close(principal_angles(B, A), expect, rtol=0, atol=1e-12)  # symmetric


def test_tiny_angles_are_accurate():
    """An angle of 1e-9 rad is recovered to relative 1e-6 (arccos of the cosine alone would give
    0 or ~1e-8: cos(1e-9) rounds to 1 in float64)."""
    t = 1e-9
    A = basis(e(0))
    B = basis(math.cos(t) * e(0) + math.sin(t) * e(1))
    assert float(principal_angles(A, B)[0]) == pytest.approx(t, rel=1e-6)


def test_different_ranks():
    """Subspaces of different dimension have min(r_A, r_B) angles: span(e0) vs span(e0, e1) → [0];
    span(e2) vs span(e0, e1) → [π/2]."""
    assert principal_angles(basis(e(0)), basis(e(0), e(1))).tolist() == pytest.approx([0.0], abs=1e-12)
    assert principal_angles(basis(e(0), e(1)), basis(e(2))).tolist() == pytest.approx([math.pi / 2], abs=1e-12)


def test_principal_angles_rejects_non_orthonormal_input():
    """A basis with duplicate or non-unit columns is rejected (the angles would be wrong)."""
    with pytest.raises(ValueError, match="orthonormal"):
        principal_angles(basis(e(0), e(0)), basis(e(1), e(2)))
    with pytest.raises(ValueError, match="orthonormal"):
        principal_angles(basis(e(0)), basis(2 * e(1)))
    with pytest.raises(ValueError, match="same n"):
        principal_angles(basis(e(0, 6)), basis(e(0, 5)))


def test_subspace_basics():
    """subspace() returns an orthonormal [d, r] (feature) or [N, r] (query) basis of the top
    singular directions; for M = diag-like data with known directions it recovers them (up to
    sign: angle 0 to 1e-12); centring removes the mean first."""
    g = torch.Generator().manual_seed(1)
    # 8 "prompts" in R^5 along e0 (±10) and e1 (±3), orthogonal zero-mean patterns, tiny noise
    a = 10 * torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1])
    b = 3 * torch.tensor([1.0, 1, -1, -1, 1, 1, -1, -1])
    M = a[:, None] * e(0, 5).float() + b[:, None] * e(1, 5).float() + 1e-3 * torch.randn(8, 5, generator=g)
    V = subspace(M, 2)
    assert V.shape == (5, 2) and V.dtype == torch.float64
    torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert principal_angles(V, basis(e(0, 5), e(1, 5))).max() < 1e-3
    assert subspace(M, 2, space="query").shape == (8, 2)
    shifted = M + 100 * e(4, 5).float()  # a common offset dominates the uncentred subspace only
    assert principal_angles(subspace(shifted, 1), basis(e(4, 5))).max() < 1e-3
    assert principal_angles(subspace(shifted, 1, center=True), basis(e(0, 5))).max() < 1e-3
    assert generalized_ships(M, M, 2) == pytest.approx(0.0, abs=1e-12)


def test_subspace_rank_deficient_input_errors_clearly():
    """A stack whose numerical rank is below the requested rank (duplicate rows, duplicate
    columns, all-zero, or centring identical rows) raises a ValueError naming the rank problem,
    instead of returning an arbitrary basis; asking for more than min(N, d) or rank 0 too."""
    g = torch.Generator().manual_seed(2)
    row = torch.randn(1, 6, generator=g)
    with pytest.raises(ValueError, match="numerical rank 1 < rank 2"):
        subspace(row.repeat(4, 1), 2)  # four identical prompts
    col = torch.randn(5, 1, generator=g)
    with pytest.raises(ValueError, match="numerical rank 1 < rank 2"):
        subspace(col.repeat(1, 6), 2)  # duplicate columns: rank 1
    with pytest.raises(ValueError, match="numerical rank 0"):
        subspace(torch.zeros(4, 6), 1)
    with pytest.raises(ValueError, match="numerical rank"):
        subspace(row.repeat(4, 1), 1, center=True)  # centred identical rows are all zero
    with pytest.raises(ValueError, match="exceeds"):
        subspace(torch.randn(3, 6, generator=g), 4)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        subspace(torch.randn(3, 6, generator=g), 0)
    with pytest.raises(ValueError, match="space"):
        subspace(torch.randn(3, 6, generator=g), 1, space="rows")
    subspace(torch.cat([row.repeat(3, 1), torch.randn(1, 6, generator=g)]), 2)  # rank 2 of duplicates: fine


# --------------------------------------------------------------------------- greedy search vs brute force


def reference_reps(model, tok, prompts, heads) -> torch.Tensor:
    """Final-norm last-token states, one prompt at a time (no padding), with plain ablate()."""
    rows = []
    for text in format_prompts(tok, prompts):
        ids = encode_prompts(tok, [text])["input_ids"]
        with torch.no_grad(), ablate(model, heads, mode="ua", eps=1e-5):
            rows.append(model.base_model(input_ids=ids).last_hidden_state[0, -1].double())
    return torch.stack(rows)


def reference_score(M0: torch.Tensor, M1: torch.Tensor, rank: int, center: bool, space: str) -> float:
    """Sum of arccos of the singular values of U0ᵀU1, written independently of sahara.py."""
    def top(M):
        if center:
            M = M - M.mean(0)
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :rank] if space == "query" else Vh[:rank].T
    cos = torch.linalg.svdvals(top(M0).T @ top(M1)).clamp(-1, 1)
    return float(torch.arccos(cos).sum())


def brute_force_greedy(model, tok, prompts, steps, rank, center, space):
    n_layers, n_heads = 3, 4
    cands = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    M0 = reference_reps(model, tok, prompts, [])
    chosen, all_scores = [], []
    for _ in range(steps):
        scores = {h: reference_score(M0, reference_reps(model, tok, prompts, chosen + [h]), rank, center, space)
                  for h in cands if h not in chosen}
        ranked = sorted(scores.values(), reverse=True)
        assert ranked[0] - ranked[1] > 1e-3  # an unambiguous choice, so comparing choices is meaningful
        chosen.append(max(scores, key=scores.get))
        all_scores.append(scores)
    return chosen, all_scores


@pytest.mark.parametrize("rank, center, space", [(1, False, "feature"), (2, True, "feature"), (2, False, "query")])
def test_greedy_search_equals_brute_force(llama, tok, rank, center, space):
    """Sahara with steps=2 over all 12 heads of a tiny Llama picks the same two heads, in the same
    order, as a brute-force greedy search that scores every candidate (and every pair with the
    first pick) with plain ablate(), one unpadded prompt per forward, the model's own
    last_hidden_state and arccos of singular values; every candidate score agrees to ANGLE_TOL =
    1e-10 rad (float64 hidden states of padded vs unpadded batches; measured <= 2.1e-14; every
    score >= 0.06 rad, where arccos is well conditioned)."""
    prompts = P7
    ref_heads, ref_scores = brute_force_greedy(llama, tok, prompts, 2, rank, center, space)
    res = sahara(llama, tok, prompts, steps=2, preset=None, rank=rank, center=center, space=space, progress=False)
    assert res.heads == ref_heads
    assert [s.chosen for s in res.steps] == ref_heads
    for step, ref in zip(res.steps, ref_scores):
        assert set(step.scores) == set(ref)
        for h, v in ref.items():
            assert step.scores[h] == pytest.approx(v, abs=ANGLE_TOL), h
        assert step.score == step.scores[step.chosen]


def test_reuse_equals_no_reuse(llama, tok):
    """Caching the unablated residual stream below the ablated layers (reuse=True) gives exactly
    the same scores (bit-identical floats) as recomputing every layer (reuse=False), also with a
    batch size that splits the prompts into padded blocks of different widths."""
    a = sahara(llama, tok, P7, steps=2, preset="paper", batch_size=3, progress=False)
    b = sahara(llama, tok, P7, steps=2, preset="paper", batch_size=3, reuse=False, progress=False)
    assert a.heads == b.heads
    assert [s.scores for s in a.steps] == [s.scores for s in b.steps]


def test_later_steps_reuse_the_chosen_heads_residual(llama, tok, monkeypatch):
    """In every step, a candidate's forward pass starts at the candidate's own layer: the residual
    below it is cached from the model with the already chosen heads ablated (so step 2 is as cheap
    as step 1, not a full forward whenever a chosen head sits in layer 0)."""
    starts = []
    orig = search_mod.reuse_residual

    def spy(model, start, hidden):
        starts.append(start if hidden is not None else 0)
        return orig(model, start, hidden)

    monkeypatch.setattr(search_mod, "reuse_residual", spy)
    res = sahara(llama, tok, P7, steps=2, batch_size=len(P7), progress=False)
    cands = [(layer, h) for layer in range(3) for h in range(4)]
    step2 = [h for h in cands if h != res.heads[0]]
    assert starts == [layer for layer, _ in cands] + [layer for layer, _ in step2]


def test_batch_size_does_not_change_scores(llama, tok):
    """Sahara's scores do not depend on how prompts are batched (batch 1 vs all 7 in one padded
    batch) beyond float64 rounding: ANGLE_TOL = 1e-10 rad (measured 1.8e-15)."""
    a = sahara(llama, tok, P7, steps=1, preset="paper", batch_size=1, progress=False)
    b = sahara(llama, tok, P7, steps=1, preset="paper", batch_size=7, progress=False)
    assert a.heads == b.heads
    for h, v in a.steps[0].scores.items():
        assert b.steps[0].scores[h] == pytest.approx(v, abs=ANGLE_TOL)


def test_candidates_restrict_the_search(llama, tok):
    """candidates= limits the search: only those heads are scored, and their scores equal the
    exhaustive search's (to 1e-12: the same computation)."""
    full = sahara(llama, tok, P7[:4], steps=1, progress=False)
    cands = [(2, 3), (0, 1), (1, 0)]
    part = sahara(llama, tok, P7[:4], steps=1, candidates=cands, progress=False)
    assert set(part.steps[0].scores) == set(cands)
    for h in cands:
        assert part.steps[0].scores[h] == pytest.approx(full.steps[0].scores[h], abs=1e-12)
    assert part.heads[0] == max(cands, key=lambda h: full.steps[0].scores[h])


# --------------------------------------------------------------------------- checkpoints


_ORIG_ABLATED = search_mod._Residuals.ablated


class Interrupt:
    """Wraps _Residuals.ablated (one call per candidate) to raise KeyboardInterrupt after ``k`` calls."""

    def __init__(self, monkeypatch, k: int | None):
        self.k, self.calls = k, 0
        orig = _ORIG_ABLATED  # not the attribute: an earlier Interrupt of the same test may wrap it

        def ablated(reps, *a, **kw):
            if self.k is not None and self.calls >= self.k:
                raise KeyboardInterrupt
            self.calls += 1
            return orig(reps, *a, **kw)

        monkeypatch.setattr(search_mod._Residuals, "ablated", ablated)


@pytest.mark.parametrize("k", [5, 15])
def test_checkpoint_resume_equals_uninterrupted(llama, tok, tmp_path, monkeypatch, k):
    """A run interrupted (KeyboardInterrupt) after k scored candidates — mid step 1 (k=5) or mid
    step 2 (k=15; step 1 has 12 candidates) — and rerun with the same checkpoint path returns
    exactly the uninterrupted result (same heads, bit-identical scores), scoring only the
    23 − k candidates left; a third call with the finished checkpoint scores none."""
    kw = dict(steps=2, preset="paper", progress=False)
    full = sahara(llama, tok, P7, **kw)
    ckpt = tmp_path / "ck.json"
    cut = Interrupt(monkeypatch, k)
    with pytest.raises(KeyboardInterrupt):
        sahara(llama, tok, P7, checkpoint=ckpt, checkpoint_every_s=1e9, **kw)
    assert cut.calls == k
    state = json.loads(ckpt.read_text())
    assert len(state["done"]) == (k >= 12) and len(state["partial"]) == k - 12 * (k >= 12)
    again = Interrupt(monkeypatch, None)
    res = sahara(llama, tok, P7, checkpoint=ckpt, **kw)
    assert again.calls == 12 + 11 - k
    assert res.heads == full.heads
    assert [(s.chosen, s.score, s.scores) for s in res.steps] == [(s.chosen, s.score, s.scores) for s in full.steps]
    done = Interrupt(monkeypatch, None)
    assert sahara(llama, tok, P7, checkpoint=ckpt, **kw).heads == full.heads
    assert done.calls == 0


@pytest.mark.parametrize("change", [dict(rank=2), dict(steps=2), dict(prompts=P7[:6]), dict(mode="sc"),
                                    dict(candidates=[(0, 0), (1, 1), (2, 2)]), dict(prompt_format="template")])
def test_checkpoint_of_another_config_is_refused(llama, tok, tmp_path, change):
    """A checkpoint written by a different configuration (rank, steps, prompts, mode, candidates,
    prompt format) is refused with a ValueError, and the file is left as it was."""
    ckpt = tmp_path / "ck.json"

    def run(prompts=P7, **kw):
        args = dict(steps=1, preset=None, rank=1, mode="ua", prompt_format="chat", progress=False)
        return sahara(llama, tok, prompts, checkpoint=ckpt, **{**args, **kw})

    run()
    before = ckpt.read_text()
    with pytest.raises(ValueError, match="different Sahara configuration"):
        run(**change)
    assert ckpt.read_text() == before


def test_checkpoint_keeps_the_prefilter(llama, tok, tmp_path, monkeypatch):
    """With a prefilter, the kept candidates are stored in the checkpoint and a resumed run uses
    them without recomputing the prefilter; the result equals the uninterrupted run."""
    kw = dict(steps=2, preset="official", prefilter="exact-subset", prefilter_k=4, progress=False)
    full = sahara(llama, tok, P7, **kw)
    ckpt = tmp_path / "ck.json"
    Interrupt(monkeypatch, 12 + 2)  # the prefilter scores 12 candidates, then step 1 is cut after 2
    with pytest.raises(KeyboardInterrupt):
        sahara(llama, tok, P7, checkpoint=ckpt, **kw)
    assert len(json.loads(ckpt.read_text())["kept"]) == 4
    again = Interrupt(monkeypatch, None)
    res = sahara(llama, tok, P7, checkpoint=ckpt, **kw)
    assert again.calls == 2 + 3  # 2 left of step 1, 3 of step 2: no prefilter rerun
    assert res.heads == full.heads and res.config["kept"] == full.config["kept"]


# --------------------------------------------------------------------------- prefilters


def test_prefilters(llama, tok):
    """prefilter="exact-subset" (with ≤ 8 prompts: exactly the exhaustive step-1 scores) keeps the
    prefilter_k best step-1 heads, so the first head equals the exhaustive search's; "estimate"
    keeps prefilter_k heads too; every chosen head is among the kept ones, and only kept heads
    are scored."""
    exhaustive = sahara(llama, tok, P7, steps=1, progress=False)
    sub = sahara(llama, tok, P7, steps=2, prefilter="exact-subset", prefilter_k=3, progress=False)
    kept = [tuple(h) for h in sub.config["kept"]]
    best3 = sorted(exhaustive.steps[0].scores, key=lambda h: -exhaustive.steps[0].scores[h])[:3]
    assert kept == best3
    assert sub.heads[0] == exhaustive.heads[0]
    est = sahara(llama, tok, P7, steps=2, prefilter="estimate", prefilter_k=5, progress=False)
    kept = [tuple(h) for h in est.config["kept"]]
    assert len(kept) == 5 and set(est.heads) <= set(kept)
    assert set(est.steps[0].scores) == set(kept)


# --------------------------------------------------------------------------- errors and presets


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=P7[:2], preset="paper"), "at least 3 prompts"),
    (dict(prompts=P7[:3], rank=3, center=True), "at least 4 prompts"),
    (dict(steps=3, candidates=[(0, 0), (1, 1)]), "more than the 2 candidate"),
    (dict(candidates=[(0, 0), (1, 1), (0, 0)]), "duplicate candidates"),
    (dict(candidates=[]), "candidates is empty"),
    (dict(steps=3, prefilter="estimate", prefilter_k=2), "prefilter_k=2 must be >= steps=3"),
    (dict(prefilter="magic"), "unknown prefilter"),
    (dict(preset="nope"), "unknown preset"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(rank=0), "rank must be >= 1"),
    (dict(space="rows"), "space"),
    (dict(prompts=[]), "no prompts"),
])
def test_bad_arguments_are_rejected(llama, tok, kwargs, match):
    """Fewer prompts than the rank needs (rank + 1 when centred), more steps than candidates,
    duplicate or no candidates, prefilter_k < steps, unknown prefilter or preset, steps or rank
    < 1, a bad space, no prompts: each a ValueError naming the problem, before any forward pass."""
    prompts = kwargs.pop("prompts", P7)
    with pytest.raises(ValueError, match=match):
        sahara(llama, tok, prompts, progress=False, **kwargs)


def test_out_of_range_candidate_is_rejected(llama, tok):
    """A candidate head outside the model is an IndexError naming the range."""
    with pytest.raises(IndexError, match="head 4 out of range"):
        sahara(llama, tok, P7, candidates=[(0, 4)], progress=False)


@pytest.mark.parametrize("preset, kwargs, rank, center", [
    ("official", {}, 1, False),
    ("paper", {}, 3, False),
    (None, {}, 1, False),
    ("paper", dict(rank=2), 2, False),
    ("official", dict(center=True), 1, True),
])
def test_presets(llama, tok, preset, kwargs, rank, center):
    """Presets set rank and centring as documented — "official": rank 1, uncentred (the public
    code); "paper": rank 3, uncentred — and explicit rank=/center= override them; the result's
    config records the preset and the values used."""
    assert sahara_mod.PRESETS == {"official": {"rank": 1, "center": False}, "paper": {"rank": 3, "center": False}}
    res = sahara(llama, tok, P7[:4], steps=1, candidates=[(0, 0), (2, 1)], preset=preset, progress=False, **kwargs)
    assert (res.config["rank"], res.config["center"], res.config["preset"]) == (rank, center, preset)
    M0 = reference_reps(llama, tok, P7[:4], [])
    expect = reference_score(M0, reference_reps(llama, tok, P7[:4], [(2, 1)]), rank, center, "feature")
    assert res.steps[0].scores[(2, 1)] == pytest.approx(expect, abs=ANGLE_TOL)  # measured <= 8e-15


def test_result_roundtrip_and_matrix(llama, tok, tmp_path):
    """SaharaResult.save/load gives back the heads, every step's scores, config and provenance;
    as_matrix puts each score at [layer, head] with NaN elsewhere."""
    res = sahara(llama, tok, P7[:3], steps=2, candidates=[(0, 0), (1, 2), (2, 3)], progress=False)
    res.save(tmp_path / "s.json")
    back = SaharaResult.load(tmp_path / "s.json")
    assert back.heads == res.heads
    assert [(s.chosen, s.score, s.scores) for s in back.steps] == [(s.chosen, s.score, s.scores) for s in res.steps]
    assert back.config == json.loads(json.dumps(res.config))
    m = res.steps[0].as_matrix(3, 4)
    assert m[1, 2] == pytest.approx(res.steps[0].scores[(1, 2)])
    assert int(torch.isnan(m).sum()) == 12 - 3


def test_sahara_on_other_architectures(tok):
    """Sahara runs on architectures with q norm (qwen3), sliding windows (gemma3) and absolute
    positions (gpt2); with prompts batched in padded blocks of 2, its step-1 scores agree with
    the brute-force reference to ANGLE_TOL = 1e-10 rad (float64; measured <= 5.7e-14)."""
    for arch in ("qwen3", "gemma3", "gpt2"):
        model = tiny_lm(arch, len(tok), dtype=torch.float64)
        res = sahara(model, tok, P7[:5], steps=1, preset="paper", batch_size=2, candidates=[(0, 1), (2, 3)],
                     progress=False)
        M0 = reference_reps(model, tok, P7[:5], [])
        for h in [(0, 1), (2, 3)]:
            expect = reference_score(M0, reference_reps(model, tok, P7[:5], [h]), 3, False, "feature")
            assert res.steps[0].scores[h] == pytest.approx(expect, abs=ANGLE_TOL), (arch, h)
