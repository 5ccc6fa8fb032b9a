"""scikit-learn-style estimators over in-memory features: `SEIC` (default) and `TAC`.

`fit(image_features, noun_embeddings, nouns)` runs the method's global pieces, trains stage 1,
predicts, applies the language guard and names the clusters. Learned state lives in attributes
with a trailing underscore; `predict` labels new features with the trained image head.

The guard ("language helps or steps aside") is a rayclust addition, not part of either paper: the
heads' clustering and plain spherical k-means with K centres on the same image features are
compared by the label-free selection score of `rayclust.method.selection` (centred neighbour
agreement in two fixed views, the image embeddings and a text view over the whole vocabulary, on
one shared anchor graph). k-means replaces the heads only when it is ahead by more than
`guard.margin` standard errors of the paired difference (bootstrap over anchors), or when the
heads' partition is degenerate (an empty or tiny cluster) and k-means' is not. Where language
helped (the text view separates what the images alone merge) the heads are kept; where the
vocabulary does not fit, the text view carries no class signal, the image view decides, and the
result is k-means whenever k-means is clearly the better partition of the images.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rayclust.config import GuardConfig, KMeansConfig, SEICConfig, TACConfig
from rayclust.method.kmeans import KMeansResult, spherical_kmeans
from rayclust.method.metrics import label_metrics, size_statistics
from rayclust.method.naming import typical_nouns, unique_names
from rayclust.method.seic import SEICObjective, prepare_seic
from rayclust.method.selection import compare_partitions, prefer_alternative, selection_graph
from rayclust.method.tac import TACObjective, prepare_tac
from rayclust.method.trainer import (EpochLog, Stage1Inputs, Stage1Trainer, TrainState,
                                     predict_proba)


@dataclass
class ClusterResult:
    labels: np.ndarray               # (N,) final cluster per point
    confidence: np.ndarray           # (N,) probability of that cluster
    source: str                      # "heads" or "kmeans" (the guard's choice)
    top_nouns: list[list[str]]       # per cluster, best first
    names: list[str]                 # per cluster, unique
    scores: dict[str, dict] = field(default_factory=dict)  # label-free scores per candidate
    kmeans_labels: np.ndarray | None = None  # the k-means baseline the guard compared against
    # the guard's paired comparison: difference k-means - heads, its standard error, decision
    selection: dict = field(default_factory=dict)


class _Estimator(abc.ABC):
    method = ""

    def __init__(self, n_clusters: int = 10, kmeans: KMeansConfig | None = None,
                 guard: GuardConfig | None = None, device: str | torch.device = "cpu",
                 seed: int = 0, top_nouns: int = 5,
                 on_epoch_end: Callable[[TrainState, EpochLog], None] | None = None):
        self.n_clusters = n_clusters
        self.kmeans = kmeans or KMeansConfig()
        self.guard = guard or GuardConfig()
        self.device = torch.device(device)
        self.seed = seed
        self.top_nouns = top_nouns
        self.on_epoch_end = on_epoch_end

    # -- per-method hooks
    @abc.abstractmethod
    def prepare(self, u: torch.Tensor, nouns: torch.Tensor
                ) -> tuple[Stage1Inputs, torch.Tensor, KMeansResult | None]:
        """The method's global pieces: (inputs, noun indices used, k-means fit or None)."""

    @abc.abstractmethod
    def objective(self, gather_distributed: bool = False):
        """The method's training objective (see trainer.Objective); with gather_distributed the
        batch-statistics terms see the global batch of all data-parallel workers."""

    # -- the shared recipe
    def fit(self, image_features, noun_embeddings, nouns: list[str] | None = None,
            state: TrainState | None = None, inputs: Stage1Inputs | None = None,
            kmeans_fit: KMeansResult | None = None) -> "_Estimator":
        """Train on image features (N, d) with noun embeddings (Nw, d).

        `inputs`/`kmeans_fit` pass precomputed global pieces and `state` a checkpoint to resume
        (the pipeline caches both in the run directory)."""
        u = F.normalize(torch.as_tensor(image_features).float(), dim=1).to(self.device)
        e = F.normalize(torch.as_tensor(noun_embeddings).float(), dim=1).to(self.device)
        if u.shape[1] != e.shape[1]:
            raise ValueError(f"image features have dimension {u.shape[1]} but noun embeddings "
                             f"{e.shape[1]}: they must come from the same CLIP model")
        if u.shape[0] < self.n_clusters:
            raise ValueError(f"{u.shape[0]} images cannot form {self.n_clusters} clusters")
        if inputs is None:
            inputs, self.nouns_used_, kmeans_fit = self.prepare(u, e)
        self.inputs_ = inputs
        self.state_ = self.trainer().fit(inputs, state)
        self.result_ = self.finish(u, e, nouns, kmeans_fit)
        return self

    def trainer(self, **kwargs) -> Stage1Trainer:
        kwargs.setdefault("on_epoch_end", self.on_epoch_end)
        return Stage1Trainer(self.objective(), self.device, self.seed, **kwargs)

    def finish(self, u: torch.Tensor, e: torch.Tensor, nouns: list[str] | None,
               kmeans_fit: KMeansResult | None) -> ClusterResult:
        probs = predict_proba(self.state_.model, u)
        confidence, labels = probs.max(dim=1)
        source, scores, selection = "heads", {}, {}
        if self.guard.enabled:
            g = self.guard
            if kmeans_fit is None:
                kmeans_fit = spherical_kmeans(u, self.n_clusters, seed=self.seed,
                                              **vars(self.kmeans))
            self.kmeans_fit_ = kmeans_fit
            graph = selection_graph(u, e, self.n_clusters, g.sample, g.neighbours,
                                    g.text_temperature, g.anchors_per_cluster, self.seed,
                                    g.text_weight)
            comparison = compare_partitions(graph, labels, kmeans_fit.labels, self.n_clusters,
                                            g.min_cluster_fraction, g.bootstrap, self.seed)
            switch, reason = prefer_alternative(comparison, g.margin)
            for name, part, lab, conf in (("heads", "a", labels, confidence),
                                          ("kmeans", "b", kmeans_fit.labels, None)):
                scores[name] = {**comparison[part],
                                **size_statistics(lab.cpu().numpy(), self.n_clusters)}
                if conf is not None:
                    scores[name]["mean_confidence"] = float(conf.float().mean())
            selection = {"difference": comparison["difference"],
                         "standard_error": comparison["standard_error"],
                         "z": comparison["z"], "margin": g.margin,
                         "chosen": "kmeans" if switch else "heads", "reason": reason,
                         **graph.settings}
            if switch:
                source = "kmeans"
                labels = kmeans_fit.labels.to(u.device)
                # A soft confidence for k-means: softmax of cosine to the centroids at T=0.05.
                # The centroids may come from a cache loaded on another device than u.
                centroids = kmeans_fit.centroids.to(u.device, u.dtype)
                confidence = torch.softmax(u @ centroids.T / 0.05, 1).max(1).values
        labels_np = labels.cpu().numpy()
        sizes = np.bincount(labels_np, minlength=self.n_clusters).tolist()
        top = typical_nouns(u, labels, self.n_clusters, e, nouns, self.top_nouns) if nouns \
            else [[] for _ in range(self.n_clusters)]
        kmeans_labels = kmeans_fit.labels.cpu().numpy() if kmeans_fit is not None else None
        return ClusterResult(labels_np, confidence.cpu().numpy(), source, top,
                             unique_names(top, sizes), scores, kmeans_labels, selection)

    # -- sklearn-style accessors
    @property
    def labels_(self) -> np.ndarray:
        return self.result_.labels

    @property
    def cluster_names_(self) -> list[str]:
        return self.result_.names

    def predict_proba(self, image_features) -> np.ndarray:
        u = F.normalize(torch.as_tensor(image_features).float(), dim=1).to(self.device)
        return predict_proba(self.state_.model, u).cpu().numpy()

    def predict(self, image_features) -> np.ndarray:
        """Cluster of new features: the image head, or the nearest k-means centroid when the
        guard kept k-means."""
        if self.result_.source == "kmeans":
            u = F.normalize(torch.as_tensor(image_features).float(), dim=1).to(self.device)
            centroids = self.kmeans_fit_.centroids.to(u.device, u.dtype)
            return (u @ centroids.T).argmax(1).cpu().numpy()
        return self.predict_proba(image_features).argmax(axis=1)

    def score(self, true_labels) -> dict[str, float]:
        return label_metrics(true_labels, self.labels_)


class SEIC(_Estimator):
    """SEIC stage 1 (ALGORITHM.md 4.1-4.3) with rayclust's language guard."""

    method = "seic"

    def __init__(self, n_clusters: int = 10, config: SEICConfig | None = None, **kwargs):
        super().__init__(n_clusters, **kwargs)
        self.config = config or SEICConfig()

    def prepare(self, u, nouns):
        return prepare_seic(u, nouns, self.n_clusters, self.config, self.kmeans, self.seed)

    def objective(self, gather_distributed: bool = False):
        return SEICObjective(self.config, self.n_clusters, gather_distributed)


class TAC(_Estimator):
    """TAC (ICML 2024, ALGORITHM.md 3), the baseline, with the same guard."""

    method = "tac"

    def __init__(self, n_clusters: int = 10, config: TACConfig | None = None, **kwargs):
        super().__init__(n_clusters, **kwargs)
        self.config = config or TACConfig()

    def prepare(self, u, nouns):
        inputs, selected = prepare_tac(u, nouns, self.n_clusters, self.config, self.kmeans,
                                       self.seed)
        return inputs, selected, None

    def objective(self, gather_distributed: bool = False):
        return TACObjective(self.config, self.n_clusters, gather_distributed)


def make_method(config, on_epoch_end=None, device: str | torch.device | None = None
                ) -> _Estimator:
    """The estimator a full `rayclust.config.Config` asks for."""
    cls, section = {"seic": (SEIC, config.seic), "tac": (TAC, config.tac)}[config.method]
    return cls(config.clusters, section, kmeans=config.kmeans, guard=config.guard,
               device=device or "cpu", seed=config.seed, top_nouns=config.output.top_nouns,
               on_epoch_end=on_epoch_end)
