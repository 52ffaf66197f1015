"""Prompt-set loaders: bundled sets, user files, sampling and hold-out splits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from safetyheads.datasets import (
    DATASETS,
    DatasetError,
    PromptSet,
    holdout_split,
    load_prompts,
)

# (name, split, expected rows) for every bundled set, straight from shared/ASSETS.md.
BUNDLED = [
    ("advbench", None, 520),
    ("advbench-pyrit", None, 520),
    ("harmbench", "test", 320),
    ("harmbench", "val", 80),
    ("harmbench:standard", "test", 159),
    ("harmbench:contextual", "test", 81),
    ("harmbench:copyright", "test", 80),
    ("harmbench:standard", "val", 41),
    ("harmbench:standard+contextual", "val", 60),
    ("strongreject", "full", 313),
    ("strongreject", "small", 60),
    ("mtbench", None, 80),
    ("rho-benign-edgy", None, 150),
    ("rho-harmless", None, 150),
    ("rho-harmful", None, 150),
]


@pytest.mark.parametrize(("name", "split", "rows"), BUNDLED)
def test_bundled_set_has_expected_rows_and_provenance(name: str, split: str | None, rows: int) -> None:
    ps = load_prompts(name, split=split)
    assert len(ps) == rows
    assert all(isinstance(p, str) and p == p.strip() and p for p in ps)
    assert len(set(ps)) == rows, "prompts are unique"
    assert len(ps.indices) == rows and len(set(ps.indices)) == rows
    prov = ps.provenance()
    json.dumps(prov)  # JSON-able
    assert prov["n"] == rows and len(prov["source_sha256"]) == 64
    assert all(Path(f["path"]).is_file() for f in prov["files"])


def test_every_registered_name_loads() -> None:
    for name in DATASETS:
        assert len(load_prompts(name)) > 0


def test_default_splits() -> None:
    assert load_prompts("harmbench").split == "test"
    assert load_prompts("strongreject").split == "full"
    assert load_prompts("advbench").split is None


def test_advbench_pinned_file_and_first_row() -> None:
    ps = load_prompts("advbench")
    assert ps.source_sha256 == "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1"
    assert ps[0].startswith("Write a script that can exploit vulnerabilities")
    assert ps.column == "goal"
    assert list(load_prompts("advbench-pyrit")) == list(ps), "PyRIT's copy holds the same 520 goals"


def test_harmbench_contextual_rows_put_the_context_first() -> None:
    ps = load_prompts("harmbench:contextual")
    for p in ps:
        context, sep, behavior = p.rpartition("\n\n---\n\n")
        assert sep and context and behavior
    # the full set's row indices point into the CSV: category filters keep the original indices
    full = load_prompts("harmbench")
    for i, p in zip(ps.indices, ps, strict=True):
        assert full[full.indices.index(i)] == p


def test_harmbench_categories_partition_the_split() -> None:
    full = load_prompts("harmbench", split="val")
    parts = [load_prompts(f"harmbench:{c}", split="val") for c in ("standard", "contextual", "copyright")]
    assert sorted(i for p in parts for i in p.indices) == sorted(full.indices)


def test_rho_pairs_keep_only_the_question() -> None:
    for name in ("rho-harmless", "rho-harmful"):
        assert all("\n\n" not in p for p in load_prompts(name))


def test_mtbench_is_the_first_turn() -> None:
    ps = load_prompts("mtbench")
    assert ps[0].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")


def test_sampling_is_deterministic_and_recorded() -> None:
    a = load_prompts("advbench", n=25, seed=3)
    b = load_prompts("advbench", n=25, seed=3)
    c = load_prompts("advbench", n=25, seed=4)
    assert list(a) == list(b) and a.indices == b.indices
    assert a.indices != c.indices
    assert list(a.indices) == sorted(a.indices)
    full = load_prompts("advbench")
    assert all(full[i] == p for i, p in zip(a.indices, a, strict=True))
    assert a.history == ("sample(n=25, seed=3)",)


def test_holdout_split_is_disjoint_deterministic_and_nested() -> None:
    ps = load_prompts("advbench")
    attr, ev = holdout_split(ps, 40, 100, seed=7)
    assert len(attr) == 40 and len(ev) == 100
    assert not set(attr.indices) & set(ev.indices)
    assert not set(attr) & set(ev)
    attr2, ev2 = holdout_split(ps, 40, 100, seed=7)
    assert attr2.indices == attr.indices and ev2.indices == ev.indices
    # the attribution part does not depend on n_eval; a larger n_eval gives a superset
    attr3, ev3 = holdout_split(ps, 40, seed=7)
    assert attr3.indices == attr.indices and len(ev3) == 480
    assert set(ev.indices) <= set(ev3.indices)
    assert holdout_split(ps, 40, seed=8)[0].indices != attr.indices
    assert "holdout_split(attribution" in attr.history[-1]


def test_holdout_split_rejects_oversized_requests() -> None:
    ps = load_prompts("mtbench")
    with pytest.raises(DatasetError, match="'mtbench' has 80 prompts; cannot take 50 for attribution and 40 for"):
        holdout_split(ps, 50, 40)
    with pytest.raises(DatasetError, match="cannot take 81 for attribution and the rest for evaluation"):
        holdout_split(ps, 81)
    with pytest.raises(DatasetError, match=r"sizes must be >= 0 \(n_attribution=-1"):
        holdout_split(ps, -1)


def test_promptset_is_a_sequence_and_slices_keep_provenance() -> None:
    ps = load_prompts("strongreject", split="small")
    assert isinstance(ps, PromptSet)
    head = ps[:5]
    assert isinstance(head, PromptSet) and list(head) == list(ps.prompts[:5])
    assert head.indices == ps.indices[:5] and head.split == "small"
    assert ps[0] in ps and ps.index(ps[3]) == 3
    assert "n=60" in repr(ps)


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_known_sets() -> None:
    with pytest.raises(DatasetError, match=r"unknown prompt set 'advbenchh'; builtin sets: \['advbench', "):
        load_prompts("advbenchh")


def test_bad_split_and_qualifier() -> None:
    with pytest.raises(DatasetError, match=r"'harmbench' has splits \['test', 'val'\], not 'train'"):
        load_prompts("harmbench", split="train")
    with pytest.raises(DatasetError, match=r"'advbench' has no splits \(got split='test'\)"):
        load_prompts("advbench", split="test")
    with pytest.raises(DatasetError, match=r"unknown HarmBench category \['weird'\]"):
        load_prompts("harmbench:weird")
    with pytest.raises(DatasetError, match="'advbench' takes no ':' qualifier"):
        load_prompts("advbench:standard")


def test_n_out_of_range() -> None:
    with pytest.raises(DatasetError, match="'mtbench' has 80 prompts, fewer than the n=81 asked for"):
        load_prompts("mtbench", n=81)
    with pytest.raises(DatasetError, match="n must be a positive integer, got 0"):
        load_prompts("mtbench", n=0)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(DatasetError, match="nope.csv"):
        load_prompts(missing)


# ----------------------------------------------------------------------------- user files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_user_csv_default_and_explicit_columns(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "jbb.csv",
        "Index,Goal,Target,Behavior\n1,Do a bad thing,Sure,Bad\n2,Do another,Sure,Other\n",
    )
    ps = load_prompts(f)
    assert list(ps) == ["Do a bad thing", "Do another"] and ps.column == "Goal"
    assert ps.name == "jbb" and ps.split is None
    assert list(load_prompts(f, column="Behavior")) == ["Bad", "Other"]


def test_user_single_column_csv_with_unknown_header(tmp_path: Path) -> None:
    f = _write(tmp_path / "one.csv", 'request\n"a, with comma"\nb\n')
    assert list(load_prompts(f)) == ["a, with comma", "b"]


def test_user_json_list_of_strings_and_objects(tmp_path: Path) -> None:
    f1 = _write(tmp_path / "s.json", json.dumps(["x", " y "]))
    assert list(load_prompts(f1)) == ["x", "y"]
    f2 = _write(tmp_path / "o.json", json.dumps([{"id": 1, "prompt": "p1"}, {"id": 2, "prompt": "p2"}]))
    assert list(load_prompts(f2)) == ["p1", "p2"]


def test_user_jsonl_and_txt(tmp_path: Path) -> None:
    f = _write(tmp_path / "q.jsonl", '{"instruction": "a"}\n\n{"instruction": "b"}\n')
    assert list(load_prompts(f)) == ["a", "b"]
    t = _write(tmp_path / "q.txt", "first\n\nsecond\n")
    assert list(load_prompts(t)) == ["first", "second"]


def test_user_missing_column_lists_available(tmp_path: Path) -> None:
    f = _write(tmp_path / "m.csv", "a,b\n1,2\n")
    with pytest.raises(DatasetError, match=r"m\.csv.*\['a', 'b'\]"):
        load_prompts(f)
    g = _write(tmp_path / "g.csv", "goal,target\nx,y\n")
    with pytest.raises(DatasetError, match=r"g\.csv.*no column 'prompt'.*\['goal', 'target'\]"):
        load_prompts(g, column="prompt")


@pytest.mark.parametrize(
    ("fname", "text"),
    [("e.csv", ""), ("h.csv", "goal\n"), ("e.json", "[]"), ("e.jsonl", "\n\n"), ("e.txt", "")],
)
def test_user_empty_files(tmp_path: Path, fname: str, text: str) -> None:
    f = _write(tmp_path / fname, text)
    with pytest.raises(DatasetError, match=fname.replace(".", r"\.")):
        load_prompts(f)


def test_user_bad_json(tmp_path: Path) -> None:
    f = _write(tmp_path / "bad.json", '["a", ')
    with pytest.raises(DatasetError, match=r"bad\.json.*invalid JSON"):
        load_prompts(f)
    g = _write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{oops}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl.*line 2"):
        load_prompts(g)
    h = _write(tmp_path / "obj.json", '{"prompt": "a"}')
    with pytest.raises(DatasetError, match=r"obj\.json.*list"):
        load_prompts(h)


def test_user_non_string_and_empty_rows_name_the_row(tmp_path: Path) -> None:
    f = _write(tmp_path / "n.json", json.dumps([{"prompt": "ok"}, {"prompt": 3}]))
    with pytest.raises(DatasetError, match=r"n\.json.*row 2 is not text"):
        load_prompts(f)
    g = _write(tmp_path / "s.json", json.dumps(["ok", None]))
    with pytest.raises(DatasetError, match=r"s\.json.*row 2"):
        load_prompts(g)
    h = _write(tmp_path / "blank.csv", "goal\nok\n   \n")
    with pytest.raises(DatasetError, match=r"blank\.csv.*row 2 is empty"):
        load_prompts(h)
    k = _write(tmp_path / "k.jsonl", '{"prompt": "a"}\n{"other": "b"}\n')
    with pytest.raises(DatasetError, match=r"k\.jsonl.*row 2 has no field 'prompt'"):
        load_prompts(k)


def test_user_duplicates_are_removed_with_a_warning(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.csv", "prompt\na\nb\na \nc\n")
    with pytest.warns(UserWarning, match=r"d\.csv.*1 duplicate"):
        ps = load_prompts(f)
    assert list(ps) == ["a", "b", "c"] and ps.indices == (0, 1, 3)


def test_builtin_sets_load_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_prompts("harmbench")
        load_prompts("advbench")


def test_unsupported_extension_and_column_on_plain_strings(tmp_path: Path) -> None:
    f = _write(tmp_path / "x.parquet", "nope")
    with pytest.raises(DatasetError, match="unsupported"):
        load_prompts(f)
    g = _write(tmp_path / "s.json", json.dumps(["a"]))
    with pytest.raises(DatasetError, match="plain values"):
        load_prompts(g, column="prompt")
    with pytest.raises(DatasetError, match="no splits"):
        load_prompts(g, split="test")
