"""Subspaces of representation stacks and the principal angles between them (Sahara's geometry).

Sahara (SPEC §3) compares the top-``rank`` singular subspace of the final hidden states of N
prompts (an N × d stack) before and after an ablation; the score is the sum of the principal
angles between the two subspaces. All in float64.
"""

from __future__ import annotations

import torch

__all__ = ["generalized_ships", "principal_angles", "subspace"]


def subspace(M: torch.Tensor, rank: int, *, center: bool = False, space: str = "feature") -> torch.Tensor:
    """Orthonormal basis (columns) of the top-``rank`` singular subspace of ``M`` (N × d), float64.

    ``space="feature"``: right singular vectors (in R^d); ``"query"``: left singular vectors (R^N).
    Raises ValueError when ``M`` has numerical rank below ``rank`` (σ_rank ≤ 1e-6·σ_1: duplicate
    prompts, collapsed representations), where the subspace would be an arbitrary choice of the SVD.
    """
    if space not in ("feature", "query"):
        raise ValueError("space must be 'feature' or 'query'")
    M = M.double()
    if center:
        M = M - M.mean(0, keepdim=True)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rank > min(M.shape):
        raise ValueError(f"rank {rank} exceeds min(n_prompts, d) = {min(M.shape)}")
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    if not S[rank - 1] > 1e-6 * S[0]:
        numerical = int((S > 1e-6 * S[0]).sum()) if S[0] > 0 else 0
        raise ValueError(
            f"the {'centred ' if center else ''}representation matrix has numerical rank {numerical} < rank {rank} "
            "(duplicate prompts or collapsed representations?): its top-rank subspace is not defined"
        )
    return (U[:, :rank] if space == "query" else Vh[:rank].T).contiguous()


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(A) and span(B), float64.

    A, B: ``[n, r]`` with orthonormal columns. Uses cosines from svd(AᵀB) and sines from
    svd(B − A AᵀB), paired and combined with atan2, so small angles are accurate (arccos alone
    loses them near 1) and results are exactly 0 for identical spans up to rounding.
    """
    A, B = A.double(), B.double()
    for name, X in (("A", A), ("B", B)):
        if X.dim() != 2 or X.shape[0] != A.shape[0] or X.shape[1] > X.shape[0]:
            raise ValueError(f"{name} must be [n, r] with r <= n and the same n as A, got {tuple(X.shape)}")
        if (X.T @ X - torch.eye(X.shape[1], dtype=X.dtype, device=X.device)).abs().max() > 1e-6:
            raise ValueError(f"{name} does not have orthonormal columns: pass an orthonormal basis (see subspace())")
    cos = torch.linalg.svdvals(A.T @ B).clamp(0, 1)  # descending
    sin = torch.linalg.svdvals(B - A @ (A.T @ B)).clamp(0, 1)
    sin = sin.flip(0)  # ascending, pairs with descending cosines
    k = min(cos.numel(), sin.numel())
    return torch.atan2(sin[:k], cos[:k])


def generalized_ships(base: torch.Tensor, ablated: torch.Tensor, rank: int, *, center: bool = False,
                      space: str = "feature") -> float:
    """Sum of principal angles between the top-``rank`` subspaces of two representation stacks."""
    return float(principal_angles(subspace(base, rank, center=center, space=space),
                                  subspace(ablated, rank, center=center, space=space)).sum())
