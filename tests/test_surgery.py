"""save_surgery on the fused-projection architectures, checked through a plain-transformers reload.

Phi-3 keeps q, k and v in one ``qkv_proj`` Linear ([out, in]: q rows first); GPT-2 keeps them in one
``c_attn`` Conv1D stored the other way round ([in, out]: q columns first) and its o projection
``c_proj`` is a Conv1D too. A wrong slice (k or v instead of q, rows instead of columns, the wrong
head) is a different model that still loads and runs; only comparing the reloaded checkpoint with
the hooked model (:func:`safetyheads.ablate`, which never touches weights) catches it.

Everything runs in float64, so the two computations — ``(W·ε)x`` in the saved weights and ``ε·(Wx)``
in the hook — differ only by float64 rounding (measured <= 5e-15 on logits of magnitude ~5); the tolerance
TOL sits far below the ablation's own effect, which each test also asserts.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from tiny_models import VOCAB, tiny_model

from safetyheads import ablate
from safetyheads.forward import position_ids_from_mask
from safetyheads.surgery import save_surgery

TOL = 1e-12  # float64: two roundings of the same product (measured <= 5e-15) on logits of magnitude ~5
HEADS = [(0, 1), (1, 3), (2, 0)]  # every layer; heads 1 and 3 sit in different kv groups
EPS = {"ua": 1e-3, "sc": 0.3, "zero": 0.0}
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "how", "do", "i", "make", "bread", "please", "help", "me"]


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary, built offline with ``tokenizers``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                      unk_token="[UNK]")


def logits64(model, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
@pytest.mark.parametrize("mode", ["ua", "sc", "zero"])
def test_saved_surgery_reloads_equal_to_hooked_model(tmp_path, tokenizer, arch, mode):
    """save_surgery → AutoModelForCausalLM.from_pretrained == the hooked model, in float64; tokenizer saved.

    Catches: the wrong slice of a fused qkv / Conv1D weight (k or v rows, transposed Conv1D
    indexing, the q bias left unscaled), a mode written into the wrong projection, a checkpoint that
    plain transformers cannot load, a missing or different tokenizer, a record that names other heads,
    and an original model left edited after saving."""
    model = tiny_model(arch).double()
    texts = ["how do i make bread please help me", "the cat sat on the mat and a dog sat"]
    ids = torch.tensor([tokenizer(t)["input_ids"][:7] for t in texts])
    plain = logits64(model, ids)
    with ablate(model, HEADS, mode=mode, eps=EPS[mode]):
        hooked = logits64(model, ids)
    effect = (hooked - plain).abs().max().item()
    assert effect > 1e-3, f"the ablation barely changes the logits ({effect}): the comparison would be vacuous"

    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_surgery(model, tokenizer, HEADS, tmp_path / "cut", mode=mode, eps=EPS[mode],
                        provenance={"model": f"tiny:{arch}"})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "save_surgery left the model edited"

    loaded = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    assert type(loaded).__name__ == type(model).__name__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.modules())  # plain transformers
    reloaded = logits64(loaded, ids)
    gap = (reloaded - hooked).abs().max().item()
    assert gap < TOL, f"{arch} {mode}: reloaded checkpoint differs from the hooked model by {gap:.3g}"

    tok2 = tf.AutoTokenizer.from_pretrained(path)
    for t in texts + ["unknownword the mat"]:
        assert tok2(t)["input_ids"] == tokenizer(t)["input_ids"]
    assert tok2.pad_token == "[PAD]" and tok2.eos_token == "</s>"

    record = json.loads((path / "safetyheads_surgery.json").read_text())
    assert record["heads"] == [list(h) for h in HEADS]
    assert record["mode"] == mode and record["eps"] == EPS[mode] and record["model"] == f"tiny:{arch}"
    assert record["model_type"] == arch


@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_surgery_touches_only_the_heads_slices(tmp_path, arch):
    """Only the ablated heads' q slice (UA) / o-projection input slice (SC) differ in the saved weights.

    Catches an edit that spills into k / v of the fused projection or into a neighbouring head,
    which could leave the logits of a short prompt close enough to pass by chance."""
    from safetensors.torch import load_file

    model = tiny_model(arch).double()
    d = model.config.hidden_size // model.config.num_attention_heads
    layer, head = 1, 2
    for mode, eps in (("ua", 0.5), ("sc", 0.5)):
        path = save_surgery(model, None, [(layer, head)], tmp_path / mode, mode=mode, eps=eps)
        saved = load_file(str(path / "model.safetensors"))
        orig = model.state_dict()
        changed = sorted(k for k in saved if not torch.equal(saved[k], orig[k]))
        if arch == "phi3":
            want = [f"model.layers.{layer}.self_attn.qkv_proj.weight"] if mode == "ua" else \
                [f"model.layers.{layer}.self_attn.o_proj.weight"]
        else:
            want = [f"transformer.h.{layer}.attn.c_attn.bias", f"transformer.h.{layer}.attn.c_attn.weight"] \
                if mode == "ua" else [f"transformer.h.{layer}.attn.c_proj.weight"]
        assert changed == want, (mode, changed)
        w_new, w_old = saved[want[-1]], orig[want[-1]]
        sl = slice(head * d, (head + 1) * d)
        # Linear stores [out, in], Conv1D [in, out]: the head's q outputs (UA) or o inputs (SC)
        if (arch == "phi3") == (mode == "ua"):
            diff_idx = (w_new != w_old).any(dim=1).nonzero().flatten()
        else:
            diff_idx = (w_new != w_old).any(dim=0).nonzero().flatten()
        assert diff_idx.tolist() == list(range(sl.start, sl.stop)), (mode, diff_idx.tolist())
