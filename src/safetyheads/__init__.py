"""safetyheads — find the attention heads a language model's safety depends on.

Implements Ships, Sahara and the attack-success evaluation of Zhou et al., "On the Role of
Attention Heads in Large Language Model Safety" (ICLR 2025).
"""

__version__ = "0.1.0"
