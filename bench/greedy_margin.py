"""Does lowering the refusal log-odds change what greedy decoding says? For a ``methods_bench.py`` folder:
at the first answer position of its held-out prompts, with the search's top-k heads ablated, the share of
prompts whose probability of the refusal tokens exceeds 0.5, the share whose greedy first token is a
refusal token (refusal margin ``max_{y∈R} z_y − max_{y∉R} z_y > 0``), and the mean log-odds and margin.

The two shares part when the ablation spreads the refusal token's probability over many small
alternatives: the log-odds fall, the token generated does not change.

Example::

    python bench/greedy_margin.py /work/runs/methods-1.5b --ks 0,5,12 --out bench/results/greedy_margin_1.5b.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from safetyheads import ablate
from safetyheads.forward import last_token_logits
from safetyheads.models import load_model
from safetyheads.prompts import encode_prompts, format_prompts
from safetyheads.ships import refusal_logodds, refusal_margin


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", type=Path, help="a methods_bench.py output folder")
    p.add_argument("--search", default="refusal_search.json", help="the search result in the folder")
    p.add_argument("--ks", default="0,5", help="numbers of the search's heads to ablate (0: unablated)")
    p.add_argument("--split", default="eval", choices=["eval", "attribution"])
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the markdown table here (and .json beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = json.loads((a.folder / "bench_config.json").read_text())["config"]
    prompts = json.loads((a.folder / "prompts.json").read_text())[a.split]
    rt = torch.tensor(json.loads((a.folder / "refusal_tokens.json").read_text())["tokens"])
    heads = [tuple(h) for h in json.loads((a.folder / a.search).read_text())["heads"]]
    ks = [int(k) for k in a.ks.split(",")]
    if max(ks) > len(heads):
        sys.exit(f"the search has {len(heads)} heads; --ks asks for {max(ks)}")
    model, tok = load_model(cfg["model"])
    texts = format_prompts(tok, prompts, cfg["prompt_format"])

    @torch.no_grad()
    def logits(hs: list) -> torch.Tensor:
        out = []
        with ablate(model, hs, mode=cfg["mode"], eps=cfg["eps"]):
            for i in range(0, len(texts), a.batch_size):
                e = encode_prompts(tok, texts[i:i + a.batch_size])
                out.append(last_token_logits(model, e["input_ids"], e["attention_mask"]).double())
        return torch.cat(out)

    rows = []
    for k in ks:
        z = logits(heads[:k])
        lo, margin = refusal_logodds(z, rt), refusal_margin(z, rt)
        rows.append({"k": k, "heads": [list(h) for h in heads[:k]], "p_refusal_over_half": float((lo > 0).double().mean()),
                     "greedy_refusal_token": float((margin > 0).double().mean()), "mean_logodds": float(lo.mean()),
                     "mean_margin": float(margin.mean())})
    lines = [f"# Log-odds vs greedy first token — {cfg['model']}", "",
             f"{len(prompts)} {a.split} prompts of `{a.folder}`, {cfg['prompt_format']} format, "
             f"{cfg['mode'].upper()} ablation of the first k heads of `{a.search}`, refusal tokens "
             f"{[tok.decode([t]) for t in rt.tolist()]}; first answer position.", "",
             "| k | P(refusal tokens) > 0.5 | greedy first token is a refusal token | mean refusal log-odds | "
             "mean refusal margin |", "|---|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['p_refusal_over_half']:.2f} | {r['greedy_refusal_token']:.2f} | "
              f"{r['mean_logodds']:+.2f} | {r['mean_margin']:+.2f} |" for r in rows]
    lines += ["", "Command: `" + " ".join(["python", *sys.argv]) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "folder": str(a.folder), "config": cfg},
                                                         indent=2))


if __name__ == "__main__":
    main()
