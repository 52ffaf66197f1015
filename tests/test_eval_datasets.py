"""--eval-dataset: heads chosen on one dataset evaluated on others (one evaluation per dataset in the
run folder), with paired statistics and layer-matched controls, shown in the report and the summary."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_lm import smol_tokenizer, tiny_lm

from safetyheads.config import ConfigError, RunConfig, load_config
from safetyheads.evaluate import eval_slug
from safetyheads.pipeline import Run, load_prompt_sets


def test_config_parses_a_list_of_eval_datasets():
    cfg = load_config(None, eval_dataset=" advbench , harmbench:standard,strongreject")
    assert cfg.eval_datasets() == ["advbench", "harmbench:standard", "strongreject"]
    assert RunConfig().eval_datasets() == ["advbench"] and RunConfig().random_kind == "layer-matched"
    with pytest.raises(ConfigError, match="eval_dataset.*empty"):
        load_config(None, eval_dataset="advbench,,strongreject")
    with pytest.raises(ConfigError, match="named twice"):
        load_config(None, eval_dataset="strongreject,strongreject")
    assert cfg.digest() != RunConfig().digest()


def test_prompt_sets_are_held_out_and_sampled():
    cfg = RunConfig(n_attribution=16, n_eval=40, eval_dataset="advbench,harmbench:standard,strongreject", seed=3)
    attribution, sets = load_prompt_sets(cfg)
    assert [n for n, _ in sets] == ["advbench", "harmbench:standard", "strongreject"]
    from safetyheads.datasets import holdout_split, load_prompts

    _, held_out = holdout_split(load_prompts("advbench"), 16, 40, seed=3)
    assert list(sets[0][1]) == list(held_out)  # the attribution dataset: its own held-out split
    for _, ps in sets:
        assert len(ps) == 40 and not set(ps) & set(attribution)
    hb = sets[1][1]
    assert hb.name == "harmbench:standard" and set(hb) <= set(load_prompts("harmbench:standard"))
    assert list(load_prompt_sets(cfg)[1][2][1]) == list(sets[2][1])  # seeded
    assert eval_slug("harmbench:standard") == "harmbench-standard" and eval_slug("/a/b/my set.csv") == "my-set.csv"


def test_attribution_prompts_are_removed_from_another_dataset(tmp_path):
    cfg = RunConfig(n_attribution=4, n_eval=10)
    attribution, _ = load_prompt_sets(cfg)
    f = tmp_path / "mine.txt"
    f.write_text("\n".join([attribution[0], "Tell me a secret.", "Another prompt."]) + "\n")
    _, sets = load_prompt_sets(cfg.model_copy(update={"eval_dataset": str(f)}))
    assert list(sets[0][1]) == ["Tell me a secret.", "Another prompt."]  # fewer than n_eval: all of them


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Stages prompts + evaluate of a run with two eval datasets on a tiny random model (conditions fixed)."""
    tok = smol_tokenizer()
    model = tiny_lm("qwen2", len(tok))
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(n_attribution=2, n_eval=3, n_harmless=2, max_new_tokens=3, eval_dataset="advbench,strongreject",
                    random_controls=2)
    conds = [{"name": "baseline", "method": "baseline", "k": 0, "heads": []},
             {"name": "sahara-top2", "method": "sahara", "k": 2, "heads": [[0, 1], [2, 3]]},
             {"name": "random0-top2", "method": "random", "k": 2, "seed": 0, "control_for": "sahara-top2",
              "heads": [[0, 2], [2, 0]]},
             {"name": "random1-top2", "method": "random", "k": 2, "seed": 1, "control_for": "sahara-top2",
              "heads": [[0, 3], [2, 2]]}]
    harmless = [{"name": "harmless-baseline", "method": "baseline", "k": 0, "heads": []},
                {"name": "harmless-sahara-top2", "method": "sahara", "k": 2, "heads": [[0, 1], [2, 3]]}]
    refusal = [tok.encode("I", add_special_tokens=False)[0]]
    mp = pytest.MonkeyPatch()
    mp.setattr(Run, "conditions", lambda self: (conds, harmless))
    mp.setattr(Run, "_refusal_tokens", lambda self: refusal)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = Run(cfg, out, progress=False, model=model, tokenizer=tok)
        run.execute(("prompts", "evaluate"))
        yield run, out
    finally:
        mp.undo()
        torch.set_num_threads(before)


def test_one_evaluation_per_dataset(tiny_study):
    run, out = tiny_study
    main = json.loads((out / "evaluation.json").read_text())
    extra = json.loads((out / "evaluations/strongreject/evaluation.json").read_text())
    assert main["provenance"]["eval_dataset"] == "advbench" and extra["provenance"]["eval_dataset"] == "strongreject"
    assert main["provenance"]["data"]["name"] == "advbench" and extra["provenance"]["data"]["name"] == "strongreject"
    assert [c["name"] for c in main["conditions"]] == [c["name"] for c in extra["conditions"]]
    assert main["over_refusal"] and not extra["over_refusal"]  # harmless prompts once, with the main evaluation
    prompts = json.loads((out / "prompts.json").read_text())
    assert [e["slug"] for e in prompts["eval_sets"]] == ["advbench", "strongreject"]
    assert [c["prompt"] for c in map(json.loads, (out / "evaluations/strongreject/responses/baseline.jsonl")
                                     .read_text().splitlines())] == prompts["eval_sets"][1]["prompts"]
    for ev in (main, extra):
        top = next(c for c in ev["conditions"] if c["name"] == "sahara-top2")
        assert top["paired"]["asr"]["test"] == "mcnemar-exact" and top["paired"]["asr"]["n"] == 3
        assert "refusal_log_odds" in top["paired"] and ev["refusal_metric"]["tokens"]
        assert ev["controls"][0]["condition"] == "sahara-top2" and ev["controls"][0]["asr"]["n"] == 3
        assert ev["stats"]["random_controls"] == "layer-matched"
    assert run.done("evaluate")
    (out / "evaluations/strongreject/evaluation.json").unlink()
    assert not run.done("evaluate")  # an interrupted extra evaluation is not done
    run.execute(("evaluate",))  # resumes: the main one loads, the extra one is written again
    assert json.loads((out / "evaluations/strongreject/evaluation.json").read_text())["conditions"] == extra["conditions"]


def test_report_shows_paired_statistics_and_transfer(tiny_study):
    from safetyheads.report import write_report

    _, out = tiny_study
    html = write_report(out).read_text()
    assert "McNemar p (Holm)" in html and "paired 95 % CI of Δ" in html and "flips ↑/↓" in html
    assert "Transfer: the same heads on other held-out datasets" in html and "evaluations/strongreject/" in html
    assert "sahara-top2: ASR " in html and ("— not significant" in html or "— significant at" in html)
    assert "Head sets vs their random controls (layer-matched)" in html
    assert "could not be rendered" not in html
