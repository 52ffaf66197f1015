"""One self-contained HTML report of a run folder.

:func:`write_report` reads what the pipeline wrote (``config.json``, ``ships.*``,
``ships_estimate.*``, ``sahara.json``, ``evaluation.json``, ``responses/*.jsonl`` …), draws the
figures into ``run_dir/plots/`` and writes ``run_dir/report.html``: inline CSS, images embedded as
``data:`` URIs, no scripts and no external requests, so the file can be mailed or archived alone.
Parts of the study that were not run (or whose files cannot be read) show as "not run" (or as the
read error) instead of failing the report. :func:`load_run` is the reader, shared with
:mod:`safetyheads.compare`.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .provenance import atomic_write_text

log = logging.getLogger("safetyheads")

N_SAMPLES = 6  # prompts shown in the responses section
MAX_RESPONSE_CHARS = 1500


# --------------------------------------------------------------------------- reading a run folder


@dataclass
class RunData:
    """Everything a run folder holds; a part that is absent is None (unreadable: None + ``errors``)."""

    path: Path
    name: str
    config_file: Any = None  # config.json as written
    ships: Any = None  # ShipsResult (exact)
    ships_estimate: Any = None  # ShipsResult (estimate)
    sahara: Any = None  # SaharaResult
    search: Any = None  # SearchResult (exact greedy head search)
    signed: dict | None = None  # signed_effects.json
    disagreement: dict | None = None  # disagreement.json
    evaluation: dict | None = None
    extra_evaluations: dict = field(default_factory=dict)  # evaluations/<slug>/evaluation.json by slug
    agreement: dict | None = None
    prompts: dict | None = None
    refusal_tokens: dict | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def evaluation_result(self) -> Any:
        """The evaluation as an :class:`~safetyheads.evaluation.Evaluation` (responses and the refusal
        metric read back: ``.to_pandas()``, ``.plot()``), or None when the run has none."""
        if self.evaluation is None:
            return None
        from .evaluation import Evaluation

        return Evaluation.load(self.path)

    @property
    def config(self) -> dict:
        """The resolved config (the ``config`` entry the pipeline writes, else the whole file)."""
        c = self.config_file
        if isinstance(c, dict) and isinstance(c.get("config"), dict):
            return c["config"]
        return c if isinstance(c, dict) else {}

    def _provenances(self) -> list[dict]:
        out = []
        for part in (self.ships, self.ships_estimate, self.sahara):
            p = getattr(part, "provenance", None)
            if isinstance(p, dict):
                out.append(p)
        if isinstance(self.evaluation, dict) and isinstance(self.evaluation.get("provenance"), dict):
            out.append(self.evaluation["provenance"])
        return out

    def _first(self, key: str) -> Any:
        if self.config.get(key) not in (None, ""):
            return self.config[key]
        if isinstance(self.evaluation, dict) and self.evaluation.get(key) not in (None, ""):
            return self.evaluation[key]
        for p in self._provenances():
            if p.get(key) not in (None, ""):
                return p[key]
        return None

    @property
    def model(self) -> str:
        if self.config.get("model"):
            return str(self.config["model"])
        for p in self._provenances():
            m = p.get("model")
            if isinstance(m, dict) and m.get("source"):
                return str(m["source"])
            if isinstance(m, str) and m:
                return m
        return "unknown model"

    @property
    def dataset(self) -> str:
        if self.config.get("dataset"):
            return str(self.config["dataset"])
        if isinstance(self.prompts, dict):
            name = ((self.prompts.get("provenance") or {}).get("attribution") or {}).get("name")
            if name:
                return str(name)
        for p in self._provenances():
            d = p.get("data")
            if isinstance(d, dict) and d.get("name"):
                return str(d["name"])
        return "unknown dataset"

    @property
    def prompt_format(self) -> str | None:
        v = self._first("prompt_format")
        return None if v is None else str(v)

    @property
    def mode(self) -> str | None:
        v = self._first("mode")
        return None if v is None else str(v)

    @property
    def eps(self) -> float | None:
        v = self._first("eps")
        try:
            return None if v is None else float(v)
        except (TypeError, ValueError):
            return None

    @property
    def grid(self) -> tuple[int, int] | None:
        """``(n_layers, n_heads)`` from the Ships tensors, else provenance, else the Sahara scores."""
        for s in (self.ships, self.ships_estimate):
            if s is not None and s.kl.dim() == 3:
                return int(s.kl.shape[1]), int(s.kl.shape[2])
        for p in self._provenances():
            m = p.get("model")
            if isinstance(m, dict) and m.get("n_layers") and m.get("n_heads"):
                return int(m["n_layers"]), int(m["n_heads"])
        if self.sahara is not None:
            heads = [h for st in self.sahara.steps for h in st.scores] + [tuple(h) for h in self.sahara.heads]
            if heads:
                return max(h[0] for h in heads) + 1, max(h[1] for h in heads) + 1
        return None


def _read(run: RunData, rel: str, loader: Callable[[Path], Any]) -> Any:
    path = run.path / rel
    if not path.exists():
        return None
    try:
        return loader(path)
    except Exception as e:  # noqa: BLE001 - an unreadable part is reported, not fatal
        run.errors.append(f"{rel}: could not be read ({type(e).__name__}: {e})")
        log.warning("report: %s could not be read: %s", path, e)
        return None


def _json_file(path: Path) -> Any:
    return json.loads(path.read_text())


def _judge_accuracy_note(judge: str | None) -> str:
    """`` (accuracy 0.82 on 260 hand-labelled answers of the embedded models, 0.67 on PyRIT's 169)`` for a
    judge measured by ``bench/judge_accuracy.py`` (:data:`safetyheads.judges.JUDGE_ACCURACY`); a note
    that it was not measured otherwise."""
    from .judges import JUDGE_ACCURACY

    acc = JUDGE_ACCURACY.get(judge or "")
    if not acc:
        return ' <span class="muted">(accuracy not measured on the labelled set)</span>'
    parts = []
    if acc.get("ours") is not None:
        parts.append(f"accuracy {acc['ours']:.2f} on {acc.get('n_ours', '?')} hand-labelled answers of the embedded models")
    if acc.get("pyrit") is not None:
        parts.append(f"{acc['pyrit']:.2f} on PyRIT's {acc.get('n_pyrit', '?')} human labels")
    return f' <span class="muted">({esc(", ".join(parts))})</span>'


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder; missing parts are None, unreadable ones None with a note in ``errors``."""
    from .sahara import SaharaResult
    from .ships import ShipsResult

    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")
    run = RunData(path=path, name=path.resolve().name)
    run.config_file = _read(run, "config.json", _json_file)

    def ships_loader(p: Path):
        if not p.with_suffix(".safetensors").exists():
            raise FileNotFoundError(f"{p.with_suffix('.safetensors').name} is missing")
        return ShipsResult.load(p.with_suffix(""))

    run.ships = _read(run, "ships.json", ships_loader)
    run.ships_estimate = _read(run, "ships_estimate.json", ships_loader)
    run.sahara = _read(run, "sahara.json", SaharaResult.load)
    from .search import SearchResult

    run.search = _read(run, "search.json", SearchResult.load)
    run.signed = _read(run, "signed_effects.json", _json_file)
    run.disagreement = _read(run, "disagreement.json", _json_file)
    run.evaluation = _read(run, "evaluation.json", _json_file)
    if (path / "evaluations").is_dir():  # --eval-dataset a,b: one evaluation per further dataset
        for sub in sorted(p for p in (path / "evaluations").iterdir() if (p / "evaluation.json").exists()):
            got = _read(run, f"evaluations/{sub.name}/evaluation.json", _json_file)
            if got is not None:
                run.extra_evaluations[sub.name] = got
    run.agreement = _read(run, "ships_agreement.json", _json_file)
    run.prompts = _read(run, "prompts.json", _json_file)
    run.refusal_tokens = _read(run, "refusal_tokens.json", _json_file)
    return run


def read_responses(run: RunData, cond: dict) -> list[dict] | None:
    """The responses of one condition (``responses_file``, else ``responses/<name>.jsonl``)."""
    candidates = []
    if cond.get("responses_file"):
        f = Path(cond["responses_file"])
        candidates += [f] if f.is_absolute() else [run.path / f, run.path / "responses" / f.name]
    if cond.get("name"):
        candidates.append(run.path / "responses" / f"{cond['name']}.jsonl")
    for f in candidates:
        if f.exists():
            rows = []
            for line in f.read_text(errors="replace").splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(row, dict):
                        rows.append(row)
            return rows
    return None


# --------------------------------------------------------------------------- HTML helpers


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt_head(h) -> str:
    return f"L{h[0]}H{h[1]}"


def fmt_heads(heads: Any, limit: int = 12) -> str:
    """``[[2, 26], [0, 11]]`` → ``L2H26, L0H11``; per-prompt lists are summarised. Plain text: escape it."""
    if not heads:
        return "—"
    try:
        if isinstance(heads[0], (list, tuple)) and heads[0] and isinstance(heads[0][0], (list, tuple)):
            counts = Counter(_fmt_head(h) for per in heads for h in per)
            common = ", ".join(f"{h}×{n}" for h, n in counts.most_common(5))
            return f"per prompt ({len(heads)} prompts; most used: {common})"
        out = [_fmt_head(h) for h in heads]
    except (TypeError, IndexError, KeyError):
        return json.dumps(heads, default=str)[:200]
    return ", ".join(out[:limit]) + (f" … (+{len(out) - limit})" if len(out) > limit else "")


def _num(v: Any, digits: int = 2) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(f) else f"{f:.{digits}f}"


def _g(v: Any) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return esc(v)


def img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def not_run(what: str, why: str = "") -> str:
    return f'<p class="notrun"><b>{esc(what)}: not run</b>{(" — " + esc(why)) if why else ""}</p>'


def table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; cells are HTML already (escape before)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv(d: dict) -> str:
    rows = [[f"<code>{esc(k)}</code>", esc(v) if isinstance(v, str) else esc(json.dumps(v, default=str))]
            for k, v in d.items()]
    return table(["key", "value"], rows, "kv")


CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
 background:#f4f5f7;color:#1d2330;line-height:1.45;font-size:15px}
header{background:#1d2330;color:#fff;padding:22px 36px 16px}
header h1{margin:0 0 8px;font-size:26px;font-weight:650}
header .sub{color:#c7cbd6;font-size:14px}
.chips{margin-top:10px;display:flex;flex-wrap:wrap;gap:6px}
.chip{background:#323a4d;border-radius:12px;padding:2px 10px;font-size:13px;color:#e8ebf2}
.chip b{color:#fff}
nav{background:#fff;border-bottom:1px solid #dde0e6;padding:8px 36px;position:sticky;top:0;z-index:2}
nav a{margin-right:18px;color:#3056d3;text-decoration:none;font-size:14px}
main{max-width:1240px;margin:0 auto;padding:18px 28px 40px}
section{background:#fff;border:1px solid #dde0e6;border-radius:8px;padding:18px 24px;margin:18px 0}
h2{margin:0 0 12px;font-size:20px;border-bottom:2px solid #eef0f4;padding-bottom:6px}
h3{font-size:16px;margin:18px 0 8px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:14px;width:auto;max-width:100%}
th,td{border-bottom:1px solid #e6e8ee;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f6;font-weight:600;white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.kv td:first-child{white-space:nowrap}
table.kv td{word-break:break-word}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
pre{background:#f6f8fa;border:1px solid #e1e4e8;border-radius:6px;padding:10px;overflow:auto;max-height:480px}
img{max-width:100%;height:auto;border:1px solid #eceef2;border-radius:4px;background:#fff}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px;align-items:start}
.figs.wide{grid-template-columns:1fr}
.figs figure{margin:0}
figcaption{font-size:13px;color:#566;margin-top:4px}
.notrun{background:#fff7e0;border-left:4px solid #f0b400;padding:8px 12px;margin:8px 0;color:#5c4700}
.error{background:#fdecea;border-left:4px solid #d93025;padding:8px 12px;margin:8px 0;color:#7a1c14}
.findings{background:#eef4ff;border-left:4px solid #3056d3;padding:10px 16px;margin:6px 0 14px}
.findings li{margin:3px 0}
.dot{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.bar{position:relative;height:14px;width:140px;background:#eef0f4;border-radius:2px}
.bar i{position:absolute;top:0;bottom:0;left:0;border-radius:2px}
.bar s{position:absolute;top:6px;height:2px;background:#222}
.pos{color:#b3261e;font-weight:600}.neg{color:#1e6b33}
.resp{display:grid;gap:10px;margin:6px 0 20px}
.resp .col{border:1px solid #e1e4e8;border-radius:6px;padding:8px 10px;background:#fcfcfd;min-width:0}
.resp .col h4{margin:0 0 6px;font-size:13px;display:flex;justify-content:space-between;gap:6px}
.resp pre{white-space:pre-wrap;word-break:break-word;margin:0;max-height:260px;background:#fff}
.prompt{font-weight:600;margin:14px 0 6px}
.badge{font-size:11px;border-radius:8px;padding:1px 8px;font-weight:600;white-space:nowrap}
.refused{background:#e3f1e7;color:#1e6b33}.complied{background:#fde4e1;color:#a1251b}.unknown{background:#eee;color:#555}
details{margin:8px 0}summary{cursor:pointer;color:#3056d3}
.muted{color:#667;font-size:13px}
"""


# --------------------------------------------------------------------------- sections


def _category(c: dict) -> str:
    from .plots import category

    return category(c.get("method"), c.get("name", ""))


def _dot(cat: str) -> str:
    from .plots import CATEGORY_COLORS

    return f'<span class="dot" style="background:{CATEGORY_COLORS[cat]}"></span>'


def _bar_cell(v: Any, lo: Any, hi: Any, color: str) -> str:
    try:
        v, lo, hi = float(v), float(lo), float(hi)
    except (TypeError, ValueError):
        return ""
    return (f'<div class="bar"><i style="width:{100 * v:.1f}%;background:{color}"></i>'
            f'<s style="left:{100 * lo:.1f}%;width:{100 * max(0.0, hi - lo):.1f}%"></s></div>')


def _baseline(conds: list[dict]) -> dict | None:
    return next((c for c in conds if _category(c) == "baseline"), None)


def _main_ablated(conds: list[dict]) -> dict | None:
    sahara = [c for c in conds if _category(c) == "sahara"]
    if sahara:
        return max(sahara, key=lambda c: (c.get("k") or 0, -conds.index(c)))
    return next((c for c in conds if _category(c) not in ("baseline", "random")), None)


def _delta(v: Any, base: float | None) -> str:
    if base is None:
        return "—"
    try:
        d = float(v) - base
    except (TypeError, ValueError):
        return "—"
    cls = "pos" if d > 0 else ("neg" if d < 0 else "")
    return f'<span class="{cls}">{d:+.2f}</span>'


def _p(v: Any) -> str:
    try:
        p = float(v)
    except (TypeError, ValueError):
        return "—"
    return f"{p:.1e}" if p < 1e-4 else (f"{p:.2g}" if p < 0.1 else f"{p:.2f}")


def _stats_findings(ev: dict | None) -> list[str]:
    """Findings in words from an evaluation's paired statistics: which effects are significant at n, each head
    set's rank among its random controls, and how well the refusal metric agrees with the judge."""
    from .evaluation import summary_lines

    if not isinstance(ev, dict):
        return []
    out = []
    st = ev.get("stats") or {}
    lines = summary_lines(ev, alpha=float(st.get("alpha", 0.05)))
    if lines:
        out.append(f"Every condition vs the baseline on the same {esc(ev.get('n_prompts'))} prompts (ASR: exact McNemar; "
                   "refusal log-odds: Wilcoxon signed-rank; paired bootstrap 95 % intervals; significance at "
                   f"α = {esc(st.get('alpha', 0.05))} unadjusted, Holm-adjusted p given):"
                   "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>")
    agree = ((ev.get("refusal_metric") or {}).get("agreement") or {}).get("all_conditions")
    if agree and agree.get("auroc") is not None:
        r = agree.get("point_biserial_r")
        out.append(f"Refusal metric (one forward pass, no generation) vs the judged refusal of the generated answer, "
                   f"per prompt over all conditions (n = {agree['n']}, {agree['n_refused']} refused): AUROC "
                   f"<b>{agree['auroc']:.2f}</b>" + (f", point-biserial r = {r:.2f}" if r is not None else "") + ".")
    return out


def _paired_cells(c: dict) -> list[str]:
    """The paired-statistics cells of a condition row (empty for the baseline / older runs)."""
    paired = c.get("paired") or {}
    pa, pl = paired.get("asr"), paired.get("refusal_log_odds")
    metric = c.get("refusal_metric") or {}
    cells = ["—", "—", "—"]
    if pa:
        holm = f" ({_p(pa['p_holm'])})" if pa.get("p_holm") is not None else ""
        cells = [f"[{float(pa['ci'][0]):+.2f}, {float(pa['ci'][1]):+.2f}]", f"{_p(pa['p_value'])}{holm}",
                 f"{esc(pa.get('flipped_to_success'))}/{esc(pa.get('flipped_to_refusal'))}"]
    cells.append(_num(metric.get("mean_log_odds")) if metric else "—")
    cells.append(f"{float(pl['diff']):+.2f} [{float(pl['ci'][0]):+.2f}, {float(pl['ci'][1]):+.2f}], p = {_p(pl['p_value'])}"
                 if pl else "—")
    return cells


def _controls_table(ev: dict) -> str:
    """Each head set against its random controls: rank and the controls' spread."""
    rows = []
    for ctl in ev.get("controls") or []:
        for key, label in (("asr", "ASR"), ("refusal_log_odds", "refusal log-odds (lower = stronger)")):
            r = ctl.get(key)
            if r:
                rows.append([esc(ctl.get("condition")), esc(label), _num(r["value"]), f"{r['rank']} of {r['n']}",
                             f"{_num(r['min'])} / {_num(r['median'])} / {_num(r['max'])}", _p(r["p_empirical"]),
                             esc(", ".join(ctl.get("controls", [])))])
    if not rows:
        return ""
    kind = (ev.get("stats") or {}).get("random_controls") or "random"
    return (f"<h3>Head sets vs their random controls ({esc(kind)})</h3>"
            + _num_table(["head set", "measure", "value", "rank (1 = strongest)", "controls min / median / max",
                          "permutation p", "controls"], rows, numeric={2, 3, 4, 5})
            + '<p class="muted">Permutation p = (1 + controls at least as strong) / (1 + controls): with few draws it '
              "cannot be small (2 draws: ≥ 1/3).</p>")


def _transfer(run: RunData) -> str:
    """The evaluations on further datasets (``--eval-dataset a,b``): ASR and paired tests per condition."""
    extra = getattr(run, "extra_evaluations", None) or {}
    if not extra:
        return ""
    out = ["<h3>Transfer: the same heads on other held-out datasets</h3>"]
    for slug, ev in extra.items():
        name = (ev.get("provenance") or {}).get("eval_dataset") or slug
        conds = ev.get("conditions") or []
        base = _baseline(conds)
        b = float(base["asr"]) if base is not None and base.get("asr") is not None else None
        rows = [[f"{_dot(_category(c))}{esc(c.get('name'))}", f"<b>{_num(c.get('asr'))}</b>",
                 f"[{_num(c.get('ci_low'))}, {_num(c.get('ci_high'))}]", esc(c.get("n")),
                 _delta(c.get("asr"), b) if _category(c) != "baseline" else "—", *_paired_cells(c)] for c in conds]
        out.append(f"<h4>{esc(name)} ({esc(ev.get('n_prompts'))} prompts; <code>evaluations/{esc(slug)}/</code>)</h4>")
        out.append(_num_table(["condition", "ASR", "95 % CI", "n", "Δ vs baseline", "paired 95 % CI of Δ",
                               "McNemar p (Holm)", "flips ↑/↓", "refusal log-odds", "Δ log-odds [95 % CI], Wilcoxon p"],
                              rows, numeric={1, 2, 3, 4, 5, 6, 7, 8, 9}))
        lines = _stats_findings(ev)
        if lines:
            out.append('<div class="findings"><ul>' + "".join(f"<li>{x}</li>" for x in lines) + "</ul></div>")
    return "".join(out)


def section_summary(run: RunData, plots_dir: Path) -> str:
    from .plots import CATEGORY_COLORS, asr_bars

    parts = []
    ev = run.evaluation
    findings = []
    if run.sahara is not None:
        steps = " → ".join(f"<b>{_fmt_head(h)}</b>" for h in run.sahara.heads)
        findings.append(f"Safety heads found by Sahara ({len(run.sahara.heads)} greedy steps, in the order chosen): {steps}")
    else:
        findings.append("Safety heads (Sahara): <b>not run</b>")
    for res, label in ((run.ships, "exact Ships"), (run.ships_estimate, "estimated Ships")):
        if res is not None:
            top = res.dataset_top(min(3, res.kl[0].numel()))
            findings.append(f"Top heads by mean {label} (KL, {len(res.prompts)} prompts): "
                            + ", ".join(_fmt_head(h) for h in top))
            break
    conds = list((ev or {}).get("conditions") or [])
    over = list((ev or {}).get("over_refusal") or [])
    if conds:
        base, main = _baseline(conds), _main_ablated(conds)
        rnd = [c for c in conds if _category(c) == "random"]
        if base is not None and main is not None:
            text = (f"Attack success rate: baseline <b>{_num(base.get('asr'))}</b> "
                    f"[{_num(base.get('ci_low'))}, {_num(base.get('ci_high'))}] → <b>{_num(main.get('asr'))}</b> "
                    f"[{_num(main.get('ci_low'))}, {_num(main.get('ci_high'))}] with {esc(main.get('name'))} ablated "
                    f"({esc(fmt_heads(main.get('heads')))}), change {_delta(main.get('asr'), float(base['asr']))}")
            pa = (main.get("paired") or {}).get("asr")
            if pa:  # paired on the same prompts: exact McNemar, bootstrap interval of the difference
                sig = "significant" if float(pa["p_value"]) < float((ev.get("stats") or {}).get("alpha", 0.05)) \
                    else "not significant"
                text += (f"; paired 95 % CI [{float(pa['ci'][0]):+.2f}, {float(pa['ci'][1]):+.2f}], McNemar "
                         f"p = {_p(pa['p_value'])}, {pa['flipped_to_success']} prompts flipped to compliance and "
                         f"{pa['flipped_to_refusal']} to refusal, n = {pa['n']} — <b>{sig}</b>")
            findings.append(text + ".")
        if rnd:
            findings.append("Random heads of the same size (control): " + ", ".join(
                f"{esc(c.get('name'))} {_num(c.get('asr'))}" for c in rnd))
        findings += _stats_findings(ev)
        ob, om = _baseline(over), _main_ablated(over)
        if ob is not None and om is not None:
            findings.append(f"Over-refusal on harmless prompts: {_num(ob.get('rate'))} → {_num(om.get('rate'))} "
                            f"with {esc(om.get('name'))}.")
    parts.append('<div class="findings"><ul>' + "".join(f"<li>{f}</li>" for f in findings) + "</ul></div>")

    if ev is None:
        partial = sorted(p.stem for p in (run.path / "responses").glob("*.jsonl")) if (run.path / "responses").is_dir() else []
        why = "no evaluation.json in this run folder"
        if partial:
            why += (f" (the evaluation stage did not finish: responses exist for {len(partial)} conditions: "
                    + ", ".join(partial) + ")")
        parts.append(not_run("Evaluation (attack success)", why))
        return "".join(parts)

    meta = [f"judge <code>{esc(ev.get('judge'))}</code>{_judge_accuracy_note(ev.get('judge'))}" if ev.get("judge") else "",
            f"{esc(ev.get('n_prompts'))} held-out prompts" if ev.get("n_prompts") is not None else "",
            f"{esc(ev.get('max_new_tokens'))} new tokens" if ev.get("max_new_tokens") is not None else ""]
    meta_s = ", ".join(m for m in meta if m)
    if conds:
        parts.append(f"<h3>Attack success rate (ASR){': ' + meta_s if meta_s else ''}</h3>")
        base = _baseline(conds)
        b = float(base["asr"]) if base is not None and base.get("asr") is not None else None
        rows = []
        for c in conds:
            cat = _category(c)
            rows.append([f"{_dot(cat)}{esc(c.get('name'))}", esc(c.get("method")), esc(c.get("k")),
                         esc(fmt_heads(c.get("heads"))) + (f' <span class="muted">(seed {esc(c["seed"])})</span>'
                                                      if c.get("seed") is not None else ""),
                         f'<b>{_num(c.get("asr"))}</b>',
                         f'[{_num(c.get("ci_low"))}, {_num(c.get("ci_high"))}]',
                         esc(c.get("n")), _delta(c.get("asr"), b) if cat != "baseline" else "—",
                         *_paired_cells(c),
                         _bar_cell(c.get("asr"), c.get("ci_low"), c.get("ci_high"), CATEGORY_COLORS[cat])])
        parts.append(_num_table(["condition", "method", "k", "heads ablated", "ASR", "95 % CI", "n", "Δ vs baseline",
                                 "paired 95 % CI of Δ", "McNemar p (Holm)", "flips ↑/↓", "refusal log-odds",
                                 "Δ log-odds [95 % CI], Wilcoxon p", ""],
                                rows, numeric={4, 5, 6, 7, 8, 9, 10, 11, 12}))
        parts.append('<p class="muted">Paired on the same prompts: flips ↑ = refused at baseline, complied under the '
                     "condition; ↓ = the reverse. Refusal log-odds: log P(refusal tokens) − log P(other tokens) at the "
                     "first answer position (mean over prompts; lower = less refusal), read off the generation's "
                     "prefill. The verdicts follow the exact tests; with few flipped prompts the percentile bootstrap "
                     "interval can exclude 0 while McNemar's exact p does not reach α.</p>")
        parts.append(_controls_table(ev))
    else:
        parts.append(not_run("ASR conditions", "evaluation.json lists none"))
    parts.append(_transfer(run))
    if over:
        parts.append("<h3>Over-refusal on harmless prompts (refusal rate; lower is better)</h3>")
        ob = _baseline(over)
        b = float(ob["rate"]) if ob is not None and ob.get("rate") is not None else None
        rows = [[f"{_dot(_category(c))}{esc(c.get('name'))}", f"<b>{_num(c.get('rate'))}</b>",
                 f"[{_num(c.get('ci_low'))}, {_num(c.get('ci_high'))}]", esc(c.get("n")),
                 _delta(c.get("rate"), b) if _category(c) != "baseline" else "—",
                 _bar_cell(c.get("rate"), c.get("ci_low"), c.get("ci_high"), CATEGORY_COLORS[_category(c)])]
                for c in over]
        parts.append(_num_table(["condition", "refusal rate", "95 % CI", "n", "Δ vs baseline", ""], rows,
                                numeric={1, 2, 3, 4}))
    else:
        parts.append(not_run("Over-refusal", "no harmless prompts evaluated"))
    util = list(ev.get("utility") or [])
    if util:
        parts.append("<h3>Utility</h3>")
        parts.append(_num_table(["condition", "metric", "value"],
                                [[esc(u.get("name")), esc(u.get("metric")), _g(u.get("value"))] for u in util],
                                numeric={2}))
        definition = ((ev.get("provenance") or {}).get("utility_metric") or {}).get("definition")
        if definition:
            parts.append(f'<p class="muted">{esc(definition)}</p>')
    if conds or over:
        parts.append(_guarded("ASR plot", lambda: (
            f"<figure>{img(asr_bars(ev, plots_dir / 'asr.png'), 'attack success rate per condition')}<figcaption>"
            "Bars: rate per condition; error bars: 95 % Wilson intervals; dashed: baseline; hatched pale blue: "
            "random-head controls.</figcaption></figure>")))
    return "".join(parts)


def _num_table(headers: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            if i in numeric:
                cells.append(f'<td class="num">{c}</td>')
            else:
                cells.append(f"<td>{c}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figs_class(run: RunData) -> str:
    """Heatmaps two per row, or one per row when the grid is wide (e.g. 32 heads)."""
    return "figs wide" if run.grid and run.grid[1] > 20 else "figs"


def _method(res, metric: str) -> str:
    """How a score was computed: an estimate's signed refusal score comes from the refusal-gradient
    estimator even when the result is labelled with the KL estimator (the pipeline stores both in one)."""
    if metric == "refusal" and str(res.method).startswith("estimate:"):
        return "estimate:refusal-grad"
    return str(res.method)


def section_ships(run: RunData, plots_dir: Path) -> str:
    from .plots import ships_heatmap

    if run.ships is None and run.ships_estimate is None:
        return not_run("Ships", "no ships.* or ships_estimate.* in this run folder")
    figs, columns = [], []
    for res, stem, label in ((run.ships, "ships", "exact"), (run.ships_estimate, "ships_estimate", "estimate")):
        if res is None:
            figs.append(not_run(f"Ships ({label})"))
            continue
        for metric in ("kl", "refusal"):
            if metric == "refusal" and res.refusal is None:
                continue
            name = {"kl": "KL", "refusal": "refusal log-odds drop"}[metric]
            method = _method(res, metric)
            title = f"{'Exact' if label == 'exact' else 'Estimated'} Ships, {name} ({method}), {len(res.prompts)} prompts"
            p = ships_heatmap(res, plots_dir / f"{stem}_{metric}.png", metric=metric, title=title)
            cap = (f"{esc(stem)}: {esc(method)}, mean of {len(res.prompts)} prompts. Numbered boxes: the 5 highest heads. "
                   + ("KL of the next-token distribution when the head alone is ablated."
                      if metric == "kl" else "Signed: positive means the head supports refusing."))
            figs.append(f"<figure>{img(p, title)}<figcaption>{cap}</figcaption></figure>")
            columns.append((f"{label}: {name}<br><span class='muted'>{esc(method)}</span>", res, metric))
    out = ["<p>Ships(q, h) = KL(p(·|q) ‖ p(·|q; h ablated)) at the last prompt position; the dataset view is "
           "each head's mean over prompts.</p>", f'<div class="{_figs_class(run)}">' + "".join(figs) + "</div>"]
    if columns:
        k = 10
        tops = [res.dataset_top(min(k, res.kl[0].numel()), metric) for _, res, metric in columns]
        means = [res.mean(metric) for _, res, metric in columns]
        rows = []
        for i in range(max(len(t) for t in tops)):
            row = [str(i + 1)]
            for t, m in zip(tops, means):
                row.append(f"{_fmt_head(t[i])} <span class='muted'>{_g(float(m[t[i]]))}</span>" if i < len(t) else "")
            rows.append(row)
        out.append(f"<h3>Top {k} heads per method (mean score)</h3>")
        out.append(table(["rank"] + [c[0] for c in columns], rows))
    if run.ships is not None:
        top1 = Counter(_fmt_head(t[0][:2]) for t in run.ships.top_heads(1) if t)
        if top1:
            out.append("<h3>Per-prompt top-1 head (exact KL)</h3><p class='muted'>The paper's per-query attack "
                       "ablates each prompt's own top-1 head; how often each head is that head:</p>")
            out.append(table(["head", "prompts"], [[esc(h), str(n)] for h, n in top1.most_common(10)]))
    if isinstance(run.agreement, dict) and run.agreement:
        out.append("<h3>Estimate vs exact Ships (on the prompts scored exactly)</h3>")
        rows = []
        for name, d in run.agreement.items():
            if isinstance(d, dict):
                rows.append([esc(name), ", ".join(f"{esc(k)} = {_g(v) if not isinstance(v, (list, dict)) else esc(json.dumps(v))}"
                                                  for k, v in d.items())])
            else:
                rows.append([esc(name), esc(d)])
        out.append(table(["estimator", "agreement"], rows, "kv"))
    return "".join(out)


def section_sahara(run: RunData, plots_dir: Path) -> str:
    from .plots import sahara_heatmaps

    s = run.sahara
    if s is None:
        return not_run("Sahara", "no sahara.json in this run folder")
    out = []
    cfg = s.config or {}
    keys = ("preset", "rank", "center", "space", "mode", "eps", "prompt_format", "prefilter", "prefilter_k",
            "n_candidates", "steps")
    shown = {k: cfg[k] for k in keys if k in cfg}
    if cfg.get("kept"):
        shown["kept (prefilter)"] = fmt_heads(cfg["kept"], limit=40)
    out.append("<p>Greedy search: at each step every head h not yet chosen is scored by the sum of principal angles "
               "between the representation subspace of the unablated model and that with G ∪ {h} ablated; the best "
               "joins G.</p>")
    if shown:
        out.append(_kv(shown))
    rows = []
    for i, st in enumerate(s.steps, 1):
        ranked = sorted(st.scores.items(), key=lambda kv: -kv[1])
        runner = next(((h, v) for h, v in ranked if tuple(h) != tuple(st.chosen)), None)
        rows.append([str(i), f"<b>{_fmt_head(st.chosen)}</b>", _g(st.score),
                     f"{_fmt_head(runner[0])} ({_g(runner[1])})" if runner else "—",
                     _g(st.score - runner[1]) if runner else "—", str(len(st.scores)),
                     _signed_cell(signed_of(run, st.chosen, s))])
    out.append("<h3>Steps</h3>")
    out.append(_num_table(["step", "head added", "score of G", "runner-up", "margin", "candidates scored",
                           "signed effect alone"], rows, numeric={2, 4, 5, 6}))
    out.append(f"<p>{SIGNED_NOTE}</p>")
    grid = run.grid
    if grid is None:
        out.append('<p class="error">Cannot draw the step heatmaps: the head grid is unknown.</p>')
        return "".join(out)
    paths = sahara_heatmaps(s, grid[0], grid[1], plots_dir)
    figs = [f"<figure>{img(p, f'Sahara step {i}')}<figcaption>Step {i}: score of every candidate; ★ the head "
            "chosen, hatched: already in G.</figcaption></figure>" for i, p in enumerate(paths, 1)]
    out.append(f'<div class="{_figs_class(run)}">' + "".join(figs) + "</div>")
    return "".join(out)


def _verdict(row: dict | None) -> str:
    if row is None:
        return '<span class="badge unknown">missing</span>'
    r = row.get("refusal")
    if r is True:
        return '<span class="badge refused">refused</span>'
    if r is False:
        return '<span class="badge complied">complied</span>'
    return '<span class="badge unknown">not judged</span>'


def _clip(text: Any) -> str:
    t = "" if text is None else str(text)
    return t if len(t) <= MAX_RESPONSE_CHARS else t[:MAX_RESPONSE_CHARS] + f" … [{len(t) - MAX_RESPONSE_CHARS} more characters]"


def section_responses(run: RunData) -> str:
    ev = run.evaluation
    conds = list((ev or {}).get("conditions") or [])
    if not conds:
        return not_run("Sample responses", "no evaluation")
    base, main = _baseline(conds), _main_ablated(conds)
    rnd = next((c for c in conds if _category(c) == "random"), None)
    shown = [c for c in (base, main, rnd) if c is not None]
    data = []
    for c in shown:
        rows = read_responses(run, c)
        data.append((c, rows))
    data = [(c, rows) for c, rows in data if rows]
    if not data:
        return not_run("Sample responses", "no responses/*.jsonl files for the evaluated conditions")
    ref_rows = data[0][1]
    by_prompt = [{r.get("prompt"): r for r in rows} for _, rows in data]

    def row_for(j: int, i: int, prompt: str) -> dict | None:
        rows = data[j][1]
        if prompt in by_prompt[j]:
            return by_prompt[j][prompt]
        return rows[i] if i < len(rows) else None

    order = list(range(len(ref_rows)))
    if len(data) > 1:  # prompts whose verdict the ablation changed come first
        def changed(i: int) -> bool:
            other = row_for(1, i, ref_rows[i].get("prompt"))
            return other is not None and other.get("refusal") != ref_rows[i].get("refusal")

        order.sort(key=lambda i: (not changed(i), i))
    out = [f"<p>{min(N_SAMPLES, len(order))} of {len(ref_rows)} held-out prompts; prompts whose verdict changed under "
           "the ablation first. Columns: " + ", ".join(f"<b>{esc(c.get('name'))}</b> ({esc(fmt_heads(c.get('heads')) if c.get('heads') else 'no ablation')})"
                                                       for c, _ in data) + ".</p>"]
    cols = f"grid-template-columns:repeat({len(data)},minmax(0,1fr))"
    for i in order[:N_SAMPLES]:
        prompt = ref_rows[i].get("prompt")
        out.append(f'<div class="prompt">Prompt {i + 1}: {esc(prompt)}</div><div class="resp" style="{cols}">')
        for j, (c, _) in enumerate(data):
            r = row_for(j, i, prompt)
            out.append(f'<div class="col"><h4><span>{esc(c.get("name"))}</span>{_verdict(r)}</h4>'
                       f"<pre>{esc(_clip(r.get('response') if r else ''))}</pre></div>")
        out.append("</div>")
    return "".join(out)


def section_config(run: RunData) -> str:
    out = []
    if run.config_file is None:
        out.append(not_run("Configuration", "no config.json in this run folder"))
    else:
        out.append("<h3>Resolved configuration</h3>")
        out.append(f"<pre>{esc(json.dumps(run.config_file, indent=2, default=str))}</pre>")
    prov = None
    for name, p in (("evaluation", (run.evaluation or {}).get("provenance")),
                    ("ships", getattr(run.ships, "provenance", None)),
                    ("ships_estimate", getattr(run.ships_estimate, "provenance", None)),
                    ("sahara", getattr(run.sahara, "provenance", None))):
        if isinstance(p, dict) and p:
            prov = (name, p)
            break
    versions = prov[1].get("versions") if prov else None
    if not versions and isinstance(run.config_file, dict):
        versions = run.config_file.get("versions")
    out.append("<h3>Versions</h3>")
    out.append(_kv(versions) if isinstance(versions, dict) and versions else not_run("Version record"))
    if prov:
        p = prov[1]
        out.append(f"<h3>Provenance <span class='muted'>(from {esc(prov[0])})</span></h3>")
        if isinstance(p.get("model"), dict):
            out.append(_kv(p["model"]))
        rest = {k: v for k, v in p.items() if k not in ("model", "versions")}
        if rest:
            out.append(f"<details><summary>full provenance record</summary><pre>"
                       f"{esc(json.dumps(rest, indent=2, default=str))}</pre></details>")
    if isinstance(run.refusal_tokens, dict):
        toks = run.refusal_tokens.get("strings") or run.refusal_tokens.get("tokens")
        out.append("<h3>Refusal-start tokens</h3><p>"
                   + (", ".join(f"<code>{esc(repr(t))}</code>" for t in toks) if toks
                      else esc(run.refusal_tokens.get("reason") or "none")) + "</p>")
    log_path = run.path / "run.log"
    if log_path.exists():
        lines = log_path.read_text(errors="replace").splitlines()
        out.append(f"<details><summary>run.log (last {min(60, len(lines))} of {len(lines)} lines)</summary>"
                   f"<pre>{esc(chr(10).join(lines[-60:]))}</pre></details>")
    return "".join(out)


# --------------------------------------------------------------------------- assembly


SIGNED_NOTE = ("Signed effect alone: the mean drop of the refusal log-odds over the attribution prompts when the "
               "head alone is ablated (exact). &gt; 0: the head holds refusal up; ▲ (&lt; 0): ablating it "
               "<b>raises</b> refusal — an unsigned score (KL, subspace angle) cannot tell the two apart.")


def signed_of(run: RunData, head, result: Any = None) -> float | None:
    """A head's exact signed effect on refusal from ``result.signed`` or ``signed_effects.json``; None if unknown."""
    h = tuple(head)
    signed = getattr(result, "signed", None)
    if signed and h in signed:
        return signed[h]
    for layer, hd, v in (run.signed or {}).get("heads", []):
        if (layer, hd) == h:
            return v
    return None


def _signed_cell(v: float | None) -> str:
    if v is None:
        return "—"
    return f'<b title="ablating it raises refusal">▲ {v:+.3f}</b>' if v < 0 else f"{v:+.3f}"


def _signed_heads(run: RunData, heads: Any) -> str:
    """``L10H7 (+0.41), ▲ L10H11 (−0.22)``: heads with their signed effects."""
    parts = []
    for h in heads:
        v = signed_of(run, h)
        mark = "▲ " if v is not None and v < 0 else ""
        parts.append(f"{mark}{_fmt_head(h)}" + ("" if v is None else f" ({v:+.2f})"))
    return esc(", ".join(parts)) if parts else "—"


def section_heads(run: RunData) -> str:
    """Every method's heads with their signed effects, the exact head search, and why methods disagree."""
    out = []
    conds = (run.signed or {}).get("conditions")
    if conds:
        rows = [[esc(name), _signed_heads(run, [(a, b) for a, b, _ in hs])] for name, hs in conds.items()]
        out.append("<h3>Signed effects of every reported head set</h3>")
        out.append(table(["condition", "heads (signed effect alone; ▲ = ablation raises refusal)"], rows))
        out.append(f"<p>{SIGNED_NOTE}</p>")
    s = run.search
    if s is not None:
        cfg = s.config or {}
        out.append(f"<h3>Exact greedy head search: objective <code>{esc(cfg.get('objective'))}</code></h3>")
        how = ("its greedy answers to the attribution prompts, generated under the ablation and judged "
               f"(<code>{esc(cfg.get('judge'))}</code>, {esc(cfg.get('max_new_tokens'))} new tokens): the score is "
               "the rise of the attack-success rate over the unablated model's, ties broken by the refusal "
               "log-odds drop (0.4/N · tanh(drop))") if cfg.get("objective") == "asr" else (
               "real ablated forward passes over the attribution prompts (objective <code>refusal</code>: the mean "
               "drop of the refusal log-odds)")
        out.append("<p>At each step every candidate head is added to the heads chosen so far and the group is "
                   f"scored by {how}; the best joins.</p>")
        rows = [[str(i), f"<b>{_fmt_head(st.chosen)}</b>", _g(st.score), _signed_cell(signed_of(run, st.chosen, s)),
                 str(len(st.scores))] for i, st in enumerate(s.steps, 1)]
        out.append(_num_table(["step", "head added", "score of the group", "signed effect alone", "candidates scored"],
                              rows, numeric={2, 3, 4}))
        if cfg.get("stopped"):
            out.append(f"<p>Stopped early: {esc(cfg['stopped'].get('reason'))}</p>")
    d = run.disagreement
    if d:
        methods = list(d.get("methods", {}))
        heads = ["head", *[esc(m) for m in methods], "KL-Ships", "signed refusal drop", "Sahara angle",
                 "refusal-direction projection", "attention on 1st token"]
        rows = []
        for r in d.get("rows", []):
            mark = "▲ " if r.get("raises_refusal") else ""
            rows.append([f"{mark}{_fmt_head(r['head'])}", *[str(r["methods"].get(m, "")) for m in methods],
                         _g(r.get("kl_ships")) if r.get("kl_ships") is not None else "—",
                         _signed_cell(r.get("refusal_drop")),
                         _g(r.get("sahara_angle")) if r.get("sahara_angle") is not None else "—",
                         _g(r.get("direction_projection")) if r.get("direction_projection") is not None else "—",
                         _num(r.get("first_token_attention"))])
        n = len(methods)
        out.append("<h3>Why the methods disagree, per head</h3>")
        out.append("<p>One row per head of every method's top heads (the number: its rank in that method). Each "
                   "column over the attribution prompts, the head ablated alone: mean Ships (KL, unsigned), the signed "
                   "refusal drop, Sahara's generalized Ships (rad, unsigned), its direct write onto the "
                   "difference-of-means refusal direction, and its attention weight on the first token at the last "
                   "position (near 1: an attention sink). A large KL or angle with a signed drop near 0 or below "
                   "marks a head that moves the output without holding refusal up.</p>")
        out.append(_num_table(heads, rows, numeric=set(range(n + 1, n + 6))))
    if not out:
        return not_run("Signed effects", "no signed_effects.json, search.json or disagreement.json in this run folder")
    return "".join(out)


def _guarded(name: str, fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one broken part must not lose the rest of the report
        log.warning("report: section %s failed: %s", name, e, exc_info=True)
        return f'<p class="error">This section could not be rendered: {esc(type(e).__name__)}: {esc(e)}</p>'


def render_report(run: RunData, plots_dir: Path) -> str:
    """The report as an HTML string (plots are written to ``plots_dir`` and embedded)."""
    ev = run.evaluation or {}
    eps = run.eps
    mode = run.mode
    mode_s = f"{mode} (ε = {eps:g})" if mode and eps is not None and mode in ("ua", "sc") else (mode or "?")
    chips = [("dataset", run.dataset), ("prompt format", run.prompt_format or "?"), ("ablation", mode_s)]
    if run.grid:
        chips.append(("heads", f"{run.grid[0]} layers × {run.grid[1]}"))
    if ev.get("judge"):
        chips.append(("judge", ev["judge"]))
    if ev.get("n_prompts") is not None:
        chips.append(("eval prompts", ev["n_prompts"]))
    created = next((p.get("created") for p in run._provenances() if p.get("created")), None)
    chip_html = "".join(f'<span class="chip">{esc(k)}: <b>{esc(v)}</b></span>' for k, v in chips)
    errors = "".join(f'<p class="error">{esc(e)}</p>' for e in run.errors)
    sections = [
        ("summary", "Results summary", _guarded("summary", lambda: section_summary(run, plots_dir))),
        ("ships", "Ships: per-query head importance", _guarded("ships", lambda: section_ships(run, plots_dir))),
        ("sahara", "Sahara: safety heads of the dataset", _guarded("sahara", lambda: section_sahara(run, plots_dir))),
        ("heads", "Signed effects, head search, why methods disagree",
         _guarded("heads", lambda: section_heads(run))),
        ("responses", "Sample responses", _guarded("responses", lambda: section_responses(run))),
        ("config", "Configuration and provenance", _guarded("config", lambda: section_config(run))),
    ]
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{esc(title)}</h2>{content}</section>' for sid, title, content in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Safety heads — {esc(run.model)}</title>
<style>{CSS}</style></head>
<body>
<header><h1>Safety heads of {esc(run.model)}</h1>
<div class="sub">Attention heads whose ablation breaks refusals (Zhou et al., ICLR 2025) — run folder
<code>{esc(run.path.resolve().name)}</code>{(' · ' + esc(created)) if created else ''}</div>
<div class="chips">{chip_html}</div></header>
<nav>{nav}</nav>
<main>{errors}{body}
<p class="muted">Generated by safetyheads from the files of this run folder. Self-contained: no external resources.</p>
</main></body></html>
"""


def write_report(run_dir: str | Path) -> Path:
    """Build ``run_dir/plots/*.png`` and the self-contained ``run_dir/report.html``; returns its path."""
    run = load_run(run_dir)
    plots_dir = run.path / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    text = render_report(run, plots_dir)
    out = run.path / "report.html"
    atomic_write_text(out, text)
    return out
