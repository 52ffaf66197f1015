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
    head_means.*           mode 'mean' only: each head's mean output over the attribution prompts (Ships format),
                           the ``mean`` of every stage's ablation (computed once, reused on resume)
    ships_estimate.*       estimated Ships (Fisher KL, refusal-gradient) on all attribution prompts
    ships.*                exact Ships on the first n_ships_exact attribution prompts
    ships_agreement.json   estimator vs exact (Spearman, top-10 recall)
    sahara.json            Sahara heads and every step's scores (sahara.ckpt.json while running)
    heads.json             the headline: {"method", "mode", "eps", "heads": [[layer, head], ...], "signed_effect"}
    evaluation.json        ASR per condition with intervals and paired statistics vs the baseline; responses/*.jsonl
    refusal_metric.json    per prompt and condition: refusal-token probability and log-odds (one forward pass)
    evaluations/<slug>/    with --eval-dataset a,b,…: the evaluation on each further dataset (same files)
    report.html, plots/    the report
    run.log
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .provenance import atomic_write_text, library_versions, provenance

log = logging.getLogger("safetyheads")

STAGES = ("prompts", "ships", "sahara", "search", "evaluate", "report")

EVAL_BATCH_SIZE = 128
"""Generation rows per batch when ``eval_batch_size`` is unset (``bench/eval_speed.py`` on 2 CPU cores:
64 rows ran 1.66x the rows/s of 16; with continuous batching and the shared prefix, 128 rows 1.06x 64)."""

HEADLINE_ORDER = ("search-refusal", "refusal-grad", "sahara")
"""Methods whose heads a run reports as its headline ``heads.json``, most trusted first: the first one
the run computed is used. Signed refusal methods first: on the embedded model they break refusals on
held-out prompts where the paper's unsigned scores do not (bench/results/methods_0.5b.md, 100 held-out
AdvBench prompts, chat format: exact refusal search k=5 0.30 → 0.56, p = 2e-7; refusal gradient k=5 → 0.51;
Ships-KL and Sahara k=5 → 0.19 / 0.21, more refusal), and on the model with planted safety heads they are
the only methods that recover them (bench/results/study.md, paper preset: 3/3 each, Ships-KL and Sahara
0/3)."""


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


def _data_record(prompts) -> dict[str, Any]:
    """The provenance of a prompt list: a PromptSet's own record (file sha256, row indices) plus the
    sha256 of the texts; for a plain list, its size and text sha256."""
    from .provenance import prompts_digest

    record = prompts.provenance() if callable(getattr(prompts, "provenance", None)) else {"n": len(prompts)}
    record["sha256"] = prompts_digest(list(prompts))
    return record


def load_prompt_sets(cfg: RunConfig):
    """``(attribution, [(name, eval PromptSet), …])`` for ``cfg`` (:func:`safetyheads.evaluate.eval_prompt_sets`
    over ``cfg.eval_datasets()``). Raises DatasetError on bad input."""
    from .evaluate import eval_prompt_sets

    return eval_prompt_sets(cfg.dataset, cfg.eval_datasets(), n_attribution=cfg.n_attribution, n_eval=cfg.n_eval,
                            seed=cfg.seed, column=cfg.column)


class Run:
    """One study in one folder. ``Run(cfg, out).execute()`` runs (or resumes) every stage."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, progress: bool = True, model=None, tokenizer=None) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.model, self.tokenizer = model, tokenizer
        self._log_handler: logging.Handler | None = None
        self.stages: tuple[str, ...] = STAGES  # the stages of the current execute()

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
            stale = [p for p in self.out.rglob(".*.tmp") if p.is_file()]  # half-written files of a killed run
            for p in stale:
                p.unlink(missing_ok=True)
            if stale:
                log.info("removed %d temporary files an interrupted run left", len(stale))
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
        from .datasets import load_prompts

        c = self.cfg
        attribution, eval_sets = load_prompt_sets(c)
        evaluation = eval_sets[0][1]
        data = {"attribution": list(attribution), "eval": list(evaluation), "harmless": [],
                "provenance": {"attribution": attribution.provenance(), "eval": evaluation.provenance()}}
        if c.eval_dataset:  # one evaluation per dataset; the first is "eval" (the main one, at the run's root)
            from .evaluate import eval_slug

            data["eval_sets"] = [{"name": name, "slug": eval_slug(name), "prompts": list(ps),
                                  "provenance": ps.provenance()} for name, ps in eval_sets]
        if c.harmless and c.harmless.lower() != "none" and c.n_harmless:
            harmless = load_prompts(c.harmless, n=c.n_harmless, seed=c.seed)
            data["harmless"] = list(harmless)
            data["provenance"]["harmless"] = harmless.provenance()
        _json(self.out / "prompts.json", data)

    @property
    def prompts(self) -> dict:
        return _read(self.out / "prompts.json")

    def prompt_set(self, which: str):
        """The ``which`` prompts (``"attribution"``, ``"eval"``, ``"harmless"``) as a PromptSet carrying
        their data provenance (source file sha256, row indices, split history), so every result made
        from them records it; a plain list if prompts.json has no provenance for them."""
        from .datasets import PromptSet

        data = self.prompts
        texts, prov = data[which], data.get("provenance", {}).get(which)
        if not prov or len(prov.get("indices", [])) != len(texts):
            return list(texts)
        return PromptSet(prompts=tuple(texts), name=prov["name"], source=prov["source"],
                         source_sha256=prov["source_sha256"], indices=tuple(prov["indices"]), split=prov.get("split"),
                         files=tuple((f["path"], f["sha256"]) for f in prov.get("files", [])),
                         column=prov.get("column"), history=tuple(prov.get("history", [])))

    def eval_sets(self) -> list[tuple[str, str, Any]]:
        """``(dataset name, folder slug, prompts)`` of every evaluation; the first is the main one (its
        results at the run's root), the others go to ``evaluations/<slug>/``."""
        data = self.prompts
        if not data.get("eval_sets"):
            return [(self.cfg.dataset, "", self.prompt_set("eval"))]
        out = []
        for i, e in enumerate(data["eval_sets"]):
            if i == 0:
                out.append((e["name"], "", self.prompt_set("eval")))
                continue
            prov = e.get("provenance") or {}
            ps: Any = list(e["prompts"])
            if len(prov.get("indices", [])) == len(ps):
                from .datasets import PromptSet

                ps = PromptSet(prompts=tuple(ps), name=prov["name"], source=prov["source"],
                               source_sha256=prov["source_sha256"], indices=tuple(prov["indices"]),
                               split=prov.get("split"), files=tuple((f["path"], f["sha256"]) for f in prov.get("files", [])),
                               column=prov.get("column"), history=tuple(prov.get("history", [])))
            out.append((e["name"], e["slug"], ps))
        return out

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
            from .provenance import provenance

            record["provenance"] = provenance(self.model, self.prompt_set("attribution"),
                                              prompt_format=self.cfg.stage_format("ships"), seed=self.cfg.seed,
                                              system_prompt=self.cfg.system_prompt, judge=self.cfg.judge,
                                              derived_by="unablated greedy responses to the attribution prompts")
            _json(path, record)
        return _read(path)["tokens"]

    def _head_means(self) -> torch.Tensor | None:
        """Mode ``mean``: the head means every stage ablates with (None for other modes) — each head's
        output averaged over the attribution prompts in the Ships stage's format
        (:func:`safetyheads.ships.dataset_means`; one unablated forward per prompt), computed once per
        run and kept in ``head_means.safetensors`` / ``head_means.json`` (with provenance), so a resumed
        run ablates with the very same tensor."""
        from .ablation import Mode

        if Mode.parse(self.cfg.mode) is not Mode.MEAN:
            return None
        from .ablation import mean_digest
        from .provenance import load_tensors_json, save_tensors_json

        stem = self.out / "head_means"
        if not stem.with_suffix(".json").exists():  # written after the tensors: it marks a complete artifact
            from .ships import MEANS_OVER, dataset_means

            c, P = self.cfg, self.prompt_set("attribution")
            mean = dataset_means(self.model, self.tokenizer, P, prompt_format=c.stage_format("ships"),
                                 system_prompt=c.system_prompt)
            save_tensors_json(stem, {"mean": mean}, {
                "kind": "head_means", "shape": list(mean.shape), "dtype": str(mean.dtype).replace("torch.", ""),
                "over": f"the {len(P)} attribution prompts: {MEANS_OVER}", "sha256": mean_digest(mean),
                "provenance": provenance(self.model, P, prompt_format=c.stage_format("ships"), mode=c.mode, eps=c.eps,
                                         seed=c.seed, system_prompt=c.system_prompt)})
        return load_tensors_json(stem)[0]["mean"]

    def stage_ships(self) -> None:
        from .ships import ShipsResult, agreement, ships, ships_estimate

        c, P = self.cfg, self.prompt_set("attribution")
        rt = self._refusal_tokens()
        common = dict(mode=c.mode, eps=c.eps, prompt_format=c.stage_format("ships"), system_prompt=c.system_prompt,
                      progress=self.progress, mean=self._head_means())
        if not (self.out / "ships_estimate.json").exists():
            # Fisher (KL) and, when the model refuses, the refusal gradient from the same forward passes
            est = ships_estimate(self.model, self.tokenizer, P, estimator="fisher", refusal_tokens=rt,
                                 batch_size=min(8, c.batch_size), **common)
            if rt is not None:
                est.provenance["refusal_estimator"] = "refusal-grad"
            est.save(self.out / "ships_estimate")
        if c.n_ships_exact and not (self.out / "ships.json").exists():
            parts_dir = self.out / "ships_parts"
            parts = []
            for i in range(c.n_ships_exact):  # one checkpoint per prompt
                stem = parts_dir / f"prompt{i:04d}"
                if not stem.with_suffix(".json").exists():
                    ships(self.model, self.tokenizer, P[i:i + 1], refusal_tokens=rt, **common).save(stem)
                parts.append(ShipsResult.load(stem))
            merged = ShipsResult(torch.cat([p.kl for p in parts]),
                                 None if rt is None else torch.cat([p.refusal for p in parts]),
                                 [p.prompts[0] for p in parts], "exact", parts[0].provenance)
            merged.provenance["data"] = _data_record(P[: len(parts)])
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
        res = sahara(self.model, self.tokenizer, self.prompt_set("attribution"), steps=c.steps, mode=c.mode, eps=c.eps,
                     preset=c.sahara_preset, prompt_format=c.stage_format("sahara"), system_prompt=c.system_prompt,
                     prefilter=None if c.prefilter == "none" else c.prefilter, prefilter_k=c.prefilter_k,
                     prefilter_scores=est, refusal_tokens=self._refusal_tokens(), batch_size=c.batch_size,
                     checkpoint=self.out / "sahara.ckpt.json", progress=self.progress, mean=self._head_means())
        res.save(self.out / "sahara.json")
        (self.out / "sahara.ckpt.json").unlink(missing_ok=True)
        if not ("search" in self.stages and self._search_runs()):  # else the search stage writes the headline
            self._write_headline()

    @property
    def search_objective(self) -> str | None:
        """The objective of the exact head search (None: not run)."""
        obj = self.cfg.search or "refusal"
        return None if obj == "none" else obj

    def _search_runs(self) -> bool:
        """Whether the search stage has an objective to search on (refusal needs the model's refusal tokens)."""
        from .search import REFUSAL_OBJECTIVES

        obj = self.search_objective
        return obj is not None and not (obj in REFUSAL_OBJECTIVES and self._refusal_tokens() is None)

    def stage_search(self) -> None:
        """The exact greedy head search (:func:`safetyheads.search.search_heads`) on ``cfg.search``, with
        Sahara's steps and prefilter (for ``"refusal"`` the refusal-gradient estimate of the ships stage is
        the ``estimate`` prefilter); then the per-head tables of every method's heads."""
        from .search import REFUSAL_OBJECTIVES, search_heads
        from .ships import ShipsResult

        c, obj = self.cfg, self.search_objective
        rt = self._refusal_tokens()
        if obj in REFUSAL_OBJECTIVES and rt is None:
            log.warning("search: the model never refused the attribution prompts, no refusal objective; skipped")
        elif obj is not None and not (self.out / "search.json").exists():
            scores = None  # the ships stage's estimate on the same prompts and format is the "estimate" prefilter
            if c.prefilter == "estimate":
                est = ShipsResult.load(self.out / "ships_estimate")
                scores = est.mean("kl") if obj == "kl" else est.refusal.nanmean(0) if est.refusal is not None else None
            res = search_heads(self.model, self.tokenizer, self.prompt_set("attribution"), objective=obj, steps=c.steps,
                               mode=c.mode, eps=c.eps, prompt_format=c.stage_format("ships"),
                               system_prompt=c.system_prompt, prefilter=None if c.prefilter == "none" else c.prefilter,
                               prefilter_k=c.prefilter_k, prefilter_scores=scores,
                               refusal_tokens=rt, checkpoint=self.out / "search.ckpt.json",
                               batch_size=(c.eval_batch_size or EVAL_BATCH_SIZE) if obj == "asr" else c.batch_size,
                               progress=self.progress, mean=self._head_means(), judge=c.judge,
                               max_new_tokens=c.max_new_tokens)
            res.save(self.out / "search.json")
            (self.out / "search.ckpt.json").unlink(missing_ok=True)
            (self.out / "heads.json").unlink(missing_ok=True)  # the search's heads may now head the list
        self._write_head_tables()
        self._write_headline()  # after the tables: it reads its heads' signed effects from signed_effects.json

    def _write_head_tables(self) -> None:
        """``signed_effects.json``: every head of every reported head set (each harmful-prompt condition, the
        random controls included) with its exact signed effect on refusal (mean drop of the refusal log-odds
        over the attribution prompts when it alone is ablated).
        ``disagreement.json``: the methods' heads side by side with KL-Ships, signed drop, Sahara angle,
        refusal-direction projection and attention on the first token (:mod:`safetyheads.disagreement`).
        Both on the attribution prompts in the Ships stage's format; each written once. The signed drop,
        KL-Ships and Sahara angle of every head in either table are read off one exact forward per head per
        prompt batch (:func:`safetyheads.search.single_head_scores`: the final-norm state and the logits of
        the same pass)."""
        if self.model is None:
            return
        from .sahara import PRESETS
        from .search import single_head_scores

        c = self.cfg
        rt = self._refusal_tokens()
        spath, dpath = self.out / "signed_effects.json", self.out / "disagreement.json"
        need_signed, need_table = rt is not None and not spath.exists(), not dpath.exists()
        if not (need_signed or need_table):
            return
        conds, _ = self.conditions()
        attr = self.prompt_set("attribution")
        fmt = dict(mode=c.mode, eps=c.eps, prompt_format=c.stage_format("ships"), system_prompt=c.system_prompt)
        mean = self._head_means()
        cond_heads = sorted({tuple(h) for cond in conds for h in cond["heads"]})
        methods = {cond["method"].split(" ")[0]: [tuple(h) for h in cond["heads"]] for cond in conds
                   if cond["k"] == c.steps and cond["method"] not in ("baseline", "random")}
        direction = None
        if need_table and self.prompts.get("harmless") and len(self.prompts["harmless"]) >= 2 and len(attr) >= 2:
            from .refusal_direction import refusal_direction

            direction = refusal_direction(self.model, self.tokenizer, attr, self.prompt_set("harmless"),
                                          prompt_format=c.stage_format("ships"), system_prompt=c.system_prompt,
                                          batch_size=c.batch_size)
            methods["refusal-dir"] = direction.top_heads(c.steps)
        union = sorted(set(cond_heads) | ({h for hs in methods.values() for h in hs} if need_table else set()))
        preset = PRESETS[c.sahara_preset]
        objectives = (["refusal"] if rt is not None else []) + (["kl", "subspace"] if need_table else [])
        scores = single_head_scores(self.model, self.tokenizer, attr, union, objectives=objectives, refusal_tokens=rt,
                                    rank=preset["rank"], center=preset["center"], batch_size=c.batch_size,
                                    progress=self.progress, mean=mean, **fmt)
        drop = scores.get("refusal")
        if need_signed:
            eff = {h: drop[h] for h in cond_heads}
            _json(spath, {"meaning": "mean drop of the refusal log-odds over the attribution prompts when the head "
                                     "alone is ablated (> 0: the head holds refusal up; < 0: its ablation raises "
                                     "refusal)", **fmt, "refusal_tokens": rt, "n_prompts": len(attr),
                          "heads": [[layer, h, eff[(layer, h)]] for layer, h in cond_heads],
                          "conditions": {cond["name"]: [[layer, h, eff[(layer, h)]] for layer, h in cond["heads"]]
                                         for cond in conds if cond["heads"]},
                          "provenance": provenance(self.model, attr, prompt_format=str(fmt["prompt_format"]),
                                                   mode=c.mode, eps=c.eps, seed=c.seed,
                                                   system_prompt=c.system_prompt,
                                                   computed_by="exact single-head ablations "
                                                               "(safetyheads.search.single_head_scores)")})
        if not need_table:
            return
        from .disagreement import disagreement

        d = disagreement(self.model, self.tokenizer, attr, methods, refusal_tokens=rt, kl_ships=scores["kl"],
                         refusal_drop=drop, sahara_angle=scores["subspace"], rank=preset["rank"],
                         center=preset["center"], direction=direction, batch_size=c.batch_size, mean=mean, **fmt)
        d.save(dpath)

    def _write_headline(self) -> None:
        """``heads.json``: the headline safety heads (first method of :data:`HEADLINE_ORDER` this run has),
        in order, with each head's exact signed effect on refusal (mean drop of the refusal log-odds over
        the attribution prompts when it alone is ablated; None when the model never refuses)."""
        path = self.out / "heads.json"
        if path.exists():
            return
        c = self.cfg
        conds, _ = self.conditions()
        found = {cond["method"].split(" ")[0]: cond for cond in conds if cond["k"] == c.steps}
        method = next((m for m in HEADLINE_ORDER if m in found), None)
        if method is None:
            return
        heads = [tuple(h) for h in found[method]["heads"]]
        rt = self._refusal_tokens()
        signed: list[float | None] = [None] * len(heads)
        spath = self.out / "signed_effects.json"
        known = {(layer, h): v for layer, h, v in _read(spath)["heads"]} if spath.exists() else {}
        if rt is not None and all(h in known for h in heads):  # the head tables' exact sweep has them
            signed = [float(known[h]) for h in heads]
        elif rt is not None:  # the exact sweep restricted to these heads: one forward per head per prompt
            from .ships import ships

            res = ships(self.model, self.tokenizer, self.prompts["attribution"], heads=heads, refusal_tokens=rt,
                        mode=c.mode, eps=c.eps, prompt_format=c.stage_format("ships"), system_prompt=c.system_prompt,
                        progress=False, mean=self._head_means())
            mean = res.mean("refusal")
            signed = [float(mean[h]) for h in heads]
        _json(path, {"method": method, "mode": c.mode, "eps": c.eps, "heads": [list(h) for h in heads],
                     "signed_effect": signed,
                     "signed_effect_meaning": "mean drop of the refusal log-odds over the attribution prompts when "
                                              "the head alone is ablated (> 0: the head holds refusal up)",
                     "why": f"first of {list(HEADLINE_ORDER)} computed by this run",
                     "others": {m: cond["heads"] for m, cond in found.items() if m != method}})

    def conditions(self) -> tuple[list[dict], list[dict]]:
        """The harmful-prompt conditions and the harmless (over-refusal) ones."""
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
        if (self.out / "search.json").exists():
            from .search import SearchResult

            found_res = SearchResult.load(self.out / "search.json")
            found, obj = [tuple(h) for h in found_res.heads], found_res.config["objective"]
            conds.append({"name": f"search-{obj}-top{k}", "method": f"search-{obj}", "k": len(found[:k]),
                          "heads": found[:k]})
            if k > 1 and found:
                conds.append({"name": f"search-{obj}-top1", "method": f"search-{obj}", "k": 1, "heads": found[:1]})
        est = ShipsResult.load(self.out / "ships_estimate")
        if est.refusal is not None:
            conds.append({"name": f"refusal-top{k}", "method": "refusal-grad", "k": k,
                          "heads": est.dataset_top(k, metric="refusal")})
        from .evaluate import random_control, random_control_seed

        for i in range(c.random_controls):  # controls of the Sahara heads: layer-matched unless asked otherwise
            seed = random_control_seed(c.seed, i)
            conds.append({"name": f"random{i}-top{k}", "method": "random", "k": k, "seed": seed,
                          "control_for": f"sahara-top{k}",
                          "heads": random_control(self.model, safety, kind=c.random_kind, seed=seed)})
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
        for i, (name, slug, harmful) in enumerate(self.eval_sets()):  # the main one (harmless prompts too) first
            out = self.out if i == 0 else self.out / "evaluations" / slug
            if i and (out / "evaluation.json").exists():
                continue
            log.info("evaluation on %s (%d prompts) → %s", name, len(harmful), out)
            ev = evaluate_conditions(self.model, self.tokenizer, harmful, conds, out_dir=out,
                                     harmless=self.prompt_set("harmless") if P["harmless"] and not i else None,
                                     harmless_conditions=harmless if P["harmless"] and not i else None, mode=c.mode,
                                     eps=c.eps, judge=c.judge, prompt_format=c.stage_format("eval"),
                                     system_prompt=c.system_prompt, max_new_tokens=c.max_new_tokens,
                                     batch_size=c.eval_batch_size or EVAL_BATCH_SIZE, seed=c.seed,
                                     progress=self.progress,
                                     refusal_tokens=self._refusal_tokens(), random_kind=c.random_kind,
                                     mean=self._head_means(), stop_at_verdict=c.stop_at_verdict is not False)
            ev.provenance["eval_dataset"] = name
            if "indices" not in ev.provenance.get("data", {}):  # evaluate_conditions keeps only the texts' sha256
                ev.provenance["data"] = _data_record(harmful)
            ev.save(out, responses=False, metric=False)

    def stage_report(self) -> None:
        from .report import write_report

        if (self.out / "sahara.json").exists():
            self._write_headline()  # run folders made before heads.json existed
            self._write_head_tables()  # … or before signed_effects.json / disagreement.json

        write_report(self.out)

    # -- driver ---------------------------------------------------------------
    _ARTIFACT = {"prompts": "prompts.json", "ships": "ships_estimate.json", "sahara": "sahara.json",
                 "search": "search.json", "evaluate": "evaluation.json", "report": "report.html"}

    def done(self, stage: str) -> bool:
        if stage == "search" and self.search_objective is None:
            return (self.out / "disagreement.json").exists()
        if stage == "ships":
            return (self.out / "ships_estimate.json").exists() and (
                not self.cfg.n_ships_exact or (self.out / "ships.json").exists())
        if stage == "evaluate" and self.cfg.eval_dataset and (self.out / "prompts.json").exists():
            return all((self.out / "evaluations" / slug if slug else self.out).joinpath("evaluation.json").exists()
                       for _, slug, _ in self.eval_sets())
        return (self.out / self._ARTIFACT[stage]).exists()

    def execute(self, stages: tuple[str, ...] = STAGES) -> Path:
        """Run the given stages in order, skipping those already done. Returns the run folder."""
        check_writable(self.out)
        self.stages = tuple(stages)
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
