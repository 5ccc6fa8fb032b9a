"""TAC, the baseline (ICML 2024; ALGORITHM.md 3): its global pieces and its loss.

Per batch: anchors i give P^v = h^v(u_i), P^t = h^t(s_i); each anchor's neighbours give
Q^t = h^t(s_j), j ~ U(N^t_k(i)) and Q^v = h^v(u_l), l ~ U(N^v_k(i)), one fresh draw per epoch.
L = L_cc(P^v, Q^t) + L_cc(P^t, Q^v) + L_con(P^v, P^t) - lambda (H(mean P^t) + H(mean P^v)).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rayclust.method.counterparts import tac_counterparts
from rayclust.method.distributed import gather_rows
from rayclust.method.estimators import Estimator, GlobalPieces
from rayclust.method.heads import TACHeads
from rayclust.method.hyperparameters import KMeansConfig, TACConfig
from rayclust.method.losses import ClusterContrastiveLoss, InstanceConsistencyLoss, marginal_entropy
from rayclust.method.neighbours import knn
from rayclust.method.trainer import Stage1Inputs, adam


class TACCriterion(nn.Module):
    def __init__(self, distill_temperature: float, entropy_weight: float,
                 gather_distributed: bool = False):
        super().__init__()
        self.distill = ClusterContrastiveLoss(distill_temperature, gather_distributed)
        self.consistency = InstanceConsistencyLoss()
        self.entropy_weight = entropy_weight
        self.gather_distributed = gather_distributed

    def forward(self, p_v, p_t, q_v, q_t) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        distill = self.distill(p_v, q_t) + self.distill(p_t, q_v)
        consistency = self.consistency(p_v, p_t)
        if self.gather_distributed:
            p_v, p_t = gather_rows(p_v), gather_rows(p_t)
        entropy = marginal_entropy(p_t) + marginal_entropy(p_v)
        loss = distill + consistency - self.entropy_weight * entropy
        return loss, {"distill": distill, "consistency": consistency, "entropy": entropy}


# TAC's official training switches regime at K = 100 (train_head.py; ALGORITHM.md 3.9): with
# K = 1000 clusters a batch of 512 holds about half a member per cluster and the cluster-level
# contrast is nearly degenerate, so the batch, the epochs and the temperature all grow.
LARGE_K = 100
SMALL_K_DEFAULTS = {"epochs": 20, "batch_size": 512, "distill_temperature": 0.5}
LARGE_K_DEFAULTS = {"epochs": 100, "batch_size": 8192, "distill_temperature": 5.0}


def resolve_tac_config(cfg: TACConfig, n_clusters: int) -> TACConfig:
    """`cfg` with every unset (None) regime value taken from TAC's official K < 100 or K >= 100
    settings; values the user set are kept."""
    defaults = LARGE_K_DEFAULTS if n_clusters >= LARGE_K else SMALL_K_DEFAULTS
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items()
                                       if getattr(cfg, k) is None})


class TACObjective:
    def __init__(self, cfg: TACConfig, n_clusters: int, gather_distributed: bool = False):
        cfg = resolve_tac_config(cfg, n_clusters)
        self.cfg = cfg
        self.n_clusters = n_clusters
        self.epochs = cfg.epochs
        self.batch_size = cfg.batch_size
        self.drop_last = True
        self.gather_distributed = gather_distributed

    def build(self, dim: int):
        return (TACHeads(dim, self.n_clusters),
                TACCriterion(self.cfg.distill_temperature, self.cfg.entropy_weight,
                             self.gather_distributed))

    def optimizer(self, params):
        return adam(params, lr=self.cfg.learning_rate, betas=(0.9, 0.99))

    def epoch_views(self, inputs: Stage1Inputs, generator: torch.Generator) -> dict:
        n, k = inputs.text_neighbours.shape
        rows = torch.arange(n, device=inputs.image.device)
        pick = lambda: torch.randint(k, (n,), generator=generator).to(rows.device)  # noqa: E731
        return {"text_neighbour": inputs.text_neighbours[rows, pick()],
                "image_neighbour": inputs.image_neighbours[rows, pick()]}

    def loss(self, model, criterion, inputs, idx, views):
        logits = model(inputs.image[idx], inputs.text[idx],
                       inputs.text[views["text_neighbour"][idx]],
                       inputs.image[views["image_neighbour"][idx]])
        p_v, p_t, q_t, q_v = (torch.softmax(x, dim=1) for x in logits)
        return criterion(p_v, p_t, q_v, q_t)


def prepare_tac(u: torch.Tensor, nouns: torch.Tensor, n_clusters: int, cfg: TACConfig,
                kmeans: KMeansConfig, seed: int = 0) -> GlobalPieces:
    """Counterparts over the selected nouns (the text space) and both neighbour tables. TAC's
    k-means has M semantic centres, not K clusters, so there is no fit for the guard."""
    text, selected = tac_counterparts(
        u, nouns, n_clusters, cfg.semantic_centres, cfg.nouns_per_centre,
        cfg.retrieval_temperature, seed=seed, kmeans_kwargs=vars(kmeans))
    k = min(cfg.knn, u.shape[0] - 1)
    return GlobalPieces(Stage1Inputs(u, text, knn(u, k), knn(text, k)), selected)


class TAC(Estimator):
    """TAC (ICML 2024, ALGORITHM.md 3), the baseline, with the same guard. Example::

        model = TAC(n_clusters=10).fit(u, nouns, noun_names)
    """

    method = "tac"

    def prepare(self, u, nouns) -> GlobalPieces:
        return prepare_tac(u, nouns, self.n_clusters, self.params, self.kmeans, self.seed)

    def objective(self, gather_distributed: bool = False) -> TACObjective:
        return TACObjective(self.params, self.n_clusters, gather_distributed)
