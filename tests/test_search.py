"""The greedy group-search engine: brute force over all small groups, resume, the harmless constraint,
signed effects.

Each test's docstring states the property it checks and its tolerance. The model is a tiny random
Llama (3 layers × 4 query heads: 12 candidates, 66 pairs) in float64 with the SmolLM2 tokenizer's
vocabulary, so exact equivalences are checked to 1e-9; prompts use SmolLM2's chat template.
"""

from __future__ import annotations

import itertools
import json
import math
import sys

import pytest
import torch
from tiny_lm import PROMPTS, refusal_ids, smol_tokenizer, tiny_lm

from safetyheads import ablate, sahara
from safetyheads.prompts import encode_prompts, format_prompts
from safetyheads.search import (
    SearchResult,
    group_scores,
    head_scores,
    search_heads,
    signed_effects,
    single_head_scores,
)
from safetyheads.ships import ships

search_mod = sys.modules["safetyheads.search"]

P6 = PROMPTS + ["Tell me a joke about cats"]
HARMLESS = ["What is the capital of France?", "Write a haiku about rain", "How do plants grow?"]
HEADS = [(layer, h) for layer in range(3) for h in range(4)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_lm("llama", len(tok), dtype=torch.float64)


@pytest.fixture(scope="module")
def rt(tok):
    return refusal_ids(tok)


# --------------------------------------------------------------------------- an independent reference


class Reference:
    """Scores of any head group by plain ``ablate()``: one unpadded prompt per forward, the final-norm
    state from ``base_model`` and logits from ``lm_head`` of it, every metric written out here."""

    def __init__(self, model, tok, prompts, rt):
        self.model, self.rt = model, torch.tensor(rt)
        self.ids = [encode_prompts(tok, [t])["input_ids"] for t in format_prompts(tok, prompts)]
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.h0, self.z0 = self.read(())

    def read(self, heads) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(sorted(heads))
        if key not in self.cache:
            hs = []
            with torch.no_grad(), ablate(self.model, list(key), mode="ua", eps=1e-5):
                for ids in self.ids:
                    hs.append(self.model.base_model(input_ids=ids).last_hidden_state[0, -1])
            h = torch.stack(hs)
            with torch.no_grad():
                self.cache[key] = (h, self.model.lm_head(h))
        return self.cache[key]

    def logodds(self, z: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(z, -1)
        pr = p[:, self.rt].sum(-1)
        return torch.log(pr) - torch.log1p(-pr)

    def refusal(self, heads) -> float:
        return float((self.logodds(self.z0) - self.logodds(self.read(heads)[1])).mean())

    def refusal_margin(self, heads) -> float:
        def margin(z):  # greedy: the best refusal token's logit over the best other token's, floored at 0
            others = torch.ones(z.shape[-1], dtype=torch.bool)
            others[self.rt] = False
            return (z[:, self.rt].max(-1).values - z[:, others].max(-1).values).clamp(min=0)
        return float((margin(self.z0) - margin(self.read(heads)[1])).mean())

    def kl(self, heads) -> float:
        p0, p1 = torch.softmax(self.z0, -1), torch.softmax(self.read(heads)[1], -1)
        return float((p0 * (p0.log() - p1.log())).sum(-1).mean())

    def subspace(self, heads, rank: int = 1) -> float:
        def top(M):
            return torch.linalg.svd(M, full_matrices=False)[2][:rank].T
        cos = torch.linalg.svdvals(top(self.h0).T @ top(self.read(heads)[0])).clamp(-1, 1)
        return float(torch.arccos(cos).sum())

    def score(self, objective: str, heads) -> float:
        return getattr(self, objective.replace("-", "_"))(heads)


def brute_force(ref: Reference, objective: str) -> tuple[dict, dict]:
    """Every single head and every pair, scored directly."""
    singles = {h: ref.score(objective, [h]) for h in HEADS}
    pairs = {frozenset(p): ref.score(objective, list(p)) for p in itertools.combinations(HEADS, 2)}
    return singles, pairs


@pytest.fixture(scope="module")
def ref(model, tok, rt):
    return Reference(model, tok, P6, rt)


# --------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("objective", ["refusal", "refusal-margin", "kl", "subspace"])
def test_greedy_equals_brute_force_over_all_pairs(model, tok, rt, ref, objective):
    """steps=2 over all 12 heads: step 1 picks the best single head and step 2 the best pair that
    contains it, exactly as brute-force scoring of all 12 singles and 66 pairs by direct ablation
    says; every candidate score of both steps equals the brute-force score of its group (1e-9 for
    refusal/KL, 1e-7 rad for the subspace angle — the reference takes arccos, the engine atan2)."""
    if objective == "refusal-margin":  # the random model's own 3 likeliest first tokens: margins > 0 to take away
        rt = sorted({int(t) for t in ref.z0.topk(3, -1).indices.flatten()})
        ref = Reference(model, tok, P6, rt)
    singles, pairs = brute_force(ref, objective)
    first = max(singles, key=singles.get)
    gap = sorted(singles.values(), reverse=True)
    assert gap[0] - gap[1] > 1e-6  # an unambiguous choice
    with_first = {h: pairs[frozenset((first, h))] for h in HEADS if h != first}
    second = max(with_first, key=with_first.get)
    res = search_heads(model, tok, P6, objective=objective, steps=2, refusal_tokens=rt, progress=False)
    assert res.heads == [first, second]
    tol = 1e-7 if objective == "subspace" else 1e-9
    for h, v in singles.items():
        assert res.steps[0].scores[h] == pytest.approx(v, abs=tol), h
    for h, v in with_first.items():
        assert res.steps[1].scores[h] == pytest.approx(v, abs=tol), h
    assert set(res.steps[1].scores) == set(HEADS) - {first}
    assert res.steps[1].score == res.steps[1].scores[second]


@pytest.mark.parametrize("objective", ["refusal", "kl", "subspace"])
def test_group_scores_equal_brute_force_for_any_groups(model, tok, rt, ref, objective):
    """group_scores on groups no greedy path need pass through — all 4 triples of layer 1's heads, a
    cross-layer triple, the empty group — equals direct ablation of each whole group (1e-9; 1e-7 rad
    for the subspace angle), and a pair the search reached at step 2 gets the search's own score."""
    groups = [list(c) for c in itertools.combinations([(1, h) for h in range(4)], 3)] + [[(0, 1), (1, 2), (2, 3)], []]
    got = group_scores(model, tok, P6, groups, objective=objective, refusal_tokens=rt)
    tol = 1e-7 if objective == "subspace" else 1e-9
    for grp, v in zip(groups, got):
        assert v == pytest.approx(ref.score(objective, grp), abs=tol), grp
    res = search_heads(model, tok, P6, objective=objective, steps=2, refusal_tokens=rt, progress=False)
    pair = list(res.heads)
    assert group_scores(model, tok, P6, [pair], objective=objective, refusal_tokens=rt)[0] == pytest.approx(
        res.steps[1].score, abs=tol)


def test_group_scores_asr_equals_the_searchs_scores(model, tok, rt):
    """For objective="asr" the groups' answers are generated in shared batches (72 rows: 12 groups per
    generation): the scores of all 12 single heads equal an asr search's step-1 scores (1e-12), and a
    group of three gets the score the asr search gives it at step 3."""
    words = ["a", "e", "i", "o", "s", "t"]
    kw = dict(objective="asr", refusal_tokens=rt, max_new_tokens=3)
    res = search_heads(model, tok, P6, judge=PrefixJudge(words), steps=3, progress=False, **kw)
    singles = group_scores(model, tok, P6, [[h] for h in HEADS], judge=PrefixJudge(words), batch_size=72, **kw)
    assert singles == pytest.approx([res.steps[0].scores[h] for h in HEADS], abs=1e-12, rel=0)
    three = group_scores(model, tok, P6, [res.heads], judge=PrefixJudge(words), batch_size=6, **kw)[0]
    assert three == pytest.approx(res.steps[2].score, abs=1e-12, rel=0)


def test_group_scores_refuses_bad_groups(model, tok, rt):
    """A duplicated head, a head outside the model, an objective without its refusal tokens and a subspace
    rank above the number of prompts are refused."""
    with pytest.raises(ValueError, match="duplicate"):
        group_scores(model, tok, P6, [[(0, 1), (0, 1)]], refusal_tokens=rt)
    with pytest.raises(IndexError, match="out of range"):
        group_scores(model, tok, P6, [[(7, 0)]], refusal_tokens=rt)
    with pytest.raises(ValueError, match="refusal_tokens"):
        group_scores(model, tok, P6, [[(0, 1)]], objective="refusal")
    with pytest.raises(ValueError, match="at least 7 prompts"):
        group_scores(model, tok, P6, [[(0, 1)]], objective="subspace", rank=7)


class PrefixJudge:
    """Refusal: the answer starts with one of ``prefixes`` (settled as soon as it does)."""

    name = "prefix-judge"

    def __init__(self, prefixes, fail_after: int | None = None):
        self.prefixes, self.fail_after, self.calls = tuple(prefixes), fail_after, 0

    def refusal_settled(self, response: str) -> bool:
        return response.startswith(self.prefixes)

    def is_refusal(self, prompts, responses):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return [self.refusal_settled(r) for r in responses]


def greedy_answer(model, tok, ids: torch.Tensor, heads, n: int) -> str:
    """Greedy decoding by hand: ``n`` full forwards of the growing unpadded sequence, no cache."""
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    new: list[int] = []
    with torch.no_grad(), ablate(model, list(heads), mode="ua", eps=1e-5):
        for _ in range(n):
            nxt = int(model(input_ids=torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1].argmax())
            if nxt in eos:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_asr_objective_equals_brute_force(model, tok, rt, ref):
    """objective="asr", steps=2 over all 12 heads: every candidate's score equals the brute-force
    score of its group — the rise in the share of the 6 prompts whose hand-decoded greedy 3-token
    answer the judge calls compliant, plus 0.4/6 · tanh(refusal log-odds drop) from direct ablation
    (1e-9) — and the search picks the best single head, then the best pair containing it. The judge
    refuses the answers that open like half the unablated ones; the rows end once it is settled."""
    n_tok = 3
    answers0 = [greedy_answer(model, tok, ids, (), n_tok) for ids in ref.ids]
    judge = PrefixJudge(sorted({a[:3] for a in answers0[::2] if a[:3]}))
    base = sum(not judge.refusal_settled(a) for a in answers0)

    def score(heads) -> float:
        compliant = sum(not judge.refusal_settled(greedy_answer(model, tok, ids, heads, n_tok)) for ids in ref.ids)
        return (compliant - base) / 6 + 0.4 / 6 * math.tanh(ref.refusal(heads))

    singles = {h: score([h]) for h in HEADS}
    first = max(singles, key=singles.get)
    with_first = {h: score([first, h]) for h in HEADS if h != first}
    assert len({round(v * 6) for v in [*singles.values(), *with_first.values()]}) > 1  # the ASR term moves
    res = search_heads(model, tok, P6, objective="asr", steps=2, refusal_tokens=rt, judge=judge,
                       max_new_tokens=n_tok, progress=False)
    for h, v in singles.items():
        assert res.steps[0].scores[h] == pytest.approx(v, abs=1e-9), h
    for h, v in with_first.items():
        assert res.steps[1].scores[h] == pytest.approx(v, abs=1e-9), h
    assert res.heads == [first, max(with_first, key=with_first.get)]
    assert res.config["judge"] == "prefix-judge" and res.config["max_new_tokens"] == n_tok


@pytest.mark.parametrize("batch_size", [6, 18])
def test_asr_search_resumes_after_interruption(model, tok, rt, tmp_path, batch_size):
    """An asr search interrupted mid step 2 (the judge raises on its 17th call: the unablated answers,
    12 step-1 and 3 step-2 candidates) resumes from its checkpoint with an identical result, judging
    only the 8 candidates left — with one candidate per generation (batch_size 6 = the 6 prompts) and
    with three generated together (18 rows: the 3 done sit in one chunk)."""
    words = PrefixJudge(["a", "e", "i", "o", "s", "t"]).prefixes
    kw = dict(objective="asr", steps=2, refusal_tokens=rt, max_new_tokens=2, progress=False, batch_size=batch_size)
    full = search_heads(model, tok, P6, judge=PrefixJudge(words), **kw)
    ckpt = tmp_path / "ck.json"
    with pytest.raises(KeyboardInterrupt):
        search_heads(model, tok, P6, judge=PrefixJudge(words, fail_after=16), checkpoint=ckpt,
                     checkpoint_every_s=0.0, **kw)
    again = PrefixJudge(words)
    res = search_heads(model, tok, P6, judge=again, checkpoint=ckpt, **kw)
    assert res.to_json()["steps"] == full.to_json()["steps"] and res.signed == full.signed
    assert again.calls == 1 + 8


def test_asr_exact_subset_prefilter_uses_the_searchs_judge(model, tok, rt):
    """An asr search's exact-subset prefilter scores the candidates with the search's own judge and
    answer length: on 6 prompts (the subset is all of them) its pool is the 5 best step-1 scores of an
    asr search without prefilter, and the judge is called for the prefilter's 1 + 12 answer sets."""
    words = ["a", "e", "i", "o", "s", "t"]
    kw = dict(objective="asr", steps=1, refusal_tokens=rt, max_new_tokens=3, progress=False)
    scores = search_heads(model, tok, P6, judge=PrefixJudge(words), **kw).steps[0].scores
    judge = PrefixJudge(words)
    res = search_heads(model, tok, P6, judge=judge, prefilter="exact-subset", prefilter_k=5, **kw)
    assert res.config["kept"] == [list(h) for h in sorted(HEADS, key=lambda h: -scores[h])[:5]]
    assert judge.calls == (1 + 12) + (1 + 5)


def test_asr_candidates_generated_together_score_as_alone(model, tok, rt):
    """Candidates generated together in shared batches (batch_size 72: 12 per generation) get the
    scores they get one at a time (batch_size 6), to 1e-12 in float64, and the same heads."""
    words = ["a", "e", "i", "o", "s", "t"]
    kw = dict(objective="asr", steps=2, refusal_tokens=rt, max_new_tokens=3, progress=False)
    alone = search_heads(model, tok, P6, judge=PrefixJudge(words), batch_size=6, **kw)
    together = search_heads(model, tok, P6, judge=PrefixJudge(words), batch_size=72, **kw)
    assert together.heads == alone.heads
    for a, b in zip(alone.steps, together.steps):
        assert b.scores == pytest.approx(a.scores, abs=1e-12, rel=0)
    assert len({round(v * 6) for v in alone.steps[0].scores.values()}) > 1  # the ASR term moves


def test_refusal_objective_is_signed(model, tok, rt, ref):
    """The refusal objective keeps the sign: on this model some heads' ablation raises the refusal
    log-odds (negative score), and the search's scores have exactly those signs (brute force)."""
    singles, _ = brute_force(ref, "refusal")
    res = search_heads(model, tok, P6, objective="refusal", steps=1, refusal_tokens=rt, progress=False)
    assert any(v < 0 for v in singles.values()) and any(v > 0 for v in singles.values())
    assert {h for h, v in res.steps[0].scores.items() if v < 0} == {h for h, v in singles.items() if v < 0}


def test_sahara_is_the_subspace_objective(model, tok):
    """sahara() is the engine with objective="subspace": the same heads and bit-identical scores for
    the same rank / centring / space, prefilter included."""
    kw = dict(steps=2, prefilter="exact-subset", prefilter_k=5, progress=False)
    a = sahara(model, tok, P6, preset=None, rank=2, center=True, **kw)
    b = search_heads(model, tok, P6, objective="subspace", rank=2, center=True, **kw)
    assert a.heads == b.heads and [s.scores for s in a.steps] == [s.scores for s in b.steps]
    assert a.config["kept"] == b.config["kept"] and a.config["preset"] is None


# --------------------------------------------------------------------------- signed effects


def test_signed_effects_exact_and_everywhere(model, tok, rt, ref, tmp_path):
    """signed_effects equals the brute-force drop of the refusal log-odds of each head ablated alone
    (1e-9); it is the refusal search's step-1 score (bit-identical: the same forward passes); Sahara
    and every search given refusal tokens carry it for their chosen heads, in the JSON too, and
    raises_refusal() lists exactly the chosen heads with a negative effect."""
    eff = signed_effects(model, tok, P6, HEADS, refusal_tokens=rt)
    for h in HEADS:
        assert eff[h] == pytest.approx(ref.refusal([h]), abs=1e-9)
    search = search_heads(model, tok, P6, objective="refusal", steps=2, refusal_tokens=rt, progress=False)
    assert search.signed == {h: search.steps[0].scores[h] for h in search.heads}
    assert search.signed == {h: eff[h] for h in search.heads}
    sah = sahara(model, tok, P6, steps=3, refusal_tokens=rt, progress=False)
    assert sah.signed == {h: eff[h] for h in sah.heads}
    assert sah.raises_refusal() == [h for h in sah.heads if eff[h] < 0]
    kl = search_heads(model, tok, P6, objective="kl", steps=2, refusal_tokens=rt, progress=False)
    assert kl.signed == {h: eff[h] for h in kl.heads}
    assert sahara(model, tok, P6, steps=1, progress=False).signed is None  # no refusal tokens: no sign
    sah.save(tmp_path / "s.json")
    back = type(sah).load(tmp_path / "s.json")
    assert back.signed == sah.signed and json.loads((tmp_path / "s.json").read_text())["kind"] == "sahara"


def test_head_scores_match_the_search_and_ships(model, tok, rt):
    """head_scores(objective) of single heads equal the search's step-1 scores bit for bit, and its
    KL equals the mean exact Ships (ships(), unpadded prompts) to 1e-9."""
    from safetyheads import ships

    for objective in ("kl", "subspace"):
        hs = head_scores(model, tok, P6, HEADS, objective=objective)
        res = search_heads(model, tok, P6, objective=objective, steps=1, progress=False)
        assert hs == res.steps[0].scores
    exact = ships(model, tok, P6, progress=False).kl.double().mean(0)
    hs = head_scores(model, tok, P6, HEADS, objective="kl")
    for (layer, h), v in hs.items():
        assert v == pytest.approx(float(exact[layer, h]), rel=1e-5, abs=1e-9)  # ships stores float32


# --------------------------------------------------------------------------- the harmless constraint


def test_constraint_rejects_candidates(model, tok, rt):
    """With harmless prompts, each candidate group's harmless KL is recorded and equals the direct
    computation (1e-9); with a bound between the values, every candidate above it is rejected, the
    chosen head is the best accepted one (not the unconstrained best), and a rejected head is never
    chosen later; with a bound below every value the search stops early and says why."""
    href = Reference(model, tok, HARMLESS, rt)
    free = search_heads(model, tok, P6, objective="refusal", steps=1, refusal_tokens=rt, progress=False)
    best = free.heads[0]
    hkl = {h: href.kl([h]) for h in HEADS}
    bound = hkl[best] * 0.999  # rejects the unconstrained best
    accepted = [h for h in HEADS if hkl[h] <= bound]
    assert accepted and len(accepted) < len(HEADS)
    res = search_heads(model, tok, P6, objective="refusal", steps=2, refusal_tokens=rt, harmless=HARMLESS,
                       max_harmless_kl=bound, progress=False)
    s1 = res.steps[0]
    for h in HEADS:
        assert s1.harmless_kl[h] == pytest.approx(hkl[h], abs=1e-9)
    assert set(s1.rejected) == {h for h in HEADS if hkl[h] > bound} and best in s1.rejected
    assert s1.scores == free.steps[0].scores  # the objective itself is unchanged by the constraint
    assert res.heads[0] == max(accepted, key=lambda h: free.steps[0].scores[h]) != best
    assert not set(res.heads) & set(s1.rejected)
    assert all(res.steps[1].harmless_kl[h] <= bound for h in [res.heads[1]])
    stopped = search_heads(model, tok, P6, objective="refusal", steps=2, refusal_tokens=rt, harmless=HARMLESS,
                           max_harmless_kl=min(hkl.values()) / 2, progress=False)
    assert stopped.heads == [] and stopped.config["stopped"]["step"] == 1
    assert "max_harmless_kl" in stopped.config["stopped"]["reason"]


# --------------------------------------------------------------------------- checkpoints


_ORIG_ABLATED = search_mod._Residuals.ablated


class Interrupt:
    """Wraps _Residuals.ablated to raise KeyboardInterrupt after ``k`` calls (None: count only)."""

    def __init__(self, monkeypatch, k: int | None):
        self.k, self.calls = k, 0

        def ablated(reps, *a, **kw):
            if self.k is not None and self.calls >= self.k:
                raise KeyboardInterrupt
            self.calls += 1
            return _ORIG_ABLATED(reps, *a, **kw)

        monkeypatch.setattr(search_mod._Residuals, "ablated", ablated)


@pytest.mark.parametrize("objective, k", [("refusal", 17), ("refusal", 27), ("kl", 43)])
def test_resume_after_interruption_is_identical(model, tok, rt, tmp_path, monkeypatch, objective, k):
    """A search with an exact-subset prefilter (12 forward batches) and the harmless constraint (two
    forward batches per candidate: 6 + 5 + 4 candidates) interrupted after k batches — mid step 1
    (k=17), mid step 2 (k=27), or in the signed effects after the last step (kl, k=43) — and rerun
    with the same checkpoint returns exactly the uninterrupted result (heads, scores, harmless KLs,
    signed effects: bit-identical), redoing only the unfinished candidates (the prefilter is not
    rerun); a third call with the finished checkpoint scores no candidate."""
    kw = dict(objective=objective, steps=3, refusal_tokens=rt, harmless=HARMLESS, max_harmless_kl=10.0,
              prefilter="exact-subset", prefilter_k=6, progress=False)
    full = search_heads(model, tok, P6, **kw)
    ckpt = tmp_path / "ck.json"
    cut = Interrupt(monkeypatch, k)
    with pytest.raises(KeyboardInterrupt):
        search_heads(model, tok, P6, checkpoint=ckpt, checkpoint_every_s=1e9, **kw)
    assert cut.calls == k and len(json.loads(ckpt.read_text())["kept"]) == 6
    signed = 3 if objective == "kl" else 0  # kl: the chosen heads' signed effects, one batch each, not stored
    search = 12 + 2 * (6 + 5 + 4)
    again = Interrupt(monkeypatch, None)
    res = search_heads(model, tok, P6, checkpoint=ckpt, **kw)
    assert again.calls == max(0, search - 12 - 2 * ((k - 12) // 2)) + signed
    assert res.to_json()["steps"] == full.to_json()["steps"] and res.heads == full.heads
    assert res.signed == full.signed
    done = Interrupt(monkeypatch, None)
    assert search_heads(model, tok, P6, checkpoint=ckpt, **kw).heads == full.heads
    assert done.calls == signed


def test_checkpoint_of_another_objective_is_refused(model, tok, rt, tmp_path):
    """A checkpoint written by another objective, bound or refusal-token set is refused."""
    ckpt = tmp_path / "ck.json"
    search_heads(model, tok, P6, objective="refusal", steps=1, refusal_tokens=rt, checkpoint=ckpt, progress=False)
    for change in (dict(objective="kl"), dict(refusal_tokens=rt[:1]), dict(harmless=HARMLESS, max_harmless_kl=1.0)):
        with pytest.raises(ValueError, match="different search configuration"):
            search_heads(model, tok, P6, **{**dict(objective="refusal", steps=1, refusal_tokens=rt), **change},
                         checkpoint=ckpt, progress=False)


def test_sharded_search_equals_one_process(model, tok, rt, tmp_path):
    """search_distributed without torch.distributed (one process, per-process checkpoint files) gives
    the same result as search_heads, and a rerun loads every candidate from its files."""
    from safetyheads.distributed import DistributedShard, search_distributed

    kw = dict(objective="refusal", steps=2, refusal_tokens=rt, harmless=HARMLESS, progress=False)
    ref = search_heads(model, tok, P6, **kw)
    got = search_distributed(model, tok, P6, checkpoint_dir=tmp_path, **kw)
    assert got.to_json()["steps"] == ref.to_json()["steps"]
    shard = DistributedShard(checkpoint_dir=tmp_path)
    again = search_heads(model, tok, P6, shard=shard, **kw)
    assert shard.computed == 0 and again.heads == ref.heads


# --------------------------------------------------------------------------- prefilters and errors


def test_estimate_prefilter_uses_the_refusal_gradient(model, tok, rt):
    """For the refusal objective the "estimate" prefilter keeps the prefilter_k heads with the largest
    mean refusal-gradient estimate (ships_estimate(estimator="refusal-grad")), and only those are scored."""
    from safetyheads import ships_estimate

    est = ships_estimate(model, tok, P6, estimator="refusal-grad", refusal_tokens=rt, progress=False).mean("refusal")
    top = sorted(HEADS, key=lambda h: -float(est[h]))[:4]
    res = search_heads(model, tok, P6, objective="refusal", steps=2, refusal_tokens=rt, prefilter="estimate",
                       prefilter_k=4, progress=False)
    assert [tuple(h) for h in res.config["kept"]] == top
    assert set(res.steps[0].scores) == set(top)


@pytest.mark.parametrize("mode", ["zero", "ua"])
def test_estimate_under_chosen_heads_is_the_gradient_there(model, tok, rt, mode):
    """``ships_estimate(under=H)``: each other head's refusal-gradient estimate is minus the derivative
    of the refusal log-odds in its strength with the heads of H ablated (strength 1, in the
    linearised form the estimate uses: ua → ua-limit), checked against a central finite difference
    of plain strength ablations (float64, step 1e-5: agreement to 1e-6 relative); H itself gets NaN."""
    from safetyheads.ablation import ablate_strengths, heads_to_strength
    from safetyheads.ships import refusal_logodds, ships_estimate

    under = [(1, 2), (0, 3)]
    est = ships_estimate(model, tok, P6[:2], estimator="refusal-grad", refusal_tokens=rt, mode=mode, under=under,
                         progress=False).refusal
    assert torch.isnan(est[:, 1, 2]).all() and torch.isnan(est[:, 0, 3]).all()
    lin = "ua-limit" if mode == "ua" else mode
    ids = [encode_prompts(tok, [t])["input_ids"] for t in format_prompts(tok, P6[:2])]
    base = heads_to_strength(model, [under]).double()
    for head in [(0, 0), (1, 1), (2, 3)]:
        one = heads_to_strength(model, [[head]]).double()
        for i, x in enumerate(ids):
            vals = []
            for a in (1e-5, -1e-5):
                with torch.no_grad(), ablate_strengths(model, base + a * one, mode=lin, eps=1e-5):
                    vals.append(float(refusal_logodds(model(input_ids=x).logits[:, -1], torch.tensor(rt))[0]))
            fd = (vals[0] - vals[1]) / 2e-5
            assert float(est[i, head[0], head[1]]) == pytest.approx(-fd, rel=1e-6, abs=1e-9)


def test_adaptive_prefilter_reranks_under_the_chosen_heads(model, tok, rt, tmp_path, monkeypatch):
    """``prefilter="estimate-adaptive"``: step 1's pool is the plain estimate's top k, every later
    step's the top k of the estimate with the chosen heads ablated (``ships_estimate(under=...)``),
    recorded per step; only those are scored; with k covering every head it is exhaustive search;
    and an interrupted run resumes to the same result."""
    from safetyheads import ships_estimate

    kw = dict(objective="refusal", steps=3, refusal_tokens=rt, progress=False)
    res = search_heads(model, tok, P6, prefilter="estimate-adaptive", prefilter_k=4, **kw)
    chosen = [tuple(h) for h in res.heads]
    for step in (1, 2):
        est = ships_estimate(model, tok, P6, estimator="refusal-grad", refusal_tokens=rt, under=chosen[:step],
                             progress=False).mean("refusal")
        want = sorted((h for h in HEADS if h not in chosen[:step]), key=lambda h: (-float(est[h]), h))[:4]
        assert [tuple(h) for h in res.config["kept_steps"][str(step)]] == want
        assert set(res.steps[step].scores) == set(want)
    full = search_heads(model, tok, P6, prefilter="estimate-adaptive", prefilter_k=len(HEADS), **kw)
    assert full.to_json()["steps"] == search_heads(model, tok, P6, **kw).to_json()["steps"]
    ckpt = tmp_path / "ck.json"
    calls = []
    real = search_mod._adaptive_pool

    def cut(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # before step 3's pool: steps 1 and 2 are in the checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(search_mod, "_adaptive_pool", cut)
    with pytest.raises(KeyboardInterrupt):
        search_heads(model, tok, P6, prefilter="estimate-adaptive", prefilter_k=4, checkpoint=ckpt, **kw)
    monkeypatch.setattr(search_mod, "_adaptive_pool", real)
    assert len(json.loads(ckpt.read_text())["done"]) == 2
    again = search_heads(model, tok, P6, prefilter="estimate-adaptive", prefilter_k=4, checkpoint=ckpt, **kw)
    assert again.to_json()["steps"] == res.to_json()["steps"] and again.config["kept_steps"] == res.config["kept_steps"]


@pytest.mark.parametrize("prefilter", [None, "estimate-adaptive"])
def test_extend_a_finished_search_equals_a_longer_one(model, tok, rt, monkeypatch, prefilter):
    """``extend=`` a 2-step search to 4 steps: the same steps, scores, pools and signed effects as a
    4-step search from scratch, scoring only steps 3 and 4's candidates; a result of
    another configuration, or with more steps than asked, is refused."""
    kw = dict(objective="refusal", refusal_tokens=rt, prefilter=prefilter, prefilter_k=6, progress=False)
    full = search_heads(model, tok, P6, steps=4, **kw)
    short = search_heads(model, tok, P6, steps=2, **kw)
    assert short.heads == full.heads[:2]
    count = Interrupt(monkeypatch, None)
    longer = search_heads(model, tok, P6, steps=4, extend=SearchResult.from_json(short.to_json()), **kw)
    scored = 2 * 6 if prefilter else (len(HEADS) - 2) + (len(HEADS) - 3)  # adaptive: 6 new heads every step
    # signed effects come free from step 1's scores unless a chosen head was not in step 1's pool
    signed = 0 if all(h in full.steps[0].scores for h in full.heads) else len(full.heads)
    assert count.calls == scored + signed
    assert longer.to_json()["steps"] == full.to_json()["steps"] and longer.signed == full.signed
    assert longer.config.get("kept_steps") == full.config.get("kept_steps")
    assert longer.config["extended_from_steps"] == 2 and longer.config["steps"] == 4
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['refusal_tokens'\]"):
        search_heads(model, tok, P6, steps=4, extend=short, **{**kw, "refusal_tokens": rt[:1]})
    with pytest.raises(ValueError, match=r"differs in \['mode'\]"):
        search_heads(model, tok, P6, steps=4, extend=short, mode="zero", **kw)
    with pytest.raises(ValueError, match="already has 4 steps"):
        search_heads(model, tok, P6, steps=3, extend=full, **kw)


@pytest.mark.parametrize("kwargs, match", [
    (dict(objective="refusal"), "needs refusal_tokens"),
    (dict(objective="nope"), "unknown objective"),
    (dict(max_harmless_kl=1.0), "needs harmless prompts"),
    (dict(harmless=HARMLESS, max_harmless_kl=-1.0), "max_harmless_kl must be >= 0"),
    (dict(harmless=[]), "harmless is empty"),
    (dict(prefilter_scores=torch.zeros(2, 2), prefilter="estimate"), "prefilter_scores must be"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(refusal_tokens=[]), "refusal_tokens must be a non-empty"),
    (dict(objective="asr"), "needs refusal_tokens"),
    (dict(objective="asr", refusal_tokens=[1], judge="nope"), "judge"),
    (dict(objective="asr", refusal_tokens=[1], max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_bad_arguments_are_rejected(model, tok, kwargs, match):
    """Each bad argument is a ValueError naming it, before any forward pass."""
    with pytest.raises(ValueError, match=match):
        search_heads(model, tok, P6, progress=False, **kwargs)


def test_result_roundtrip(model, tok, rt, tmp_path):
    """SearchResult.save/load gives back heads, steps (harmless KL, rejected), config and signed effects."""
    res = search_heads(model, tok, P6[:3], objective="refusal", steps=2, refusal_tokens=rt, harmless=HARMLESS,
                       max_harmless_kl=math.inf, progress=False)
    res.save(tmp_path / "r.json")
    back = SearchResult.load(tmp_path / "r.json")
    assert back.to_json() == json.loads(json.dumps(res.to_json()))
    assert back.steps[0].harmless_kl == res.steps[0].harmless_kl and back.signed == res.signed


# --------------------------------------------------------------------------- why methods disagree


def test_first_token_attention_is_one_over_t_under_ua(model, tok):
    """Under UA ablation a head attends uniformly over the prompt, so its weight on the first token at
    the last position is 1/T: the mean over prompts of 1/T_i, to 1e-6 (ε = 1e-5 leaves a tiny tilt);
    other heads are not uniform; every weight is in [0, 1]; the attention implementation is restored."""
    from safetyheads.disagreement import first_token_attention

    lengths = [encode_prompts(tok, [t])["input_ids"].shape[1] for t in format_prompts(tok, P6)]
    with ablate(model, [(1, 2)], mode="ua", eps=1e-5):
        att = first_token_attention(model, tok, P6)
    assert att.shape == (3, 4) and float(att.min()) >= 0 and float(att.max()) <= 1
    assert float(att[1, 2]) == pytest.approx(sum(1 / t for t in lengths) / len(lengths), abs=1e-6)
    assert abs(float(att[1, 1]) - float(att[1, 2])) > 1e-3
    assert model.config._attn_implementation == "sdpa"


def test_disagreement_table(model, tok, rt, ref, tmp_path):
    """disagreement(): one row per head of the union of the methods' lists, each with its rank in every
    method that picked it; KL-Ships, signed refusal drop and Sahara angle equal the brute-force
    single-head scores (1e-9; angle 1e-7 rad); a given [L, H] grid is used as is (the direction
    column); ▲ marks exactly the heads whose ablation raises refusal; JSON round trip."""
    from safetyheads.disagreement import Disagreement, disagreement

    singles = {h: ref.refusal([h]) for h in HEADS}
    neg = min(singles, key=singles.get)  # a head whose ablation raises refusal
    methods = {"a": [(0, 1), (2, 3)], "b": [(2, 3), neg]}
    contrib = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    d = disagreement(model, tok, P6, methods, refusal_tokens=rt, direction=contrib)
    union = list(dict.fromkeys(methods["a"] + methods["b"]))
    assert sorted(r.head for r in d.rows) == sorted(union)
    row = {r.head: r for r in d.rows}
    assert row[(2, 3)].methods == {"a": 2, "b": 1} and row[neg].methods.get("b") == 2
    for h in union:
        assert row[h].kl_ships == pytest.approx(ref.kl([h]), abs=1e-9)
        assert row[h].refusal_drop == pytest.approx(singles[h], abs=1e-9)
        assert row[h].sahara_angle == pytest.approx(ref.subspace([h]), abs=1e-7)
        assert row[h].direction_projection == float(contrib[h])
        assert row[h].raises_refusal == (singles[h] < 0)
    md = d.to_markdown()
    assert f"L{neg[0]}H{neg[1]} ▲" in md and singles[neg] < 0
    d.save(tmp_path / "d.json")
    back = Disagreement.load(tmp_path / "d.json")
    assert back.to_json() == json.loads(json.dumps(d.to_json()))


def test_single_head_scores_read_every_objective_off_one_pass(model, tok, rt):
    """single_head_scores over kl, refusal and subspace (one forward per head and prompt batch, hidden
    state and logits of the same pass) equals head_scores per objective, and its KL and refusal equal
    the exact Ships sweep's means (float64: 1e-10 relative)."""
    heads = [(0, 1), (1, 3), (2, 0), (2, 2)]
    kw = dict(refusal_tokens=rt, rank=2, batch_size=2)
    got = single_head_scores(model, tok, P6, heads, objectives=("kl", "refusal", "subspace"), **kw)
    for obj in ("kl", "refusal", "subspace"):
        want = head_scores(model, tok, P6, heads, objective=obj, **kw)
        assert [got[obj][h] for h in heads] == pytest.approx([want[h] for h in heads], rel=1e-10, abs=1e-14)
    sweep = ships(model, tok, P6, heads=heads, refusal_tokens=rt, progress=False)
    for obj, metric in (("kl", "kl"), ("refusal", "refusal")):
        m = sweep.mean(metric)
        assert [got[obj][h] for h in heads] == pytest.approx([float(m[h]) for h in heads], rel=1e-10, abs=1e-14)
    assert len({round(v, 6) for v in got["subspace"].values()}) == len(heads)  # the heads differ
    with pytest.raises(ValueError, match="objective"):
        single_head_scores(model, tok, P6, heads, objectives=("nope",))


def test_run_searches_on_attack_success(model, tok, rt, tmp_path, monkeypatch):
    """A run with ``search="asr"`` (the CLI's ``--search asr``): its search.json is exactly
    search_heads(objective="asr") with the run's judge, answer length, attribution prompts, refusal
    tokens, the Ships stage's refusal estimate as prefilter and the generation batch size."""
    from safetyheads.config import RunConfig
    from safetyheads.pipeline import EVAL_BATCH_SIZE, Run
    from safetyheads.ships import ShipsResult

    monkeypatch.setattr(sys.modules["safetyheads.evaluate"], "derive_refusal_tokens", lambda *a, **k: list(rt))
    cfg = RunConfig(search="asr", n_attribution=3, n_ships_exact=1, n_eval=2, n_harmless=1, max_new_tokens=3,
                    steps=2, prefilter_k=3, batch_size=4)
    out = tmp_path / "run"
    Run(cfg, out, progress=False, model=model, tokenizer=tok).execute(("prompts", "ships", "sahara", "search"))
    got = SearchResult.load(out / "search.json")
    attr = json.loads((out / "prompts.json").read_text())["attribution"]
    est = ShipsResult.load(out / "ships_estimate").refusal.nanmean(0)
    want = search_heads(model, tok, attr, objective="asr", steps=2, refusal_tokens=rt, judge="keyword:paper",
                        max_new_tokens=3, prefilter="estimate", prefilter_k=3, prefilter_scores=est,
                        prompt_format=cfg.stage_format("ships"), batch_size=EVAL_BATCH_SIZE, progress=False)
    assert got.heads == want.heads and got.to_json()["steps"] == want.to_json()["steps"]
    assert got.config["objective"] == "asr" and got.config["judge"] == "keyword:paper"
    assert got.config["max_new_tokens"] == 3
