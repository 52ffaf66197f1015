"""The ablation engine, checked on tiny random models of every supported architecture.

Each test states the property it checks. The models run in float64 end to end
(``tiny_model(arch, dtype=torch.float64)``, see ``tiny_models.float64_model``), so two computations
of the same ablation agree to float64 rounding on any CPU and thread count: measured max relative
differences of the logits 0.4-3e-15 (batched vs one row, hook vs weight surgery, left padding).
They are asserted at ``RTOL = 1e-10`` relative to the largest |logit| — 1e5 above that noise and
1e4 below float32's, so a float32-sized discrepancy (a wrong cast, a wrong row) fails. "Exact"
means bit-identical (torch.equal). One test checks the batched ablation in float32, the precision
sweeps run in, against a noise floor measured in the same test.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, SURGERY_UA_ARCHS, float64_model, random_ids, tiny_model

from safetyheads import ablate, head_geometry, head_means, surgery
from safetyheads.ablation import ablate_strengths
from safetyheads.adapters import UnsupportedArchitectureError, get_adapter
from safetyheads.forward import position_ids_from_mask
from safetyheads.surgery import SurgeryError, save_surgery, surgery_applied

RTOL = 1e-10  # float64 agreement of two computations of the same ablation, relative to max |logit|
HEADS = [(0, 1), (1, 3), (2, 0)]  # touches every layer, both kv groups


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, tiny_model(request.param, dtype=torch.float64)


def logits(model, ids, mask=None):
    """All positions' logits, in the model's dtype."""
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


def assert_same(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """max |actual − expected| <= rtol · max |expected| (float64 logits: see the module docstring)."""
    assert actual.dtype == expected.dtype == torch.float64
    assert actual.shape == expected.shape
    err = float((actual - expected).abs().max() / expected.abs().max())
    assert err <= rtol, f"max relative difference {err:.3g} > {rtol:g}"


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in model.modules())


def test_no_ablation_is_bit_identical(arch_model):
    """ablate() with no heads, and a per-row ablation whose row is empty, change nothing."""
    _, model = arch_model
    ids = random_ids(2, 12)
    ref = logits(model, ids)
    with ablate(model, []):
        assert torch.equal(logits(model, ids), ref)
    with ablate(model, rows=[[(1, 2)], []]):
        assert torch.equal(logits(model, ids)[1], ref[1])
        assert not torch.equal(logits(model, ids)[0], ref[0])


@pytest.mark.parametrize("mode", ["ua", "sc", "zero", "ua-limit"])
def test_ablation_changes_output_and_restores(arch_model, mode):
    """Each mode changes the logits; after the block the logits are bit-identical again."""
    _, model = arch_model
    ids = random_ids(1, 12)
    ref = logits(model, ids)
    with ablate(model, HEADS, mode=mode, eps=1e-5 if mode != "zero" else 0.0):
        out = logits(model, ids)
    assert (out - ref).abs().max() > 1e-3
    assert torch.equal(logits(model, ids), ref)
    assert no_hooks_left(model)


def test_ua_small_eps_equals_running_mean_of_values(arch_model):
    """UA (query × ε) → replacing the head's output by the causal running mean of its values
    (``ua-limit``, computed from v directly; sliding windows respected), with a gap linear in ε:
    gap(1e-6) / gap(1e-8) = 100 to 1e-3 (measured 100.000 on every architecture; gap(1e-8) is
    2e-10-3e-9 × max|logit|, far above float64 noise). A limit off by any δ ≳ 1e-12 — a window or
    a position counted wrong — would stop the gap shrinking (a mistral without its window: 4.1)."""
    _, model = arch_model
    ids = random_ids(2, 12, seed=1)
    with ablate(model, HEADS, mode="ua-limit"):
        lim = logits(model, ids)
    gaps = []
    for eps in (1e-6, 1e-8):
        with ablate(model, HEADS, mode="ua", eps=eps):
            gaps.append((logits(model, ids) - lim).abs().max().item())
    assert gaps[1] > 1e-12 * lim.abs().max().item()  # well above float64 noise: the ratio is meaningful
    assert gaps[0] / gaps[1] == pytest.approx(100, rel=1e-3), gaps


def test_ua_limit_with_left_padding(arch_model):
    """The running-mean reference ignores left padding when given the mask, like UA itself: on the
    padded row, UA's gap to it shrinks linearly in ε (ratio 100 to 1e-3, as above), and the padded
    row's last-token ua-limit logits equal the unpadded prompt's (1e-10 relative)."""
    _, model = arch_model
    ids = random_ids(2, 10, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with ablate(model, HEADS, mode="ua-limit", attention_mask=mask):
        lim = logits(model, ids, mask)[:, -1]
    gaps = []
    for eps in (1e-6, 1e-8):
        with ablate(model, HEADS, mode="ua", eps=eps):
            gaps.append((logits(model, ids, mask)[:, -1] - lim).abs().max().item())
    assert gaps[0] / gaps[1] == pytest.approx(100, rel=1e-3), gaps
    with ablate(model, HEADS, mode="ua-limit"):
        unpadded = logits(model, ids[1:, 3:])[:, -1]
    assert_same(lim[1:], unpadded)


@pytest.mark.parametrize("arch", SURGERY_UA_ARCHS)
def test_ua_hook_equals_weight_surgery(arch):
    """UA by hooking the final query == UA written into W_q rows and q bias (1e-10 relative)."""
    model = tiny_model(arch, dtype=torch.float64)
    ids = random_ids(2, 12, seed=3)
    with ablate(model, HEADS, mode="ua", eps=1e-3):
        hooked = logits(model, ids)
    cut = surgery(model, HEADS, mode="ua", eps=1e-3)
    assert_same(logits(cut, ids), hooked)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "olmo2"])
def test_ua_surgery_refused_with_q_norm(arch):
    """A q norm after W_q would undo a weight scale: surgery says so instead of being wrong."""
    with pytest.raises(SurgeryError, match="q norm"):
        surgery(tiny_model(arch), [(0, 0)], mode="ua")


def test_sc_hook_equals_o_proj_column_surgery(arch_model):
    """SC by hook (o_proj input slice × ε) == SC by scaling the head's columns of W_o (1e-10 relative)."""
    _, model = arch_model
    ids = random_ids(2, 12, seed=4)
    with ablate(model, HEADS, mode="sc", eps=0.3):
        hooked = logits(model, ids)
    with surgery_applied(model, HEADS, mode="sc", eps=0.3):
        cut = logits(model, ids)
    assert_same(cut, hooked)


def test_sc_eps0_equals_zeroing_o_proj_input(arch_model):
    """SC with ε = 0 == zero mode == a plain hook that zeroes the head's o_proj input columns."""
    _, model = arch_model
    ids = random_ids(1, 12, seed=5)
    ad = get_adapter(model)
    d = ad.geometry.head_dim

    def zero_cols(head):
        def hook(module, args):
            z = args[0].clone()
            z[..., head * d:(head + 1) * d] = 0
            return (z,)
        return hook

    handles = [ad.o_module(layer).register_forward_pre_hook(zero_cols(head)) for layer, head in HEADS]
    try:
        manual = logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    with ablate(model, HEADS, mode="sc", eps=0.0):
        sc0 = logits(model, ids)
    with ablate(model, HEADS, mode="zero"):
        zero = logits(model, ids)
    assert torch.equal(sc0, manual)
    assert torch.equal(zero, manual)


def test_mean_mode_replaces_output_with_dataset_mean(arch_model):
    """mean mode == a plain hook writing the float64 dataset mean into the head's o_proj input
    (1e-10 relative)."""
    _, model = arch_model
    data = random_ids(4, 9, seed=6)
    mu = head_means(model, data)
    assert mu.dtype == torch.float64
    ids = random_ids(1, 12, seed=7)
    ad = get_adapter(model)
    d = ad.geometry.head_dim

    def put_mean(layer, head):
        def hook(module, args):
            z = args[0].clone()
            z[..., head * d:(head + 1) * d] = mu[layer, head].to(z.dtype)
            return (z,)
        return hook

    handles = [ad.o_module(layer).register_forward_pre_hook(put_mean(layer, head)) for layer, head in HEADS]
    try:
        manual = logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    with ablate(model, HEADS, mode="mean", mean=mu):
        assert_same(logits(model, ids), manual)


@pytest.mark.parametrize("mode", ["ua", "sc", "ua-limit"])
def test_per_row_equals_one_row_at_a_time(arch_model, mode):
    """Row i of a batched forward with rows=[...] == a batch-1 forward ablating rows[i] alone
    (1e-10 relative; measured <= 3e-15)."""
    _, model = arch_model
    ids = random_ids(1, 11, seed=8).expand(4, -1)
    rows = [[(0, 0)], [(1, 2), (2, 3)], [], [(2, 1)]]
    with ablate(model, rows=rows, mode=mode, eps=1e-2):
        batched = logits(model, ids)
    for i, heads in enumerate(rows):
        with ablate(model, heads, mode=mode, eps=1e-2):
            single = logits(model, ids[:1])
        assert_same(batched[i:i + 1], single)


def test_left_padding_does_not_change_ablated_logits(arch_model):
    """A left-padded prompt under UA gives the same last-token logits as the same prompt unpadded
    (1e-10 relative; measured <= 2e-15)."""
    _, model = arch_model
    ids = random_ids(1, 8, seed=9)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    with ablate(model, HEADS, mode="ua"):
        a = logits(model, ids)[:, -1]
        b = logits(model, padded, mask)[:, -1]
    assert_same(b, a)


def test_per_row_float32_within_measured_noise():
    """In float32 (the precision sweeps run in), row i of a batched per-row ablation differs from
    the batch-1 forward by rounding only: at most 4× the noise floor measured here — the same
    unablated forward, batch 4 vs batch 1 (other matmul kernels for other shapes) — or 4 float32
    ulps of the largest logit where that floor is 0. The floor itself is float32-sized (< 1e-5 ×
    max|logit|; measured 0-2e-6 depending on the CPU and thread count)."""
    model = tiny_model("llama")
    ids = random_ids(1, 11, seed=8).expand(4, -1)
    rows = [[(0, 0)], [(1, 2), (2, 3)], [], [(2, 1)]]
    plain_batched, plain_single = logits(model, ids), logits(model, ids[:1])
    scale = float(plain_single.abs().max())
    floor = float((plain_batched - plain_single).abs().max())
    assert floor < 1e-5 * scale, (floor, scale)
    bound = 4 * max(floor, 4 * torch.finfo(torch.float32).eps * scale)
    with ablate(model, rows=rows, mode="ua", eps=1e-2):
        batched = logits(model, ids)
    for i, heads in enumerate(rows):
        with ablate(model, heads, mode="ua", eps=1e-2):
            single = logits(model, ids[:1])
        err = float((batched[i:i + 1] - single).abs().max())
        assert err <= bound, (i, err, floor, bound)


@pytest.mark.parametrize("mode", ["ua", "sc"])
def test_generation_with_cache_equals_without(arch_model, mode):
    """generate() under a per-row ablation with a KV cache == without a cache (greedy, token-identical),
    == each row generated alone with the ablation written into the weights (surgery; UA only where
    it can be written), and != the unablated generation (the ablation is visible in the tokens)."""
    arch, model = arch_model
    ids = random_ids(2, 6, seed=10)
    rows = [[(0, 1), (2, 2)], [(1, 0)]]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with ablate(model, rows=rows, mode=mode, eps=1e-5):
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **kw)
        uncached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    if mode == "sc" or arch in SURGERY_UA_ARCHS:
        for i, heads in enumerate(rows):
            with surgery_applied(model, heads, mode=mode, eps=1e-5):
                cut = model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw)
            assert torch.equal(cut, cached[i:i + 1]), (i, cut, cached[i])
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert not torch.equal(cached, plain)


def test_model_unchanged_after_exception(arch_model):
    """An exception inside ablate() or surgery_applied() leaves weights, hooks and outputs as before."""
    arch, model = arch_model
    ids = random_ids(1, 8)
    before, ref = state(model), logits(model, ids)
    with pytest.raises(RuntimeError, match="boom"), ablate(model, HEADS, mode="ua"):
        raise RuntimeError("boom")
    mode = "ua" if arch in SURGERY_UA_ARCHS else "sc"
    with pytest.raises(RuntimeError, match="boom"), surgery_applied(model, HEADS, mode=mode, eps=0.5):
        raise RuntimeError("boom")
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert no_hooks_left(model)
    assert torch.equal(logits(model, ids), ref)


def test_gradient_of_strength_matches_finite_difference(arch_model):
    """A strength tensor with requires_grad gives d(output)/d(strength) (attribution patching): a
    central finite difference at ±1e-4 matches it to 1e-6 relative (its O(h²) error, measured
    <= 3e-8; float64 noise / h ~ 1e-11)."""
    _, model = arch_model
    ids = random_ids(1, 10, seed=11)
    g = head_geometry(model)
    s = torch.zeros(1, g.n_layers, g.n_heads, dtype=torch.float64, requires_grad=True)
    with ablate_strengths(model, s, mode="ua-limit"):
        out = model(input_ids=ids).logits[0, -1, 5]
    (grad,) = torch.autograd.grad(out, s)
    h = 1e-4
    vals = []
    for a in (h, -h):
        s2 = torch.zeros(1, g.n_layers, g.n_heads, dtype=torch.float64)
        s2[0, 1, 2] = a
        with torch.no_grad(), ablate_strengths(model, s2, mode="ua-limit"):
            vals.append(model(input_ids=ids).logits[0, -1, 5])
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(float(grad[0, 1, 2])) > 1e-3  # a derivative worth comparing
    torch.testing.assert_close(grad[0, 1, 2], fd, atol=0, rtol=1e-6)


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("heads, err, msg", [
    ([(3, 0)], IndexError, "layer 3 out of range"),
    ([(-1, 0)], IndexError, "layer -1 out of range"),
    ([(0, 4)], IndexError, "head 4 out of range"),
    ((0, 1), TypeError, "single pair"),
    ([(0,)], TypeError, "pair of ints"),
    (["a"], TypeError, "pair of ints"),
])
def test_bad_heads_are_clear_errors(llama, heads, err, msg):
    with pytest.raises(err, match=msg), ablate(llama, heads):
        pass


@pytest.mark.parametrize("mode, eps, msg", [
    ("ua", 0.0, "> 0"), ("ua", -1e-5, "> 0"), ("sc", -0.1, ">= 0"),
    ("ua", float("nan"), "finite"), ("sc", float("inf"), "finite"), ("bogus", 1e-5, "unknown ablation mode"),
])
def test_bad_eps_and_mode_are_clear_errors(llama, mode, eps, msg):
    with pytest.raises((ValueError, TypeError), match=msg), ablate(llama, [(0, 0)], mode=mode, eps=eps):
        pass


def test_mean_mode_without_means_is_an_error(llama):
    with pytest.raises(ValueError, match="head_means"), ablate(llama, [(0, 0)], mode="mean"):
        pass


def test_rows_must_match_batch(llama):
    with ablate(llama, rows=[[(0, 0)], [(1, 1)]]), pytest.raises(ValueError, match="rows"):
        logits(llama, random_ids(3, 5))
    assert no_hooks_left(llama)


def test_surgery_errors(llama):
    with pytest.raises(ValueError, match="at least one"):
        surgery(llama, [], mode="ua")
    with pytest.raises(SurgeryError, match="cannot be written"):
        surgery(llama, [(0, 0)], mode="mean")


def test_unsupported_architecture_names_what_is_needed():
    import transformers as tf
    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=32, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="final query"):
        head_geometry(model)


def test_saved_surgery_loads_in_plain_transformers(tmp_path):
    """save_surgery writes a float64 checkpoint that AutoModelForCausalLM loads (as float64), equal
    to the hooked model to 1e-10 relative; the model itself is left unchanged."""
    import transformers as tf
    model = tiny_model("llama", dtype=torch.float64)
    ids = random_ids(1, 9, seed=12)
    with ablate(model, [(1, 1)], mode="ua", eps=1e-3):
        hooked = logits(model, ids)
    before = state(model)
    path = save_surgery(model, None, [(1, 1)], tmp_path / "cut", mode="ua", eps=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loaded = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    assert loaded.dtype == torch.float64
    assert_same(logits(float64_model(loaded), ids), hooked)
    assert (path / "safetyheads_surgery.json").exists()
