"""Learned head masks: the optimisation lowers its objective, the hard top-k validation is an exact
ablation, runs are deterministic and resume to the same result, and the model is left as it was.

Models are tiny random models (3 layers × 4 query heads, 2 kv heads) with the SmolLM2 tokenizer's
vocabulary; prompts use SmolLM2's chat template. The equivalence test runs in float64 and compares
the validation numbers with an independent per-prompt computation at 1e-9 (float64 rounding of a
batched vs an unbatched forward is ~1e-13). Determinism and resume are compared bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import PROMPTS, refusal_ids, smol_tokenizer, tiny_lm

from safetyheads.ablation import ablate
from safetyheads.masks import HeadMaskResult, hard_validation, learn_head_mask, mask_heads
from safetyheads.prompts import encode_prompts, format_prompts

HARMLESS = ["What is the capital of France?", "Write a short poem about the sea.", "How do I bake bread?",
            "Name three prime numbers."]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="session")
def tok():
    return smol_tokenizer()


@pytest.fixture(scope="session")
def rt(tok):
    return refusal_ids(tok)


@pytest.fixture(scope="module")
def qwen2(tok):
    return tiny_lm("qwen2", len(tok))


def _run(model, tok, rt, **kw):
    args = dict(harmless=HARMLESS, refusal_tokens=rt, steps=8, batch_size=2, lr=0.2, validate_ks=(1, 3))
    args.update(kw)
    return learn_head_mask(model, tok, PROMPTS, **args)


@pytest.mark.parametrize("sparsity", ["l1", "hard-concrete"])
def test_optimisation_lowers_the_objective(qwen2, tok, rt, sparsity):
    """The full objective (all prompts, deterministic strengths) is lower after training than at the
    initial strengths; with the penalties off, the refusal log-odds itself goes down."""
    r = _run(qwen2, tok, rt, sparsity=sparsity, init=-1.0)
    assert r.objective_after["objective"] < r.objective_before["objective"]
    r0 = _run(qwen2, tok, rt, sparsity=sparsity, init=-1.0, lam_kl=0.0, lam_sparsity=0.0)
    assert r0.objective_after["refusal"] < r0.objective_before["refusal"] - 1e-3
    assert len(r.history) == 8 and all(math.isfinite(h["objective"]) for h in r.history)


def _independent(model, tok, rt, heads, prompts, harmless):
    """Per-prompt (unbatched) refusal log-odds drop and harmless KL under ablate(), by hand."""

    def logits(text, hs):
        enc = encode_prompts(tok, [text])
        with torch.no_grad(), ablate(model, hs, mode="ua", eps=1e-5):
            return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, -1].double()

    def logodds(lg):
        lp = F.log_softmax(lg, -1)
        inside = torch.zeros_like(lp, dtype=torch.bool)
        inside[rt] = True
        return torch.logsumexp(lp[inside], 0) - torch.logsumexp(lp[~inside], 0)

    drops = [float(logodds(logits(t, [])) - logodds(logits(t, heads))) for t in format_prompts(tok, prompts)]
    kls = []
    for t in format_prompts(tok, harmless):
        p, q = F.log_softmax(logits(t, []), -1), F.log_softmax(logits(t, heads), -1)
        kls.append(float((p.exp() * (p - q)).sum()))
    return sum(drops) / len(drops), sum(kls) / len(kls)


def test_hard_topk_validation_equals_direct_ablation(tok, rt):
    """Each validated top-k set's refusal drop and harmless KL equal an independent unbatched computation
    with ablate() in float64 (rtol 1e-9, atol 1e-11)."""
    model = tiny_lm("qwen2", len(tok), dtype=torch.float64)
    r = _run(model, tok, rt, steps=4, validate_ks=(1, 2, 5))
    assert [v.k for v in r.validation] == [1, 2, 5]
    for v in r.validation:
        assert v.heads == r.top_heads(v.k) == mask_heads(r, v.k)
        drop, kl = _independent(model, tok, rt, v.heads, PROMPTS, HARMLESS)
        assert v.refusal_drop == pytest.approx(drop, rel=1e-9, abs=1e-11)
        assert v.harmless_kl == pytest.approx(kl, rel=1e-9, abs=1e-11)
        assert v.refusal_drop == pytest.approx(v.refusal_base - v.refusal_ablated, abs=1e-12)


def test_hard_validation_of_any_heads_matches_the_mask_validation(qwen2, tok, rt):
    """hard_validation (for other methods' heads) gives the same numbers as the mask's own top-k validation."""
    r = _run(qwen2, tok, rt, steps=2)
    v = hard_validation(qwen2, tok, PROMPTS, harmless=HARMLESS, heads=r.top_heads(3), refusal_tokens=rt, batch_size=2)
    assert v.to_json() == r.validated(3).to_json()


def test_ranking_follows_the_learned_parameters(qwen2, tok, rt):
    """The ranking lists every head once, in descending θ, and the strengths are θ's sigmoid (l1)."""
    r = _run(qwen2, tok, rt, steps=3)
    assert sorted(r.ranking) == [(layer, h) for layer in range(3) for h in range(4)]
    vals = [float(r.theta[layer, h]) for layer, h in r.ranking]
    assert vals == sorted(vals, reverse=True)
    torch.testing.assert_close(r.strengths, torch.sigmoid(r.theta), rtol=0, atol=0)


@pytest.mark.parametrize("sparsity", ["l1", "hard-concrete"])
def test_two_runs_are_identical(qwen2, tok, rt, sparsity):
    """Same seed, same inputs: bit-identical parameters, histories and validations."""
    a = _run(qwen2, tok, rt, sparsity=sparsity, steps=5)
    b = _run(qwen2, tok, rt, sparsity=sparsity, steps=5)
    assert torch.equal(a.theta, b.theta)
    assert a.history == b.history
    assert [v.to_json() for v in a.validation] == [v.to_json() for v in b.validation]
    if sparsity == "hard-concrete":  # the seed matters where there is noise
        c = _run(qwen2, tok, rt, sparsity=sparsity, steps=5, seed=1)
        assert not torch.equal(a.theta, c.theta)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("sparsity", ["l1", "hard-concrete"])
def test_resume_after_interruption_is_identical(qwen2, tok, rt, tmp_path, sparsity):
    """A run stopped after step 5 (last checkpoint at step 4) and resumed from its checkpoint ends
    bit-identical to an uninterrupted run (θ, Adam state via θ's later steps, history, validation)."""
    full = _run(qwen2, tok, rt, sparsity=sparsity, steps=8)

    def stop(step, rec):
        if step == 5:
            raise _Stop

    ck = tmp_path / "mask.ckpt"
    with pytest.raises(_Stop):
        _run(qwen2, tok, rt, sparsity=sparsity, steps=8, checkpoint=ck, checkpoint_every=2, callback=stop)
    seen = []
    resumed = _run(qwen2, tok, rt, sparsity=sparsity, steps=8, checkpoint=ck, checkpoint_every=2,
                   callback=lambda s, r: seen.append(s))
    assert seen == [5, 6, 7, 8]  # steps 1..4 came from the checkpoint
    assert ck.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["mask.ckpt"]  # one file, no temp left
    assert torch.equal(full.theta, resumed.theta)
    assert full.history == resumed.history
    assert [v.to_json() for v in full.validation] == [v.to_json() for v in resumed.validation]
    # a finished checkpoint skips training; a longer run continues it
    again = _run(qwen2, tok, rt, sparsity=sparsity, steps=8, checkpoint=ck, callback=lambda s, r: seen.append(-s))
    assert torch.equal(again.theta, full.theta) and seen == [5, 6, 7, 8]


def test_checkpoint_of_another_configuration_is_refused(qwen2, tok, rt, tmp_path):
    ck = tmp_path / "mask"
    _run(qwen2, tok, rt, steps=2, checkpoint=ck)
    with pytest.raises(ValueError, match="different mask configuration"):
        _run(qwen2, tok, rt, steps=2, checkpoint=ck, lam_kl=0.5)
    with pytest.raises(ValueError, match="past steps"):
        _run(qwen2, tok, rt, steps=1, checkpoint=ck)


def test_model_is_left_exactly_as_it_was(tok, rt):
    """Weights bit-identical, requires_grad flags and train/eval mode restored, no hooks left,
    deterministic-algorithms setting restored."""
    model = tiny_lm("qwen2", len(tok))
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)
    before = [p.detach().clone() for p in params]
    det = torch.are_deterministic_algorithms_enabled()
    _run(model, tok, rt, steps=2)
    assert [p.requires_grad for p in params] == [i % 2 == 0 for i in range(len(params))]
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert not model.training
    assert torch.are_deterministic_algorithms_enabled() == det
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_save_load_roundtrip(qwen2, tok, rt, tmp_path):
    r = _run(qwen2, tok, rt, steps=2)
    r.save(tmp_path / "mask")
    back = HeadMaskResult.load(tmp_path / "mask")
    assert torch.equal(back.theta, r.theta) and torch.equal(back.strengths, r.strengths)
    assert back.ranking == r.ranking and back.history == r.history
    assert [v.to_json() for v in back.validation] == [v.to_json() for v in r.validation]
    assert back.provenance["model"]["model_type"] == "qwen2" and back.provenance["mode"] == "ua"
    assert back.provenance["refusal_tokens"] == rt and back.config["sparsity"] == "l1"
    assert back.validated(3).k == 3
    with pytest.raises(KeyError):
        back.validated(4)


@pytest.mark.parametrize("arch", ["phi3", "gpt2", "qwen3"])
def test_gradients_reach_every_head_on_other_architectures(tok, rt, arch):
    """Fused qkv (phi3), Conv1D (gpt2) and q norm (qwen3): every head's θ moves from its initial value."""
    model = tiny_lm(arch, len(tok))
    r = _run(model, tok, rt, steps=2, lam_sparsity=0.0)
    assert (r.theta != -3.0).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": "l0"}, "unknown sparsity"),
    ({"harmless": []}, "harmless is empty"),
    ({"mode": "mean"}, "not supported for learned masks"),
    ({"steps": -1}, "steps"),
    ({"lam_kl": -1.0}, "lam_kl"),
    ({"validate_ks": (0,)}, "validate_ks"),
    ({"refusal_tokens": []}, "refusal_tokens is empty"),
])
def test_bad_arguments_are_rejected(qwen2, tok, rt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(qwen2, tok, rt, **kwargs)
