"""Interrupt ``safetyheads run`` inside each long stage, rerun it, and get the uninterrupted results.

How a test lands *inside* a stage without a debug hook in the product: the run is started through
this file run as a script (:func:`_harness`), which watches the run folder (a 10 ms poll, and a
check at every ``os.replace`` — the last step of every atomic write of the product) for the point:
the first Ships per-prompt checkpoint, the Sahara checkpoint holding step 1, the evaluation's first
generated batch (or first condition written). Then it creates a marker file; the test sees it and
sends the signal at once, while the run computes the next unit (the second prompt's sweep, step 2's
candidates, the next generation batch). So that the signal cannot arrive after the stage ends, the
harness also holds the run's next atomic write (a half-written checkpoint: temp file written, not
renamed) until the signal comes. SIGINT is delivered as Python does by default (KeyboardInterrupt),
so the product's own clean-up runs.

Two chains, one per signal, each interrupting the same run three times (Ships sweep, Sahara step,
evaluation) and then finishing it; every result file must equal the reference run's
(tests/cli_runs.py: tensors bit-identical, JSON equal except wall-clock fields).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import SMALL, check, cli, diff_results, reference, result_files

POINTS = ("ships", "sahara", "evaluate")
GENERATION_CKPT = "responses/.generation.ckpt.jsonl"  # evaluation: appended after every generated batch


def _lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def _reached(point: str, out: Path) -> bool:
    """Is the run in ``out`` inside ``point``: its first unit checkpointed, the stage not finished?"""
    if point == "ships":
        return (out / "ships_parts" / "prompt0000.json").exists()
    if point == "sahara":
        try:
            return len(json.loads((out / "sahara.ckpt.json").read_text()).get("done", [])) >= 1
        except (FileNotFoundError, json.JSONDecodeError):
            return False
    if point == "evaluate":  # a generated batch checkpointed, or a condition's responses written
        return _lines(out / GENERATION_CKPT) >= 2 or any((out / "responses").glob("*.config.json"))
    raise ValueError(point)


def _harness(point: str, marker: str, cli_args: list[str]) -> None:
    """Run the CLI, arming when the run reaches ``point`` (see the module docstring): a thread polls the
    folder every 10 ms, and every atomic write (``os.replace``) checks it too, so the write that would
    let the stage finish is held even if the poll were late."""
    import threading

    out = Path(cli_args[cli_args.index("--out") + 1])
    real_replace = os.replace
    state = {"armed": False, "fired": False}

    def check() -> None:
        if not state["fired"] and _reached(point, out):
            state["fired"] = state["armed"] = True
            Path(marker).write_text(point)

    def poll() -> None:
        while not state["fired"]:
            check()
            time.sleep(0.01)

    def on_sigint(signum, frame):  # Python's default SIGINT behaviour, plus: stop holding writes
        state["armed"] = False
        raise KeyboardInterrupt

    def replace(src, dst, *a, **kw):
        check()
        while state["armed"]:  # the next checkpoint, held half-written (temp file, no rename) until the signal
            time.sleep(0.01)
        real_replace(src, dst, *a, **kw)
        check()

    signal.signal(signal.SIGINT, on_sigint)
    os.replace = replace
    threading.Thread(target=poll, daemon=True).start()
    from safetyheads.cli import app

    app(cli_args, prog_name="safetyheads")


def interrupt(out: Path, point: str, sig: signal.Signals, tmp: Path) -> dict:
    """Start ``run SMALL --out out``, signal it inside ``point``, and return what it left behind."""
    marker = tmp / f"reached-{point}-{sig.name}"
    marker.unlink(missing_ok=True)
    log = tmp / f"{point}-{sig.name}.stderr"
    with log.open("w") as err_file:  # a file, not a pipe: a full pipe would block the run
        proc = subprocess.Popen([sys.executable, __file__, point, str(marker), "run", *SMALL, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=err_file)
    deadline = time.time() + 3600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if not marker.exists():
        proc.kill()
        proc.wait()
        pytest.fail(f"the run never reached {point} (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    proc.send_signal(sig)
    proc.wait(timeout=600)
    err = log.read_text()
    left = {"returncode": proc.returncode, "stderr": err, "files": sorted(str(p.relative_to(out))
                                                                           for p in out.rglob("*") if p.is_file())}
    if sig is signal.SIGINT:
        assert proc.returncode == 130, (proc.returncode, err[-3000:])
        assert "interrupted" in err and "rerun the same command" in err, err[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    return left


def _check_inside(out: Path, point: str, left: dict) -> str:
    """Assert the run stopped inside ``point`` (its final artifact absent, its checkpoint present)."""
    files = left["files"]
    if point == "ships":
        assert "ships_parts/prompt0000.json" in files and "ships.json" not in files, files
        return "Ships sweep of prompt 2 of 2"
    if point == "sahara":
        assert "ships.json" in files and "sahara.json" not in files, files
        state = json.loads((out / "sahara.ckpt.json").read_text())
        assert len(state["done"]) == 1, state
        return f"Sahara step 2 ({len(state.get('partial', {}))} candidate scores kept)"
    assert "sahara.json" in files and "evaluation.json" not in files, files
    n = sum(f.startswith("responses/") and f.endswith(".config.json") for f in files)
    rows = max(0, _lines(out / GENERATION_CKPT) - 1)
    assert n >= 1 or rows >= 1, files
    return f"evaluation ({rows} generated rows checkpointed, {n} conditions written)"


#: what a run folder holds once the Ships estimate is done (the SIGINT chain starts from the
#: reference's copy of these, to save the refusal-token generation and the estimate: a resume too)
BEFORE_SWEEP = ("config.json", "prompts.json", "refusal_tokens.json", "ships_estimate.json",
                "ships_estimate.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("sig, seeded", [(signal.SIGKILL, False), (signal.SIGINT, True)],
                         ids=["kill-9-from-scratch", "sigint-from-estimate"])
def test_interrupted_three_times_equals_uninterrupted(tmp_path_factory, tmp_path, sig, seeded):
    """Interrupted inside the Ships sweep, a Sahara step and the evaluation, then rerun: same results.

    Catches: a checkpoint that is not atomic (a torn file read back on resume), a resumed stage that
    mixes in scores of another prompt / step / condition or drops them, a per-prompt merge in the
    wrong order, Sahara resuming with the wrong chosen heads or stale partial scores, an evaluation
    that counts a condition whose responses were not all written, SIGINT clean-up that deletes
    checkpoints or writes a half result, half-written temp files left in the folder, and a resume
    that redoes finished work (each Sahara step is logged once across all the processes)."""
    out = tmp_path / "cut"
    if seeded:
        ref = reference(tmp_path_factory)
        out.mkdir()
        for name in BEFORE_SWEEP:
            shutil.copy2(ref["out"] / name, out / name)
    where = []
    for point in POINTS:
        left = interrupt(out, point, sig, tmp_path)
        where.append(_check_inside(out, point, left))
    r = check(cli("run", *SMALL, "--out", str(out)), "resumed run")
    assert "ASR" in r.stdout
    ref = reference(tmp_path_factory)  # asked for last: another xdist worker may be building it meanwhile
    diff = diff_results(result_files(out), result_files(ref["out"]))
    assert not diff, f"resumed after {sig.name} at {where}: results differ from the uninterrupted run: {diff}"
    assert not list(out.rglob("*.tmp")) and not (out / "sahara.ckpt.json").exists() \
        and not (out / "ships_parts").exists()
    log = (out / "run.log").read_text()
    assert log.count("Sahara step 1:") == 1 and log.count("Sahara step 2:") == 1, log  # finished steps not redone
    assert "reused" in log or "loaded" in log  # generated rows / conditions read back, not regenerated
    print(f"{sig.name}: interrupted inside {where}")


if __name__ == "__main__":
    _harness(sys.argv[1], sys.argv[2], sys.argv[3:])
