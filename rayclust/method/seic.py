"""SEIC stage 1 (ALGORITHM.md 4.1-4.3, VLM4Cluster's reading of the paper).

Global pieces: spherical k-means with K centres on u, candidate nouns (top-k1 per centre), text
counterparts (softmax over each image's top-k2 candidates). Per batch of pairs (u_i, s_i):

    L = alpha NCE(Z^v, Z^t; learnable T) + beta NCE_0.5((P^v)^T, (P^t)^T)
        + gamma NCE_0.5(C^v, C^t) + delta L_bal

with confidence-weighted centres C and the dynamic balancing regulariser L_bal.
"""

from __future__ import annotations

import torch
from torch import nn

from rayclust.method.counterparts import seic_counterparts
from rayclust.method.distributed import gather_rows
from rayclust.method.estimators import Estimator, GlobalPieces
from rayclust.method.heads import SEICHeads
from rayclust.method.hyperparameters import KMeansConfig, SEICConfig
from rayclust.method.kmeans import spherical_kmeans
from rayclust.method.losses import (CentreConsistencyLoss, DynamicBalanceRegulariser,
                                    SymmetricInfoNCE, info_nce)
from rayclust.method.trainer import Stage1Inputs, adam


class SEICCriterion(nn.Module):
    """Stage-1 loss. With gather_distributed, the instance, assignment and centre terms and the
    balancing regulariser all see the global batch (gathered rows keep their gradients)."""

    def __init__(self, cfg: SEICConfig, n_clusters: int, gather_distributed: bool = False):
        super().__init__()
        self.cfg = cfg
        self.gather_distributed = gather_distributed
        self.assignment = SymmetricInfoNCE(cfg.assignment_temperature)
        self.centre = CentreConsistencyLoss(cfg.centre_temperature)
        self.balance = DynamicBalanceRegulariser(n_clusters, cfg.balance_momentum,
                                                 cfg.balance_floor, cfg.balance_max_weight)

    def forward(self, z_v, logits_v, z_t, logits_t, scale):
        if self.gather_distributed:  # gather once here; the parts then run on the global batch
            z_v, logits_v, z_t, logits_t = map(gather_rows, (z_v, logits_v, z_t, logits_t))
        p_v, p_t = torch.softmax(logits_v, dim=1), torch.softmax(logits_t, dim=1)
        instance = info_nce(z_v, z_t, scale)
        assignment = self.assignment(p_v.T, p_t.T)
        centre = self.centre(z_v, p_v, z_t, p_t)
        balance = self.balance(p_v, p_t)
        c = self.cfg
        loss = (c.instance_weight * instance + c.assignment_weight * assignment
                + c.centre_weight * centre + c.balance_weight * balance)
        return loss, {"instance": instance, "assignment": assignment, "centre": centre,
                      "balance": balance}


class SEICObjective:
    def __init__(self, cfg: SEICConfig, n_clusters: int, gather_distributed: bool = False):
        self.cfg = cfg
        self.n_clusters = n_clusters
        self.epochs = cfg.epochs
        self.batch_size = cfg.batch_size
        self.drop_last = False  # SEIC drops only a trailing batch of one (see trainer.batches)
        self.gather_distributed = gather_distributed

    def build(self, dim: int):
        return (SEICHeads(dim, self.n_clusters, self.cfg.instance_temperature),
                SEICCriterion(self.cfg, self.n_clusters, self.gather_distributed))

    def optimizer(self, params):
        return adam(params, lr=self.cfg.learning_rate, weight_decay=0.0)

    def epoch_views(self, inputs: Stage1Inputs, generator: torch.Generator) -> dict:
        return {}

    def loss(self, model, criterion, inputs, idx, views):
        return criterion(*model(inputs.image[idx], inputs.text[idx]))


def prepare_seic(u: torch.Tensor, nouns: torch.Tensor, n_clusters: int, cfg: SEICConfig,
                 kmeans: KMeansConfig, seed: int = 0
                 ) -> GlobalPieces:
    """K-centre k-means, candidate nouns (the text space) and counterparts; the k-means fit is
    kept for the guard."""
    fit = spherical_kmeans(u, n_clusters, seed=seed, **vars(kmeans))
    text, candidates = seic_counterparts(u, nouns, fit.centroids, cfg.candidate_nouns_per_centre,
                                         cfg.nouns_per_image, cfg.retrieval_temperature)
    return GlobalPieces(Stage1Inputs(u, text), candidates, fit)


class SEIC(Estimator):
    """SEIC stage 1 (ALGORITHM.md 4.1-4.3) with rayclust's language guard. Example::

        model = SEIC(n_clusters=10, params=SEICConfig(epochs=50)).fit(u, nouns, noun_names)
    """

    method = "seic"

    def prepare(self, u, nouns) -> GlobalPieces:
        return prepare_seic(u, nouns, self.n_clusters, self.params, self.kmeans, self.seed)

    def objective(self, gather_distributed: bool = False) -> SEICObjective:
        return SEICObjective(self.params, self.n_clusters, gather_distributed)
