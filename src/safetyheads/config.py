"""One config schema for the CLI flags, config files (TOML / YAML / JSON) and the Python pipeline.

Every field is a CLI flag of the same name (``n_eval`` → ``--n-eval``); a config file holds the
same keys. Precedence: defaults < config file < flags. Unknown keys and bad values are errors
that name the key.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .models import DEFAULT_MODEL

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the key and the problem."""


PromptFormatName = Literal["chat", "template", "template-sahara", "template-ships", "raw"]
"""The names of :class:`safetyheads.prompts.PromptFormat`."""


_UNSET_ABSENT = ("preset", "ships_format", "sahara_format", "eval_format", "search", "eval_dataset",
                 "stop_at_verdict", "eval_batch_size")


class RunConfig(BaseModel):
    """Everything a ``safetyheads run`` depends on. The defaults are the embedded study (~8 min on 2 idle CPU cores)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # model
    model: str = Field(DEFAULT_MODEL, description="builtin:NAME, a Hugging Face id, a local directory or a .gguf file")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, mps …")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="default: float32 on CPU, bfloat16 on GPU")
    device_map: str | None = Field(None, description="e.g. 'auto' to spread a big model over GPUs")
    # data
    dataset: str = Field("advbench", description="harmful prompts: builtin name or a CSV/JSON/JSONL path")
    column: str | None = Field(None, description="column of a user file holding the prompt")
    harmless: str | None = Field("rho-benign-edgy", description="harmless prompts for over-refusal (None: skip)")
    n_attribution: int = Field(16, ge=1, description="prompts used to find heads (Ships estimate, Sahara)")
    n_ships_exact: int = Field(1, ge=0, description="of those, prompts scored by the exact Ships sweep (0: skip)")
    n_eval: int = Field(96, ge=1, description="held-out prompts for attack success (disjoint from attribution)")
    eval_dataset: str | None = Field(
        None, description="prompts for attack success: a builtin name or file, or several comma-separated (one "
                          "evaluation each; the first is the main one). None: the held-out split of dataset")
    n_harmless: int = Field(16, ge=0, description="harmless prompts for over-refusal")
    preset: Literal["paper", "chat", "chat-nosys"] | None = Field(
        None, description="named settings (safetyheads.presets) under any field given explicitly")
    prompt_format: PromptFormatName = "chat"
    ships_format: PromptFormatName | None = Field(None, description="Ships attribution prompt format (None: prompt_format)")
    sahara_format: PromptFormatName | None = Field(None, description="Sahara prompt format (None: prompt_format)")
    eval_format: PromptFormatName | None = Field(None, description="generation/ASR prompt format (None: prompt_format)")
    system_prompt: str | None = Field(None, description="chat only; None = the template's default, '' = none")
    # ablation
    mode: Literal["ua", "sc", "zero", "mean", "ua-limit"] = "ua"
    eps: float = Field(1e-5, description="ε of ua / sc (paper: 1e-5)")
    # Sahara
    steps: int = Field(3, ge=1, le=64, description="safety heads to find (paper: ≤ 5)")
    sahara_preset: Literal["official", "paper"] = "official"
    prefilter: Literal["estimate", "exact-subset", "none"] = "estimate"
    prefilter_k: int = Field(12, ge=1, description="candidates kept by the prefilter")
    search: Literal["refusal", "asr", "kl", "none"] | None = Field(
        None, description="objective of the exact greedy head search run beside Sahara (same steps and prefilter; "
                          "None = 'refusal': the heads whose joint ablation most lowers refusal; 'asr': the heads "
                          "whose joint ablation most raises the judged attack success of greedy answers to the "
                          "attribution prompts, max_new_tokens long — a generation per candidate); 'none' skips it")
    # evaluation
    judge: str = Field("keyword:paper", description="keyword:paper|gcg|jailbreakbench|harmbench, or llm:MODEL")
    max_new_tokens: int = Field(48, ge=1, description="tokens generated per response (paper: 128)")
    stop_at_verdict: bool | None = Field(
        None, description="end a harmful prompt's response once a keyword judge's refusal phrase appears (same "
                          "verdicts, less decoding; stored refusals are cut after the phrase); None = true; "
                          "false = full responses (to re-judge them with another judge)")
    random_controls: int = Field(2, ge=0, description="random head sets of the same size, as a control")
    random_kind: Literal["layer-matched", "uniform"] = Field(
        "layer-matched", description="random controls: as many heads per layer as the Sahara heads (never those), "
                                     "or uniform over all other heads")
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int | None = Field(
        None, ge=1, description="rows (prompt × condition) per generation batch; None = 128 (decoding reads every "
                                "weight once per step whatever the batch: on 2 CPU cores 64 rows ran 1.66x the rows/s "
                                "of 16, 128 rows 1.06x 64)")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """Fill in the preset's values under the fields given explicitly."""
        if isinstance(data, dict) and data.get("preset") is not None:
            from .presets import PresetError, apply_preset

            try:
                return apply_preset(data)
            except PresetError as e:
                raise ValueError(str(e)) from None
        return data

    def stage_format(self, stage: Literal["ships", "sahara", "eval"]) -> str:
        """The prompt format of a stage: its own field if set, else ``prompt_format``."""
        if stage not in ("ships", "sahara", "eval"):
            raise ValueError(f"unknown stage {stage!r}; one of 'ships', 'sahara', 'eval'")
        return getattr(self, f"{stage}_format") or self.prompt_format

    @field_validator("eval_dataset")
    @classmethod
    def _eval_datasets(cls, v: str | None) -> str | None:
        if v is None:
            return None
        names = [x.strip() for x in v.split(",")]
        if not all(names):
            raise ValueError(f"eval_dataset {v!r}: an empty name in the comma-separated list")
        if len(set(names)) != len(names):
            raise ValueError(f"eval_dataset {v!r}: a dataset is named twice")
        return ",".join(names)

    def eval_datasets(self) -> list[str]:
        """The evaluation datasets in order (the first is the main evaluation); ``[dataset]`` by default."""
        return self.eval_dataset.split(",") if self.eval_dataset else [self.dataset]

    @field_validator("eps")
    @classmethod
    def _eps_finite(cls, v: float) -> float:
        if not (v == v and abs(v) != float("inf")) or v < 0:
            raise ValueError("eps must be a finite number >= 0")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.mode == "ua" and self.eps <= 0:
            raise ValueError("mode 'ua' needs eps > 0")
        if self.n_ships_exact > self.n_attribution:
            raise ValueError("n_ships_exact must be <= n_attribution")
        if self.prefilter != "none" and self.prefilter_k < self.steps:
            raise ValueError("prefilter_k must be >= steps")
        return self

    def digest(self, keys: set[str] | None = None) -> str:
        """Hash of the fields that determine results (``keys``: only these)."""
        d = self.model_dump()
        # fields added after run folders existed hash as if absent while unset, so old folders still resume
        for k in _UNSET_ABSENT:
            if d.get(k) is None:
                d.pop(k, None)
        if keys is not None:
            d = {k: v for k, v in d.items() if k in keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config file {path} cannot be parsed: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of keys")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _format_errors(e: ValidationError, where: str) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(x) for x in err["loc"]) or "config"
        msg = "unknown key (not a RunConfig field)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}")
    return f"invalid configuration ({where}):\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Defaults, then the file at ``path``, then ``overrides`` (``None`` values are ignored)."""
    data: dict[str, Any] = _read_file(Path(path)) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path) if path else "flags")) from None
