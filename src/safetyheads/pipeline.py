"""The whole study as resumable stages, each writing its artifact into a run folder.

``prompts`` → ``ships`` → ``sahara`` → ``evaluate`` → ``report``. A stage whose artifact exists is
skipped, so an interrupted run (Ctrl-C, kill -9) continues where it stopped when the same command
is run again; long stages checkpoint inside (Ships per prompt, Sahara per step, evaluation per
condition). Every file is written atomically. A run folder remembers the config that made it and
refuses a different one instead of mixing results.

Run folder::

    config.json            resolved config (+ digest)
    prompts.json           attribution / evaluation / harmless prompts and their provenance
    refusal_tokens.json    refusal-start tokens derived from the model's own refusals
    ships_estimate.*       estimated Ships (Fisher KL, refusal-gradient) on all attribution prompts
    ships.*                exact Ships on the first n_ships_exact attribution prompts
    ships_agreement.json   estimator vs exact (Spearman, top-10 recall)
    sahara.json            Sahara heads and every step's scores (sahara.ckpt.json while running)
    evaluation.json        ASR per condition with intervals; responses/*.jsonl
    report.html, plots/    the report
    run.log
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .provenance import atomic_write_text, library_versions

log = logging.getLogger("safetyheads")

STAGES = ("prompts", "ships", "sahara", "evaluate", "report")


class RunFolderError(RuntimeError):
    """The output folder cannot be used for this run (another config's results, not writable)."""


def check_writable(out: Path) -> None:
    """Fail early, before any work, if ``out`` cannot be created or written."""
    probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output {out} exists and is not a folder")
    probe = probe_dir / f".safetyheads-write-test-{time.time_ns()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"output folder {out} is not writable ({e.strerror}: {probe_dir})") from None


def _json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


class Run:
    """One study in one folder. ``Run(cfg, out).execute()`` runs (or resumes) every stage."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, progress: bool = True, model=None, tokenizer=None) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.model, self.tokenizer = model, tokenizer
        self._log_handler: logging.Handler | None = None

    # -- folder ---------------------------------------------------------------
    def _claim_folder(self) -> None:
        cfg_path = self.out / "config.json"
        if cfg_path.exists():
            old = _read(cfg_path)
            if old.get("digest") != self.cfg.digest():
                changed = sorted(k for k, v in self.cfg.model_dump().items() if old.get("config", {}).get(k) != v)
                raise RunFolderError(
                    f"{self.out} holds a run with a different configuration (differs in: {', '.join(changed) or '?'}); "
                    "use another --out folder, or delete this one to start over"
                )
            log.info("resuming run in %s", self.out)
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            _json(cfg_path, {"config": self.cfg.model_dump(), "digest": self.cfg.digest(), "versions": library_versions()})
        handler = logging.FileHandler(self.out / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("safetyheads").addHandler(handler)
        self._log_handler = handler

    def _load_model(self) -> None:
        if self.model is None:
            from .models import load_model

            dtype = getattr(torch, self.cfg.dtype) if self.cfg.dtype else None
            self.model, self.tokenizer = load_model(self.cfg.model, device=self.cfg.device, dtype=dtype,
                                                    device_map=self.cfg.device_map)

    # -- stages ---------------------------------------------------------------
    def stage_prompts(self) -> None:
        from .datasets import holdout_split, load_prompts

        c = self.cfg
        harmful = load_prompts(c.dataset, column=c.column)
        attribution, evaluation = holdout_split(harmful, c.n_attribution, c.n_eval, seed=c.seed)
        data = {"attribution": list(attribution), "eval": list(evaluation), "harmless": [],
                "provenance": {"attribution": attribution.provenance(), "eval": evaluation.provenance()}}
        if c.harmless and c.harmless.lower() != "none" and c.n_harmless:
            harmless = load_prompts(c.harmless, n=c.n_harmless, seed=c.seed)
            data["harmless"] = list(harmless)
            data["provenance"]["harmless"] = harmless.provenance()
        _json(self.out / "prompts.json", data)

    @property
    def prompts(self) -> dict:
        return _read(self.out / "prompts.json")

    def _refusal_tokens(self) -> list[int] | None:
        path = self.out / "refusal_tokens.json"
        if not path.exists():
            from .evaluate import derive_refusal_tokens

            try:
                # the tokens are scored at the Ships prompts' last position, so they start refusals in that format
                tokens = derive_refusal_tokens(self.model, self.tokenizer, self.prompts["attribution"], judge=self.cfg.judge,
                                               prompt_format=self.cfg.stage_format("ships"),
                                               system_prompt=self.cfg.system_prompt)
                record = {"tokens": tokens, "strings": [self.tokenizer.decode([t]) for t in tokens]}
            except ValueError as e:  # the model never refuses: no signed score
                log.warning("no refusal tokens: %s", e)
                record = {"tokens": None, "reason": str(e)}
            _json(path, record)
        return _read(path)["tokens"]

    def stage_ships(self) -> None:
        from .ships import ShipsResult, agreement, ships, ships_estimate

        c, P = self.cfg, self.prompts["attribution"]
        rt = self._refusal_tokens()
        common = dict(mode=c.mode, eps=c.eps, prompt_format=c.stage_format("ships"), system_prompt=c.system_prompt,
                      progress=self.progress)
        if not (self.out / "ships_estimate.json").exists():
            est = ships_estimate(self.model, self.tokenizer, P, estimator="fisher", batch_size=min(8, c.batch_size), **common)
            if rt is not None:
                est.refusal = ships_estimate(self.model, self.tokenizer, P, estimator="refusal-grad", refusal_tokens=rt,
                                             batch_size=min(8, c.batch_size), **common).refusal
            est.save(self.out / "ships_estimate")
        if c.n_ships_exact and not (self.out / "ships.json").exists():
            parts_dir = self.out / "ships_parts"
            parts = []
            for i, prompt in enumerate(P[: c.n_ships_exact]):  # one checkpoint per prompt
                stem = parts_dir / f"prompt{i:04d}"
                if not stem.with_suffix(".json").exists():
                    ships(self.model, self.tokenizer, [prompt], refusal_tokens=rt, **common).save(stem)
                parts.append(ShipsResult.load(stem))
            merged = ShipsResult(torch.cat([p.kl for p in parts]),
                                 None if rt is None else torch.cat([p.refusal for p in parts]),
                                 [p.prompts[0] for p in parts], "exact", parts[0].provenance)
            merged.provenance["data"] = {"n": len(parts), "from": "attribution prompts"}
            est = ShipsResult.load(self.out / "ships_estimate")
            agree = {"kl_fisher": agreement(est.kl[: len(parts)], merged.kl)}
            if rt is not None:
                agree["refusal_grad"] = agreement(est.refusal[: len(parts)], merged.refusal)
            _json(self.out / "ships_agreement.json", agree)
            merged.save(self.out / "ships")
            shutil.rmtree(parts_dir, ignore_errors=True)

    def stage_sahara(self) -> None:
        from .sahara import sahara
        from .ships import ShipsResult

        c = self.cfg
        # the Fisher estimate of the ships stage is the "estimate" prefilter: no need to compute it again,
        # unless Sahara reads another prompt format (the paper preset), where Sahara estimates on its own
        same_format = c.stage_format("sahara") == c.stage_format("ships")
        est = ShipsResult.load(self.out / "ships_estimate").mean("kl") if same_format else None
        res = sahara(self.model, self.tokenizer, self.prompts["attribution"], steps=c.steps, mode=c.mode, eps=c.eps,
                     preset=c.sahara_preset, prompt_format=c.stage_format("sahara"), system_prompt=c.system_prompt,
                     prefilter=None if c.prefilter == "none" else c.prefilter, prefilter_k=c.prefilter_k,
                     prefilter_scores=est, batch_size=c.batch_size, checkpoint=self.out / "sahara.ckpt.json", progress=self.progress)
        res.save(self.out / "sahara.json")
        (self.out / "sahara.ckpt.json").unlink(missing_ok=True)

    def conditions(self) -> tuple[list[dict], list[dict]]:
        """The harmful-prompt conditions and the harmless (over-refusal) ones."""
        from .adapters import head_geometry
        from .sahara import SaharaResult
        from .ships import ShipsResult

        c = self.cfg
        k = c.steps
        safety = [tuple(h) for h in SaharaResult.load(self.out / "sahara.json").heads]
        conds = [{"name": "baseline", "method": "baseline", "k": 0, "heads": []},
                 {"name": f"sahara-top{k}", "method": "sahara", "k": k, "heads": safety}]
        if k > 1:
            conds.append({"name": "sahara-top1", "method": "sahara", "k": 1, "heads": safety[:1]})
        ships_stem = self.out / ("ships" if (self.out / "ships.json").exists() else "ships_estimate")
        sr = ShipsResult.load(ships_stem)
        conds.append({"name": f"ships-kl-top{k}", "method": f"ships-kl ({sr.method})", "k": k, "heads": sr.dataset_top(k)})
        est = ShipsResult.load(self.out / "ships_estimate")
        if est.refusal is not None:
            conds.append({"name": f"refusal-top{k}", "method": "refusal-grad", "k": k,
                          "heads": est.dataset_top(k, metric="refusal")})
        g = head_geometry(self.model)
        everything = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
        pool = [h for h in everything if h not in set(safety)]
        for i in range(c.random_controls):
            rng = random.Random(c.seed * 1000 + i)
            conds.append({"name": f"random{i}-top{k}", "method": "random", "k": k, "seed": c.seed * 1000 + i,
                          "heads": sorted(rng.sample(pool, k))})
        harmless = [{"name": "harmless-baseline", "method": "baseline", "k": 0, "heads": []},
                    {"name": f"harmless-sahara-top{k}", "method": "sahara", "k": k, "heads": safety}]
        for cond in conds + harmless:
            cond["heads"] = [list(h) for h in cond["heads"]]
        return conds, harmless

    def stage_evaluate(self) -> None:
        from .evaluate import evaluate_conditions

        c = self.cfg
        conds, harmless = self.conditions()
        P = self.prompts
        evaluate_conditions(self.model, self.tokenizer, P["eval"], conds, out_dir=self.out, harmless=P["harmless"] or None,
                            harmless_conditions=harmless if P["harmless"] else None, mode=c.mode, eps=c.eps,
                            judge=c.judge, prompt_format=c.stage_format("eval"), system_prompt=c.system_prompt,
                            max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, progress=self.progress)

    def stage_report(self) -> None:
        from .report import write_report

        write_report(self.out)

    # -- driver ---------------------------------------------------------------
    _ARTIFACT = {"prompts": "prompts.json", "ships": "ships_estimate.json", "sahara": "sahara.json",
                 "evaluate": "evaluation.json", "report": "report.html"}

    def done(self, stage: str) -> bool:
        if stage == "ships":
            return (self.out / "ships_estimate.json").exists() and (
                not self.cfg.n_ships_exact or (self.out / "ships.json").exists())
        return (self.out / self._ARTIFACT[stage]).exists()

    def execute(self, stages: tuple[str, ...] = STAGES) -> Path:
        """Run the given stages in order, skipping those already done. Returns the run folder."""
        check_writable(self.out)
        fresh = not (self.out / "config.json").exists()
        created = fresh and not self.out.exists()
        try:
            self._load_model()
        except BaseException:
            raise  # nothing written yet
        try:
            self._claim_folder()
            for stage in stages:
                if stage == "report" or not self.done(stage):
                    t0 = time.perf_counter()
                    log.info("stage %s …", stage)
                    getattr(self, f"stage_{stage}")()
                    log.info("stage %s done in %.1f s", stage, time.perf_counter() - t0)
                else:
                    log.info("stage %s already done, skipped", stage)
        except RunFolderError:
            raise
        except BaseException:
            if created and not any(self.done(s) for s in STAGES if s != "report"):
                shutil.rmtree(self.out, ignore_errors=True)  # nothing useful made: leave nothing behind
            raise
        finally:
            if self._log_handler is not None:
                logging.getLogger("safetyheads").removeHandler(self._log_handler)
                self._log_handler.close()
        return self.out


def run(cfg: RunConfig, out: str | Path, *, progress: bool = True, stages: tuple[str, ...] = STAGES, model=None,
        tokenizer=None) -> Path:
    """Run (or resume) the study described by ``cfg`` into folder ``out``."""
    return Run(cfg, out, progress=progress, model=model, tokenizer=tokenizer).execute(stages)
