"""Results you can look at (safetyheads.views): ``to_pandas()`` frames equal the tensors and lists they
come from, value by value; ``plot()`` is the report's figure with one heatmap cell per layer × head
holding the plotted numbers; ``_repr_html_`` parses as HTML with a table and an inline PNG.

Real results of a tiny random llama (3 layers × 4 heads) with the SmolLM2 tokenizer's vocabulary
(tests/tiny_lm.py), float32; the frames hold the same float32 values widened to float64, so they are
compared with ``==`` (no tolerance).
"""

from __future__ import annotations

import base64
import math
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.figure import Figure
from tiny_lm import PROMPTS, refusal_ids, smol_tokenizer, tiny_lm

import safetyheads as sh
from safetyheads.evaluation import Evaluation
from safetyheads.masks import HeadMaskResult

HARMLESS = ["What is the capital of France?", "Write a short poem about the sea.", "Name three prime numbers."]
N_LAYERS, N_HEADS = 3, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


@pytest.fixture(scope="module")
def rt(tok):
    return refusal_ids(tok)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_lm("llama", len(tok))


@pytest.fixture(scope="module")
def ships_res(model, tok, rt):
    # heads= leaves the others NaN: the frame must keep those cells as NaN rows
    heads = [(la, h) for la in range(N_LAYERS) for h in range(N_HEADS) if (la, h) != (1, 2)]
    return sh.ships(model, tok, PROMPTS[:3], refusal_tokens=rt, heads=heads, progress=False)


@pytest.fixture(scope="module")
def sahara_res(model, tok):
    return sh.sahara(model, tok, PROMPTS, steps=2, progress=False)


@pytest.fixture(scope="module")
def search_res(model, tok, rt):
    return sh.search_heads(model, tok, PROMPTS[:3], objective="refusal", refusal_tokens=rt, steps=2,
                           harmless=HARMLESS, max_harmless_kl=1e9, progress=False)


@pytest.fixture(scope="module")
def ev(model, tok, rt):
    return sh.evaluate(model, tok, PROMPTS[:3], heads=[(0, 1), (2, 3)], random_controls=1, max_new_tokens=3,
                       harmless=HARMLESS[:2], refusal_tokens=rt, progress=False)


@pytest.fixture(scope="module")
def mask(model, tok, rt):
    return sh.learn_head_mask(model, tok, PROMPTS[:3], harmless=HARMLESS, refusal_tokens=rt, steps=2,
                              batch_size=3, validate_ks=(1,))


def _same(a, b) -> bool:
    """Equal as float64 arrays, NaN equal to NaN."""
    return np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True)


# --------------------------------------------------------------------------- to_pandas


def test_ships_frame_is_the_tensor_row_by_row(ships_res):
    """One row per prompt × layer × head in that order; kl / refusal equal the tensors' cells (NaN
    where the head was not scored), prompt is the prompt of prompt_index."""
    df = ships_res.to_pandas()
    n_p = len(ships_res.prompts)
    assert list(df.columns) == ["prompt_index", "prompt", "layer", "head", "kl", "refusal"]
    assert len(df) == n_p * N_LAYERS * N_HEADS
    for row in df.itertuples():
        p, la, h = row.prompt_index, row.layer, row.head
        assert row.prompt == ships_res.prompts[p]
        assert _same(row.kl, ships_res.kl[p, la, h].item()), (p, la, h)
        assert _same(row.refusal, ships_res.refusal[p, la, h].item()), (p, la, h)
    assert df[(df.layer == 1) & (df["head"] == 2)].kl.isna().all()
    assert df.kl.notna().sum() == n_p * (N_LAYERS * N_HEADS - 1)
    # the order is prompt-major, then layer, then head: reshaping gives the tensor back
    assert _same(df.kl.to_numpy().reshape(n_p, N_LAYERS, N_HEADS), ships_res.kl.double().numpy())
    # the dataset view: a groupby mean (float64) is the result's own mean (float32 nanmean)
    assert np.allclose(df.groupby(["layer", "head"]).kl.mean().to_numpy().reshape(N_LAYERS, N_HEADS),
                       ships_res.mean("kl").double().numpy(), rtol=1e-6, atol=0, equal_nan=True)


def test_ships_frame_without_refusal_has_no_refusal_column(ships_res):
    """A result without refusal scores has no refusal column (not a column of NaN)."""
    res = sh.ShipsResult(ships_res.kl, None, ships_res.prompts, "exact")
    assert list(res.to_pandas().columns) == ["prompt_index", "prompt", "layer", "head", "kl"]


@pytest.mark.parametrize("which", ["sahara_res", "search_res"])
def test_search_frame_is_every_step_and_candidate(request, which):
    """One row per step × scored candidate; score equals the step's score of that head; exactly one
    chosen row per step, the step's chosen head; with a harmless constraint, harmless_kl and rejected."""
    res = request.getfixturevalue(which)
    df = res.to_pandas()
    assert len(df) == sum(len(st.scores) for st in res.steps)
    for i, st in enumerate(res.steps, 1):
        part = df[df.step == i]
        assert sorted(zip(part.layer, part["head"])) == sorted(st.scores)
        for row in part.itertuples():
            assert row.score == st.scores[(row.layer, row.head)]
        chosen = part[part.chosen]
        assert [(int(r.layer), int(r.head)) for r in chosen.itertuples()] == [tuple(st.chosen)]
        if st.harmless_kl is not None:
            for row in part.itertuples():
                assert row.harmless_kl == st.harmless_kl[(row.layer, row.head)]
                assert row.rejected == ((row.layer, row.head) in set(st.rejected))
    assert [tuple(x) for x in df[df.chosen].sort_values("step")[["layer", "head"]].to_numpy()] == list(res.heads)
    if which == "search_res":
        assert {"harmless_kl", "rejected"} <= set(df.columns)
    else:
        assert list(df.columns) == ["step", "layer", "head", "score", "chosen"]


def test_evaluation_frame_is_every_condition_and_prompt(ev):
    """One row per condition × prompt (harmful conditions, then harmless ones): prompt, response,
    refusal and the refusal metric equal the Condition's lists."""
    df = ev.to_pandas()
    conds = [("harmful", c) for c in ev.conditions] + [("harmless", c) for c in ev.over_refusal]
    assert len(df) == sum(c.n for _, c in conds)
    assert list(df.columns) == ["condition", "set", "method", "k", "prompt_index", "prompt", "response", "refusal",
                                "refusal_log_odds", "refusal_prob"]
    assert {c.name for c in ev.conditions} >= {"baseline", "ablated", "random0"}
    for which, c in conds:
        part = df[df.condition == c.name]
        assert list(part.prompt_index) == list(range(c.n))
        assert set(part.set) == {which} and set(part.method) == {c.method} and set(part.k) == {c.k}
        assert list(part.prompt) == c.prompts and list(part.response) == c.responses
        assert list(part.refusal) == c.refusals
        assert _same(part.refusal_log_odds, c.refusal_log_odds if c.refusal_log_odds is not None else [math.nan] * c.n)
        assert _same(part.refusal_prob, c.refusal_prob if c.refusal_prob is not None else [math.nan] * c.n)
    # the attack success of a condition is the share of non-refusal rows
    for c in ev.conditions:
        assert 1 - df[df.condition == c.name].refusal.mean() == pytest.approx(c.asr, abs=1e-12)


def test_mask_frame_is_one_row_per_head(mask):
    """One row per head: theta and strength equal the tensors; rank is the position in the ranking."""
    df = mask.to_pandas()
    assert list(df.columns) == ["layer", "head", "theta", "strength", "rank"]
    assert len(df) == N_LAYERS * N_HEADS
    for row in df.itertuples():
        assert row.theta == mask.theta[row.layer, row.head].item()
        assert row.strength == mask.strengths[row.layer, row.head].item()
        assert mask.ranking[row.rank - 1] == (row.layer, row.head)
    assert sorted(df["rank"]) == list(range(1, N_LAYERS * N_HEADS + 1))


# --------------------------------------------------------------------------- plot


def _image(fig: Figure) -> np.ndarray:
    assert isinstance(fig, Figure)
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 1
    return np.ma.filled(images[0].get_array().astype(float), np.nan)


def test_ships_plot_is_the_mean_heatmap(ships_res):
    """plot() draws one layers × heads image holding each head's mean score (kl, or refusal)."""
    img = _image(ships_res.plot())
    assert img.shape == (N_LAYERS, N_HEADS)
    assert np.allclose(img, ships_res.mean("kl").double().numpy(), rtol=1e-6, equal_nan=True)
    assert np.isnan(img[1, 2])
    img = _image(ships_res.plot(metric="refusal"))
    assert np.allclose(img, ships_res.mean("refusal").double().numpy(), rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("which", ["sahara_res", "search_res"])
def test_search_plot_is_a_step_heatmap(request, which):
    """plot(step) draws that step's candidate scores as a layers × heads image (default: last step)."""
    res = request.getfixturevalue(which)
    for step in (1, len(res.steps)):
        img = _image(res.plot(step=step))
        assert img.shape == (N_LAYERS, N_HEADS)
        assert _same(img, res.steps[step - 1].as_matrix(N_LAYERS, N_HEADS).double().numpy())
    assert _same(_image(res.plot()), res.steps[-1].as_matrix(N_LAYERS, N_HEADS).double().numpy())
    with pytest.raises(ValueError, match="step"):
        res.plot(step=len(res.steps) + 1)


def test_evaluation_plot_has_one_bar_per_condition(ev):
    """plot() is the report's attack-success figure: one bar per condition at its ASR, and an
    over-refusal panel with one bar per harmless condition at its rate."""
    fig = ev.plot()
    assert isinstance(fig, Figure)
    ax_asr, ax_over = fig.axes[0], fig.axes[1]
    assert [b.get_height() for b in ax_asr.patches[: len(ev.conditions)]] == pytest.approx([c.asr for c in ev.conditions])
    heights = [b.get_height() for b in ax_over.patches[: len(ev.over_refusal)]]
    assert heights == pytest.approx([c.refusal_rate for c in ev.over_refusal])


def test_mask_plot_is_the_strength_heatmap(mask):
    """plot() draws the learned strengths as a layers × heads image."""
    img = _image(mask.plot())
    assert img.shape == (N_LAYERS, N_HEADS)
    assert np.allclose(img, mask.strengths.double().numpy(), rtol=1e-6)


# --------------------------------------------------------------------------- _repr_html_


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.open: list[str] = []
        self.imgs: list[dict] = []
        self.cells: list[str] = []
        self.text = ""
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        else:
            self.open.append(tag)
        self._in_cell = tag in ("td", "th")
        if self._in_cell:
            self.cells.append("")

    def handle_startendtag(self, tag, attrs):  # <img .../>: a void element, nothing to close
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()
        self._in_cell = False

    def handle_data(self, data):
        self.text += data
        if self._in_cell:
            self.cells[-1] += data


def _parse(text: str) -> _Collect:
    p = _Collect()
    p.feed(text)
    p.close()
    assert not p.open, f"unclosed tags {p.open}"
    return p


@pytest.mark.parametrize("which", ["ships_res", "sahara_res", "search_res", "ev", "mask"])
def test_repr_html_parses_with_a_table_and_a_png(request, which):
    """_repr_html_ is well-formed HTML (every tag closed in order) holding a table and one inline
    PNG (base64 that decodes to a PNG file)."""
    obj = request.getfixturevalue(which)
    p = _parse(obj._repr_html_())
    assert "table" in p.tags and "td" in p.tags
    assert len(p.imgs) == 1
    src = p.imgs[0]["src"]
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_repr_html_tables_hold_the_results(ships_res, sahara_res, ev, mask):
    """The tables show the numbers: Ships' top head by mean KL, Sahara's chosen heads, every
    condition's name, the mask's top head."""
    la, h = ships_res.dataset_top(1)[0]
    assert f"L{la}H{h}" in _parse(ships_res._repr_html_()).cells
    cells = _parse(sahara_res._repr_html_()).cells
    assert [c for c in cells if c.startswith("L")] == [f"L{a}H{b}" for a, b in sahara_res.heads]
    cells = _parse(ev._repr_html_()).cells
    assert {c.name for c in ev.conditions + ev.over_refusal} <= set(cells)
    la, h = mask.ranking[0]
    assert f"L{la}H{h}" in _parse(mask._repr_html_()).cells


def test_repr_html_escapes_text(ev):
    """A condition name with markup is escaped, so the HTML still parses and shows it as text."""
    bad = Evaluation(judge="<b>j</b>", mode=ev.mode, eps=ev.eps, prompt_format=ev.prompt_format,
                     max_new_tokens=ev.max_new_tokens, n_prompts=ev.n_prompts,
                     conditions=[ev.conditions[0].__class__(**{**ev.conditions[0].__dict__, "name": "<x>&"})])
    p = _parse(bad._repr_html_())
    assert "<x>&" in p.cells
    assert "<b>j</b>" in p.text and p.tags.count("b") == 1  # the title's own <b>, not the judge's


# --------------------------------------------------------------------------- load_run


def test_load_run_gives_the_result_objects(tmp_path, ships_res, sahara_res, search_res, ev, mask):
    """A run folder read by sh.load_run gives result objects whose frames equal the originals'
    (the evaluation through RunData.evaluation_result, responses and refusal metric included)."""
    ships_res.save(tmp_path / "ships")
    sahara_res.save(tmp_path / "sahara.json")
    search_res.save(tmp_path / "search.json")
    ev.save(tmp_path)
    run = sh.load_run(tmp_path)
    assert run.ships.to_pandas().equals(ships_res.to_pandas())
    assert run.sahara.to_pandas().equals(sahara_res.to_pandas())
    assert run.search.to_pandas().equals(search_res.to_pandas())
    assert isinstance(run.evaluation, dict)  # what report.py reads stays a dict
    assert isinstance(run.evaluation_result, Evaluation)
    assert run.evaluation_result.to_pandas().equals(ev.to_pandas())
    mask.save(tmp_path / "mask")
    assert HeadMaskResult.load(tmp_path / "mask").to_pandas().equals(mask.to_pandas())
    (tmp_path / "empty").mkdir()
    assert sh.load_run(tmp_path / "empty").evaluation_result is None
