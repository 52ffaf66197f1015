"""safetyheads — find the attention heads a language model's safety depends on.

Implements Ships, Sahara and the attack-success evaluation of Zhou et al., "On the Role of
Attention Heads in Large Language Model Safety" (ICLR 2025).
"""

from .ablation import Mode, ablate, ablate_strengths, head_means
from .adapters import head_geometry
from .surgery import save_surgery, surgery, surgery_applied

__version__ = "0.1.0"

__all__ = ["Mode", "ablate", "ablate_strengths", "head_geometry", "head_means", "save_surgery", "surgery",
           "surgery_applied", "__version__"]
