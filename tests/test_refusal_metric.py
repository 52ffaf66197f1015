"""The refusal metric (refusal-token probability mass and log-odds at the first answer position):
equal to a hand computation, in float64, on a tiny model whose ablation is written into its weights
(surgery), so the hooks and the per-row batching are checked against an independent path."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from tiny_lm import PROMPTS, smol_tokenizer, tiny_lm

import safetyheads.refusal_metric as rm
from safetyheads.evaluate import Evaluation, EvaluationError, evaluate_conditions
from safetyheads.prompts import encode_prompts, format_prompts
from safetyheads.refusal_metric import refusal_agreement, refusal_metric, refusal_metric_many
from safetyheads.surgery import surgery

ev = importlib.import_module("safetyheads.evaluate")  # the package binds sh.evaluate to the function


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


@pytest.fixture(scope="module")
def model64(tok):
    return tiny_lm("qwen2", len(tok), dtype=torch.float64, max_positions=256)


def _by_hand(model, tok, prompt: str, tokens: list[int]) -> tuple[float, float]:
    """One prompt alone: softmax of the last position's logits; P(R) and log P(R) − log(1 − P(R))."""
    text = format_prompts(tok, [prompt], "chat")[0]
    ids = encode_prompts(tok, [text])["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    p = torch.softmax(logits, -1)
    p_r = float(p[tokens].sum())
    p_other = float(p.sum() - p[tokens].sum())
    return p_r, math.log(p_r) - math.log(p_other)


def test_metric_equals_hand_computation_with_surgery_weights(tok, model64):
    tokens = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("I", "Sorry", "As", "cannot")})
    heads = [(0, 1), (2, 3)]
    rows = [[(1, 0)], [], [(0, 2), (2, 1)], [(1, 3)], [(0, 0)]]
    jobs = [{"prompts": PROMPTS, "heads": []}, {"prompts": PROMPTS, "heads": heads},
            {"prompts": PROMPTS, "rows": rows}]
    got = refusal_metric_many(model64, tok, jobs, refusal_tokens=tokens, batch_size=4)  # batches mix conditions
    for i, p in enumerate(PROMPTS):
        edited = (model64, surgery(model64, heads, mode="ua", eps=1e-5),
                  surgery(model64, rows[i], mode="ua", eps=1e-5) if rows[i] else model64)
        for j, m in enumerate(edited):
            prob, log_odds = _by_hand(m, tok, p, tokens)
            assert got[j].prob[i] == pytest.approx(prob, rel=1e-10, abs=1e-15)
            assert got[j].log_odds[i] == pytest.approx(log_odds, rel=1e-10, abs=1e-12)
    assert got[0].log_odds != got[1].log_odds  # the ablation moves the metric
    assert got[0].tokens == tokens and got[1].heads == heads and got[2].per_query
    # the single-condition form and any batch size give the same numbers
    one = refusal_metric(model64, tok, PROMPTS, refusal_tokens=tokens, heads=heads, batch_size=1)
    assert one.log_odds == pytest.approx(got[1].log_odds, rel=1e-12)
    assert one.mean_prob == pytest.approx(sum(got[1].prob) / len(PROMPTS))


def test_metric_errors(tok, model64):
    with pytest.raises(EvaluationError, match="empty"):
        refusal_metric(model64, tok, PROMPTS, refusal_tokens=[])
    with pytest.raises(EvaluationError, match="token ids must be in"):
        refusal_metric(model64, tok, PROMPTS, refusal_tokens=[10 ** 7])
    with pytest.raises(EvaluationError, match="not both"):
        refusal_metric(model64, tok, PROMPTS, refusal_tokens=[5], heads=[(0, 1)], rows=[[]] * 5)
    with pytest.raises(EvaluationError, match="no prompts"):
        refusal_metric(model64, tok, [], refusal_tokens=[5])


def test_agreement_hand_case():
    lo = [3.0, 1.0, -2.0, 0.5, -1.0]
    refused = [True, True, False, False, False]
    a = refusal_agreement(lo, refused)
    assert a["auroc"] == 1.0 and a["n"] == 5 and a["n_refused"] == 2
    r = refusal_agreement([0.0, 2.0, 1.0], [True, False, True])
    assert r["auroc"] == pytest.approx(0.0)  # the refusals have the lower log-odds
    m = sum(lo) / 5
    sd = math.sqrt(sum((x - m) ** 2 for x in lo) / 5)
    # point-biserial r = (M1 − M0)/s · sqrt(p q) with the population sd
    assert a["point_biserial_r"] == pytest.approx((2.0 - (-2.5 / 3)) / sd * math.sqrt(0.4 * 0.6))
    one = refusal_agreement([1.0, 2.0], [True, True])
    assert one["auroc"] is None and "both" in one["note"]


def test_evaluation_reports_metric_paired_stats_and_agreement(tok, model64, tmp_path, monkeypatch):
    tokens = [tok.encode("I", add_special_tokens=False)[0], tok.encode("Sorry", add_special_tokens=False)[0]]
    conds = [{"name": "baseline", "method": "baseline", "heads": []},
             {"name": "top2", "method": "sahara", "heads": [(0, 1), (2, 3)]},
             {"name": "random0", "method": "random", "heads": [(0, 2), (2, 0)], "seed": 1, "control_for": "top2"},
             {"name": "random1", "method": "random", "heads": [(0, 3), (2, 2)], "seed": 2, "control_for": "top2"}]
    calls = []
    real = rm.refusal_metric_many
    monkeypatch.setattr(rm, "refusal_metric_many", lambda m, t, jobs, **k: calls.extend(jobs) or real(m, t, jobs, **k))
    res = evaluate_conditions(model64, tok, PROMPTS, conds, out_dir=tmp_path, max_new_tokens=3, refusal_tokens=tokens,
                              progress=False, n_boot=500)
    assert calls == []  # read off the generation's prefill: no forward pass of its own
    want = real(model64, tok, [{"prompts": PROMPTS, "heads": c["heads"]} for c in conds], refusal_tokens=tokens)
    for c, m in zip(res.conditions, want):
        assert c.refusal_log_odds == pytest.approx(m.log_odds, rel=1e-10, abs=1e-12)
        assert c.refusal_prob == pytest.approx(m.prob, rel=1e-10, abs=1e-15)
        assert c.mean_log_odds == pytest.approx(m.mean_log_odds)
    top = res.condition("top2")
    pl = top.paired["refusal_log_odds"]
    assert pl["test"] == "wilcoxon-signed-rank" and pl["n"] == 5
    assert pl["diff"] == pytest.approx(top.mean_log_odds - res.baseline.mean_log_odds)
    pa = top.paired["asr"]
    assert pa["test"] == "mcnemar-exact" and pa["diff"] == pytest.approx(top.asr - res.baseline.asr)
    assert "p_holm" in pa and pa["p_holm"] >= pa["p_value"]
    assert res.baseline.paired == {}
    (ctl,) = res.controls
    assert ctl["condition"] == "top2" and ctl["controls"] == ["random0", "random1"] and ctl["asr"]["n"] == 3
    assert res.refusal_metric["tokens"] == sorted(tokens) and res.refusal_metric["source"] == "given"
    assert res.refusal_metric["agreement"]["all_conditions"]["n"] == 20
    assert any(line.startswith("top2: ASR ") for line in res.summary())
    # saved and read back; a second run reuses the stored metric
    back = Evaluation.load(tmp_path)
    assert [c.condition_json() for c in back.conditions] == [c.condition_json() for c in res.conditions]
    assert back.condition("top2").refusal_log_odds == top.refusal_log_odds
    stored = json.loads((tmp_path / "refusal_metric.json").read_text())
    assert set(stored["conditions"]) == {c["name"] for c in conds}
    calls.clear()
    again = evaluate_conditions(model64, tok, PROMPTS, conds, out_dir=tmp_path, max_new_tokens=3, refusal_tokens=tokens,
                                progress=False, n_boot=500)
    assert calls == [] and again.to_json()["conditions"] == res.to_json()["conditions"]
    # other refusal tokens: the responses are loaded, so the metric takes its own forward passes
    other = evaluate_conditions(model64, tok, PROMPTS, conds, out_dir=tmp_path, max_new_tokens=3,
                                refusal_tokens=tokens[:1], progress=False, n_boot=500)
    assert len(calls) == 4
    assert other.condition("top2").refusal_log_odds != top.refusal_log_odds


def test_refusal_tokens_derived_from_the_baseline_when_not_given(tok, model64):
    class Judge:  # every other answer is a refusal
        name = "test"

        def is_refusal(self, prompts, responses):
            return [i % 2 == 0 for i in range(len(responses))]

    res = evaluate_conditions(model64, tok, PROMPTS, [{"name": "baseline", "heads": []}, {"name": "x", "heads": [(1, 1)]}],
                              judge=Judge(), max_new_tokens=3, progress=False, n_boot=200)
    first = ev._first_tokens(tok, res.baseline.responses)
    assert res.refusal_metric["tokens"] == sorted(ev.refusal_tokens_from(first, res.baseline.refusals))
    assert res.refusal_metric["source"].startswith("first tokens")
    Judge.is_refusal = lambda self, prompts, responses: [False] * len(responses)  # a model that never refuses
    never = evaluate_conditions(model64, tok, PROMPTS[:2], [{"name": "baseline", "heads": []}], judge=Judge(),
                                max_new_tokens=2, progress=False)
    assert "refused none" in never.refusal_metric["skipped"] and never.baseline.refusal_log_odds is None
