"""Mode ``mean`` (SPEC: a head's output replaced by its dataset mean) through every stage's engine.

On a tiny float64 model (tests/tiny_lm.py) with the head means of :func:`safetyheads.ships.dataset_means`:
generation in shared batches (conditions mixed, per-prompt ``rows=``) equals a plain greedy loop under
``ablate(..., mode="mean", mean=...)`` one condition and one prompt at a time, token for token; the
search engine's step-1 KL scores equal a brute-force loop of plain ``ablate(mode="mean")`` forwards;
the Ships default mean is :func:`dataset_means`; and every library function that takes ``mode``
refuses ``mode="mean"`` without ``mean=`` with an error naming ``head_means``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import PROMPTS, refusal_ids, smol_tokenizer, tiny_lm

import safetyheads.generation as gen
from safetyheads import ablate
from safetyheads.prompts import encode_prompts, format_prompts
from safetyheads.ships import dataset_means, ships

HEADS = [(layer, h) for layer in range(3) for h in range(4)]
MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_lm("llama", len(tok), dtype=torch.float64)


@pytest.fixture(scope="module")
def mu(model, tok):
    """The head means over the test prompts (chat format), as a run computes them."""
    return dataset_means(model, tok, PROMPTS)


def _jobs(prompts):
    return [{"prompts": prompts, "heads": []},
            {"prompts": prompts, "heads": [(0, 1), (1, 2)]},
            {"prompts": prompts[::-1], "heads": [(2, 3)]},  # other order, other heads
            {"prompts": prompts, "rows": [[(0, 0)], [(1, 3), (2, 0)], [], [(2, 2)], [(0, 3), (1, 1)]][: len(prompts)]}]


@torch.no_grad()
def _plain_greedy(model, tok, prompt: str, heads, mu, eos: set[int]) -> list[int]:
    """One unpadded prompt under plain ``ablate(mode="mean")``: the whole sequence re-run for every new
    token (no KV cache, no batch), argmax as the generator picks it."""
    ids = encode_prompts(tok, format_prompts(tok, [prompt]))["input_ids"]
    out: list[int] = []
    with ablate(model, heads, mode="mean", mean=mu):
        for _ in range(MAX_NEW):
            t = int(model(input_ids=ids, use_cache=False).logits[0, -1].float().argmax())
            if t in eos:
                break
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out


@pytest.mark.parametrize("batch_size", [3, 64])
def test_generation_in_shared_batches_equals_plain_mean_ablation(model, tok, mu, batch_size):
    """generate_many(mode="mean", mean=μ) — conditions mixed in shared, left-padded batches with a KV
    cache, one job per-prompt ``rows=`` — gives the same tokens as plain ``ablate(mode="mean", mean=μ)``
    on each prompt alone, one condition at a time.

    Catches: a mean that does not reach the generation hooks (or another mean), rows ablated with
    another row's heads, a mean hook that misbehaves on padded or cached positions."""
    jobs = _jobs(PROMPTS)
    eos = set(gen._eos_ids(model, tok, "chat"))
    want = []
    for job in jobs:
        rows = job["rows"] if "rows" in job else [job["heads"]] * len(job["prompts"])
        want.append([_plain_greedy(model, tok, p, h, mu, eos) for p, h in zip(job["prompts"], rows)])
    got = gen.generate_many(model, tok, jobs, mode="mean", mean=mu, max_new_tokens=MAX_NEW, batch_size=batch_size,
                            progress=False)
    assert got == want
    assert got[1] != got[0] and got[3] != got[0]  # the ablations change answers, so a mix-up would show
    zero = gen.generate_many(model, tok, jobs, mode="zero", max_new_tokens=MAX_NEW, batch_size=batch_size,
                             progress=False)
    assert zero[1:] != got[1:], "mean ablation generated what zero ablation does: the mean did not matter"
    # generate_ids / rows= is the same path
    assert gen.generate_ids(model, tok, PROMPTS, rows=jobs[3]["rows"], mode="mean", mean=mu,
                            max_new_tokens=MAX_NEW, batch_size=batch_size, progress=False) == want[3]


def _last_logprobs(model, ids) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, -1].double(), -1)


@torch.no_grad()
def test_search_kl_step1_equals_brute_force_mean_ablation(model, tok, mu):
    """search_heads(objective="kl", mode="mean", mean=μ): every step-1 candidate score equals the mean
    over prompts of KL(unablated ‖ head mean-ablated) at the last position, computed here with plain
    ``ablate(mode="mean", mean=μ)``, one unpadded prompt per forward (float64, 1e-10 relative);
    head_scores gives the same numbers.

    Catches: the engine ablating without the means (or with other ones), residual reuse or padding
    that changes mean-ablated scores, a step that scores a head under another mode."""
    from safetyheads.search import head_scores, search_heads

    ids = [encode_prompts(tok, [t])["input_ids"] for t in format_prompts(tok, PROMPTS)]
    base = [_last_logprobs(model, x) for x in ids]
    want = {}
    for h in HEADS:
        with ablate(model, [h], mode="mean", mean=mu):
            kls = [float((b.exp() * (b - _last_logprobs(model, x))).sum()) for b, x in zip(base, ids)]
        want[h] = sum(kls) / len(kls)
    assert min(want.values()) > 1e-6  # every head's mean ablation moves the distribution: a real comparison
    res = search_heads(model, tok, PROMPTS, objective="kl", steps=1, mode="mean", mean=mu, batch_size=2,
                       progress=False)
    assert set(res.steps[0].scores) == set(HEADS)
    for h, v in want.items():
        assert res.steps[0].scores[h] == pytest.approx(v, rel=1e-10, abs=0), h
    assert res.heads == [max(want, key=want.get)]
    assert res.config["mode"] == "mean" and len(res.config["mean_sha256"]) == 64
    hs = head_scores(model, tok, PROMPTS, HEADS, objective="kl", mode="mean", mean=mu, batch_size=2)
    assert all(hs[h] == pytest.approx(v, rel=1e-10, abs=0) for h, v in want.items())
    zero = head_scores(model, tok, PROMPTS, HEADS[:3], objective="kl", mode="zero", batch_size=2)
    assert all(abs(zero[h] - want[h]) > 1e-6 * want[h] for h in zero), "mean scores equal zero-ablation scores"


def test_ships_default_mean_is_dataset_means(model, tok, mu):
    """ships(mode="mean") without ``mean`` uses dataset_means of its prompts (the run computes that once
    and passes it): the same scores bit for bit, and another mean gives other scores."""
    heads = [(0, 1), (2, 3)]
    own = ships(model, tok, PROMPTS, heads=heads, mode="mean", progress=False)
    given = ships(model, tok, PROMPTS, heads=heads, mode="mean", mean=mu, progress=False)
    torch.testing.assert_close(own.kl, given.kl, rtol=0, atol=0, equal_nan=True)  # unscored heads are NaN
    other = ships(model, tok, PROMPTS, heads=heads, mode="mean", mean=dataset_means(model, tok, PROMPTS[:1]),
                  progress=False)
    scored = given.kl.isfinite()
    assert scored.sum() == 2 * len(PROMPTS) and not torch.equal(other.kl[scored], given.kl[scored])


def _calls(model, tok):
    from safetyheads.disagreement import disagreement
    from safetyheads.evaluate import evaluate, evaluate_conditions, teacher_forced_kl
    from safetyheads.refusal_metric import refusal_metric, refusal_metric_many
    from safetyheads.sahara import sahara
    from safetyheads.search import head_scores, search_heads, signed_effects

    P, rt = PROMPTS[:2], refusal_ids(tok)
    return {
        "search_heads": lambda: search_heads(model, tok, P, objective="kl", steps=1, mode="mean", progress=False),
        "sahara": lambda: sahara(model, tok, P, steps=1, mode="mean", progress=False),
        "head_scores": lambda: head_scores(model, tok, P, [(0, 0)], objective="kl", mode="mean"),
        "signed_effects": lambda: signed_effects(model, tok, P, [(0, 0)], refusal_tokens=rt, mode="mean"),
        "disagreement": lambda: disagreement(model, tok, P, {"a": [(0, 0)]}, refusal_tokens=rt, mode="mean"),
        "generate_many": lambda: gen.generate_many(model, tok, [{"prompts": P, "heads": [(0, 0)]}], mode="mean",
                                                   max_new_tokens=2, progress=False),
        "generate": lambda: gen.generate(model, tok, P, heads=[(0, 0)], mode="mean", max_new_tokens=2, progress=False),
        "refusal_metric_many": lambda: refusal_metric_many(model, tok, [{"prompts": P, "heads": [(0, 0)]}],
                                                           refusal_tokens=rt, mode="mean"),
        "refusal_metric": lambda: refusal_metric(model, tok, P, refusal_tokens=rt, heads=[(0, 0)], mode="mean"),
        "teacher_forced_kl": lambda: teacher_forced_kl(model, tok, P, ["a", "b"], {"x": [(0, 0)]}, mode="mean"),
        "evaluate_conditions": lambda: evaluate_conditions(
            model, tok, P, [{"name": "baseline", "method": "baseline", "heads": []}], mode="mean", max_new_tokens=2,
            progress=False),
        "evaluate": lambda: evaluate(model, tok, P, heads=[(0, 0)], mode="mean", max_new_tokens=2, progress=False),
    }


NAMES = ["search_heads", "sahara", "head_scores", "signed_effects", "disagreement", "generate_many", "generate",
         "refusal_metric_many", "refusal_metric", "teacher_forced_kl", "evaluate_conditions", "evaluate"]


@pytest.mark.parametrize("name", NAMES)
def test_mode_mean_without_mean_names_head_means(model, tok, name, monkeypatch):
    """Each function that takes ``mode`` refuses ``mode="mean"`` without ``mean=`` up front, with a
    ValueError naming head_means — before any forward pass (the model's forward is made to fail)."""
    call = _calls(model, tok)[name]
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail(f"{name} ran a forward before checking mean"))
    with pytest.raises(ValueError, match="head_means"):
        call()


def test_mean_of_the_wrong_shape_is_refused(model, tok):
    """A mean that is not ``[layers, heads, head_dim]`` is refused with the expected shape."""
    from safetyheads.search import head_scores

    with pytest.raises(ValueError, match=r"mean must be \[3, 4, 16\]"):
        head_scores(model, tok, PROMPTS[:2], [(0, 0)], objective="kl", mode="mean", mean=torch.zeros(3, 4))


def test_run_in_mode_mean_passes_one_saved_mean_to_every_stage(model, tok, tmp_path, monkeypatch):
    """A whole run (prompts → ships → sahara → search → evaluate) in mode ``mean`` on the tiny model:
    head_means.safetensors holds dataset_means of the attribution prompts (Ships format); the search,
    its signed-effects table and the headline's signed effects are exactly what the library gives
    with that tensor; Sahara, the disagreement table and every generated condition record its
    sha256; a resumed stage reuses the saved tensor instead of computing it again.

    Catches: a stage that computes its own means (over other prompts) or none, a mean that differs
    between stages or between a run and its resume. (The embedded models rarely refuse these few
    prompts, so the refusal tokens are fixed here: the refusal search and signed effects run.)"""
    import json
    import sys

    from safetyheads.config import RunConfig
    from safetyheads.pipeline import Run
    from safetyheads.provenance import load_tensors_json
    from safetyheads.search import SearchResult, signed_effects

    ev_mod, ships_mod = sys.modules["safetyheads.evaluate"], sys.modules["safetyheads.ships"]  # not the functions
    rt = refusal_ids(tok)
    monkeypatch.setattr(ev_mod, "derive_refusal_tokens", lambda *a, **k: list(rt))
    cfg = RunConfig(mode="mean", n_attribution=3, n_ships_exact=1, n_eval=2, n_harmless=1, max_new_tokens=3, steps=2,
                    prefilter_k=3, random_controls=1, batch_size=4)
    out = tmp_path / "run"
    stages = ("prompts", "ships", "sahara", "search", "evaluate")
    Run(cfg, out, progress=False, model=model, tokenizer=tok).execute(stages)
    tensors, meta = load_tensors_json(out / "head_means")
    mean = tensors["mean"]
    attr = json.loads((out / "prompts.json").read_text())["attribution"]
    assert torch.equal(mean, dataset_means(model, tok, attr, prompt_format=cfg.stage_format("ships")))
    digest = meta["sha256"]
    search = SearchResult.load(out / "search.json")
    assert search.config["objective"] == "refusal" and search.config["mean_sha256"] == digest
    signed = json.loads((out / "signed_effects.json").read_text())
    heads = [(a, b) for a, b, _ in signed["heads"]]
    want = signed_effects(model, tok, attr, heads, refusal_tokens=rt, mode="mean", mean=mean, batch_size=4)
    # the run reads them off the same passes as the other table columns (single_head_scores): float64 rounding
    assert [v for _, _, v in signed["heads"]] == pytest.approx([want[h] for h in heads], rel=1e-10, abs=1e-12)
    headline = json.loads((out / "heads.json").read_text())
    assert headline["method"] == "search-refusal" and headline["mode"] == "mean"
    exact = ships(model, tok, attr, heads=[tuple(h) for h in headline["heads"]], refusal_tokens=rt, mode="mean",
                  mean=mean, progress=False).mean("refusal")
    assert headline["signed_effect"] == pytest.approx([float(exact[tuple(h)]) for h in headline["heads"]],
                                                      rel=1e-10, abs=1e-12)
    # … and the headline's values are the head tables' (one sweep, not computed again)
    table = {(a, b): v for a, b, v in signed["heads"]}
    assert headline["signed_effect"] == [table[tuple(h)] for h in headline["heads"]]
    assert json.loads((out / "sahara.json").read_text())["config"]["mean_sha256"] == digest
    assert json.loads((out / "disagreement.json").read_text())["config"]["mean_sha256"] == digest
    configs = list((out / "responses").glob("*.config.json"))
    assert configs and all(json.loads(f.read_text())["config"]["mean_sha256"] == digest for f in configs)
    # resume: the evaluation again, with the saved means (computing them anew is made to fail)
    monkeypatch.setattr(ships_mod, "dataset_means", lambda *a, **k: pytest.fail("head means computed again"))
    (out / "evaluation.json").unlink()
    Run(cfg, out, progress=False, model=model, tokenizer=tok).execute(stages)
    assert json.loads((out / "evaluation.json").read_text())["provenance"]["mean_sha256"] == digest
