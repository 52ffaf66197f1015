"""The ``safetyheads`` command line. Every RunConfig field is a flag; ``--config FILE`` reads the same keys.

    safetyheads run                         # the whole study on the embedded model and AdvBench
    safetyheads run --model PATH --dataset my.csv --column prompt --out runs/mine
    safetyheads ships | sahara | evaluate   # one part of the study (same flags, same run folder)
    safetyheads surgery --heads 2.26,3.4 --save ablated/   # write an ablated checkpoint
    safetyheads compare runs/a runs/b --out cmp/
    safetyheads report runs/a
"""

from __future__ import annotations

import logging
import sys
import typing
from pathlib import Path

import click

from .config import ConfigError, RunConfig, load_config

log = logging.getLogger("safetyheads")


def _click_type(annotation):
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return _click_type(args[0]) if len(args) == 1 else str
    return {int: int, float: float, bool: bool}.get(annotation, str)


def config_options(func):
    """Add one ``--flag`` per RunConfig field (default None: only flags given override the file)."""
    for name, field in reversed(list(RunConfig.model_fields.items())):
        default = field.default
        help_text = (field.description or "") + (f"  [default: {default}]" if default is not None else "")
        func = click.option(f"--{name.replace('_', '-')}", name, type=_click_type(field.annotation), default=None,
                            help=help_text)(func)
    func = click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="TOML / YAML / JSON file with the same keys as the flags")(func)
    return func


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    # --quiet quiets the terminal only: the run's log file (pipeline.Run) still gets every INFO line
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING if quiet else logging.INFO)
    logging.getLogger("safetyheads").setLevel(logging.INFO)
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:
        # every bar a library draws for us: transformers' "Loading weights", the GGUF dequantizer's (it
        # calls tqdm itself) and hub downloads; put back when the command ends (matters in-process, e.g.
        # click's CliRunner). The pipeline's own bars follow Run(progress=not quiet).
        from .models import progress_bars

        ctx = click.get_current_context(silent=True)
        if ctx is not None:
            ctx.with_resource(progress_bars(False))
        else:  # called outside a command: switch them off for good
            progress_bars(False).__enter__()


def _config(config_file, fields) -> RunConfig:
    try:
        return load_config(config_file, **fields)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


def _default_out(cfg: RunConfig) -> Path:
    name = cfg.model.split(":")[-1].split("/")[-1].replace(".gguf", "")
    return Path("runs") / f"{name}-{cfg.dataset.split('/')[-1].split('.')[0]}-{cfg.mode}-{cfg.digest()[:6]}"


def _check_inputs(cfg: RunConfig) -> None:
    """Unknown or too small datasets and unknown judges are usage errors (exit 2) naming the flag,
    found before the model is loaded or the run folder is touched."""
    from .datasets import DatasetError, holdout_split, load_prompts
    from .judges import JudgeError, get_judge

    try:
        holdout_split(load_prompts(cfg.dataset, column=cfg.column), cfg.n_attribution, cfg.n_eval, seed=cfg.seed)
    except DatasetError as e:
        raise click.BadParameter(str(e), param_hint="'--dataset'") from None
    if cfg.harmless and cfg.harmless.lower() != "none" and cfg.n_harmless:
        try:
            load_prompts(cfg.harmless, n=cfg.n_harmless, seed=cfg.seed)
        except DatasetError as e:
            raise click.BadParameter(str(e), param_hint="'--harmless'") from None
    if cfg.eval_dataset:
        from .pipeline import load_prompt_sets

        try:
            load_prompt_sets(cfg)
        except DatasetError as e:
            raise click.BadParameter(str(e), param_hint="'--eval-dataset'") from None
    kind, _, rest = cfg.judge.partition(":")
    if kind.strip().lower() == "llm" and rest.strip():
        return  # an LLM judge's model is loaded (and checked) by the evaluation stage
    try:
        get_judge(cfg.judge)
    except JudgeError as e:
        raise click.BadParameter(str(e), param_hint="'--judge'") from None


def _execute(stages, out, quiet, config_file, fields) -> Path:
    from .models import ModelLoadError
    from .pipeline import Run, RunFolderError

    _setup_logging(quiet)
    cfg = _config(config_file, fields)
    _check_inputs(cfg)
    out = Path(out) if out else _default_out(cfg)
    try:
        path = Run(cfg, out, progress=not quiet).execute(stages)
    except (RunFolderError, ModelLoadError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted — rerun the same command to resume from the checkpoints in {out}", err=True)
        sys.exit(130)
    return path


def _common(func):
    func = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="run folder (default: runs/<model>-<dataset>-<mode>-<config digest>)")(func)
    func = click.option("--quiet", "-q", is_flag=True, help="no progress bars, warnings only")(func)
    return config_options(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="safetyheads")
def app() -> None:
    """Find the attention heads a language model's safety depends on (Ships, Sahara, attack success)."""


@app.command()
@_common
def run(out, quiet, config_file, **fields) -> None:
    """The whole study: Ships, Sahara heads, the exact refusal head search, attack success with and without
    them, report.

    With no flags: Qwen2.5-Coder-0.5B-Instruct (embedded) on AdvBench, 96 held-out prompts, ~8 min on 2 idle CPU cores.
    Interrupted runs resume when the same command is run again.
    """
    path = _execute(("prompts", "ships", "sahara", "search", "evaluate", "report"), out, quiet, config_file, fields)
    _summary(path)


@app.command()
@_common
def ships(out, quiet, config_file, **fields) -> None:
    """Ships scores of every head (estimate on all attribution prompts, exact on n_ships_exact)."""
    path = _execute(("prompts", "ships"), out, quiet, config_file, fields)
    from .ships import ShipsResult

    stem = path / ("ships" if (path / "ships.json").exists() else "ships_estimate")
    res = ShipsResult.load(stem)
    click.echo(f"top heads by mean Ships ({res.method}): " + ", ".join(f"L{a}H{b}" for a, b in res.dataset_top(10)))
    click.echo(f"results in {path}")


@app.command()
@_common
def sahara(out, quiet, config_file, **fields) -> None:
    """Sahara: the group of heads whose ablation most moves the harmful-query representation."""
    path = _execute(("prompts", "ships", "sahara"), out, quiet, config_file, fields)
    from .sahara import SaharaResult

    res = SaharaResult.load(path / "sahara.json")
    for i, step in enumerate(res.steps, 1):
        click.echo(f"step {i}: L{step.chosen[0]}H{step.chosen[1]}  generalized Ships {step.score:.4f}")
    click.echo(f"results in {path}")


@app.command()
@_common
def evaluate(out, quiet, config_file, **fields) -> None:
    """Attack success with and without the safety heads (runs the earlier stages if needed)."""
    path = _execute(("prompts", "ships", "sahara", "search", "evaluate"), out, quiet, config_file, fields)
    _summary(path)


def _parse_heads(text: str) -> list[tuple[int, int]]:
    try:
        heads = [tuple(int(x) for x in item.replace("L", "").replace("H", ".").split(".") if x != "")
                 for item in text.split(",") if item.strip()]
        assert heads and all(len(h) == 2 for h in heads)
        return heads  # type: ignore[return-value]
    except (ValueError, AssertionError):
        raise click.BadParameter(f"heads must look like '2.26,3.4' (layer.head pairs), got {text!r}",
                                 param_hint="'--heads'") from None


@app.command()
@click.option("--model", default=None, help="model to edit (default: the embedded one)")
@click.option("--heads", required=True, help="layer.head pairs, e.g. 2.26,3.4")
@click.option("--mode", type=click.Choice(["ua", "sc", "zero"]), default="ua", show_default=True)
@click.option("--eps", type=float, default=1e-5, show_default=True)
@click.option("--save", "save_to", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for the ablated checkpoint (save_pretrained)")
@click.option("--device", default="cpu", show_default=True)
def surgery(model, heads, mode, eps, save_to, device) -> None:
    """Write a copy of the model with the heads ablated in its weights (for vLLM, lm-eval, …)."""
    from .models import DEFAULT_MODEL, ModelLoadError, load_model
    from .surgery import SurgeryError, save_surgery

    _setup_logging(False)
    parsed = _parse_heads(heads)
    try:
        m, tok = load_model(model or DEFAULT_MODEL, device=device)
    except ModelLoadError as e:
        raise click.ClickException(str(e)) from None
    from .adapters import head_geometry, validate_heads

    try:
        validate_heads(parsed, head_geometry(m))
    except (IndexError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="'--heads'") from None
    try:
        path = save_surgery(m, tok, parsed, save_to, mode=mode, eps=eps, provenance={"model": model or DEFAULT_MODEL})
    except (ModelLoadError, SurgeryError, IndexError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"ablated checkpoint written to {path}")


@app.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/compare"), show_default=True)
@click.option("--k", type=int, default=10, show_default=True, help="top-k Ships heads compared")
@click.option("--metric", type=click.Choice(["kl", "refusal"]), default="kl", show_default=True,
              help="the Ships score ranked")
@click.option("--ships", "ships_source", type=click.Choice(["auto", "exact", "estimate"]), default="auto",
              show_default=True, help="which Ships result (auto: exact unless the estimate covers more prompts)")
def compare(runs, out, k, metric, ships_source) -> None:
    """Overlap of the safety heads and top-k Ships heads of two or more runs (Jaccard, rank correlation)."""
    from .compare import NotARunError, write_comparison

    if len(runs) < 2:
        raise click.UsageError("compare needs at least two run folders")
    try:
        path = write_comparison(list(runs), out, k=k, metric=metric, ships=ships_source)
    except NotARunError as e:
        raise click.BadParameter(str(e), param_hint="'RUNS'") from None
    click.echo((path / "compare.md").read_text() if (path / "compare.md").exists() else f"written to {path}")


@app.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(run_dir) -> None:
    """(Re)build report.html and the plots of a run folder."""
    from .report import write_report

    click.echo(f"report: {write_report(run_dir)}")


def _summary(path: Path) -> None:
    import json

    ev = path / "evaluation.json"
    if ev.exists():
        data = json.loads(ev.read_text())
        click.echo(f"\nattack success rate ({data.get('judge')}, {data.get('n_prompts')} held-out prompts):")
        for c in data["conditions"]:
            click.echo(f"  {c['name']:<22} ASR {c['asr']:.2f}  [{c['ci_low']:.2f}, {c['ci_high']:.2f}]  heads "
                       + " ".join(f"L{a}H{b}" for a, b in (c['heads'] if c['heads'] and isinstance(c['heads'][0][0], int) else [])))
        for c in data.get("over_refusal", []):
            click.echo(f"  over-refusal {c['name']:<22} {c['rate']:.2f}  [{c['ci_low']:.2f}, {c['ci_high']:.2f}]")
        from .evaluation import summary_lines

        lines = summary_lines(data, alpha=float((data.get("stats") or {}).get("alpha", 0.05)))
        if lines:
            click.echo("\npaired vs the baseline (same prompts):")
            for line in lines:
                click.echo(f"  {line}")
    for extra in sorted((path / "evaluations").glob("*/evaluation.json")) if (path / "evaluations").is_dir() else []:
        data = json.loads(extra.read_text())
        click.echo(f"\n{(data.get('provenance') or {}).get('eval_dataset') or extra.parent.name} "
                   f"({data.get('n_prompts')} prompts): " + ", ".join(f"{c['name']} {c['asr']:.2f}"
                                                                    for c in data["conditions"]))
    click.echo(f"\nrun folder: {path}\nreport:     {path / 'report.html'}")


if __name__ == "__main__":
    app()
