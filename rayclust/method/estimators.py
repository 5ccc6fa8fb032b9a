"""scikit-learn-style estimators over in-memory features; `Estimator` is the shared recipe and
each method's module (`seic`, `tac`) subclasses it with its global pieces and objective.

`fit(image_features, noun_embeddings, nouns)` runs the method's global pieces, trains stage 1,
predicts, applies the language guard and names the clusters. Learned state lives in attributes
with a trailing underscore; `predict` labels new features with the trained image head.
The pipeline drives an estimator through the same public API: `prepare` (global pieces, which it
caches), `fit(..., pieces=, state=)` (resume), `state_dict`/`load_estimator` (the saved model),
`name_clusters`, `label_free_scores` and `image_classifier` (stage 2).

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
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayclust.method import registry
from rayclust.method.hyperparameters import GuardConfig, KMeansConfig
from rayclust.method.kmeans import KMeansResult, spherical_kmeans
from rayclust.method.metrics import label_free_scores, label_metrics, size_statistics
from rayclust.method.naming import typical_nouns, unique_names
from rayclust.method.selection import compare_partitions, prefer_alternative, selection_graph
from rayclust.method.trainer import (EpochLog, Stage1Inputs, Stage1Trainer, TrainState,
                                     predict_proba)

# k-means as the final assignment gets a soft confidence: softmax of cosine to the centroids
KMEANS_CONFIDENCE_TEMPERATURE = 0.05


@dataclass
class ClusterResult:
    labels: np.ndarray               # (N,) final cluster per point
    confidence: np.ndarray           # (N,) probability of that cluster
    source: str                      # "heads" or "kmeans" (the guard's choice), or "stage2"
    top_nouns: list[list[str]]       # per cluster, best first
    names: list[str]                 # per cluster, unique
    scores: dict[str, dict] = field(default_factory=dict)  # label-free scores per candidate
    kmeans_labels: np.ndarray | None = None  # the k-means baseline the guard compared against
    # the guard's paired comparison: difference k-means - heads, its standard error, decision
    selection: dict = field(default_factory=dict)


@dataclass
class GlobalPieces:
    """What a method computes once over the whole corpus before training: the training inputs
    (image features, text counterparts, neighbour tables), the indices of the nouns that span
    its text space, and its K-centre k-means fit when it made one (SEIC; the guard reuses it)."""

    inputs: Stage1Inputs
    nouns_used: torch.Tensor
    kmeans: KMeansResult | None = None

    def to_dict(self) -> dict:
        """CPU tensors without the image features (the caller has those): for a cache file."""
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        k = self.kmeans
        return {"text": cpu(self.inputs.text),
                "image_neighbours": cpu(self.inputs.image_neighbours),
                "text_neighbours": cpu(self.inputs.text_neighbours),
                "nouns_used": cpu(self.nouns_used),
                "kmeans_centroids": cpu(k.centroids) if k else None,
                "kmeans_labels": cpu(k.labels) if k else None,
                "kmeans_inertia": k.inertia if k else None}

    @classmethod
    def from_dict(cls, saved: dict, image: torch.Tensor) -> "GlobalPieces":
        kmeans = None
        if saved.get("kmeans_centroids") is not None:
            kmeans = KMeansResult(saved["kmeans_centroids"], saved["kmeans_labels"],
                                  saved["kmeans_inertia"])
        inputs = Stage1Inputs(image, saved["text"], saved["image_neighbours"],
                              saved["text_neighbours"])
        return cls(inputs, saved["nouns_used"], kmeans)


class Estimator(abc.ABC):
    """The shared recipe. `params` is the method's hyper-parameter section
    (`method.hyperparameters`); None takes its defaults."""

    method = ""  # the registry name; set by each subclass

    def __init__(self, n_clusters: int = 10, params=None, *, kmeans: KMeansConfig | None = None,
                 guard: GuardConfig | None = None, device: str | torch.device = "cpu",
                 seed: int = 0, top_nouns: int = 5,
                 on_epoch_end: Callable[[TrainState, EpochLog], None] | None = None):
        self.n_clusters = n_clusters
        self.params = params if params is not None else registry.get(self.method).params()
        self.kmeans = kmeans or KMeansConfig()
        self.guard = guard or GuardConfig()
        self.device = torch.device(device)
        self.seed = seed
        self.top_nouns = top_nouns
        self.on_epoch_end = on_epoch_end

    # -- per-method hooks
    @abc.abstractmethod
    def prepare(self, u: torch.Tensor, nouns: torch.Tensor) -> GlobalPieces:
        """The method's global pieces from unit image features and noun embeddings."""

    @abc.abstractmethod
    def objective(self, gather_distributed: bool = False):
        """The method's training objective (see trainer.Objective); with gather_distributed the
        batch-statistics terms see the global batch of all data-parallel workers."""

    def hyperparameters(self) -> dict:
        """The values training uses, after those left unset were derived (e.g. TAC's regime)."""
        return dataclasses.asdict(self.objective().cfg)

    # -- the shared recipe
    def fit(self, image_features, noun_embeddings, nouns: list[str] | None = None, *,
            pieces: GlobalPieces | None = None, state: TrainState | None = None
            ) -> "Estimator":
        """Train on image features (N, d) with noun embeddings (Nw, d).

        `pieces` passes precomputed global pieces and `state` a training state to resume from
        (the pipeline caches both in the run directory; a state that completed every epoch
        trains no further)."""
        u = F.normalize(torch.as_tensor(image_features).float(), dim=1).to(self.device)
        e = F.normalize(torch.as_tensor(noun_embeddings).float(), dim=1).to(self.device)
        if u.shape[1] != e.shape[1]:
            raise ValueError(f"image features have dimension {u.shape[1]} but noun embeddings "
                             f"{e.shape[1]}: they must come from the same CLIP model")
        if u.shape[0] < self.n_clusters:
            raise ValueError(f"{u.shape[0]} images cannot form {self.n_clusters} clusters")
        self.pieces_ = pieces if pieces is not None else self.prepare(u, e)
        self.state_ = self.trainer().fit(self.pieces_.inputs, state)
        self.result_ = self._finish(u, e, nouns, self.pieces_.kmeans)
        return self

    def trainer(self, **kwargs) -> Stage1Trainer:
        """The stage-1 loop for this estimator; kwargs as `Stage1Trainer` (rank, world_size,
        on_epoch_end, wrap_model: what a data-parallel worker passes)."""
        kwargs.setdefault("on_epoch_end", self.on_epoch_end)
        objective = self.objective(gather_distributed=kwargs.get("world_size", 1) > 1)
        return Stage1Trainer(objective, self.device, self.seed, **kwargs)

    def _finish(self, u: torch.Tensor, e: torch.Tensor, nouns: list[str] | None,
                kmeans_fit: KMeansResult | None) -> ClusterResult:
        probs = predict_proba(self.state_.model, u)
        confidence, labels = probs.max(dim=1)
        source, scores, selection = "heads", {}, {}
        self.kmeans_fit_ = kmeans_fit
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
                confidence = self._kmeans_proba(u).max(1).values
        self.source_ = source
        top, names = self.name_clusters(u, labels, e, nouns)
        kmeans_labels = kmeans_fit.labels.cpu().numpy() if kmeans_fit is not None else None
        return ClusterResult(labels.cpu().numpy(), confidence.cpu().numpy(), source, top, names,
                             scores, kmeans_labels, selection)

    def _kmeans_proba(self, u: torch.Tensor) -> torch.Tensor:
        # the centroids may come from a cache loaded on another device than u
        centroids = self.kmeans_fit_.centroids.to(u.device, u.dtype)
        return torch.softmax(u @ centroids.T / KMEANS_CONFIDENCE_TEMPERATURE, 1)

    # -- naming and scoring (stage 2 uses them on its own assignment)
    def name_clusters(self, u: torch.Tensor, labels, e: torch.Tensor, nouns: list[str] | None
                      ) -> tuple[list[list[str]], list[str]]:
        """(top nouns per cluster, unique names) in the frozen CLIP space: unit image features
        u (N, d), labels (N,), unit noun embeddings e (Nw, d)."""
        labels = torch.as_tensor(labels).to(u.device)
        sizes = np.bincount(labels.cpu().numpy(), minlength=self.n_clusters).tolist()
        top = typical_nouns(u, labels, self.n_clusters, e, nouns, self.top_nouns) if nouns \
            else [[] for _ in range(self.n_clusters)]
        return top, unique_names(top, sizes)

    def label_free_scores(self, u: torch.Tensor, labels, confidence) -> dict:
        """Neighbour agreement, size statistics and mean confidence of an assignment."""
        g = self.guard
        return label_free_scores(u, torch.as_tensor(labels), self.n_clusters,
                                 torch.as_tensor(confidence), g.neighbours, g.sample, self.seed)

    # -- the trained model
    def image_classifier(self) -> nn.Module:
        """The trained image branch as a module: unit image features (B, d) -> logits (B, K).
        Its parameters are the heads' own (stage 2 fine-tunes them in place)."""
        return self.state_.module.image_classifier()

    def state_dict(self) -> dict:
        """Everything `load_estimator` needs to rebuild this fitted estimator."""
        k = getattr(self, "kmeans_fit_", None)
        return {"method": self.method, "n_clusters": self.n_clusters,
                "dim": int(self.pieces_.inputs.image.shape[1]),
                "params": dataclasses.asdict(self.params),
                "kmeans": dataclasses.asdict(self.kmeans), "guard": dataclasses.asdict(self.guard),
                "seed": self.seed, "top_nouns": self.top_nouns,
                "state": self.state_.state_dict(), "source": self.source_,
                "kmeans_centroids": k.centroids.cpu() if k is not None else None}

    # -- sklearn-style accessors
    @property
    def labels_(self) -> np.ndarray:
        return self.result_.labels

    @property
    def cluster_names_(self) -> list[str]:
        return self.result_.names

    def predict_proba(self, image_features) -> np.ndarray:
        """The trained image head's cluster probabilities (whatever the guard chose)."""
        u = F.normalize(torch.as_tensor(image_features).float(), dim=1).to(self.device)
        return predict_proba(self.state_.model, u).cpu().numpy()

    def predict(self, image_features) -> np.ndarray:
        """Cluster of new features: the image head, or the nearest k-means centroid when the
        guard kept k-means."""
        if self.source_ == "kmeans":
            u = F.normalize(torch.as_tensor(image_features).float(), dim=1).to(self.device)
            return self._kmeans_proba(u).argmax(1).cpu().numpy()
        return self.predict_proba(image_features).argmax(axis=1)

    def score(self, true_labels) -> dict[str, float]:
        return label_metrics(true_labels, self.labels_)


def load_estimator(saved: dict, device: str | torch.device = "cpu") -> Estimator:
    """A fitted estimator from `Estimator.state_dict()`: its method, K, hyper-parameters and
    trained heads (enough to predict, name, score and fine-tune; not the global pieces)."""
    spec = registry.get(saved["method"])
    estimator = spec.estimator()(saved["n_clusters"], spec.params(**saved["params"]),
                                 kmeans=KMeansConfig(**saved["kmeans"]),
                                 guard=GuardConfig(**saved["guard"]), device=device,
                                 seed=saved["seed"], top_nouns=saved["top_nouns"])
    estimator.state_ = estimator.trainer().init_state(saved["dim"])
    estimator.state_.load_state_dict(saved["state"])
    estimator.source_ = saved["source"]
    centroids = saved.get("kmeans_centroids")
    estimator.kmeans_fit_ = (KMeansResult(centroids.to(estimator.device), None, None)
                             if centroids is not None else None)
    return estimator
