#!/usr/bin/env python
"""Correctness on a CUDA device: the test suite's equivalences, rerun on the GPU, and GPU == CPU.

    python bench/cuda_check.py                       # cuda:0; SmolLM2 tokenizer from the asset package
    python bench/cuda_check.py --tokenizer DIR       # any saved tokenizer folder (e.g. on a machine without assets)
    python bench/cuda_check.py --device cpu          # smoke run of the script itself (compares cpu with cpu)

CI has no GPU, so the unit tests run on CPU only; this script is what checks the same things where
users run them. It builds the tiny random-weight models of every supported architecture (the test
suite's ``tests/tiny_models.py`` and ``tests/tiny_lm.py``) on the device and checks:

In float64 end to end (``tiny_models.float64_model``), where two computations of the same thing
agree to float64 rounding on any device, so the bound is ``TOL = 1e-10`` relative (to the largest
magnitude of the compared tensor) everywhere — GPU and CPU differ by ~1e-15 there:

- ``ua_hook=surgery``: UA by hooking the query == UA written into W_q / q bias (no-q-norm archs).
- ``sc_hook=surgery``: SC by hooking the o_proj input == scaled W_o columns (ε = 0.3).
- ``zero=sc0``: zero mode == SC with ε = 0.
- ``dev=cpu``: ablated logits on the device == on CPU.
- ``ships_exact=naive``: exact batched Ships == the naive loop (KL and refusal score).
- ``ships_dev=cpu``: exact Ships on the device == on CPU.
- ``sahara_dev=cpu``: a 2-step Sahara on the device picks the same heads as on CPU, scores within TOL rad.
- ``generate=surgery``: KV-cache generation under ablation == HF ``generate`` on surgery weights
  (token-identical) and == the same generation on CPU (``generate_dev=cpu``).

In the precisions sweeps run in on a GPU, against a noise floor measured in the same run (the
float64 scores are the truth): ``fp32 exact~naive`` / ``bf16 exact~naive``: the exact sweep's error
is at most ``FLOOR_FACTOR`` = 4× the naive loop's (the paper's computation, same dtype; at least 16
ulps of the dtype), and that floor itself is small (< 1e-3 relative in float32, < 0.2 in
bfloat16). TF32 is off.

Prints one line per check and a summary; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from tiny_lm import PROMPTS, SHIPS_ARCHS, hf_greedy, tiny_lm  # noqa: E402
from tiny_models import ARCHS, SURGERY_UA_ARCHS, random_ids, tiny_model  # noqa: E402

import safetyheads as sh  # noqa: E402
from safetyheads.evaluate import _eos_ids, generate_ids  # noqa: E402

HEADS = [(0, 1), (1, 3), (2, 0)]
TOL = 1e-10  # float64: relative to the largest magnitude
FLOOR_FACTOR = 4  # lower precisions: the exact sweep's error vs the naive loop's, same dtype
F64 = torch.float64
RESULTS: list[tuple[str, str, bool, str]] = []


def check(arch: str, name: str, ok: bool, detail: str) -> None:
    RESULTS.append((arch, name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {arch:10} {name:20} {detail}", flush=True)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(dev)).logits.double().cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (NaN entries, unscored heads, ignored)."""
    a, b = a.double().cpu(), b.double().cpu()
    keep = ~(a.isnan() | b.isnan())
    return float((a[keep] - b[keep]).abs().max() / b[keep].abs().max().clamp_min(1e-300))


def ablation_checks(arch: str, dev: torch.device) -> None:
    ids = random_ids(2, 12, seed=3)
    cpu_model = tiny_model(arch, dtype=F64)
    model = tiny_model(arch, dtype=F64).to(dev)
    if arch in SURGERY_UA_ARCHS:
        with sh.ablate(model, HEADS, mode="ua", eps=1e-3):
            hooked = logits(model, ids)
        r = rel(logits(sh.surgery(model, HEADS, mode="ua", eps=1e-3), ids), hooked)
        check(arch, "ua_hook=surgery", r <= TOL, f"rel {r:.1e}")
    with sh.ablate(model, HEADS, mode="sc", eps=0.3):
        hooked = logits(model, ids)
    with sh.surgery_applied(model, HEADS, mode="sc", eps=0.3):
        cut = logits(model, ids)
    r = rel(cut, hooked)
    check(arch, "sc_hook=surgery", r <= TOL, f"rel {r:.1e}")
    with sh.ablate(model, HEADS, mode="zero"):
        z = logits(model, ids)
    with sh.ablate(model, HEADS, mode="sc", eps=0.0):
        s0 = logits(model, ids)
    r = rel(z, s0)
    check(arch, "zero=sc0", r <= TOL, f"rel {r:.1e}")
    with sh.ablate(model, HEADS, mode="ua", eps=1e-5):
        on_dev = logits(model, ids)
    with sh.ablate(cpu_model, HEADS, mode="ua", eps=1e-5):
        on_cpu = logits(cpu_model, ids)
    r = rel(on_dev, on_cpu)
    check(arch, "dev=cpu", r <= TOL, f"rel {r:.1e}")


def lm_checks(arch: str, dev: torch.device, tok, refusal: list[int], low: bool) -> None:
    vocab = len(tok)
    cpu_model = tiny_lm(arch, vocab, dtype=F64)
    model = tiny_lm(arch, vocab, dtype=F64).to(dev)
    kw = dict(prompt_format="chat", progress=False, refusal_tokens=refusal)
    exact = sh.ships(model, tok, PROMPTS[:3], batch_size=5, **kw)
    naive = sh.ships(model, tok, PROMPTS[:3], method="naive", **kw)
    r, r2 = rel(exact.kl, naive.kl), rel(exact.refusal, naive.refusal)
    check(arch, "ships_exact=naive", max(r, r2) <= TOL,
          f"rel KL {r:.1e}, rel refusal {r2:.1e} (max KL {float(naive.kl.max()):.3g})")
    on_cpu = sh.ships(cpu_model, tok, PROMPTS[:3], batch_size=5, **kw)
    r, r2 = rel(exact.kl, on_cpu.kl), rel(exact.refusal, on_cpu.refusal)
    check(arch, "ships_dev=cpu", max(r, r2) <= TOL, f"rel KL {r:.1e}, rel refusal {r2:.1e}")

    skw = dict(steps=2, prompt_format="chat", preset="paper", progress=False)
    a = sh.sahara(model, tok, PROMPTS, **skw)
    b = sh.sahara(cpu_model, tok, PROMPTS, **skw)
    ds = max(abs(x.scores[h] - y.scores[h]) for x, y in zip(a.steps, b.steps) for h in x.scores if h in y.scores)
    check(arch, "sahara_dev=cpu", a.heads == b.heads and ds <= TOL, f"{a.heads} vs {b.heads}, max |Δscore| {ds:.1e} rad")

    heads = [(0, 1), (1, 2), (2, 0)]
    gkw = dict(heads=heads, eps=1e-5, max_new_tokens=8, batch_size=3, progress=False)
    got = generate_ids(model, tok, PROMPTS[:3], **gkw)
    if arch in SURGERY_UA_ARCHS:
        ref = hf_greedy(sh.surgery(model, heads, mode="ua", eps=1e-5), tok, PROMPTS[:3], 8, _eos_ids(model, tok, "chat"))
        check(arch, "generate=surgery", got == ref, f"{sum(map(len, got))} tokens, equal: {got == ref}")
    cpu_got = generate_ids(cpu_model, tok, PROMPTS[:3], **gkw)
    same = sum(x == y for x, y in zip(got, cpu_got))
    check(arch, "generate_dev=cpu", same == len(got), f"{same}/{len(got)} responses token-identical")

    if low:
        for dtype, name, ceiling in ((torch.float32, "fp32", 1e-3), (torch.bfloat16, "bf16", 0.2)):
            m = tiny_lm(arch, vocab).to(dev, dtype)
            e = sh.ships(m, tok, PROMPTS[:3], batch_size=5, **kw)
            n = sh.ships(m, tok, PROMPTS[:3], method="naive", **kw)
            err, floor = rel(e.kl, naive.kl), rel(n.kl, naive.kl)
            bound = FLOOR_FACTOR * max(floor, 16 * torch.finfo(dtype).eps)  # never below a few ulps
            check(arch, f"{name} exact~naive", err <= bound and floor < ceiling,
                  f"exact's error {err:.1e} vs the naive loop's {floor:.1e} (relative to float64; "
                  f"exact vs naive {rel(e.kl, n.kl):.1e})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tokenizer", default=None, help="saved tokenizer folder (default: SmolLM2's, from the asset)")
    ap.add_argument("--archs", default=",".join(ARCHS))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 check is meant as float32
    torch.backends.cudnn.allow_tf32 = False
    import transformers as tf

    if args.tokenizer:
        tok = tf.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from tiny_lm import smol_tokenizer

        tok = smol_tokenizer()
    from tiny_lm import refusal_ids

    refusal = refusal_ids(tok)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {dev} ({name}), torch {torch.__version__}, transformers {tf.__version__}", flush=True)
    t0 = time.perf_counter()
    archs = [a for a in args.archs.split(",") if a]
    for arch in archs:
        ablation_checks(arch, dev)
    for arch in [a for a in SHIPS_ARCHS if a in archs]:
        lm_checks(arch, dev, tok, refusal, low=arch in ("llama", "qwen2", "gemma3"))
    failed = [r for r in RESULTS if not r[2]]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed in {time.perf_counter() - t0:.0f} s on {name}")
    for arch, n, _, d in failed:
        print(f"  FAILED {arch} {n}: {d}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
