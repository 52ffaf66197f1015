"""Cross-run comparison: Jaccard / Spearman on hand cases, different grids, missing parts, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_report import make_run, png_size

from safetyheads.compare import (
    compare_runs,
    depth_bin,
    depth_profile,
    jaccard,
    multiset_jaccard,
    spearman,
    to_markdown,
    write_comparison,
)


def test_measures_on_hand_cases():
    assert jaccard({(1, 2), (3, 4)}, {(1, 2), (3, 4)}) == 1.0
    assert jaccard({(1, 2)}, {(3, 4)}) == 0.0
    assert jaccard({(1, 2), (3, 4)}, {(1, 2), (5, 6)}) == pytest.approx(1 / 3)
    assert jaccard([], []) is None
    assert multiset_jaccard([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 4)
    assert multiset_jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == (pytest.approx(1.0), 4)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16])[0] == pytest.approx(1.0)  # monotone, not linear
    rho, n = spearman([1, 2, np.nan, 4, 5], [2, 1, 7, 4, 3])  # NaN pair dropped
    assert n == 4 and rho == pytest.approx(0.6)  # ranks 1234 vs 2143: 1 - 6·4/60
    assert spearman([1, 1, 1], [1, 2, 3])[0] is None  # constant
    assert spearman([1, 2], [1, 2])[0] is None  # too few
    # ties averaged like scipy
    from scipy.stats import spearmanr

    x, y = [1, 2, 2, 3, 5, 5, 0], [3, 1, 2, 2, 9, 4, 4]
    assert spearman(x, y)[0] == pytest.approx(spearmanr(x, y).statistic)


def test_depth_bins():
    assert [depth_bin(la, 28, 24) for la in range(28)][-1] == 23
    assert sorted({depth_bin(la, 28, 24) for la in range(28)}) == list(range(24))  # every bin hit
    assert [depth_bin(la, 24, 24) for la in range(24)] == list(range(24))
    prof = depth_profile(np.array([[1.0, 3.0], [2.0, 0.0], [5.0, np.nan], [np.nan, np.nan]]), 2)
    assert prof.tolist() == [2.5, 5.0]  # mean over the bin's layers of each layer's max


def test_identical_runs(tmp_path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    c = compare_runs([a, b], k=5)
    (p,) = c["pairs"]
    assert p["basis"] == "heads" and p["same_grid"]
    assert p["sahara_jaccard"] == 1.0 and p["ships_topk_jaccard"] == 1.0
    assert p["ships_spearman"] == pytest.approx(1.0) and p["spearman_n"] == 24
    assert p["sahara_shared"] == [[1, 0], [2, 3], [3, 5]]
    assert "same grid 4×6" in p["compared"]
    # auto: the estimate covers more prompts (5) than the exact sweep (as in a default run)
    assert c["runs"][0]["ships_source"].startswith("ships_estimate (estimate:fisher, 5 prompts")
    assert c["runs"][0]["sahara_depth"] == pytest.approx(((2.5 + 1.5 + 3.5) / 3) / 4)  # heads (2,3),(1,0),(3,5)
    assert "relative depth" in to_markdown(c)
    assert compare_runs([a, b], k=3, ships="exact")["runs"][0]["ships_source"].startswith("ships (exact")
    assert len(c["runs"][0]["ships_top"]) == 5


def test_disjoint_heads(tmp_path):
    a = make_run(tmp_path, "a", sahara_heads=((0, 0), (0, 1)), ships_peaks={(0, 0): 3.0, (0, 1): 2.0})
    b = make_run(tmp_path, "b", sahara_heads=((3, 4), (3, 5)), ships_peaks={(3, 4): 3.0, (3, 5): 2.0})
    (p,) = compare_runs([a, b], k=2)["pairs"]
    assert p["sahara_jaccard"] == 0.0 and p["ships_topk_jaccard"] == 0.0
    assert p["sahara_shared"] == [] and p["ships_topk_shared"] == []
    assert p["ships_spearman"] < 0.99  # same background noise, different peaks


def test_different_grids_use_relative_depth(tmp_path):
    # 0.5B-like 24×14 vs 1.5B-like 28×12: the same relative depths, different head indices
    a = make_run(tmp_path, "small", n_layers=24, n_heads=14, sahara_heads=((0, 11), (12, 3)),
                 ships_peaks={(0, 11): 2.0, (12, 3): 1.0})
    b = make_run(tmp_path, "big", n_layers=28, n_heads=12, sahara_heads=((0, 5), (14, 7)),
                 ships_peaks={(0, 5): 2.0, (14, 7): 1.0})
    c = compare_runs([a, b], k=2)
    (p,) = c["pairs"]
    assert not p["same_grid"] and p["basis"] == "relative-depth" and p["heads"] is None
    assert p["depth"]["bins"] == 24
    assert p["sahara_jaccard"] == 1.0  # bins 0 and 12 in both
    assert p["ships_topk_jaccard"] == 1.0
    assert p["ships_spearman"] is not None and p["spearman_n"] == 24
    assert "different grids 24×14 vs 28×12" in p["compared"] and "relative depth" in p["compared"]
    md = to_markdown(c)
    assert "relative depth (24 bins)" in md and "| small | big |" in md


def test_three_runs_and_missing_parts(tmp_path):
    a = make_run(tmp_path, "a")
    b = make_run(tmp_path, "b", sahara=False)
    d = make_run(tmp_path, "d", ships=False, estimate=False, sahara=False, evaluation=False)
    c = compare_runs([a, b, d], k=3)
    assert [(p["a"], p["b"]) for p in c["pairs"]] == [("a", "b"), ("a", "d"), ("b", "d")]
    ab = c["pairs"][0]
    assert ab["sahara_jaccard"] is None and "Sahara not run in b" in ab["notes"]
    assert ab["ships_topk_jaccard"] == 1.0
    ad = c["pairs"][1]
    assert ad["ships_spearman"] is None and ad["sahara_jaccard"] is None
    assert "head grid unknown for d" in ad["notes"]
    assert c["runs"][2]["ships_source"] == "not run" and c["runs"][2]["sahara_heads"] is None
    md = to_markdown(c)
    assert "not run" in md and "n/a" in md


def test_estimate_fallback_and_choice(tmp_path):
    a = make_run(tmp_path, "a", ships=False)
    b = make_run(tmp_path, "b", estimate=False)
    c = compare_runs([a, b], k=3)
    assert c["runs"][0]["ships_source"].startswith("ships_estimate (estimate:fisher")
    assert c["runs"][1]["ships_source"].startswith("ships (exact")
    assert any("Ships sources differ" in n for n in c["pairs"][0]["notes"])
    b = make_run(tmp_path, "b2")
    c = compare_runs([a, b], k=3)
    assert not c["pairs"][0]["notes"]
    c = compare_runs([a, b], k=3, ships="estimate")
    assert not c["pairs"][0]["notes"]
    c = compare_runs([a, b], k=3, metric="refusal")
    assert c["pairs"][0]["ships_spearman"] is not None
    with pytest.raises(ValueError, match="compare_runs needs at least two run folders"):
        compare_runs([a], k=3)
    with pytest.raises(ValueError, match="ships must be 'auto', 'exact' or 'estimate', got 'bogus'"):
        compare_runs([a, b], ships="bogus")


def test_same_folder_names_are_disambiguated(tmp_path):
    a = make_run(tmp_path / "ua", "run")
    b = make_run(tmp_path / "sc", "run")
    c = compare_runs([a, b])
    assert [r["name"] for r in c["runs"]] == ["ua/run", "sc/run"]


def test_write_comparison(tmp_path):
    a = make_run(tmp_path, "a")
    b = make_run(tmp_path, "b", n_layers=6, n_heads=4, sahara_heads=((1, 1),), ships_peaks={(1, 1): 1.0})
    out = write_comparison([a, b], tmp_path / "cmp", k=4)
    assert out == tmp_path / "cmp"
    data = json.loads((out / "compare.json").read_text())
    assert data["k"] == 4 and len(data["pairs"]) == 1
    assert "# Safety-head overlap" in (out / "compare.md").read_text()
    w, h = png_size(out / "compare.png")
    assert w > 600 and h > 250
