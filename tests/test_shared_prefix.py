"""The shared prompt prefix: the tokens every prompt starts with (a chat template's system block) run
once per ablation and their KV cache stands in for them (``forward.SharedPrefix``).

Each path that uses it is compared with the same computation on whole prompts, in float64 on every
architecture the library supports (tolerance 1e-10 relative: the two differ only in summation order):
the search engine's readouts (hidden and logits, single heads from every layer, after a rebase onto
chosen heads) and the exact Ships sweep against the paper's naive loop on several prompts. gemma3's
sliding-window cache is not a plain cache: there the prefix is not shared, and the results must
still be right.
"""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_lm import PROMPTS, SHIPS_ARCHS, refusal_ids, smol_tokenizer, tiny_lm

from safetyheads.ablation import heads_to_strength
from safetyheads.adapters import get_adapter
from safetyheads.forward import SharedPrefix
from safetyheads.prompts import format_prompts, prompt_token_ids
from safetyheads.search import _Residuals
from safetyheads.ships import ships

ships_mod = sys.modules["safetyheads.ships"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

F64 = torch.float64


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))


def test_prefix_length_leaves_every_prompt_a_token(tok):
    rows = prompt_token_ids(tok, format_prompts(tok, PROMPTS))
    n = SharedPrefix.length(rows)
    assert n > 5 and all(r[:n] == rows[0][:n] for r in rows)  # the system block and more
    assert rows[0][n] != rows[1][n] or rows[0][n] != rows[2][n]  # … and not one token more
    assert SharedPrefix.length([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts keep their last token
    assert SharedPrefix.length([[1, 2], [3]]) == 0
    assert SharedPrefix.length([]) == 0


@pytest.mark.parametrize("arch", SHIPS_ARCHS)
@pytest.mark.parametrize("mode", ["ua", "mean"])
def test_search_readouts_equal_whole_prompts(tok, arch, mode):
    """_Residuals with and without the shared prefix: the unablated readout, every single-head
    ablation (heads in every layer, so the prefix is rerun from each layer), and after a rebase onto
    a chosen head (the cached prefix and residuals then carry that ablation)."""
    model = tiny_lm(arch, len(tok), dtype=F64, max_positions=256)
    texts = format_prompts(tok, PROMPTS)
    g = get_adapter(model).geometry
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(g.n_layers, g.n_heads, g.head_dim, generator=gen, dtype=F64) if mode == "mean" else None
    for readout in ("hidden", "logits"):
        whole = _Residuals(model, tok, texts, 3, True, readout, mean=mean, shared_prefix=False)
        shared = _Residuals(model, tok, texts, 3, True, readout, mean=mean, shared_prefix=True)
        assert (shared.prefix is None) == (arch == "gemma3")
        assert whole.prefix is None
        _close(shared.base, whole.base)
        for head in [(0, 1), (1, 3), (2, 0)]:
            s = heads_to_strength(model, [[head]])
            _close(shared.ablated(s, mode, 1e-5), whole.ablated(s, mode, 1e-5))
        chosen = heads_to_strength(model, [[(1, 2)]])
        for r in (whole, shared):
            r.rebase(chosen, mode, 1e-5)
        for head in [(0, 2), (2, 3)]:
            s = heads_to_strength(model, [[(1, 2), head]])
            _close(shared.ablated(s, mode, 1e-5), whole.ablated(s, mode, 1e-5))


@pytest.mark.parametrize("arch", SHIPS_ARCHS)
def test_exact_sweep_with_shared_prefix_equals_naive_loop(tok, arch, monkeypatch):
    """Several prompts (so the exact sweep shares their prefix, chunk by chunk): every head's KL and
    refusal score equal the paper's naive loop on whole prompts, at batch sizes 5 (chunks straddle
    layers) and 64."""
    model = tiny_lm(arch, len(tok), dtype=F64, max_positions=256)
    rt = refusal_ids(tok)
    prompts = PROMPTS[:3]
    ref = ships(model, tok, prompts, method="naive", refusal_tokens=rt, progress=False)
    assert (ref.kl > 1e-3).all()
    shared = []
    real = ships_mod._sweep_shared
    monkeypatch.setattr(ships_mod, "_sweep_shared", lambda *a: shared.append(len(a[2])) or real(*a))
    for bs in (5, 64):
        got = ships(model, tok, prompts, batch_size=bs, refusal_tokens=rt, progress=False)
        _close(got.kl, ref.kl)
        _close(got.refusal, ref.refusal)
    assert (not shared) == (arch == "gemma3") and all(n > 5 for n in shared)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lower_layers_runs_only_the_layers_below(tok, arch):
    """``forward.lower_layers``: the residual entering layers 0…stop equals a full forward's, and a cache
    passed in receives keys and values in the layers below ``stop`` only, equal to the full forward's."""
    from safetyheads.forward import cache_argument, captured_inputs, lower_layers, output_cache

    model = tiny_lm(arch, len(tok), dtype=F64, max_positions=256)
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    mask = torch.ones_like(ids)
    with torch.no_grad(), captured_inputs(model) as full_inputs:
        full = output_cache(model.base_model(input_ids=ids, attention_mask=mask, use_cache=True))
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        got = lower_layers(model, 2, input_ids=ids, attention_mask=mask, use_cache=True,
                           **{cache_argument(model.base_model.forward): cache})
    assert len(got) == 3
    for a, b in zip(got, full_inputs[:3]):
        _close(a, b)
    _close(cache.layers[1].keys, full.layers[1].keys)
    _close(cache.layers[0].values, full.layers[0].values)
    assert not cache.layers[2].is_initialized  # layer 2 never ran
    with pytest.raises(ValueError, match="stop must be in"):
        lower_layers(model, 0, input_ids=ids)
