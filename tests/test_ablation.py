"""The ablation engine, checked on tiny random models of every supported architecture.

Each test states the property it checks. Tolerances: float32 throughout; "exact" means
bit-identical (torch.equal); otherwise the stated atol on logits of magnitude ~1-10.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, SURGERY_UA_ARCHS, random_ids, tiny_model

from safetyheads import ablate, head_geometry, head_means, surgery
from safetyheads.ablation import ablate_strengths
from safetyheads.adapters import UnsupportedArchitectureError, get_adapter
from safetyheads.forward import position_ids_from_mask
from safetyheads.surgery import SurgeryError, save_surgery, surgery_applied

ATOL = 1e-5  # float32 agreement between two computations of the same ablation
HEADS = [(0, 1), (1, 3), (2, 0)]  # touches every layer, both kv groups


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, tiny_model(request.param)


def logits(model, ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits.float()


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
    (computed from v directly; sliding windows respected). The gap is O(ε): measured ~1e-4 at
    ε = 1e-5 and ~5e-6 at ε = 1e-7 on these models (logits up to ~7)."""
    _, model = arch_model
    ids = random_ids(2, 12, seed=1)
    with ablate(model, HEADS, mode="ua-limit"):
        lim = logits(model, ids)
    gaps = []
    for eps in (1e-3, 1e-7):
        with ablate(model, HEADS, mode="ua", eps=eps):
            gaps.append((logits(model, ids) - lim).abs().max().item())
    assert gaps[1] < 2e-5
    assert gaps[0] > 100 * gaps[1]  # the gap shrinks with ε: the limit is the right one


def test_ua_limit_with_left_padding(arch_model):
    """The running-mean reference ignores left padding when given the mask, like UA itself."""
    _, model = arch_model
    ids = random_ids(2, 10, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with ablate(model, HEADS, mode="ua", eps=1e-7):
        ua = logits(model, ids, mask)[:, -1]
    with ablate(model, HEADS, mode="ua-limit", attention_mask=mask):
        lim = logits(model, ids, mask)[:, -1]
    torch.testing.assert_close(ua, lim, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", SURGERY_UA_ARCHS)
def test_ua_hook_equals_weight_surgery(arch):
    """UA by hooking the final query == UA written into W_q rows and q bias."""
    model = tiny_model(arch)
    ids = random_ids(2, 12, seed=3)
    with ablate(model, HEADS, mode="ua", eps=1e-3):
        hooked = logits(model, ids)
    cut = surgery(model, HEADS, mode="ua", eps=1e-3)
    torch.testing.assert_close(logits(cut, ids), hooked, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "olmo2"])
def test_ua_surgery_refused_with_q_norm(arch):
    """A q norm after W_q would undo a weight scale: surgery says so instead of being wrong."""
    with pytest.raises(SurgeryError, match="q norm"):
        surgery(tiny_model(arch), [(0, 0)], mode="ua")


def test_sc_hook_equals_o_proj_column_surgery(arch_model):
    """SC by hook (o_proj input slice × ε) == SC by scaling the head's columns of W_o."""
    _, model = arch_model
    ids = random_ids(2, 12, seed=4)
    with ablate(model, HEADS, mode="sc", eps=0.3):
        hooked = logits(model, ids)
    with surgery_applied(model, HEADS, mode="sc", eps=0.3):
        cut = logits(model, ids)
    torch.testing.assert_close(cut, hooked, atol=ATOL, rtol=0)


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
    """mean mode == a plain hook writing the float64 dataset mean into the head's o_proj input."""
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
        torch.testing.assert_close(logits(model, ids), manual, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["ua", "sc", "ua-limit"])
def test_per_row_equals_one_row_at_a_time(arch_model, mode):
    """Row i of a batched forward with rows=[...] == a batch-1 forward ablating rows[i] alone."""
    _, model = arch_model
    ids = random_ids(1, 11, seed=8).expand(4, -1)
    rows = [[(0, 0)], [(1, 2), (2, 3)], [], [(2, 1)]]
    with ablate(model, rows=rows, mode=mode, eps=1e-2):
        batched = logits(model, ids)
    for i, heads in enumerate(rows):
        with ablate(model, heads, mode=mode, eps=1e-2):
            single = logits(model, ids[:1])
        torch.testing.assert_close(batched[i:i + 1], single, atol=ATOL, rtol=0)


def test_left_padding_does_not_change_ablated_logits(arch_model):
    """A left-padded prompt under UA gives the same last-token logits as the same prompt unpadded."""
    _, model = arch_model
    ids = random_ids(1, 8, seed=9)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    with ablate(model, HEADS, mode="ua"):
        a = logits(model, ids)[:, -1]
        b = logits(model, padded, mask)[:, -1]
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["ua", "sc"])
def test_generation_with_cache_equals_without(arch_model, mode):
    """generate() under ablation with a KV cache == without a cache (greedy), per-row too."""
    _, model = arch_model
    ids = random_ids(2, 6, seed=10)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with ablate(model, rows=[[(0, 1), (2, 2)], [(1, 0)]], mode=mode, eps=1e-5):
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **kw)
        uncached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert not torch.equal(cached, plain) or mode == "sc"  # ablation visible in what is generated


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
    """A strength tensor with requires_grad gives d(output)/d(strength) (attribution patching)."""
    _, model = arch_model
    ids = random_ids(1, 10, seed=11)
    g = head_geometry(model)
    s = torch.zeros(1, g.n_layers, g.n_heads, requires_grad=True)
    with ablate_strengths(model, s, mode="ua-limit"):
        out = model(input_ids=ids).logits[0, -1, 5]
    (grad,) = torch.autograd.grad(out, s)
    h = 1e-3
    s2 = torch.zeros(1, g.n_layers, g.n_heads)
    s2[0, 1, 2] = h
    with torch.no_grad(), ablate_strengths(model, s2, mode="ua-limit"):
        out2 = model(input_ids=ids).logits[0, -1, 5]
    fd = (out2 - out.detach()) / h
    torch.testing.assert_close(grad[0, 1, 2], fd, atol=5e-3, rtol=2e-2)


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


def test_saved_surgery_loads_in_plain_transformers(tmp_path, llama):
    """save_surgery writes a checkpoint that AutoModelForCausalLM loads, equal to the hooked model."""
    import transformers as tf
    ids = random_ids(1, 9, seed=12)
    with ablate(llama, [(1, 1)], mode="ua", eps=1e-3):
        hooked = logits(llama, ids)
    before = state(llama)
    path = save_surgery(llama, None, [(1, 1)], tmp_path / "cut", mode="ua", eps=1e-3)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    loaded = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(logits(loaded, ids), hooked, atol=ATOL, rtol=0)
    assert (path / "safetyheads_surgery.json").exists()
