"""Named sets of run settings: the paper's public code stage by stage, and the chat-model settings.

A preset is a named set of :class:`~safetyheads.config.RunConfig` values. ``RunConfig(preset=NAME)``
(``--preset NAME`` on the command line, ``preset = "NAME"`` in a config file) starts from the preset's
values; anything given explicitly (a field, a config key, a flag) overrides them. The preset's name
stays in the resolved config, so a run folder's ``config.json`` says which preset made it.

``paper``
    What the paper's public code (``ydyjya/SafetyHeadAttribution``, last commit 2025-06-01) does,
    stage by stage (SPEC §6):

    * Ships attribution: the raw query, tokenized with the tokenizer's defaults (so after BOS for
      tokenizers that add one, e.g. Llama's), no template, no system prompt (``use_tem`` off,
      ``lib/SHIPS/get_ships.py``): ``ships_format = "raw"``.
    * Sahara: ``"## Query:{q}\\n## Answer:"`` (no space after the colon;
      ``lib/Sahara/attribution.py``): ``sahara_format = "template-sahara"``; rank 1, no centring
      (``sahara_preset = "official"``).
    * Generation for attack success: ``"## Query: {q}\\n## Answer:"`` (with the space), greedy,
      128 new tokens (the paper's figure; the code's own scripts used 32-256):
      ``eval_format = "template"``, ``max_new_tokens = 128``.
    * UA (query × ε), ε = 1e-5 (the paper and notebooks; the Ships script's default is 1e-4).
    * Judge: the code's keyword list with its bugs (a fused ``"sorryI am sorry"``, seven curly
      apostrophes, case-sensitive matching, < 32 characters = refusal): ``keyword:paper-prototype``.
      The fixed list is ``keyword:paper``; judge saved responses with both to see the difference.
``chat``
    The chat template with the model's default system prompt at every stage (the package default).
``chat-nosys``
    The chat template with no system prompt (an empty system turn where the template would insert
    its default one), at every stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["PRESETS", "Preset", "PresetError", "apply_preset", "preset_values"]


class PresetError(ValueError):
    """An unknown preset name."""


@dataclass(frozen=True)
class Preset:
    """A named set of RunConfig values.

    Attributes:
        name: what users type (``--preset NAME``).
        description: one line on what it reproduces.
        values: RunConfig field -> value.
    """

    name: str
    description: str
    values: Mapping[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "paper",
            "the paper's public code, stage by stage: Ships on the raw query, Sahara on '## Query:{q}\\n## Answer:', "
            "generation on '## Query: {q}\\n## Answer:' (greedy, 128 tokens), no system prompt, UA eps=1e-5, "
            "the code's keyword judge with its bugs",
            MappingProxyType({
                "prompt_format": "template",
                "ships_format": "raw",
                "sahara_format": "template-sahara",
                "eval_format": "template",
                "system_prompt": "",
                "mode": "ua",
                "eps": 1e-5,
                "sahara_preset": "official",
                "max_new_tokens": 128,
                "judge": "keyword:paper-prototype",
            }),
        ),
        Preset(
            "chat",
            "the chat template with the model's default system prompt at every stage (the package default)",
            MappingProxyType({"prompt_format": "chat", "system_prompt": None}),
        ),
        Preset(
            "chat-nosys",
            "the chat template with no system prompt at every stage",
            MappingProxyType({"prompt_format": "chat", "system_prompt": ""}),
        ),
    )
}
"""The named presets (see the module docstring)."""


def preset_values(name: str) -> dict[str, Any]:
    """The RunConfig values of preset ``name`` (a fresh dict).

    Raises:
        PresetError: an unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name].values)


def apply_preset(data: Mapping[str, Any]) -> dict[str, Any]:
    """Config values with their ``preset`` (if any) filled in underneath: explicit keys win.

    ``data`` is a mapping of RunConfig fields as given by the user (file + flags). Keys that ``data``
    holds, even with the value None, override the preset's.
    """
    out = dict(data)
    name = out.get("preset")
    if name is None:
        return out
    return {**preset_values(str(name)), **out}
