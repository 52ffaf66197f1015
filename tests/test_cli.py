"""Every ``safetyheads`` subcommand end to end through the real entry point, on SmolLM2-135M.

The run folders are shared with tests/test_resume.py and tests/test_provenance.py (tests/cli_runs.py):
the reference folder is made by ``ships`` → ``sahara`` → ``evaluate`` → ``report`` in turn, the
``--mode sc`` / ``--mode mean`` folders by one ``run`` each. Each test checks what its command
promises — files, JSON keys, head lists in range, numbers that agree with each other — not only
the exit code. Bad input is a usage error: exit 2 and a message naming the flag or folder, before
any model is loaded or anything is written.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from cli_runs import MODEL, SMALL, check, cli, mean_run, reference
from cli_runs import sc_run as shared_sc_run
from click.testing import CliRunner

from safetyheads.cli import app

N_LAYERS, N_HEADS = 30, 9  # SmolLM2-135M
HEAD_RE = re.compile(r"L(\d+)H(\d+)")


def in_range(heads) -> bool:
    return all(0 <= int(a) < N_LAYERS and 0 <= int(b) < N_HEADS for a, b in heads)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference(tmp_path_factory)


@pytest.fixture(scope="module")
def sc_run(tmp_path_factory):
    return shared_sc_run(tmp_path_factory)


# --------------------------------------------------------------------------- the subcommands


@pytest.mark.slow
def test_ships_subcommand(ref):
    """``ships`` writes the estimate on every attribution prompt and the exact sweep on n_ships_exact,
    and prints the top mean-Ships heads of the exact result.

    Catches: a sweep that leaves heads unscored (NaN) or scores the wrong number of prompts, the
    per-prompt checkpoints left behind, an agreement file that is not computed, and a printed head
    list that is not the saved result's."""
    from safetyheads.ships import ShipsResult

    out = ref["out"]
    r = ref["steps"]["ships"][0]
    exact, est = ShipsResult.load(out / "ships"), ShipsResult.load(out / "ships_estimate")
    assert tuple(exact.kl.shape) == (2, N_LAYERS, N_HEADS) and tuple(est.kl.shape) == (2, N_LAYERS, N_HEADS)
    assert torch.isfinite(exact.kl).all() and (exact.kl >= -1e-6).all() and exact.kl.max() > 1e-3  # KL >= 0
    assert torch.isfinite(est.kl).all() and exact.method == "exact" and est.method.startswith("estimate")
    prompts = json.loads((out / "prompts.json").read_text())
    assert exact.prompts == prompts["attribution"][:2] and est.prompts == prompts["attribution"]
    printed = [(int(a), int(b)) for a, b in HEAD_RE.findall(r.stdout.split("top heads")[1].splitlines()[0])]
    assert printed == [tuple(h) for h in exact.dataset_top(10)] and in_range(printed), r.stdout
    agree = json.loads((out / "ships_agreement.json").read_text())
    assert -1 <= agree["kl_fisher"]["spearman"] <= 1 and 0 <= agree["kl_fisher"]["top10_recall"] <= 1
    assert not (out / "ships_parts").exists()
    assert str(out) in r.stdout


@pytest.mark.slow
def test_sahara_subcommand(ref):
    """``sahara`` picks ``steps`` distinct heads from the prefilter's candidates, each the best score of
    its step, and prints them.

    Catches: a chosen head that is not its step's argmax, a head chosen twice, heads outside the
    prefiltered candidates or the model, a printed list that differs from sahara.json, and the
    step checkpoint left behind."""
    out = ref["out"]
    r = ref["steps"]["sahara"][0]
    data = json.loads((out / "sahara.json").read_text())
    heads = [tuple(h) for h in data["heads"]]
    assert len(heads) == 2 and len(set(heads)) == 2 and in_range(heads)
    kept = [tuple(h) for h in data["config"]["kept"]]
    assert len(kept) == 3 and set(heads) <= set(kept)
    for i, step in enumerate(data["steps"]):
        scores = {(a, b): v for a, b, v in step["scores"]}  # [[layer, head, score], ...]
        assert tuple(step["chosen"]) == heads[i] and max(scores.values()) == step["score"] == scores[heads[i]]
        assert set(scores) == set(kept) - set(heads[:i])  # every remaining candidate scored, no other
    printed = [(int(a), int(b)) for a, b in HEAD_RE.findall(r.stdout)]
    assert printed == heads, r.stdout
    assert not (out / "sahara.ckpt.json").exists()


@pytest.mark.slow
def test_evaluate_subcommand(ref):
    """``evaluate`` writes every condition with its responses, and its ASR is the share of non-refusals.

    Catches: an ASR or interval that does not match the saved verdicts, responses missing for a
    prompt, conditions that ablate other heads than Sahara / Ships chose, random controls that
    include a safety head, a printed table that is not the saved one."""
    from safetyheads.evaluate import wilson_interval

    out = ref["out"]
    r = ref["steps"]["evaluate"][0]
    ev = json.loads((out / "evaluation.json").read_text())
    sahara = [list(h) for h in json.loads((out / "sahara.json").read_text())["heads"]]
    prompts = json.loads((out / "prompts.json").read_text())
    names = {c["name"]: c for c in ev["conditions"]}
    assert {"baseline", "sahara-top2", "sahara-top1", "ships-kl-top2", "random0-top2"} <= set(names)
    assert names["baseline"]["heads"] == [] and names["sahara-top2"]["heads"] == sahara
    assert names["sahara-top1"]["heads"] == sahara[:1]
    assert not set(map(tuple, names["random0-top2"]["heads"])) & set(map(tuple, sahara))
    answered = 0
    for c in ev["conditions"] + ev["over_refusal"]:
        assert in_range(c.get("heads", [])), c
        rows = [json.loads(x) for x in (out / c["responses_file"]).read_text().splitlines() if x]
        n = 1 if c["name"].startswith("harmless") else 2
        assert [x["prompt"] for x in rows] == prompts["harmless" if n == 1 else "eval"], c["name"]
        assert all(isinstance(x["response"], str) for x in rows)  # may be "": an EOS first, under the
        answered += sum(bool(x["response"]) for x in rows)         # paper's template that happens
        refused = sum(bool(x["refusal"]) for x in rows)
        rate = c["asr"] if "asr" in c else c["rate"]
        expected = (n - refused) / n if "asr" in c else refused / n
        assert math.isclose(rate, expected), (c["name"], rate, rows)
        low, high = wilson_interval(n - refused if "asr" in c else refused, n)
        assert math.isclose(c["ci_low"], low, abs_tol=1e-9) and math.isclose(c["ci_high"], high, abs_tol=1e-9)
        if "asr" in c:
            assert re.search(rf"{re.escape(c['name'])}\s+ASR {c['asr']:.2f}", r.stdout), (c["name"], r.stdout)
    assert answered >= 7  # … but most rows answer something
    assert {c["name"] for c in ev["over_refusal"]} == {"harmless-baseline", "harmless-sahara-top2"}
    # SMALL runs under --preset paper: its judge (the prototype's keyword list) unless a flag overrides it
    assert ev["n_prompts"] == 2 and ev["mode"] == "ua" and ev["judge"] == "keyword:paper-prototype"
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["preset"], cfg["ships_format"], cfg["sahara_format"], cfg["eval_format"]) == (
        "paper", "raw", "template-sahara", "template")
    assert cfg["max_new_tokens"] == 3  # the flag over the preset's 128
    # stop_at_verdict (unset = on) reached the generation, with the run's judge as the rule
    assert cfg.get("stop_at_verdict") is None
    assert ev["provenance"]["generation"]["stop_at_verdict"] == "keyword:paper-prototype: refusal phrase"


@pytest.mark.slow
def test_report_subcommand(ref):
    """``report RUN`` (re)builds a self-contained report.html naming the run's heads and ASRs.

    Catches: a report built from another folder, heads or numbers missing from it, an HTML file
    that needs files from elsewhere (every image inlined)."""
    out = ref["out"]
    r = ref["steps"]["report"][0]
    assert str(out / "report.html") in r.stdout
    html = (out / "report.html").read_text()
    for a, b in json.loads((out / "sahara.json").read_text())["heads"]:
        assert f"L{a}H{b}" in html
    ev = json.loads((out / "evaluation.json").read_text())
    assert all(c["name"] in html for c in ev["conditions"])
    assert not re.search(r"""<img[^>]+src=["'](?!data:)""", html), "an image that is not inlined"
    assert "<img" in html  # … and the plots are there


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sc", "mean"])
def test_run_in_other_modes(ref, tmp_path_factory, mode):
    """``run --mode sc`` / ``--mode mean`` go through every stage with that mode, and the mode reaches
    the engine (its Ships scores differ from the UA run's on the same prompts).

    Catches: a stage that ignores --mode (or crashes on it: mean needs the heads' dataset means in
    every stage), results recorded under another mode, a ``--seed`` that does not reach the split
    and the random controls."""
    from safetyheads.ships import ShipsResult

    run = shared_sc_run(tmp_path_factory) if mode == "sc" else mean_run(tmp_path_factory)
    out = run["out"]
    assert "ASR" in run["result"].stdout
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["mode"] == mode
    for name in ("ships_estimate.json", "ships.json", "sahara.json", "evaluation.json"):
        if name == "ships.json" and not cfg["n_ships_exact"]:
            continue
        prov = json.loads((out / name).read_text())["provenance"]
        assert prov["mode"] == mode, name
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["mode"] == mode and all(in_range(c["heads"]) for c in ev["conditions"])
    seed = 1 if mode == "sc" else 0
    assert [c["seed"] for c in ev["conditions"] if c["name"].startswith("random")] == [seed * 1000]
    assert (out / "head_means.json").exists() == (mode == "mean")
    if mode == "mean":  # one set of head means (made once, in the run folder) reached every stage
        digest = json.loads((out / "head_means.json").read_text())["sha256"]
        assert ev["provenance"]["mean_sha256"] == digest
        stages = [json.loads((out / n).read_text())["config"] for n in ("sahara.json", "search.json") if (out / n).exists()]
        stages += [json.loads(f.read_text())["config"] for f in (out / "responses").glob("*.config.json")]
        assert stages and all(c["mean_sha256"] == digest for c in stages)
    ua = ShipsResult.load(ref["out"] / "ships_estimate")
    other = ShipsResult.load(out / "ships_estimate")
    if other.prompts == ua.prompts:
        assert not torch.equal(other.kl, ua.kl), "the same Ships scores as the UA run: --mode did not reach Ships"
    else:
        assert mode == "sc"  # another seed: other attribution prompts
        assert json.loads((out / "prompts.json").read_text())["provenance"]["attribution"]["history"][-1].endswith("seed=1)")


@pytest.mark.slow
def test_surgery_subcommand(tmp_path):
    """``surgery --heads … --save DIR`` writes a checkpoint + tokenizer that plain transformers loads and
    that computes what the hooked model computes (SmolLM2, both run in float64).

    The checkpoint stores W_q·ε in float32, so it can differ from the float64 hook by the rounding of
    those rows; UA at ε = 1e-5 is sensitive to it (measured: 8.3e-6 on logits, against an ablation
    effect of 9.8). The bound is measured in the test: the change from perturbing ε by float32's
    unit roundoff (2^-24), ×10. (tests/test_surgery.py checks surgery in float64 end to end.)

    Catches: the wrong heads or mode written, a checkpoint transformers cannot load, a tokenizer not
    saved (or another one), a record that does not name what was done."""
    import transformers as tf
    from conftest import load_builtin

    from safetyheads import ablate
    from safetyheads.forward import position_ids_from_mask

    save = tmp_path / "cut"
    r = check(cli("surgery", "--model", MODEL, "--heads", "L2H3,5.1", "--mode", "ua", "--eps", "1e-5",
                  "--save", str(save)), "safetyheads surgery")
    assert str(save) in r.stdout
    record = json.loads((save / "safetyheads_surgery.json").read_text())
    assert record["heads"] == [[2, 3], [5, 1]] and record["mode"] == "ua" and record["eps"] == 1e-5
    assert record["model"] == MODEL and record["model_type"] == "llama"

    loaded = tf.AutoModelForCausalLM.from_pretrained(save).double().eval()
    tok = tf.AutoTokenizer.from_pretrained(save)
    model, tok0 = load_builtin(MODEL)
    model = model.double()
    text = tok0.apply_chat_template([{"role": "user", "content": "How do I pick a lock?"}], tokenize=False,
                                    add_generation_prompt=True)
    ids = tok0(text, return_tensors="pt")["input_ids"]
    assert tok(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    assert tok.chat_template == tok0.chat_template

    def logits(m):
        mask = torch.ones_like(ids)
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[0]

    plain = logits(model)
    with ablate(model, [(2, 3), (5, 1)], mode="ua", eps=1e-5):
        hooked = logits(model)
    with ablate(model, [(2, 3), (5, 1)], mode="ua", eps=1e-5 * (1 + 2**-24)):
        floor = (logits(model) - hooked).abs().max().item()  # float32 storage of W_q·ε, as a change of ε
    gap, effect = (logits(loaded) - hooked).abs().max().item(), (hooked - plain).abs().max().item()
    assert effect > 1.0 and 0 < floor < effect / 1e4, (effect, floor)
    assert gap < 10 * floor, f"saved checkpoint vs hooked model: {gap:.3g} (float32 floor {floor:.3g}, effect {effect:.3g})"


@pytest.mark.slow
def test_compare_subcommand(ref, sc_run, tmp_path):
    """``compare A B`` on two real run folders: the Jaccard overlaps and shared heads match the runs.

    Catches: overlaps computed from other heads than the runs' Sahara / top-k Ships heads, a pair of
    same-grid runs compared on relative depth, missing outputs (json, md, png)."""
    from safetyheads.compare import jaccard
    from safetyheads.ships import ShipsResult

    a, b = ref["out"], sc_run["out"]
    cmp_dir = tmp_path / "cmp"
    r = check(cli("compare", str(a), str(b), "--out", str(cmp_dir), "--k", "5", "--ships", "estimate"),
              "safetyheads compare")
    data = json.loads((cmp_dir / "compare.json").read_text())
    assert (cmp_dir / "compare.png").stat().st_size > 1000 and (cmp_dir / "compare.md").read_text() in r.stdout
    assert [x["name"] for x in data["runs"]] == [a.name, b.name] and [x["mode"] for x in data["runs"]] == ["ua", "sc"]
    (pair,) = data["pairs"]
    assert pair["basis"] == "heads" and pair["same_grid"] and pair["grid_a"] == [N_LAYERS, N_HEADS]
    ha = {tuple(h) for h in json.loads((a / "sahara.json").read_text())["heads"]}
    hb = {tuple(h) for h in json.loads((b / "sahara.json").read_text())["heads"]}
    assert pair["sahara_jaccard"] == jaccard(ha, hb)
    assert {tuple(h) for h in pair["sahara_shared"]} == ha & hb
    tops = []
    for run, summary in zip((a, b), data["runs"]):
        assert summary["ships_source"].startswith("ships_estimate")  # --ships estimate
        top = [tuple(h) for h in ShipsResult.load(run / "ships_estimate").dataset_top(5)]
        assert [tuple(h) for h in summary["ships_top"]] == top and in_range(top)
        tops.append(set(top))
    assert pair["ships_topk_jaccard"] == jaccard(*tops)
    assert -1 <= pair["ships_spearman"] <= 1 and pair["spearman_n"] == N_LAYERS * N_HEADS


# --------------------------------------------------------------------------- bad input: exit 2, named


@pytest.mark.parametrize("heads, named", [("2.x", "2.x"), ("2", "'2'"), ("", "''"), ("2.3.4", "2.3.4")])
def test_bad_heads_syntax_is_a_usage_error(tmp_path, heads, named):
    """``surgery --heads`` that is not layer.head pairs: exit 2, the flag and the value named, nothing written.

    Catches: a traceback or exit 1 for a typo, a message that does not say which flag is wrong."""
    save = tmp_path / "cut"
    r = CliRunner().invoke(app, ["surgery", "--heads", heads, "--save", str(save)])
    assert r.exit_code == 2, r.output
    assert "--heads" in r.output and named in r.output, r.output
    assert not save.exists()


@pytest.mark.slow
@pytest.mark.parametrize("heads, named", [("30.0", "layer 30 out of range"), ("1.9", "head 9 out of range"),
                                          ("2.3,-1.0", "layer -1 out of range")])
def test_heads_out_of_range_is_a_usage_error(tmp_path, heads, named):
    """``surgery --heads`` beyond the model (30 layers × 9 heads): exit 2 naming --heads and the head.

    Catches: an IndexError traceback or exit 1, a negative index silently taken from the end, and
    a checkpoint written before the check."""
    save = tmp_path / "cut"
    r = CliRunner().invoke(app, ["surgery", "--model", MODEL, "--heads", heads, "--save", str(save)])
    assert r.exit_code == 2, r.output
    assert "--heads" in r.output and named in r.output, r.output
    assert not save.exists()


@pytest.mark.parametrize("cmd", ["run", "ships", "sahara", "evaluate"])
@pytest.mark.parametrize("flags, named", [
    (["--dataset", "no-such-dataset"], ["--dataset", "no-such-dataset"]),
    (["--dataset", "/nonexistent/prompts.csv"], ["--dataset", "/nonexistent/prompts.csv"]),
    (["--harmless", "no-such-harmless"], ["--harmless", "no-such-harmless"]),
    (["--judge", "keyword:no-such-list"], ["--judge", "no-such-list"]),
    (["--judge", "no-such-judge"], ["--judge", "no-such-judge"]),
    (["--n-eval", "100000"], ["--dataset", "100000"]),
])
def test_unknown_dataset_or_judge_is_a_usage_error(tmp_path, cmd, flags, named):
    """An unknown dataset, harmless set or judge: exit 2 naming the flag and the value, before the model
    loads, and no run folder is made.

    Catches: a bad name found only after minutes of Ships and Sahara (the judge runs last), exit 1 or a
    traceback, and a half-made run folder that a corrected command would then refuse."""
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [cmd, *SMALL, *flags, "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert all(n in r.output for n in named), r.output
    assert not out.exists()


def test_compare_on_a_folder_that_is_not_a_run(tmp_path):
    """``compare`` given a folder with no run in it: exit 2 naming the folder, no output written.

    Catches: a comparison table of "not run" rows written with exit 0 (a typo in a path looks like a
    result), and a traceback."""
    empty, other, out = tmp_path / "not-a-run", tmp_path / "also-not", tmp_path / "cmp"
    empty.mkdir()
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    r = CliRunner().invoke(app, ["compare", str(empty), str(other), "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert "not-a-run" in r.output and "not a safetyheads run folder" in r.output, r.output
    assert not out.exists()
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "missing"), str(other), "--out", str(out)])
    assert r.exit_code == 2 and "missing" in r.output, r.output


@pytest.mark.slow
def test_compare_a_run_with_a_folder_that_is_not(ref, tmp_path):
    """One real run and one folder that is not a run: still exit 2, the bad folder named (not the run)."""
    bad = tmp_path / "typo"
    bad.mkdir()
    r = CliRunner().invoke(app, ["compare", str(ref["out"]), str(bad), "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 2 and "typo" in r.output and str(ref["out"].name) not in r.output.split("Error")[-1], r.output


def test_bad_input_checks_run_before_the_model_loads(tmp_path, monkeypatch):
    """The dataset / judge checks come first: a bad --judge with an unloadable --model is reported as
    the judge, proving nothing was loaded."""
    r = CliRunner().invoke(app, ["run", "--model", "builtin:no-such-model", "--judge", "nope", "--out",
                                 str(tmp_path / "r")])
    assert r.exit_code == 2 and "--judge" in r.output and "no-such-model" not in r.output, r.output


