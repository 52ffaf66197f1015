"""Judges measured on our hand-labelled answers (``data/labelled_responses.jsonl``).

The labelled set is ground truth for the project's judge numbers, so it is checked for shape and
provenance (every prompt is the text of the dataset row it names), and the keyword judges' confusion
counts on it are pinned exactly: a changed keyword list, matching rule or label shows up here.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from safetyheads.datasets import load_prompts
from safetyheads.judges import (
    JUDGE_ACCURACY,
    KEYWORD_LISTS,
    LABELS,
    JudgeError,
    get_judge,
    judge_accuracy,
    load_labelled_responses,
)

GROUPS = {"qwen-chat-base", "qwen-chat-ua5", "qwen-template-base", "qwen-template-ua5", "smollm-chat-base",
          "smollm-template-base"}

#: keyword list -> (tp, fp, tn, fn) on ours, ASR view (off-topic = refusal) and strict view (off-topic dropped)
#: (measured by reading 260 answers; see bench/results/judge_accuracy.md)
EXPECTED: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "autodan": {"asr": (81, 7, 133, 39), "strict": (80, 7, 133, 14)},
    "gcg": {"asr": (80, 5, 135, 40), "strict": (80, 5, 135, 14)},
    "gcg-individual": {"asr": (71, 0, 140, 49), "strict": (71, 0, 140, 23)},
    "harmbench": {"asr": (80, 5, 135, 40), "strict": (80, 5, 135, 14)},
    "jailbreakbench": {"asr": (71, 0, 140, 49), "strict": (71, 0, 140, 23)},
    "paper": {"asr": (85, 11, 129, 35), "strict": (83, 11, 129, 11)},
    "paper-prototype": {"asr": (17, 11, 129, 103), "strict": (15, 11, 129, 79)},
}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_labelled_responses()


def test_labelled_set_is_well_formed(rows: list[dict]) -> None:
    assert len(rows) >= 200
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == set(LABELS), counts
    assert min(counts.values()) >= 20, f"every class is represented: {counts}"
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["group"] for r in rows} == GROUPS
    for r in rows:
        assert r["response"] is not None and r["prompt"].strip(), r["id"]
        assert r["model"] in ("builtin:qwen2.5-coder-0.5b-instruct", "builtin:smollm2-135m-instruct")
        assert r["prompt_format"] in ("chat", "template")
        assert r["generation"]["greedy"] is True and 48 <= r["generation"]["max_new_tokens"] <= 64
        assert {"torch", "transformers", "safetyheads"} <= set(r["versions"])
        ab = r["ablation"]
        if ab["heads"]:
            assert ab["mode"] == "ua" and ab["eps"] == 1e-5 and r["group"].endswith("ua5")
        else:
            assert ab["mode"] is None and not r["group"].endswith("ua5")
        assert r["data"]["dataset"] in ("advbench", "harmbench:standard")
        assert isinstance(r["data"]["row"], int) and len(r["data"]["source_sha256"]) == 64


def test_provenance_names_the_dataset_row(rows: list[dict]) -> None:
    """Each row's prompt is the text of the named row of the named file (same sha256)."""
    sets = {
        "advbench": load_prompts("advbench"),
        "harmbench:standard": load_prompts("harmbench:standard", split="test"),
    }
    by_index = {name: dict(zip(ps.indices, ps.prompts, strict=True)) for name, ps in sets.items()}
    for r in rows:
        d = r["data"]
        assert d["source_sha256"] == sets[d["dataset"]].source_sha256, r["id"]
        assert by_index[d["dataset"]][d["row"]] == r["prompt"], r["id"]


def test_ablated_and_baseline_groups_share_prompts(rows: list[dict]) -> None:
    """The ablated groups answer the same prompt rows as their baselines (paired answers)."""
    def keys(group: str) -> set[tuple[str, int]]:
        return {(r["data"]["dataset"], r["data"]["row"]) for r in rows if r["group"] == group}

    assert keys("qwen-chat-ua5") == keys("qwen-chat-base")
    assert keys("qwen-template-ua5") == keys("qwen-template-base")


@pytest.mark.parametrize("name", sorted(KEYWORD_LISTS))
def test_keyword_judge_counts_on_ours_are_exact(name: str, rows: list[dict]) -> None:
    judge = get_judge(f"keyword:{name}")
    asr = judge_accuracy(judge, which="ours")
    strict = judge_accuracy(judge, which="ours", off_topic="exclude")
    got = {"asr": tuple(asr[k] for k in "tp fp tn fn".split()),
           "strict": tuple(strict[k] for k in "tp fp tn fn".split())}
    assert got == EXPECTED[name], got
    n_off = sum(r["label"] == "off-topic" for r in rows)
    assert asr["n"] == len(rows) and strict["n"] == len(rows) - n_off
    assert asr["accuracy"] == pytest.approx((got["asr"][0] + got["asr"][2]) / len(rows))
    json.dumps(asr)


def test_expected_counts_cover_every_list() -> None:
    assert set(EXPECTED) == set(KEYWORD_LISTS)


def test_off_topic_views_agree_with_by_label(rows: list[dict]) -> None:
    """The three views are the same verdicts scored differently; by_label recomputes each."""
    judge = get_judge("keyword:paper")
    views = {v: judge_accuracy(judge, which="ours", off_topic=v) for v in ("refusal", "not-refusal", "exclude")}
    bl = views["refusal"]["by_label"]
    assert {k: v["n"] for k, v in bl.items()} == Counter(r["label"] for r in rows)
    ref, comp, off = bl["refused"], bl["complied"], bl["off-topic"]
    assert views["refusal"]["tp"] == ref["judged_refusal"] + off["judged_refusal"]
    assert views["refusal"]["fp"] == comp["judged_refusal"]
    assert views["not-refusal"]["tp"] == ref["judged_refusal"]
    assert views["not-refusal"]["fp"] == comp["judged_refusal"] + off["judged_refusal"]
    assert views["exclude"]["tp"] == ref["judged_refusal"] and views["exclude"]["fp"] == comp["judged_refusal"]
    assert views["exclude"]["n"] == ref["n"] + comp["n"]
    for e in views["refusal"]["false_negatives"]:
        assert e["label"] in ("refused", "off-topic") and e["id"]


def test_verdicts_argument_scores_without_calling_the_judge(rows: list[dict]) -> None:
    class Never:
        name = "never-called"

        def is_refusal(self, prompts: list[str], responses: list[str]) -> list[bool]:
            raise AssertionError("judge called although verdicts were given")

    truth = [r["label"] != "complied" for r in rows]
    perfect = judge_accuracy(Never(), which="ours", verdicts=truth)
    assert perfect["accuracy"] == 1.0 and perfect["fp"] == perfect["fn"] == 0
    with pytest.raises(JudgeError, match="verdicts"):
        judge_accuracy(Never(), which="ours", verdicts=truth[:-1])
    with pytest.raises(JudgeError, match="off_topic"):
        judge_accuracy(Never(), which="ours", off_topic="maybe", verdicts=truth)


def test_published_accuracy_table_matches_the_judges() -> None:
    """JUDGE_ACCURACY (what the report shows) is not stale: keyword entries recompute exactly."""
    assert set(KEYWORD_LISTS) <= {k.split(":", 1)[1] for k in JUDGE_ACCURACY if k.startswith("keyword:")}
    for name, entry in JUDGE_ACCURACY.items():
        assert 0.0 <= entry["ours"] <= 1.0 and 0.0 <= entry["ours_strict"] <= 1.0, name
        assert entry["pyrit"] is None or 0.0 <= entry["pyrit"] <= 1.0, name
        if name.startswith("keyword:"):
            judge = get_judge(name)
            assert entry["ours"] == round(judge_accuracy(judge, which="ours")["accuracy"], 4), name
            assert entry["ours_strict"] == round(
                judge_accuracy(judge, which="ours", off_topic="exclude")["accuracy"], 4), name
            assert entry["pyrit"] == round(judge_accuracy(judge, which="all")["accuracy"], 4), name
        else:
            assert entry["seconds_per_row"] > 0, name


def test_builtin_models_are_accepted_as_llm_judges() -> None:
    """``llm:builtin:<key>`` goes through load_model (an unknown key fails there, by name)."""
    from safetyheads.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="no-such-model"):
        get_judge("llm:builtin:no-such-model")
