"""Planting refusal into chosen heads trains only those heads' q rows / o columns (tiny models, 2 steps)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_ids, tiny_model

from safetyheads.planted import PlantConfig, PlantError, plant_heads, trainable_slices


def _examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    ids = random_ids(n, 9, seed=seed)
    return [(row[:6].tolist(), row[6:].tolist()) for row in ids]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


@pytest.mark.parametrize("arch", ["llama", "llama-bias", "qwen2"])
def test_training_touches_only_the_chosen_slices(arch):
    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    heads = [(0, 1), (2, 3)]  # tiny: 4 query heads of dim 16, 2 kv heads (groups of 2)
    res = plant_heads(model, heads, _examples(6, 1), _examples(6, 2), steps=2, batch_size=4, lr=1e-2, progress=False)
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    d = model.config.hidden_size // model.config.num_attention_heads
    changed_somewhere = set()
    for name, p in model.named_parameters():
        old, new = before[name], p.detach()
        allowed = torch.zeros_like(old, dtype=torch.bool)
        for layer, head in heads:
            rows = slice(head * d, (head + 1) * d)
            if name == f"model.layers.{layer}.self_attn.q_proj.weight" or name == f"model.layers.{layer}.self_attn.q_proj.bias":
                allowed[rows] = True
            if name == f"model.layers.{layer}.self_attn.o_proj.weight":
                allowed[:, rows] = True
        # every entry outside the chosen slices keeps its exact bits (k/v of the heads' groups included)
        assert torch.equal(_bits(old)[~allowed], _bits(new)[~allowed]), name
        if allowed.any():
            assert not torch.equal(old[allowed], new[allowed]), f"{name}: the chosen slice did not train"
            changed_somewhere.add(name.rsplit(".", 2)[-2])
    assert changed_somewhere >= {"q_proj", "o_proj"}
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored


def test_only_q_part_leaves_o_untouched():
    model = tiny_model("llama")
    o_before = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    plant_heads(model, [(1, 0)], _examples(4, 3), _examples(4, 4), parts=("q",), steps=2, batch_size=2, progress=False)
    assert torch.equal(_bits(o_before), _bits(model.model.layers[1].self_attn.o_proj.weight))


def test_an_interrupted_training_changes_nothing(monkeypatch):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = {"n": 0}
    real = torch.optim.Adam.step

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", boom)
    with pytest.raises(KeyboardInterrupt):
        plant_heads(model, [(0, 0)], _examples(4, 5), _examples(4, 6), steps=3, batch_size=2, progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(_bits(before[n]), _bits(p)), n
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_bad_settings_are_named():
    model = tiny_model("llama")
    with pytest.raises(PlantError, match="out of range"):
        trainable_slices(model, [(9, 0)])
    with pytest.raises(PlantError, match="parts"):
        trainable_slices(model, [(0, 0)], parts=("k",))
    with pytest.raises(PlantError, match="duplicate"):
        trainable_slices(model, [(0, 0), (0, 0)])
    with pytest.raises(PlantError, match="harmful and harmless"):
        plant_heads(model, [(0, 0)], [], _examples(2, 0), steps=1, batch_size=2)


def test_config_digest_tracks_every_setting():
    a = PlantConfig()
    assert a.digest() == PlantConfig().digest()
    assert PlantConfig(heads=((8, 2), (14, 5), (20, 6))).digest() != a.digest()
    assert PlantConfig(steps=61).digest() != a.digest()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_target_loss_equals_the_full_forward_cross_entropy(arch):
    """The loss unembeds only the target positions; it must equal the CE of the full logits."""
    from safetyheads.planted import _collate, _target_loss

    model = tiny_model(arch).double()
    batch = _collate(_examples(3, 7)[:2] + [([5, 6, 7], [8, 9, 10, 11, 12])], pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                            ignore_index=-100)
    torch.testing.assert_close(_target_loss(model, batch), ref, rtol=1e-12, atol=1e-12)
