"""Cross-condition batched generation: every condition's rows in shared batches, each row ablating its
own heads, must give the same tokens as generating one condition at a time.

In float64 the equality is exact (padding and batch composition change float rounding only at the
1e-16 level, far below any argmax margin); the tiny model runs with the real SmolLM2 tokenizer and
chat template, and the slow test repeats it on SmolLM2-135M itself in float64.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_builtin
from tiny_lm import PROMPTS, smol_tokenizer, tiny_lm

import safetyheads.generation as gen
from safetyheads.generation import EvaluationError, StopRule, generate_and_score, generate_ids, generate_many
from safetyheads.refusal_metric import refusal_metric_many


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


def _jobs(prompts):
    return [{"prompts": prompts, "heads": []},
            {"prompts": prompts, "heads": [(0, 1), (1, 2)]},
            {"prompts": prompts[::-1], "heads": [(2, 3)]},  # other order, other heads
            {"prompts": prompts, "rows": [[(0, 0)], [(1, 3), (2, 0)], [], [(2, 2)], [(0, 3)]][: len(prompts)]}]


def _one_at_a_time(model, tok, jobs, **kw):
    """The plain path: one condition at a time, whole prompts prefilled (no shared prefix cache)."""
    out = []
    for job in jobs:
        heads = {"rows": job["rows"]} if "rows" in job else {"heads": job["heads"]}
        out.append(generate_ids(model, tok, job["prompts"], progress=False, shared_prefix=False, **heads, **kw))
    return out


@pytest.fixture(scope="module")
def alone(tok, model64):
    """Each condition alone, one prompt at a time (no padding, no other rows)."""
    return _one_at_a_time(model64, tok, _jobs(PROMPTS), max_new_tokens=8, batch_size=1)


def test_one_condition_at_a_time_is_batch_independent(tok, model64, alone):
    assert _one_at_a_time(model64, tok, _jobs(PROMPTS), max_new_tokens=8, batch_size=16) == alone
    assert alone[0] != alone[1] and alone[0] != alone[3]  # the ablations change answers, so a mix-up would show


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_shared_batches_equal_one_condition_at_a_time(tok, model64, alone, batch_size):
    got = generate_many(model64, tok, _jobs(PROMPTS), max_new_tokens=8, batch_size=batch_size, progress=False)
    assert got == alone


def test_rows_leaving_at_eos_do_not_disturb_the_others(tok, model64, monkeypatch):
    """Make a token that some answers produce early an EOS: those rows leave their batch (and the
    KV cache) mid-way; every row must still equal its condition generated alone."""
    jobs = _jobs(PROMPTS)
    free = generate_many(model64, tok, jobs, max_new_tokens=8, batch_size=64, progress=False)
    stop = free[1][1][2]
    monkeypatch.setattr(gen, "_eos_ids", lambda *a: [stop])
    got = generate_many(model64, tok, jobs, max_new_tokens=8, batch_size=64, progress=False)
    assert got == _one_at_a_time(model64, tok, jobs, max_new_tokens=8, batch_size=16)
    assert got[1][1] == free[1][1][:2]  # it did stop early
    assert any(len(r) == 8 for rows in got for r in rows)  # and others ran on


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2"])
def test_rows_joining_a_running_batch_equal_alone(tok, arch, monkeypatch):
    """Continuous batching: with small batches and rows that end early (a stop rule cuts them at
    different lengths), waiting rows are prefilled and merged into the running batch (left-padded
    caches, trimmed leading columns), on every architecture (gemma3's sliding-window cache decodes
    in fixed batches); every row must equal its condition generated alone, in float64."""
    model = tiny_lm(arch, len(tok), dtype=torch.float64, max_positions=256)
    jobs = _jobs(PROMPTS)
    alone = _one_at_a_time(model, tok, jobs, max_new_tokens=8, batch_size=1)
    rule = StopRule("checksum", lambda text: sum(map(ord, text)) % 5 == 0)  # settles at scattered lengths
    want = [[_first_settled(tok, r, rule.settled) for r in rows] for rows in alone]
    prefills = []
    real_merge = gen._Batch.extend
    monkeypatch.setattr(gen._Batch, "extend", lambda self, other: prefills.append(len(other.rows))
                        or real_merge(self, other))
    for batch_size in (3, 8):
        got = generate_many(model, tok, [dict(j, stop=rule) for j in jobs], max_new_tokens=8, batch_size=batch_size,
                            progress=False)
        assert got == want, batch_size
    assert (not prefills) == (arch == "gemma3")  # rows did join running batches (but never a sliding-window cache)
    assert len({len(r) for rows in want for r in rows}) > 2  # rows did end at different lengths


def _assert_same(got, want, batch_size) -> None:
    """``generate_and_score`` results: the same tokens, and first-position refusal scores equal to float64
    rounding (1e-10 relative; the paths differ only in summation order)."""
    assert got[0] == want[0], batch_size
    for rows, ref in zip(got[1], want[1]):
        assert [p for p, _ in rows] == pytest.approx([p for p, _ in ref], rel=1e-10, abs=1e-15)
        assert [lo for _, lo in rows] == pytest.approx([lo for _, lo in ref], rel=1e-10, abs=1e-12)


def _fast_path_equals_plain(tok, arch, monkeypatch, jobs, spied: str, off: dict, batch_sizes, plain_batch_size):
    """Generate ``jobs`` on a float64 ``arch`` model with a fast path off (keyword ``off``) and on, at each
    of ``batch_sizes``: the same tokens and refusal scores (:func:`_assert_same`). Returns ``(args,
    result)`` of every call of ``gen.<spied>`` (the fast path's function; never called with it off)."""
    model = tiny_lm(arch, len(tok), dtype=torch.float64, max_positions=256)
    tokens = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("I", "Sorry", "As")})
    calls = []
    real = getattr(gen, spied)
    monkeypatch.setattr(gen, spied, lambda *a: (lambda r: calls.append((a, r)) or r)(real(*a)))
    plain = generate_and_score(model, tok, jobs, refusal_tokens=tokens, max_new_tokens=8,
                               batch_size=plain_batch_size, progress=False, **off)
    assert not calls
    for batch_size in batch_sizes:
        _assert_same(generate_and_score(model, tok, jobs, refusal_tokens=tokens, max_new_tokens=8,
                                        batch_size=batch_size, progress=False), plain, batch_size)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2"])
def test_shared_prefix_cache_equals_whole_prompts(tok, arch, monkeypatch):
    """The chat template's common prefix is prefilled once per distinct head set and copied into each
    row's cache (layout ``[prefix | padding | rest]``): every row's tokens and first-position refusal
    scores must equal whole-prompt prefill, in float64, on every architecture (gemma3's sliding-window
    cache falls back to whole prompts)."""
    calls = _fast_path_equals_plain(tok, arch, monkeypatch, _jobs(PROMPTS), "_prefix_cache",
                                    dict(shared_prefix=False), (3, 64), 5)
    assert calls and min(len(args[3]) for args, _ in calls) > 5  # the system block and more was shared


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2"])
def test_prefill_from_lowest_ablated_layer_equals_full_prefill(tok, arch, monkeypatch):
    """With the shared prefix, a prefill group runs the layers below each row's lowest ablated head
    once per distinct prompt, unablated, and every row only from that layer up (its cache below it
    copied from the unablated pass). Rows ablating layer 0, 1, 2 and nothing, mixed in one batch and
    joining running batches: tokens must equal full prefills and first-position refusal scores match
    to float64 rounding, on every architecture (gemma3's sliding-window cache has no shared prefix,
    so nothing is skipped there)."""
    jobs = _jobs(PROMPTS) + [{"prompts": PROMPTS, "heads": [(2, 1)]}]
    calls = _fast_path_equals_plain(tok, arch, monkeypatch, jobs, "_prefill_from_lowest", dict(reuse_lower=False),
                                    (4, 64), 64)
    assert any(r is not None for _, r in calls) == (arch != "gemma3")


def test_lowest_layers():
    s = torch.zeros(3, 4, 2)
    s[0, 2, 1] = s[0, 3, 0] = 1.0
    s[2, 0, 0] = 0.5
    assert gen._lowest_layers(s).tolist() == [2, 4, 0]


def test_sampling_in_shared_batches_equals_alone(tok, model64):
    jobs = _jobs(PROMPTS[:3])
    kw = dict(sampling=True, top_k=5, temperature=1.3, seed=11, max_new_tokens=6)
    assert generate_many(model64, tok, jobs, batch_size=5, progress=False, **kw) == \
        _one_at_a_time(model64, tok, jobs, batch_size=2, **kw)


def test_generate_and_score_reads_the_refusal_metric_off_the_prefill(tok, model64, alone):
    """Same tokens as generate_many, and per row the refusal metric of its own forward pass (float64)."""
    tokens = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("I", "Sorry", "As")})
    jobs = _jobs(PROMPTS)
    ids, scores = generate_and_score(model64, tok, jobs, refusal_tokens=tokens, max_new_tokens=8, batch_size=6,
                                     progress=False)
    assert ids == alone
    for _job, sc, m in zip(jobs, scores, refusal_metric_many(model64, tok, jobs, refusal_tokens=tokens, batch_size=1)):
        assert [p for p, _ in sc] == pytest.approx(m.prob, rel=1e-10, abs=1e-15)
        assert [lo for _, lo in sc] == pytest.approx(m.log_odds, rel=1e-10, abs=1e-12)
    assert scores[0] != scores[1]
    with pytest.raises(EvaluationError, match="empty"):
        generate_and_score(model64, tok, jobs, refusal_tokens=[])


_DECODE_STREAM = gen._decode_stream  # the real decoder, whatever a test has patched


def _count_rows(monkeypatch, interrupt_after: int | None = None) -> tuple[list[int], list[int]]:
    """Patch the decoder: record how many rows each generate_many call decodes and how many finished
    before an optional KeyboardInterrupt after ``interrupt_after`` yields."""
    real, decoded, finished = _DECODE_STREAM, [], []

    def counting(model, encode, strength, *a, **k):
        decoded.append(strength.shape[0])
        for i, rows in enumerate(real(model, encode, strength, *a, **k)):
            if interrupt_after is not None and i == interrupt_after:
                raise KeyboardInterrupt
            finished.extend(rows)
            yield rows

    monkeypatch.setattr(gen, "_decode_stream", counting)
    return decoded, finished


def test_checkpoint_resumes_after_an_interruption(tok, model64, tmp_path, monkeypatch):
    jobs = _jobs(PROMPTS)
    want = generate_many(model64, tok, jobs, max_new_tokens=5, batch_size=4, progress=False)
    ckpt = tmp_path / "gen.ckpt.jsonl"
    n_unique = sum(len(j["prompts"]) for j in jobs) - 1  # job 3's unablated row repeats job 0's
    _, finished = _count_rows(monkeypatch, interrupt_after=3)
    with pytest.raises(KeyboardInterrupt):
        generate_many(model64, tok, jobs, max_new_tokens=5, batch_size=4, progress=False, checkpoint=ckpt)
    assert 0 < len(finished) < n_unique
    assert len(ckpt.read_text().splitlines()) == 1 + len(finished)  # header + every row that had finished
    decoded, _ = _count_rows(monkeypatch)
    again = generate_many(model64, tok, jobs, max_new_tokens=5, batch_size=4, progress=False, checkpoint=ckpt)
    assert again == want
    assert decoded == [n_unique - len(finished)]  # only the rows not checkpointed were generated
    # other settings: the checkpoint is not used
    decoded.clear()
    generate_many(model64, tok, jobs, max_new_tokens=4, batch_size=4, progress=False, checkpoint=ckpt)
    assert decoded == [n_unique]


def test_repeated_rows_are_decoded_once(tok, model64, alone, monkeypatch):
    """Two conditions with the same heads (e.g. two methods that chose the same set; heads in another
    order) cost one decoding per prompt, and each gets the same tokens as alone."""
    decoded, _ = _count_rows(monkeypatch)
    twice = _jobs(PROMPTS) + [{"prompts": PROMPTS, "heads": [(1, 2), (0, 1)]}]  # job 1's heads, other order
    got = generate_many(model64, tok, twice, max_new_tokens=8, batch_size=64, progress=False)
    assert got == alone + [alone[1]]
    # 4 jobs × 5 prompts, less job 3's unablated row that repeats job 0's; the added job adds nothing
    assert decoded == [4 * len(PROMPTS) - 1]


def _first_settled(tok, ids, settled):
    """The shortest prefix of ``ids`` whose decoded text settles, or all of ``ids``."""
    for n in range(1, len(ids) + 1):
        if settled(tok.decode(ids[:n], skip_special_tokens=True)):
            return ids[:n]
    return ids


def test_stop_rule_cuts_each_row_at_its_first_settled_prefix(tok, model64, alone, tmp_path):
    """A job with a StopRule: each row is the unstopped row cut at its first prefix whose text settles;
    jobs without one, in the same batches, are untouched; rows cut by a rule are checkpointed under it.

    Catches: a stopped row that is not a prefix of the full answer (a cache or strength row dropped for
    the wrong row), a rule applied to the wrong rows or one step late, and a checkpoint reusing rows cut
    by another rule (or none)."""
    texts = [tok.decode(r, skip_special_tokens=True) for job in alone for r in job]
    # a rule that settles mid-way on most rows: the text has reached the median length of the full answers
    cut = sorted(len(t) for t in texts)[len(texts) // 2] // 2
    rule = StopRule("len", lambda text: len(text) >= cut)
    jobs = [dict(j, stop=rule if i % 2 else None) for i, j in enumerate(_jobs(PROMPTS))]
    ckpt = tmp_path / "gen.ckpt.jsonl"
    got = generate_many(model64, tok, jobs, max_new_tokens=8, batch_size=7, progress=False, checkpoint=ckpt)
    want = [[_first_settled(tok, r, rule.settled) if job.get("stop") else r for r in rows]
            for job, rows in zip(jobs, alone)]
    assert got == want
    n_cut = sum(len(a) < len(b) for g, w in zip(got, alone) for a, b in zip(g, w))
    assert n_cut >= 3, n_cut  # the rule did cut rows short
    # the checkpoint knows which rows a rule cut: another rule's run regenerates exactly those jobs' rows
    other = StopRule("never", lambda text: False)
    again = generate_many(model64, tok, [dict(j, stop=other if j.get("stop") else None) for j in jobs],
                          max_new_tokens=8, batch_size=7, progress=False, checkpoint=ckpt)
    assert again == alone
    with pytest.raises(EvaluationError, match="StopRule"):
        generate_many(model64, tok, [{"prompts": ["a"], "heads": [], "stop": lambda t: True}])


def test_generate_many_errors(tok, model64):
    with pytest.raises(EvaluationError, match="no generation jobs"):
        generate_many(model64, tok, [])
    with pytest.raises(EvaluationError, match="not both"):
        generate_many(model64, tok, [{"prompts": ["a"], "heads": [(0, 1)], "rows": [[(0, 1)]]}])
    with pytest.raises(EvaluationError, match="unknown keys"):
        generate_many(model64, tok, [{"prompts": ["a"], "head": [(0, 1)]}])
    with pytest.raises(EvaluationError, match="rows= has 1"):
        generate_many(model64, tok, [{"prompts": ["a", "b"], "rows": [[(0, 1)]]}])
    with pytest.raises(EvaluationError, match="no prompts"):
        generate_many(model64, tok, [{"prompts": [], "heads": []}])
    with pytest.raises(IndexError):
        generate_many(model64, tok, [{"prompts": ["a"], "heads": [(9, 0)]}])
    with pytest.raises(TypeError):
        generate_many(model64, tok, {"prompts": ["a"]})


@pytest.mark.slow
def test_smollm2_float64_shared_batches_equal_one_condition_at_a_time():
    model, tok = load_builtin("builtin:smollm2-135m-instruct", dtype=torch.float64)
    prompts = PROMPTS[:3]  # 12 rows × 8 tokens, each alone at batch 1 in float64: most of this test's time
    jobs = [{"prompts": prompts, "heads": []},
            {"prompts": prompts, "heads": [(3, 2), (10, 5)]},
            {"prompts": prompts, "heads": [(0, 0), (20, 8), (29, 1)]},
            {"prompts": prompts, "rows": [[(5, 5)], [(12, 1), (13, 2)], [(29, 8)]]}]
    want = _one_at_a_time(model, tok, jobs, max_new_tokens=8, batch_size=1)
    got = generate_many(model, tok, jobs, max_new_tokens=8, batch_size=16, progress=False)
    assert got == want
    assert len({tuple(map(tuple, rows)) for rows in want}) > 1  # the head sets change some answers
