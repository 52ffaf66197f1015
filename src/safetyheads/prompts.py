"""Prompt formats: one place that turns queries into model input, for every stage.

The paper attributes heads on the raw query or on a plain template without the chat template or
system prompt (a system prompt adds in-context safety); users of chat models expect the chat
template. All three are supported and named (:class:`PromptFormat`), and
:func:`prompt_format_info` records which one a result used.

``chat``
    ``tokenizer.apply_chat_template([system?, user], tokenize=False, add_generation_prompt=True)``.
    ``system_prompt=None`` keeps the template's default (Qwen2.5 and SmolLM2 insert their own
    default system prompt when none is given); ``system_prompt=""`` asks for no system prompt:
    the template is rendered both without a system message and with an empty one, and the shorter
    rendering is used (for Qwen/SmolLM that is an empty system turn instead of the default one;
    for Llama-2-style templates it is no ``<<SYS>>`` block at all; a template that rejects the
    system role falls back to no system message). Any other string is passed as the system
    message.
``template``
    ``TEMPLATE.format(query=q)``, i.e. ``"## Query: {q}\\n## Answer:"`` (the paper's template; also
    what the paper's public code generates from when it measures attack success).
``template-sahara``
    ``"## Query:{q}\\n## Answer:"`` (no space after the colon): the string the public code's
    Sahara attribution (``lib/Sahara/attribution.py``) feeds the model.
``template-ships``
    ``"## Query:{q} \\n## Answer:"`` (a space before the newline): the public code's Ships
    attribution with ``use_tem`` on (``lib/SHIPS/get_ships.py``; ``use_tem`` is off by default,
    which is ``raw``).
``raw``
    the query itself (tokenized with the tokenizer's defaults, so after BOS for tokenizers that
    add one, exactly as the public code's ``tokenizer(text)`` does).

For ``template`` and ``raw`` a non-empty ``system_prompt`` is prepended as ``system + "\\n\\n"``.

:func:`encode_prompts` tokenizes formatted texts for a batched forward pass or ``generate``: left
padding, an attention mask and matching position ids, and never a doubled BOS token (a chat
template that already writes the BOS text is encoded without special tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import Enum
from typing import Any

import torch

__all__ = [
    "TEMPLATE",
    "TEMPLATES",
    "PromptFormat",
    "encode_prompts",
    "format_prompts",
    "pad_left",
    "prompt_format_info",
    "prompt_token_ids",
]

TEMPLATE = "## Query: {query}\n## Answer:"
"""The paper's plain prompt template (SPEC §6)."""

TEMPLATES: dict[str, str] = {
    "template": TEMPLATE,
    "template-sahara": "## Query:{query}\n## Answer:",
    "template-ships": "## Query:{query} \n## Answer:",
}
"""The plain (non-chat) templates by format name; the variants are the public code's per-stage strings."""


class PromptFormat(str, Enum):
    """How a query is turned into the model's input text."""

    CHAT = "chat"
    TEMPLATE = "template"
    TEMPLATE_SAHARA = "template-sahara"
    TEMPLATE_SHIPS = "template-ships"
    RAW = "raw"

    @property
    def template(self) -> str | None:
        """The ``str.format`` template with a ``{query}`` field, or None for ``chat`` / ``raw``."""
        return TEMPLATES.get(self.value)

    @classmethod
    def parse(cls, fmt: PromptFormat | str) -> PromptFormat:
        """Accept a member or its name/value in any case; a clear error otherwise."""
        if isinstance(fmt, PromptFormat):
            return fmt
        try:
            return cls(str(fmt).strip().lower())
        except ValueError:
            raise ValueError(
                f"unknown prompt format {fmt!r}; choose one of {[f.value for f in cls]}"
            ) from None


def _check_queries(queries: Sequence[str], what: str = "query") -> list[str]:
    if isinstance(queries, str):
        raise TypeError(f"expected a sequence of {what} strings, got a single str")
    out = list(queries)
    for i, q in enumerate(out):
        if not isinstance(q, str):
            raise TypeError(f"{what} {i} is a {type(q).__name__}, not a str")
        if not q.strip():
            raise ValueError(f"{what} {i} is empty")
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):  # some versions return a list for batched input
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _chat(tokenizer: Any, query: str, system_prompt: str | None) -> str:
    user = {"role": "user", "content": query}
    if system_prompt is None:
        return _render(tokenizer, [user])
    if system_prompt == "":
        without = _render(tokenizer, [user])
        try:
            with_empty = _render(tokenizer, [{"role": "system", "content": ""}, user])
        except Exception:  # the template rejects a system role (raise_exception in Jinja)
            return without
        return with_empty if len(with_empty) < len(without) else without
    try:
        return _render(tokenizer, [{"role": "system", "content": system_prompt}, user])
    except Exception as e:
        raise ValueError(
            f"this tokenizer's chat template does not accept a system prompt ({e}); "
            "pass system_prompt=None or put the instruction in the query"
        ) from e


def format_prompts(
    tokenizer: Any,
    queries: Sequence[str],
    fmt: PromptFormat | str = "chat",
    *,
    system_prompt: str | None = None,
) -> list[str]:
    """Format queries as model input text.

    Args:
        tokenizer: a Hugging Face tokenizer (only used, and only required, for ``chat``).
        queries: the user queries (e.g. a :class:`~safetyheads.datasets.PromptSet`).
        fmt: ``"chat"``, ``"template"``, ``"template-sahara"``, ``"template-ships"`` or ``"raw"``
            (see the module docstring).
        system_prompt: ``None`` = the chat template's default, ``""`` = none, else this text.

    Returns:
        one formatted string per query.

    Raises:
        ValueError: an empty query, an unknown format, or ``chat`` with a tokenizer that has no
            chat template.
        TypeError: ``queries`` is a single string or holds non-strings.
    """
    form = PromptFormat.parse(fmt)
    qs = _check_queries(queries)
    if form is PromptFormat.CHAT:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
            raise ValueError(
                f"tokenizer {name!r} has no chat template, so the 'chat' prompt format is unavailable; "
                "use fmt='template' (the paper's '## Query: ... ## Answer:') or fmt='raw'"
            )
        return [_chat(tokenizer, q, system_prompt) for q in qs]
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    if form.template is not None:
        return [prefix + form.template.format(query=q) for q in qs]
    return [prefix + q for q in qs]


def prompt_token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of formatted prompts, unpadded, exactly as :func:`encode_prompts` feeds them.

    A text that already starts with the tokenizer's BOS text (chat templates such as Llama's
    write it) is encoded with ``add_special_tokens=False``; other texts use the tokenizer's
    default, so a raw or templated prompt still gets the BOS token a Llama-style tokenizer adds.
    """
    items = _check_queries(texts, what="text")
    if not items:
        raise ValueError("no texts to encode")
    bos_text = getattr(tokenizer, "bos_token", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    rows: list[list[int]] = []
    for t in items:
        starts_with_bos = bool(bos_text) and t.startswith(bos_text)
        ids = list(tokenizer(t, add_special_tokens=not starts_with_bos)["input_ids"])
        if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
            ids = ids[1:]  # the text began with BOS after all (e.g. leading whitespace)
        rows.append(ids)
    return rows


def pad_left(
    tokenizer: Any, rows: Sequence[Sequence[int]], *, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Token id lists as a left-padded batch (see :func:`encode_prompts`); padding uses
    ``pad_token_id``, else ``eos_token_id``, else 0."""
    if not rows:
        raise ValueError("no token rows to pad")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            input_ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            attention_mask[i, width - len(r) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def encode_prompts(
    tokenizer: Any, texts: Sequence[str], *, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize formatted prompts into a left-padded batch.

    A text that already starts with the tokenizer's BOS text (chat templates such as Llama's
    write it) is encoded with ``add_special_tokens=False``; other texts use the tokenizer's
    default, so a raw or templated prompt still gets the BOS token a Llama-style tokenizer adds.
    The tokenizer is not modified; padding uses ``pad_token_id``, else ``eos_token_id``, else 0.

    Returns:
        ``input_ids``, ``attention_mask`` (1 = token, 0 = left padding) and ``position_ids``
        (``cumsum(attention_mask) - 1`` clamped at 0), all ``int64`` of shape ``[batch, seq]``,
        on ``device`` if given.
    """
    return pad_left(tokenizer, prompt_token_ids(tokenizer, texts), device=device)


def prompt_format_info(
    fmt: PromptFormat | str, system_prompt: str | None = None, *, tokenizer: Any = None
) -> dict[str, Any]:
    """A JSON-able record of the prompt format a result used.

    Args:
        fmt: the prompt format.
        system_prompt: as passed to :func:`format_prompts`.
        tokenizer: if given and ``fmt`` is ``chat``, the sha256 of its chat template is recorded.
    """
    form = PromptFormat.parse(fmt)
    if system_prompt is None:
        mode = "template default" if form is PromptFormat.CHAT else "none"
    elif system_prompt == "":
        mode = "none"
    else:
        mode = "custom"
    info: dict[str, Any] = {
        "format": form.value,
        "template": form.template,
        "system_prompt": system_prompt,
        "system_prompt_mode": mode,
    }
    if form is PromptFormat.CHAT and tokenizer is not None:
        tpl = getattr(tokenizer, "chat_template", None)
        info["chat_template_sha256"] = (
            hashlib.sha256(tpl.encode()).hexdigest() if isinstance(tpl, str) else None
        )
    return info
