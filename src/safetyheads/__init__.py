"""safetyheads — find the attention heads a language model's safety depends on.

Implements Ships, Sahara and the attack-success evaluation of Zhou et al., "On the Role of
Attention Heads in Large Language Model Safety" (ICLR 2025), and the signed methods that, on the
models we can run, find heads whose ablation actually breaks refusals.

One import gives the whole workflow (``import safetyheads as sh``):

Models and data
    load_model           a Hugging Face causal LM (hub id, local dir, .gguf or ``builtin:<name>``) + tokenizer
    load_prompts         a benchmark by name (``advbench``, ``harmbench``, ``strongreject``, …) or a user file
    holdout_split        seeded attribution / held-out split: heads are never evaluated on prompts that chose them

Ablating heads
    ablate               context manager: heads ``[(layer, head), …]`` ablated (ua | sc | zero | mean | ua-limit)
    save_surgery         write an ablated checkpoint (weights edited) for vLLM, lm-eval, …

Scoring and finding heads
    ships                Ships: exact per-prompt, per-head KL (and signed refusal drop) of ablating each head
    ships_estimate       Ships estimated by a few backward passes (Fisher / refusal gradient)
    agreement            Spearman and top-k recall of an estimate against exact scores
    sahara               Sahara: the paper's dataset-level greedy search on subspace angles
    search_heads         exact greedy group search on any objective (subspace | refusal | refusal-margin | kl | asr)
    group_scores         the search's score of any given head groups (e.g. every subset of a short list)
    signed_effects       each head's exact signed effect on refusal (drop of refusal log-odds, ablated alone)
    learn_head_mask      learned sparse per-head ablation strengths (L1 / hard-concrete), hard top-k validated
    mask_heads           the top-k heads of a learned mask
    refusal_direction    the difference-of-means refusal direction (Arditi et al. 2024), best layer
    head_contributions   each head's direct write onto a refusal direction
    disagreement         per-head table of why methods disagree

Evaluating
    evaluate             generate with and without heads, judge, attack success with paired statistics
    get_judge            a refusal judge by name (keyword lists, LLM judges)
    paired_comparison    exact McNemar, paired bootstrap interval and flips of a condition vs baseline

Runs
    load_run             open a ``safetyheads run`` folder
    compare              overlap of safety heads across run folders
"""

from .ablation import Mode, ablate, ablate_strengths, head_means
from .adapters import head_geometry
from .compare import compare_runs
from .datasets import holdout_split, load_prompts
from .disagreement import disagreement
from .evaluate import evaluate
from .judges import get_judge
from .masks import learn_head_mask, mask_heads
from .models import load_model
from .refusal_direction import head_contributions, refusal_direction
from .report import load_run
from .sahara import SaharaResult, sahara
from .search import SearchResult, group_scores, search_heads, signed_effects
from .ships import ShipsResult, agreement, ships, ships_estimate
from .stats import paired_comparison
from .surgery import save_surgery, surgery, surgery_applied

#: ``sh.compare(run_dirs, k=10)``: :func:`safetyheads.compare.compare_runs`
compare = compare_runs

__version__ = "0.1.0"

__all__ = ["Mode", "SaharaResult", "SearchResult", "ShipsResult", "ablate", "ablate_strengths", "agreement",
           "compare", "compare_runs", "disagreement", "evaluate", "get_judge", "group_scores", "head_contributions",
           "head_geometry", "head_means", "holdout_split", "learn_head_mask", "load_model", "load_prompts",
           "load_run", "mask_heads", "paired_comparison", "refusal_direction", "sahara", "save_surgery",
           "search_heads", "ships", "ships_estimate", "signed_effects", "surgery", "surgery_applied", "__version__"]
