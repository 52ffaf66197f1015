"""Refusal direction: the difference of means equals a hand computation, the heads' direct
contributions plus the other residual writers add up to the residual stream's projection, and the
layer selection scores are what they claim.

Tiny random float64 models (3 layers × 4 query heads, 2 kv heads; phi3 with fused qkv, gpt2 with
Conv1D and position embeddings, gemma2 with a post-attention norm) and the SmolLM2 chat template.
Every equivalence is float64 against an independent computation, at rtol 1e-9 / atol 1e-9 (the
quantities are O(1)-O(10); float64 rounding is ~1e-14 relative).
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_lm import PROMPTS, refusal_ids, smol_tokenizer, tiny_lm

from safetyheads.adapters import get_adapter
from safetyheads.prompts import encode_prompts, format_prompts
from safetyheads.refusal_direction import (
    POST_ATTENTION_NORM,
    RefusalDirection,
    head_contributions,
    refusal_direction,
)

HARMLESS = ["What is the capital of France?", "Write a short poem about the sea.", "How do I bake bread?",
            "Name three prime numbers.", "Tell me a fun fact about cats."]
TOL = dict(rtol=1e-9, atol=1e-9)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="session")
def tok():
    return smol_tokenizer()


@pytest.fixture(scope="module")
def qwen2(tok):
    return tiny_lm("qwen2", len(tok), dtype=torch.float64)


def _hidden_after_each_layer(model, tok, prompts) -> torch.Tensor:
    """[n, L, d] residual stream after every decoder block at the last position, one prompt at a time."""
    layers = get_adapter(model).layers
    out = []
    for text in format_prompts(tok, prompts):
        enc = encode_prompts(tok, [text])
        got = {}
        hs = [layer.register_forward_hook(lambda m, a, o, i=i, got=got: got.__setitem__(i, o[0, -1].clone()))
              for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        finally:
            for h in hs:
                h.remove()
        out.append(torch.stack([got[i] for i in range(len(layers))]))
    return torch.stack(out).double()


def test_difference_of_means_equals_hand_computation(qwen2, tok):
    """diffs[l] = mean over harmful − mean over harmless of the last-position state after block l
    (prompts run one at a time, no padding); direction = the chosen layer's diff, normalised."""
    rd = refusal_direction(qwen2, tok, PROMPTS, HARMLESS, batch_size=3, max_layer_frac=1.0)
    h, s = _hidden_after_each_layer(qwen2, tok, PROMPTS), _hidden_after_each_layer(qwen2, tok, HARMLESS)
    torch.testing.assert_close(rd.diffs, h.mean(0) - s.mean(0), **TOL)
    torch.testing.assert_close(rd.raw, rd.diffs[rd.layer], rtol=0, atol=0)
    torch.testing.assert_close(rd.direction, rd.raw / rd.raw.norm(), **TOL)
    assert rd.layer == int(torch.argmax(rd.separation))


def test_separation_is_cross_fitted_cohens_d(qwen2, tok):
    """The separation score of a layer: fit on even positions, score odd ones, and vice versa; mean of the two
    Cohen's d (difference of projection means over the pooled standard deviation)."""
    rd = refusal_direction(qwen2, tok, PROMPTS, HARMLESS, max_layer_frac=1.0)
    h, s = _hidden_after_each_layer(qwen2, tok, PROMPTS), _hidden_after_each_layer(qwen2, tok, HARMLESS)
    for layer in range(3):
        ds = []
        for fit in (0, 1):
            d = h[fit::2, layer].mean(0) - s[fit::2, layer].mean(0)
            r = d / d.norm()
            a, b = h[1 - fit::2, layer] @ r, s[1 - fit::2, layer] @ r
            ds.append(float((a.mean() - b.mean()) / ((a.var() + b.var()) / 2).sqrt()))
        assert float(rd.separation[layer]) == pytest.approx(sum(ds) / 2, rel=1e-9)


def _writes(model, arch, tok, prompts):
    """Per prompt, at the last position: resid entering layer 0, each layer's attention write and MLP write
    (after the post-norms where the architecture has them), and the residual after each block."""
    ad = get_adapter(model)
    post = POST_ATTENTION_NORM.get(ad.geometry.model_type)
    rows = []
    for text in format_prompts(tok, prompts):
        enc = encode_prompts(tok, [text])
        got: dict = {}
        hs = [ad.layers[0].register_forward_pre_hook(
            lambda m, a, k, got=got: got.__setitem__("pre", (a[0] if a else k["hidden_states"])[0, -1].clone()),
            with_kwargs=True)]
        for i, layer in enumerate(ad.layers):
            attn_site = getattr(layer, post) if post else ad.attns[i]
            mlp_site = layer.post_feedforward_layernorm if post else layer.mlp
            hs.append(attn_site.register_forward_hook(
                lambda m, a, o, i=i, got=got: got.__setitem__(("attn", i), (o[0] if isinstance(o, tuple) else o)[0, -1].clone())))
            hs.append(mlp_site.register_forward_hook(lambda m, a, o, i=i, got=got: got.__setitem__(("mlp", i), o[0, -1].clone())))
            hs.append(layer.register_forward_hook(lambda m, a, o, i=i, got=got: got.__setitem__(("post", i), o[0, -1].clone())))
        try:
            with torch.no_grad():
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        finally:
            for h in hs:
                h.remove()
        rows.append(got)
    return rows


@pytest.mark.parametrize("arch", ["qwen2", "llama-bias", "phi3", "gpt2", "gemma2"])
def test_head_contributions_decompose_the_residual_projection(tok, arch):
    """For every prompt and layer l: Σ_h c[l, h] + the o-projection bias's share = the attention block's write
    projected on r; and r·resid_after(l) = r·resid_in(0) + Σ_{l'≤l} (attention write + MLP write) · r. Checked
    per prompt (batched contributions vs unbatched hooks) for GQA (qwen2), o bias (llama-bias), fused qkv
    (phi3), Conv1D + position embeddings (gpt2) and a post-attention norm (gemma2, frozen norm scale)."""
    model = tiny_lm(arch, len(tok), dtype=torch.float64)
    ad = get_adapter(model)
    g = ad.geometry
    r = torch.randn(model.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    r = r / r.norm()
    # the tiny gemma2's sliding window (5) leaves left-padded query rows with no visible key (NaN rows whose
    # values then meet zero attention weights: NaN); real models' windows are longer than the padding
    c = head_contributions(model, tok, PROMPTS, r, per_prompt=True, batch_size=1 if arch == "gemma2" else 3)
    assert c.shape == (len(PROMPTS), g.n_layers, g.n_heads) and not torch.isnan(c).any()
    rows = _writes(model, arch, tok, PROMPTS)
    for i, got in enumerate(rows):
        total = float(got["pre"] @ r)
        for layer in range(g.n_layers):
            bias = getattr(ad.o_module(layer), "bias", None)
            if arch in ("gemma2",):
                assert bias is None
            share = 0.0 if bias is None else float(bias.detach().double() @ r)
            attn = float(got[("attn", layer)] @ r)
            assert float(c[i, layer].sum()) + share == pytest.approx(attn, rel=1e-9, abs=1e-9)
            total += attn + float(got[("mlp", layer)] @ r)
            assert float(got[("post", layer)] @ r) == pytest.approx(total, rel=1e-9, abs=1e-9)


def test_heads_above_the_layer_are_nan_and_harmless_is_subtracted(qwen2, tok):
    r = torch.ones(64, dtype=torch.float64)
    full = head_contributions(qwen2, tok, PROMPTS, r)
    low = head_contributions(qwen2, tok, PROMPTS, r, layer=1)
    assert torch.isnan(low[2]).all() and not torch.isnan(low[:2]).any()
    torch.testing.assert_close(low[:2], full[:2], rtol=0, atol=0)
    rel = head_contributions(qwen2, tok, PROMPTS, r, harmless=HARMLESS)
    torch.testing.assert_close(rel, full - head_contributions(qwen2, tok, HARMLESS, r), **TOL)


def test_result_contributions_rank_and_roundtrip(qwen2, tok, tmp_path):
    """RefusalDirection.contributions = mean harmful − mean harmless direct contributions on its own
    direction and layer; top_heads ranks them most positive first; save/load keeps everything."""
    rd = refusal_direction(qwen2, tok, PROMPTS, HARMLESS, max_layer_frac=1.0)
    expect = head_contributions(qwen2, tok, PROMPTS, rd, harmless=HARMLESS)
    torch.testing.assert_close(rd.contributions, expect, rtol=0, atol=0, equal_nan=True)
    top = rd.top(3)
    vals = [v for _, _, v in top]
    assert vals == sorted(vals, reverse=True)
    assert vals[0] == float(torch.nan_to_num(rd.contributions, nan=-math.inf).max())
    assert rd.top_heads(3) == [(a, b) for a, b, _ in top]
    rd.save(tmp_path / "rd")
    back = RefusalDirection.load(tmp_path / "rd")
    assert back.layer == rd.layer and back.select == rd.select and back.top_heads(5) == rd.top_heads(5)
    torch.testing.assert_close(back.direction, rd.direction, rtol=0, atol=0)
    assert back.provenance["model"]["model_type"] == "qwen2"


def test_ablation_selection_equals_independent_projection(qwen2, tok):
    """select='ablation': each candidate layer's score is the drop of the mean refusal log-odds when its unit
    direction is removed from the residual stream everywhere — here recomputed by projecting it out of the
    embedding output and every block's output (an equivalent placement of the same projection)."""
    rt = refusal_ids(tok)
    rd = refusal_direction(qwen2, tok, PROMPTS, HARMLESS, select="ablation", refusal_tokens=rt, max_layer_frac=0.6)
    assert torch.isnan(rd.scores[2]) and not torch.isnan(rd.scores[:2]).any()  # 2 >= 0.6 * 3
    ad = get_adapter(qwen2)

    def mean_logodds(r=None):
        vals = []
        for text in format_prompts(tok, PROMPTS):
            enc = encode_prompts(tok, [text])
            hs = []
            if r is not None:
                def proj(m, a, o):
                    return o - (o @ r)[..., None] * r
                hs = [m.register_forward_hook(proj) for m in (qwen2.get_input_embeddings(), *ad.layers)]
            try:
                with torch.no_grad():
                    lg = qwen2(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, -1].double()
            finally:
                for h in hs:
                    h.remove()
            inside = torch.zeros_like(lg, dtype=torch.bool)
            inside[rt] = True
            vals.append(float(torch.logsumexp(lg[inside], 0) - torch.logsumexp(lg[~inside], 0)))
        return sum(vals) / len(vals)

    base = mean_logodds()
    for layer in (0, 1):
        r = rd.diffs[layer] / rd.diffs[layer].norm()
        assert float(rd.ablation[layer]) == pytest.approx(base - mean_logodds(r), rel=1e-9, abs=1e-9)
    assert rd.layer == max((0, 1), key=lambda i: float(rd.ablation[i]))


@pytest.mark.parametrize("kwargs, match", [
    ({"select": "best"}, "unknown select"),
    ({"select": "ablation"}, "needs refusal_tokens"),
    ({"max_layer_frac": 0.0}, "max_layer_frac"),
])
def test_bad_arguments_are_rejected(qwen2, tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        refusal_direction(qwen2, tok, PROMPTS, HARMLESS, **kwargs)
    with pytest.raises(ValueError, match="at least 2"):
        refusal_direction(qwen2, tok, PROMPTS[:1], HARMLESS)
    with pytest.raises(ValueError, match="entries"):
        head_contributions(qwen2, tok, PROMPTS, torch.ones(7))
