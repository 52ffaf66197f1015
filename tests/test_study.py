"""bench/study.py's answer NLL (the column that tells a broken model from a jailbroken one)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_lm import PROMPTS, smol_tokenizer, tiny_lm

from safetyheads.config import RunConfig
from safetyheads.prompts import encode_prompts, format_prompts

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import study  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset", ["chat", "paper"])
def test_answer_nll_is_the_token_weighted_loss_on_the_answers(preset):
    """answer_nll == transformers' own loss with the prompt tokens masked out, token-weighted over
    answers, empty answers skipped; under each preset's eval format.

    Catches: an off-by-one between logits and answer tokens (the first answer token scored against the
    wrong position), prompts formatted in another format than generation used, averaging per answer
    instead of per token, and an empty answer that counts."""
    tok = smol_tokenizer()
    model = tiny_lm("llama", len(tok), dtype=torch.float64, max_positions=256)
    cfg = RunConfig(preset=preset, model="tiny")
    prompts, answers = PROMPTS[:3], [" Sure, here is how.", "", " I'm sorry, I can't help with that request."]
    got = study.answer_nll(model, tok, cfg, prompts, answers)
    texts = format_prompts(tok, prompts, cfg.stage_format("eval"), system_prompt=cfg.system_prompt)
    total = count = 0
    for text, ans in zip(texts, answers):
        a = tok(ans, add_special_tokens=False)["input_ids"]
        if not a:
            continue
        p = encode_prompts(tok, [text])["input_ids"][0].tolist()
        ids = torch.tensor([p + a])
        labels = torch.tensor([[-100] * len(p) + a])
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * len(a)
        count += len(a)
    # transformers' loss casts the logits to float32 (ForCausalLMLoss), so the reference is float32-exact only
    assert got == pytest.approx(total / count, rel=8 * torch.finfo(torch.float32).eps)
    assert study.answer_nll(model, tok, cfg, prompts[:1], [""]) is None
