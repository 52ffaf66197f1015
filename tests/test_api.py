"""``import safetyheads as sh`` gives the whole workflow, and ``help(sh)`` lists it (issue #15 item 1).

Catches: a name of the paper's workflow missing from the package, a listed name that is not the
function of its module (e.g. ``sh.evaluate`` bound to the module, ``sh.compare`` to something else
than compare_runs), a name added to the package but not to the one-line listing of ``help(sh)``.
"""

from __future__ import annotations

import importlib
import pydoc
import re

import safetyheads as sh

WORKFLOW = {  # name on the package -> (module, function)
    "load_model": ("models", "load_model"), "load_prompts": ("datasets", "load_prompts"),
    "holdout_split": ("datasets", "holdout_split"), "ablate": ("ablation", "ablate"),
    "ships": ("ships", "ships"), "ships_estimate": ("ships", "ships_estimate"), "agreement": ("ships", "agreement"),
    "sahara": ("sahara", "sahara"), "search_heads": ("search", "search_heads"),
    "signed_effects": ("search", "signed_effects"), "group_scores": ("search", "group_scores"),
    "learn_head_mask": ("masks", "learn_head_mask"),
    "mask_heads": ("masks", "mask_heads"), "refusal_direction": ("refusal_direction", "refusal_direction"),
    "head_contributions": ("refusal_direction", "head_contributions"),
    "disagreement": ("disagreement", "disagreement"), "evaluate": ("evaluate", "evaluate"),
    "get_judge": ("judges", "get_judge"), "paired_comparison": ("stats", "paired_comparison"),
    "save_surgery": ("surgery", "save_surgery"), "compare": ("compare", "compare_runs"),
    "load_run": ("report", "load_run"),
}


def test_one_import_gives_the_workflow():
    for name, (module, func) in WORKFLOW.items():
        assert name in sh.__all__, name
        want = getattr(importlib.import_module(f"safetyheads.{module}"), func)
        assert getattr(sh, name) is want, f"sh.{name} is not safetyheads.{module}.{func}"
        assert callable(want) and want.__doc__, name


def test_help_lists_every_workflow_name_with_one_line():
    assert sh.__doc__ in pydoc.render_doc(sh, renderer=pydoc.plaintext).replace("\n    ", "\n") or \
        all(line.strip() in pydoc.render_doc(sh, renderer=pydoc.plaintext) for line in sh.__doc__.splitlines())
    listed = dict(re.findall(r"^\s{4}(\w+)\s{2,}(\S.*)$", sh.__doc__, flags=re.M))
    assert set(WORKFLOW) <= set(listed), sorted(set(WORKFLOW) - set(listed))
    for name in WORKFLOW:
        assert len(listed[name]) > 10, (name, listed[name])  # a real one-line description
