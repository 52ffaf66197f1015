"""The main job end to end: config errors, a tiny real run on a cold model cache, the default run.

The tiny runs use the real SmolLM2-135M (fastest real model; it does not refuse, so the signed
refusal score is skipped and recorded as such) with a handful of prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import sc_run
from click.testing import CliRunner

from safetyheads.cli import app
from safetyheads.config import ConfigError, load_config


def cli(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    """``safetyheads`` in a subprocess; ``cache`` overrides the session's SAFETYHEADS_CACHE."""
    env = {**os.environ, "SAFETYHEADS_CACHE": str(cache)} if cache is not None else None
    r = subprocess.run([sys.executable, "-m", "safetyheads.cli", *args], capture_output=True, timeout=900, env=env)
    # decoded by hand: text=True would turn the carriage returns of a progress bar into newlines
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    return r


def assert_no_progress_bars(stderr: str) -> None:
    """No tqdm bar of any kind: tqdm redraws with carriage returns and writes 'NN%|' and 'it/s' or 's/it'."""
    for mark in ("\r", "%|", "it/s", "s/it", "Loading weights", "de-quantizing"):
        assert mark not in stderr, f"{mark!r} in stderr: {stderr[-2000:]!r}"


# --------------------------------------------------------------------------- config errors (fast)


def test_unknown_key_in_config_file_is_named(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('bogus_key = 3\nsteps = 2\n')
    with pytest.raises(ConfigError, match="bogus_key: unknown key"):
        load_config(f)


@pytest.mark.parametrize("body, msg", [
    ("steps = 0", r"c\.toml\):\n  steps: Input should be greater than or equal to 1"),
    ('mode = "nope"', r"mode: Input should be 'ua', 'sc'"),
    ("eps = -1.0", "eps: Value error, eps must be a finite number >= 0"),
    ("n_eval = 'x'", "n_eval: Input should be a valid integer"),
    ("prefilter_k = 1\nsteps = 3", "prefilter_k must be >= steps"),
])
def test_bad_values_are_named(tmp_path, body, msg):
    f = tmp_path / "c.toml"
    f.write_text(body + "\n")
    with pytest.raises(ConfigError, match=msg):
        load_config(f)


def test_yaml_and_flags_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 4\nn-eval: 10\n")
    cfg = load_config(f, steps=2)
    assert (cfg.steps, cfg.n_eval) == (2, 10)


def test_cli_config_errors_exit_nonzero_and_write_nothing(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["run", "--out", str(out), "--steps", "0"])
    assert r.exit_code != 0 and "steps" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense = true\n")
    r = runner.invoke(app, ["run", "--out", str(out), "--config", str(bad)])
    assert r.exit_code != 0 and "nonsense" in r.output
    assert not out.exists()


def test_unknown_model_is_a_clear_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--out", str(out), "--model", "builtin:no-such-model", "--quiet"])
    assert r.exit_code != 0
    assert "no-such-model" in r.output
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc: a folder nobody, root included, can write")
def test_unwritable_output_folder():
    r = CliRunner().invoke(app, ["run", "--out", "/proc/self/safetyheads-run", "--quiet"])
    assert r.exit_code != 0 and "not writable" in r.output


def test_output_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(app, ["run", "--out", str(f), "--model", "builtin:smollm2-135m-instruct", "--quiet"])
    assert r.exit_code != 0 and ("not a folder" in r.output or "is a file" in r.output)


def test_quiet_silences_library_bars_for_the_command_only(tmp_path, monkeypatch):
    """--quiet switches off transformers' bars and the GGUF dequantizer's own tqdm while the command
    runs (the run itself gets progress=False), and puts both back when it ends, on error too."""
    import io

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    import safetyheads.pipeline as pipeline

    seen = {}

    def fake_execute(self, stages):
        sink = io.StringIO()
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=sink):
            pass
        seen.update(bars=hf_logging.is_progress_bar_enabled(), gguf=sink.getvalue(), progress=self.progress)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(pipeline.Run, "execute", fake_execute)
    original = gguf_utils.tqdm
    hf_logging.enable_progress_bar()
    try:
        r = CliRunner().invoke(app, ["ships", "--out", str(tmp_path / "q"), "--quiet"])
        assert r.exit_code == 1 and "stopped by the test" in r.output, r.output
        assert seen == {"bars": False, "gguf": "", "progress": False}
        assert hf_logging.is_progress_bar_enabled() and gguf_utils.tqdm is original
        r = CliRunner().invoke(app, ["ships", "--out", str(tmp_path / "loud")])
        assert r.exit_code == 1
        assert seen["bars"] is True and "3/3" in seen["gguf"] and seen["progress"] is True
    finally:
        hf_logging.enable_progress_bar()


def test_help_everywhere():
    runner = CliRunner()
    for cmd in ([], ["run"], ["ships"], ["sahara"], ["evaluate"], ["surgery"], ["compare"], ["report"]):
        r = runner.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output


# --------------------------------------------------------------------------- real runs


def _results(run: Path) -> dict:
    ev = json.loads((run / "evaluation.json").read_text())
    sahara = json.loads((run / "sahara.json").read_text())
    return {"conditions": [(c["name"], c["heads"], c["asr"]) for c in ev["conditions"]],
            "sahara": (sahara["heads"], [s["scores"] for s in sahara["steps"]]),
            "responses": {p.name: p.read_text() for p in sorted((run / "responses").glob("*.jsonl"))}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The shared tiny run (tests/cli_runs.py: ``run BASE --mode sc --seed 1``, also checked by test_cli and
    test_provenance), made on an empty model cache of its own, so it took the cold path (assemble,
    verify, dequantize, cache) whatever ran before it, a developer's warm SAFETYHEADS_TEST_CACHE included.

    Resume after kill -9 and SIGINT inside each stage is tests/test_resume.py's (it replaced this
    module's single kill test, which ran the same tiny run twice more)."""
    run = sc_run(tmp_path_factory)
    return run["out"], run["result"], run["cache"], run["args"]


@pytest.mark.slow
def test_tiny_run_end_to_end(tiny_run):
    """`safetyheads run` on SmolLM2 writes every artifact and a report that names the heads."""
    out, r, cache, args = tiny_run
    for name in ("config.json", "prompts.json", "ships.json", "ships.safetensors", "ships_estimate.json",
                 "sahara.json", "evaluation.json", "report.html", "run.log"):
        assert (out / name).exists(), name
    ev = json.loads((out / "evaluation.json").read_text())
    names = [c["name"] for c in ev["conditions"]]
    assert "baseline" in names and "sahara-top2" in names and any(n.startswith("random") for n in names)
    heads = json.loads((out / "sahara.json").read_text())["heads"]
    assert len(heads) == 2
    html = (out / "report.html").read_text()
    # the chosen heads by their labels, in the order chosen (not any "L1…" text)
    assert " → ".join(f"<b>L{layer}H{head}</b>" for layer, head in heads) in html, heads
    assert "ASR" in r.stdout
    log = (out / "run.log").read_text()  # … the log file has every stage
    assert all(f"stage {s} done" in log for s in ("prompts", "ships", "sahara", "evaluate", "report")), log[-2000:]
    # this was the cold path: the cache folder did not exist before this run, which built the model's cache …
    built = [p.name for p in (cache / "models").iterdir() if p.is_dir()]
    assert built == ["smollm2-135m-instruct-b179c9523d0e"], built
    # … and --quiet kept the terminal free of every bar on it, the GGUF dequantizer's included
    assert "--quiet" in args
    assert_no_progress_bars(r.stderr)
    assert "INFO" not in r.stderr
    # a second run of the same command does no work and changes nothing
    before = _results(out)
    t0 = time.perf_counter()
    r2 = cli(*args, cache=cache)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert _results(out) == before
    assert time.perf_counter() - t0 < 120
    assert_no_progress_bars(r2.stderr)
    # a different config in the same folder is refused
    r3 = cli(*[a for a in args if a != "--quiet"], "--steps", "3", "--quiet", cache=cache)
    assert r3.returncode != 0 and "different configuration" in r3.stderr
