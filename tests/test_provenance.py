"""Every JSON artifact of a real run folder records where its result came from.

The README: "Every result records the model, the data (file sha256 and row indices), the prompt
format, the ablation mode and ε, the seed and the library versions". Checked on the shared real
runs (tests/cli_runs.py: the UA reference run, seed 0, and the ``--mode sc --seed 1`` run; and
tests/test_cli.py's ``--mode mean`` run, whose head means are an artifact of their own), against
independent facts — the dataset file's sha256 recomputed here, its rows read back here at the
recorded indices, the installed library versions, the run's own config — so a record that is
present but wrong fails too. Every JSON file the run writes must be one this test knows how to
check: a new artifact without a provenance check fails here until one is added.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch
from cli_runs import MODEL, mean_run, reference, sc_run

from safetyheads.provenance import prompts_digest

HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: JSON files that summarise other artifacts of the same folder (their inputs carry the provenance)
DERIVED = {"ships_agreement.json": ("ships.json", "ships_estimate.json"), "heads.json": ("sahara.json",)}


@pytest.fixture(scope="module", params=["ua-seed0", "sc-seed1", "mean-seed0"])
def run(request, tmp_path_factory) -> Path:
    if request.param == "ua-seed0":
        return reference(tmp_path_factory)["out"]
    if request.param == "mean-seed0":
        return mean_run(tmp_path_factory)["out"]
    return sc_run(tmp_path_factory)["out"]


def _json(path: Path):
    return json.loads(path.read_text())


def _check_versions(v: dict, where: str) -> None:
    for pkg in ("torch", "transformers", "safetensors", "numpy", "safetyheads"):
        assert v.get(pkg) == metadata.version(pkg), (where, pkg, v.get(pkg))
    assert re.match(r"^3\.\d+\.\d+", v.get("python", "")), (where, v)


def _check_model(m: dict, where: str) -> None:
    assert m["source"]["name"] == MODEL, where
    assert HEX64.match(m["source"]["gguf_sha256"]), where
    assert (m["model_type"], m["n_layers"], m["n_heads"], m["dtype"]) == ("llama", 30, 9, "float32"), where


def _check_data(d: dict, texts: list[str], set_prov: dict, where: str) -> None:
    """``d`` names the same file, sha256 and row indices as prompts.json does for ``texts``."""
    assert d["n"] == len(texts), where
    if "sha256" in d:  # the texts' own digest, where recorded beside the file's
        assert d["sha256"] == prompts_digest(texts), f"{where}: data sha256 is not that of the prompts used"
    assert d["source_sha256"] == set_prov["source_sha256"] and d["name"] == set_prov["name"], where
    assert d["indices"] == set_prov["indices"][: len(texts)], f"{where}: row indices"


def test_every_json_artifact_has_provenance(run):
    """Each JSON result names model, data (file sha256 + row indices), prompt format, mode, ε, seed and
    versions, and each value is the true one for this run.

    Catches: a stage that drops the data's file hash or row indices (passing bare strings on), a
    merged result whose provenance describes one prompt or none, a mode / ε / seed that is the
    default instead of the run's, stale versions, and a new artifact written without provenance."""
    cfg_file = _json(run / "config.json")
    cfg = cfg_file["config"]
    _check_versions(cfg_file["versions"], "config.json")
    assert cfg["model"] == MODEL and re.match(r"^[0-9a-f]{16}$", cfg_file["digest"])
    prompts = _json(run / "prompts.json")
    sets = prompts["provenance"]
    seen = {"config.json", "prompts.json"}

    def stage_format(stage: str) -> str:  # RunConfig.stage_format: a preset may give each stage its own
        return cfg.get(f"{stage}_format") or cfg["prompt_format"]

    def result(name: str, texts: list[str], which: str, *, mode=cfg["mode"], eps=cfg["eps"], seed=(None,),
               stage: str = "ships") -> dict:
        prov = _json(run / name)["provenance"]
        _check_model(prov["model"], name)
        _check_data(prov["data"], texts, sets[which], name)
        fmt = prov["prompt_format"]
        assert (fmt["format"] if isinstance(fmt, dict) else fmt) == stage_format(stage), name
        assert prov["mode"] == mode and prov["eps"] == eps, (name, prov["mode"], prov["eps"])
        assert "seed" in prov and prov["seed"] in (*seed, cfg["seed"]), (name, prov["seed"])
        _check_versions(prov["versions"], name)
        seen.add(name)
        return prov

    attr, held_out = prompts["attribution"], prompts["eval"]
    result("ships_estimate.json", attr, "attribution")
    if cfg["n_ships_exact"]:
        result("ships.json", attr[: cfg["n_ships_exact"]], "attribution")
    assert (run / "head_means.json").exists() == (cfg["mode"] == "mean")
    if cfg["mode"] == "mean":  # the head means every stage ablates with, over the attribution prompts
        from safetensors.torch import load_file

        result("head_means.json", attr, "attribution", seed=())
        hm = _json(run / "head_means.json")
        mean = load_file(str(run / "head_means.safetensors"))["mean"]
        assert hm["sha256"] == hashlib.sha256(mean.double().numpy().tobytes()).hexdigest()
        assert tuple(mean.shape) == (30, 9, 64) == tuple(hm["shape"]) and mean.dtype == torch.float64
        assert hm["over"].startswith(f"the {len(attr)} attribution prompts") and mean.abs().sum() > 0
    result("sahara.json", attr, "attribution", stage="sahara")
    ev = result("evaluation.json", held_out, "eval", seed=(), stage="eval")  # the evaluation's seed is the run's
    rt = result("refusal_tokens.json", attr, "attribution", mode=None, eps=None, seed=())  # unablated
    assert rt["judge"] == cfg["judge"] == ev["judge"]
    if (run / "refusal_metric.json").exists():  # per-prompt refusal metric of the same held-out prompts
        assert result("refusal_metric.json", held_out, "eval", seed=(), stage="eval")["data"] == ev["data"]
    for name in ("search.json", "signed_effects.json", "disagreement.json"):  # only where the model refuses
        if (run / name).exists():
            result(name, attr, "attribution")
    harmless = prompts["harmless"]
    assert ev["harmless"]["indices"] == sets["harmless"]["indices"] and len(harmless) == cfg["n_harmless"]
    assert ev["harmless"]["source_sha256"] == sets["harmless"]["source_sha256"]

    for f in sorted((run / "responses").glob("*.config.json")):  # the per-condition resume keys
        c = _json(f)["config"]
        _check_model(c["model"], f.name)
        texts = harmless if f.name.startswith("harmless") else held_out
        assert c["prompts_sha256"] == prompts_digest(texts), f.name
        assert (c["mode"], c["eps"], c["prompt_format"]["format"]) == (cfg["mode"], cfg["eps"], stage_format("eval"))
        seen.add(str(f.relative_to(run)))
    if (run / "utility_kl.json").exists():  # the stored utility KLs: their key names the model, ablation and prompts
        u = _json(run / "utility_kl.json")["config"]
        _check_model(u["model"], "utility_kl.json")
        assert u["harmless_sha256"] == prompts_digest(harmless)
        assert (u["mode"], u["eps"], u["prompt_format"]["format"]) == (cfg["mode"], cfg["eps"], stage_format("eval"))
        seen.add("utility_kl.json")
    for name, inputs in DERIVED.items():
        if (run / name).exists():
            assert all(name in seen or (run / i).exists() for i in inputs)
            seen.add(name)
    every = {str(p.relative_to(run)) for p in run.rglob("*.json")}
    assert every == seen, f"JSON artifacts without a provenance check: {sorted(every - seen)}"


def test_data_provenance_is_the_real_file_and_rows(run):
    """prompts.json's record: the file's sha256 recomputed here, the recorded rows read back here are
    the prompts used, attribution and held-out rows disjoint, the split's seed the run's.

    Catches: a hash of something else than the file, indices into a filtered or shuffled list
    instead of the file's rows, overlapping attribution / evaluation prompts, a split that ignores
    --seed."""
    from safetyheads.datasets import load_prompts

    cfg = _json(run / "config.json")["config"]
    prompts = _json(run / "prompts.json")
    for which, name in (("attribution", cfg["dataset"]), ("eval", cfg["dataset"]), ("harmless", cfg["harmless"])):
        p = prompts["provenance"][which]
        assert p["files"], which
        for f in p["files"]:
            assert hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() == f["sha256"], (which, f["path"])
        full = load_prompts(name)
        row = dict(zip(full.indices, full.prompts))
        assert [row[i] for i in p["indices"]] == prompts[which], f"{which}: the recorded rows are not the prompts"
        assert f"seed={cfg['seed']}" in p["history"][-1], p["history"]  # the split / the sample
    assert not set(prompts["provenance"]["attribution"]["indices"]) & set(prompts["provenance"]["eval"]["indices"])
