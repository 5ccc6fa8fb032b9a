"""LAIC-RS's training signal, OUR READING (ALGORITHM.md section 5; relations.py has the maths of
the relation space): SCAN's neighbour consistency on relation-space neighbours, plus the
marginal-entropy balance term shared with TAC/SEIC.

    L = -(1/B) sum_i log( p_i . p_{n(i)} )  -  w * H( mean_i p_i )

p_i (B, K): image i's assignment to the prompt-learned centres, softmax(cos(u_i, t_k) / tau);
p_{n(i)}: the same for one relation-space neighbour of i drawn per epoch. Both sides carry
gradients (SCAN, TAC). Returns the loss and its parts for logging.
"""

from __future__ import annotations

import torch

from rayclust.method.losses.marginal_entropy import marginal_entropy


def relational_consistency(p: torch.Tensor, q: torch.Tensor, entropy_weight: float,
                           eps: float = 1e-8) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """p, q (B, K) rows on the simplex (anchors and their relation neighbours) -> (loss, parts)."""
    agreement = -torch.log((p * q).sum(dim=1).clamp_min(eps)).mean()
    balance = marginal_entropy(p)
    loss = agreement - entropy_weight * balance
    return loss, {"agreement": agreement.detach(), "balance": balance.detach()}
