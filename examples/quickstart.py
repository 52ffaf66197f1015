# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # safetyheads quickstart
#
# Which attention heads does a model's refusal rest on? This notebook runs the whole workflow of
# Zhou et al. (ICLR 2025) — Ships, Sahara, the signed refusal search, attack success with and
# without the heads — on the embedded SmolLM2-135M with three prompts, so it finishes in about a
# minute on a CPU. For a study, use `"builtin:qwen2.5-coder-0.5b-instruct"` (a model that refuses)
# and 16+ attribution prompts.
#
# Open it in Jupyter with `jupytext --to notebook examples/quickstart.py`, or run it as a script:
# `python examples/quickstart.py`. Everything it writes goes into a temporary folder.

# %%
import tempfile
from pathlib import Path

import safetyheads as sh
from safetyheads.generation import EvaluationError
from safetyheads.refusal_metric import derive_refusal_tokens

work = Path(tempfile.mkdtemp(prefix="safetyheads-quickstart-"))

# %% [markdown]
# ## Model and prompts
# Heads are chosen on attribution prompts and judged on held-out ones.

# %%
model, tok = sh.load_model("builtin:smollm2-135m-instruct")
attr, held_out = sh.holdout_split(sh.load_prompts("advbench"), 3, 3, seed=0)
harmless = sh.load_prompts("rho-benign-edgy", n=3)
list(attr)

# %% [markdown]
# ## Ships: how far ablating one head moves the answer
# The gradient estimate scores every head; exact Ships here scores the estimate's top 10
# (leave out `heads=` for every head).

# %%
estimate = sh.ships_estimate(model, tok, attr, estimator="fisher")
scores = sh.ships(model, tok, attr, heads=estimate.dataset_top(k=10))
print(sh.agreement(estimate.kl, scores.kl, k=5))
scores  # noqa: B018 - in Jupyter: the top heads and the heatmap

# %%
frame = scores.to_pandas()  # one row per prompt × layer × head
frame.dropna().sort_values("kl", ascending=False).head()

# %% [markdown]
# ## Sahara and the signed refusal search

# %%
res = sh.sahara(model, tok, attr, steps=2, prefilter="estimate", prefilter_k=4,
                prefilter_scores=estimate.mean("kl"))
res.to_pandas().head()

# %%
try:
    rt = derive_refusal_tokens(model, tok, attr, max_new_tokens=8)
except EvaluationError:
    # SmolLM2 refuses almost nothing, so it has no refusal tokens of its own: use typical openings.
    rt = sorted({tok(s, add_special_tokens=False)["input_ids"][0] for s in ("I'm sorry", "Sorry", "I cannot")})
refusal = sh.search_heads(model, tok, attr, objective="refusal", steps=2, refusal_tokens=rt,
                          prefilter="estimate", prefilter_k=4)
refusal  # noqa: B018 - shown as a table and the last step's heatmap

# %% [markdown]
# ## Attack success with and without the heads

# %%
ev = sh.evaluate(model, tok, held_out, heads=refusal.heads, harmless=harmless[:2], random_controls=1,
                 max_new_tokens=12, refusal_tokens=rt)
print(ev.table())
ev.to_pandas()[["condition", "prompt_index", "refusal", "refusal_log_odds"]]

# %%
fig = ev.plot()  # the report's attack-success figure
fig.savefig(work / "asr.png")
html = ev._repr_html_()  # what Jupyter shows for `ev`
print(f"{len(html)} characters of HTML; figures in {work}")
