"""The method layer's own hyper-parameter sections: k-means, the language guard and one section
per method. Plain dataclasses, no torch: the application config (`rayclust.config`) embeds them as
its `kmeans`, `guard` and per-method sections (their docs and limits come from here), and the
estimators take them directly. Adapter kinds and the LoRA rank default of stage 2 live here too,
so the config's accepted values and `method.adapters` share one source.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayclust.settings import setting as _f

# Stage 2 (method.adapters): what trains in the vision tower, and the LoRA rank by default.
ADAPTER_KINDS = ("lora", "last_blocks", "full", "none")
LORA_RANK = 128


@dataclass
class KMeansConfig:
    iterations: int = _f(300, "Lloyd iterations per restart at most (faiss's niter in TAC and "
                              "SEIC); a restart stops earlier once the objective settles.",
                         minimum=1)
    restarts: int = _f(10, "Restarts with fresh k-means++ seeding (faiss's nredo); the lowest "
                           "inertia wins.", minimum=1)
    smallest_cluster_fraction: float = _f(0.05, "The smallest cluster the fit must still see, as "
                                                "a fraction of the average size N/K.",
                                          minimum=1e-6)
    points_in_smallest: int = _f(50, "Points of that smallest cluster a fit sample must hold: "
                                     "the fit uses all points, or a uniform sample of "
                                     "ceil(points_in_smallest x K / smallest_cluster_fraction) "
                                     "when N is larger (1,000 per centroid by default; faiss "
                                     "uses 256, which starves small clusters), then assigns "
                                     "every point.", minimum=1)


@dataclass
class GuardConfig:
    enabled: bool = _f(True, "Compare the trained heads with plain k-means on the image features "
                             "by the label-free selection score (rayclust.method.selection) and "
                             "keep k-means when it is clearly better.")
    margin: float = _f(2.0, "k-means replaces the heads only if its selection score is higher by "
                            "more than this many standard errors of the paired difference.",
                       minimum=0.0)
    neighbours: int = _f(10, "Neighbours per anchor in the selection graphs (image and text "
                             "views) and in the reported neighbour agreement.", minimum=1)
    sample: int = _f(4000, "Anchors of the selection graph (at least anchors_per_cluster x K; all "
                           "points when fewer).", minimum=100)
    anchors_per_cluster: int = _f(20, "Anchors per cluster at least, so large K keep enough "
                                      "anchors per cluster.", minimum=1)
    text_temperature: float = _f(0.01, "tau of the softmax over the whole vocabulary that builds "
                                       "the selection's text view.", minimum=1e-6)
    text_weight: float = _f(0.75, "Share of the text view in the selection score (the image view "
                                  "has the rest); see rayclust.method.selection for the "
                                  "measurements behind 0.75.", minimum=0.0)
    min_cluster_fraction: float = _f(0.05, "A candidate whose smallest cluster holds fewer than "
                                           "this fraction of N/K points is degenerate and cannot "
                                           "win.", minimum=0.0)
    bootstrap: int = _f(1000, "Bootstrap resamples of the anchors for the standard errors.",
                        minimum=2)


class _Section:
    def problem(self, n_clusters: int) -> str | None:
        """What is wrong across keys of this section for K clusters ("key ...: why"), or
        None. The config loader reports it as a user error."""
        return None


@dataclass
class TACConfig(_Section):
    semantic_centres: int | None = _f(None, "M, the k-means centres used to select nouns; null "
                                            "= max(round(N/300), 3K) capped at nouns/5.",
                                      minimum=2)
    nouns_per_centre: int = _f(5, "Nouns kept per semantic centre.", minimum=1)
    retrieval_temperature: float = _f(0.005, "tau of the softmax that builds text counterparts.",
                                      minimum=1e-6)
    knn: int = _f(50, "Neighbours mined in image and counterpart space.", minimum=1)
    epochs: int | None = _f(None, "Training epochs; null = TAC's official 20, or 100 when "
                                  "clusters >= 100.", minimum=1)
    batch_size: int | None = _f(None, "Anchors per global batch (split across the training "
                                      "workers); null = TAC's official 512, or 8192 when "
                                      "clusters >= 100 (at K = 1000 a batch of 512 holds about "
                                      "half a member per cluster).", minimum=2)
    learning_rate: float = _f(1e-3, "Adam learning rate.", minimum=0.0)
    distill_temperature: float | None = _f(None, "tau-hat of the cluster-level contrastive "
                                                 "loss; null = TAC's official 0.5, or 5.0 when "
                                                 "clusters >= 100.", minimum=1e-6)
    entropy_weight: float = _f(5.0, "lambda, weight of the marginal-entropy balance term.",
                               minimum=0.0)


@dataclass
class SEICConfig(_Section):
    candidate_nouns_per_centre: int = _f(200, "k1: nouns kept per k-means centre as candidates.",
                                         minimum=1)
    nouns_per_image: int = _f(50, "k2: candidate nouns mixed into each text counterpart.",
                              minimum=1)
    retrieval_temperature: float = _f(0.01, "tau_t of the counterpart softmax.", minimum=1e-6)
    epochs: int = _f(100, "Training epochs.", minimum=1)
    batch_size: int = _f(1024, "Pairs per global batch (split across the training workers).",
                         minimum=2)
    learning_rate: float = _f(5e-3, "Adam learning rate.", minimum=0.0)
    instance_weight: float = _f(0.5, "alpha, weight of the instance-level InfoNCE.", minimum=0.0)
    assignment_weight: float = _f(1.0, "beta, weight of the assignment-level InfoNCE.",
                                  minimum=0.0)
    centre_weight: float = _f(1.0, "gamma, weight of the centre-level InfoNCE.", minimum=0.0)
    balance_weight: float = _f(2.0, "delta, weight of the dynamic balancing regulariser.",
                               minimum=0.0)
    instance_temperature: float = _f(0.07, "Initial learnable temperature of the instance "
                                           "InfoNCE.", minimum=1e-4)
    assignment_temperature: float = _f(0.5, "Temperature of the assignment-level InfoNCE.",
                                       minimum=1e-6)
    centre_temperature: float = _f(0.5, "Temperature of the centre-level InfoNCE.", minimum=1e-6)
    balance_momentum: float = _f(0.9, "EMA momentum of the cluster-usage history.", minimum=0.0)
    balance_floor: float = _f(0.01, "Floor of the usage history before weighting.", minimum=0.0)
    balance_max_weight: float = _f(5.0, "Cap of the per-cluster balancing weight.", minimum=1.0)

    def problem(self, n_clusters: int) -> str | None:
        if self.nouns_per_image > self.candidate_nouns_per_centre * n_clusters:
            return ("nouns_per_image cannot exceed seic.candidate_nouns_per_centre x clusters "
                    "(the candidate pool).")
        return None
