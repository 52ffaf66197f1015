"""safetyheads — find the attention heads a language model's safety depends on.

Implements Ships, Sahara and the attack-success evaluation of Zhou et al., "On the Role of
Attention Heads in Large Language Model Safety" (ICLR 2025).
"""

from .ablation import Mode, ablate, ablate_strengths, head_means
from .adapters import head_geometry
from .sahara import SaharaResult, sahara
from .ships import ShipsResult, agreement, ships, ships_estimate
from .surgery import save_surgery, surgery, surgery_applied

__version__ = "0.1.0"

__all__ = ["Mode", "SaharaResult", "ShipsResult", "ablate", "ablate_strengths", "agreement", "head_geometry",
           "head_means", "sahara", "save_surgery", "ships", "ships_estimate", "surgery", "surgery_applied",
           "__version__"]
