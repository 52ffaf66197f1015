"""Exact signed effect of every head of the planted model, and where its planted heads rank.

Each of the 270 heads of ``builtin:smollm2-135m-planted`` ablated alone (UA, ε = 1e-5, chat format) on the
study's 16 attribution prompts; the effect is the mean drop of the refusal log-odds at the first answer
position (``safetyheads.signed_effects``; refusal tokens: the study's, ``runs/study/planted/chat``).
Writes ``bench/results/planted_signed.json``. About 15 min on one shared CPU core.

    SAFETYHEADS_CACHE=... python bench/planted_signed.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import per_query  # noqa: E402

import safetyheads as sh  # noqa: E402
from safetyheads.planted import planted_info  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model, tok = sh.load_model("builtin:smollm2-135m-planted")
    attr = list(per_query.held_out(100)[0])[:16]
    rt = json.loads(Path("runs/study/planted/chat/refusal_tokens.json").read_text())["tokens"]
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    t0 = time.perf_counter()
    eff = sh.signed_effects(model, tok, attr, heads, refusal_tokens=rt, mode="ua", prompt_format="chat")
    rank = sorted(eff, key=lambda h: -eff[h])
    planted = [tuple(h) for h in planted_info()["planted_heads"]]
    out = {"refusal_tokens": [tok.decode([t]) for t in rt], "seconds": time.perf_counter() - t0,
           "top10": [[list(h), eff[h]] for h in rank[:10]],
           "planted": [[list(h), rank.index(h) + 1, eff[h]] for h in planted],
           "effects": {f"L{a}H{b}": v for (a, b), v in eff.items()}}
    Path("bench/results/planted_signed.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("refusal_tokens", "seconds", "top10", "planted")}, indent=1))


if __name__ == "__main__":
    main()
