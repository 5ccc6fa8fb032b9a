"""Label-free model selection: which partition of the same images is better, with an error bar.

The language guard uses it to choose between the trained heads and plain k-means, and the search
over K scores each trial with it (RAY.md 3.3, ALGORITHM.md 9). It is a rayclust addition; neither
paper selects models without labels.

**Two fixed views.** Scores are computed in spaces that no method trains, so every method and
every K is judged alike:

* the image view: the CLIP image embeddings u_i;
* the text view: each image's soft assignment over the *whole* vocabulary at a fixed temperature
  tau, represented by its expected noun embedding
  z_i = sum_w softmax_w(u_i . e_w / tau) e_w.
  It does not depend on any method's noun selection, counterparts or training, yet it sees what
  language sees: two visual modes of one concept (a photo and a sketch) land on the same nouns,
  and two visually close concepts land on different ones. With a vocabulary unrelated to the
  images it degrades into a noisy copy of the image view, so it then rewards image structure.

Both views are centred over the anchors and L2-normalised before the neighbour search. A shared
component (CLIP's cone, the modality gap) otherwise adds a query-independent term m . x_j to
every cosine, and points with a large m . x_j become neighbours of everyone (hubs).

**One shared graph.** s anchors are drawn once (uniformly, seeded): s = min(N, max(sample,
anchors_per_cluster * K)). In each view every anchor gets its k nearest other anchors; when N < s
would make the graph finer than at full size, k is scaled to k * N / sample (at least 3), so the
graph resolution k / s does not drift with N. Every candidate partition is scored on the same
anchors and neighbours; the Tune search builds the graph once, with its largest K.

**The score: centred neighbour agreement (kNN-graph modularity).** For anchor i in cluster c
(n_c of the s anchors), in view v,

    a_i^v = (1/k) sum_{j in N_v(i)} [y_j = y_i]          (neighbours in the same cluster)
    e_i   = (n_c - 1) / (s - 1)                          (the same fraction for k neighbours drawn
                                                          at random: a size-preserving label
                                                          permutation at the same K, exactly)
    q_i   = (1 - w) a_i^image + w a_i^text - e_i           (w = `text_weight`, 0.75)
    Q     = (1/s) sum_i q_i  ~=  (1 - w) a^image + w a^text - sum_c p_c^2

Q is the modularity of the partition on the k-regular neighbour graph (a weighted mean over the
two views): observed agreement minus its expectation under the null at the same K and the same
cluster sizes.

**Why the text view weighs 3:1.** The guard asks whether language helped; the text view is the
evidence for that, and the image view is there to catch a vocabulary that does not fit (the text
view is then a noisy copy of the image view and both agree with k-means). The image view alone
always favours k-means where a concept has two visual modes, since that is the structure
k-means fits. Measured on planted sets (N = 2,000, K = 10, SEIC 30 epochs / TAC 20; z of
k-means minus heads, k-means is kept above +2):

    setting (ACC heads vs k-means)              w=0.5   0.67   0.75   0.85   1.0
    two-mode, SEIC (0.93 vs 0.60)               +5.8    0.0   -2.3   -4.9   -8.0
    two-mode seed 1, TAC (0.80 vs 0.65)         +3.6   -1.1   -2.9   -4.7   -6.7
    unrelated nouns, SEIC (0.50 vs 1.00)       +58.7  +39.9  +28.7  +14.6   -3.5
    unrelated nouns, TAC (0.51 vs 1.00)        +61.7  +42.7  +32.1  +18.8   +1.2
    two-mode, unrelated nouns, SEIC (0.56/0.60)+28.8  +25.6  +23.6  +20.9  +16.7
    overlapping, fitting nouns, SEIC (0.55/0.18)-30.6 -33.6  -34.3  -34.7  -35.0

Equal weights keep k-means where the heads join visual modes (the issue's failure); the text
view alone keeps heads at ACC 0.50 against a perfect k-means. 0.75 sits inside the range that is
right on every row. That subtraction is what makes K comparable: more clusters lower both a and
sum p_c^2, fewer raise both, and only structure beyond chance is left. The old guard's kappa,
(a - e) / (1 - e), divided by 1 - e, which cancels the penalty of a merge: merging two true
clusters cuts no neighbour pairs, so a stays 1 and kappa stays 1 (failure (b) of issue 10). In Q a
merge of clusters with shares p and q costs 2pq, and splitting a compact cluster cuts a share of
its neighbour pairs (about half, for a blob in high dimension) and costs far more than the
p^2 / 2 it saves. Dividing by the null's standard deviation (a z-score) was rejected: that
deviation shrinks like 1 / sqrt(K), so z-scores would grow with K. A known limit of modularity is
its resolution: at very large K, two true clusters that share more than about 2 s k / K^2
neighbour edges score higher merged, so the search over K leans small there.

**Degenerate partitions cannot win.** A partition whose smallest cluster holds fewer than
`min_cluster_fraction` * N / K points (empty clusters included) is flagged `degenerate`; the
guard never chooses a degenerate candidate over a non-degenerate one, and the search over K skips
them. Merges that leave no cluster empty are handled by the score itself (2pq above).

**Paired comparison with an error bar.** Two partitions A and B are compared anchor by anchor on
the same graph: d_i = q_i(B) - q_i(A), difference D = mean d_i. Its standard error comes from a
bootstrap over anchors (resample the s anchors with replacement, recompute the mean of d; the
standard deviation over resamples), so the correlation between the two candidates' scores is
kept. The guard switches from the heads (A) to k-means (B) only when D > margin * SE: it is
clearly ahead, not ahead by noise. The bootstrap is conditional on the drawn graph: it measures
how much the verdict depends on which anchors were scored, not the variation of the graph itself.

**Use.** The guard: `compare_partitions(graph, heads, kmeans, K)` then `prefer_alternative`.
The search over K: build `selection_graph(u, e, K_max)` once, call `score_partition(graph,
labels, K)` per trial, drop `degenerate` trials and take the largest `score` (a trial within two
`standard_error`s of the best can be settled by the paired comparison).

Why these choices were checked (tests/method/test_selection.py): on planted two-mode classes with
a fitting vocabulary the truth beats k-means (the text view decides; the image view is about
even); with unrelated nouns k-means wins; a merge scores lower and is degenerate; over K = 4..10
on 7 vMF clusters the score peaks at 7. tau = 0.01 (CLIP's own logit scale) was kept over larger
values: at tau >= 0.1 the softmax is nearly flat and z approaches a linear map of u (the
vocabulary's second moment applied to u), which re-imports the image structure and, on the
planted two-mode set, ranked k-means (ACC 0.55) above heads at ACC 0.97.

Cost: one pass over the vocabulary for the s anchors (s * Nw * d multiply-adds, chunked), two
exact kNN searches over s points, then O(s k) per candidate and O(B s) for the bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rayclust.method.neighbours import knn

VIEWS = ("image", "text")


@dataclass
class SelectionGraph:
    """The shared anchors and their neighbours in each fixed view (indices into `anchors`)."""
    anchors: torch.Tensor                  # (s,) indices into the N points, CPU int64
    neighbours: dict[str, torch.Tensor]    # view -> (s, k) CPU int64
    n_points: int                          # N, the points the partitions label
    settings: dict = field(default_factory=dict)
    text_weight: float = 0.75              # w: the text view's share of the score

    @property
    def size(self) -> int:
        return int(self.anchors.shape[0])


def vocabulary_view(image: torch.Tensor, vocabulary: torch.Tensor, temperature: float = 0.01,
                    chunk_elements: int = 1 << 24) -> torch.Tensor:
    """z_i = sum_w softmax_w(u_i . e_w / tau) e_w over the whole vocabulary, (n, d).

    The vocabulary is streamed in column chunks with a running maximum (the log-sum-exp trick
    done online), so memory stays O(n * chunk) whatever the vocabulary size."""
    n = image.shape[0]
    chunk = max(1, chunk_elements // max(n, 1))
    vocabulary = vocabulary.to(image.device, image.dtype)
    top = torch.full((n, 1), float("-inf"), device=image.device, dtype=image.dtype)
    total = torch.zeros(n, 1, device=image.device, dtype=image.dtype)
    acc = torch.zeros(n, image.shape[1], device=image.device, dtype=image.dtype)
    for start in range(0, vocabulary.shape[0], chunk):
        e = vocabulary[start:start + chunk]
        logits = image @ e.T / temperature
        new_top = torch.maximum(top, logits.max(dim=1, keepdim=True).values)
        rescale = torch.exp(top - new_top)  # earlier chunks were weighted against a lower max
        weights = torch.exp(logits - new_top)
        total = total * rescale + weights.sum(dim=1, keepdim=True)
        acc = acc * rescale + weights @ e
        top = new_top
    return acc / total


def _centred(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x - x.mean(dim=0, keepdim=True), dim=1)


def selection_graph(image: torch.Tensor, vocabulary: torch.Tensor, n_clusters: int,
                    sample: int = 4000, neighbours: int = 10, temperature: float = 0.01,
                    anchors_per_cluster: int = 20, seed: int = 0,
                    text_weight: float = 0.75) -> SelectionGraph:
    """Draw the anchors and build both views' neighbour lists once (see the module docstring).

    image (N, d) unit rows, vocabulary (Nw, d) unit rows (the whole noun bank); n_clusters is
    the largest K that will be scored on this graph."""
    n = image.shape[0]
    size = min(n, max(sample, anchors_per_cluster * n_clusters))
    # k fixed for N >= sample; scaled down for smaller sets so the resolution k / s holds
    k = neighbours if n >= sample else max(min(3, neighbours), round(neighbours * n / sample))
    k = min(k, size - 1)
    if k < 1:
        raise ValueError(f"{n} points are too few to score a clustering")
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randperm(n, generator=generator)[:size].sort().values
    u = image[anchors.to(image.device)].float()
    views = {"image": _centred(u),
             "text": _centred(vocabulary_view(u, vocabulary.float(), temperature))}
    graph = {name: knn(x, k).cpu() for name, x in views.items()}
    return SelectionGraph(anchors, graph, n,
                          {"anchors": size, "neighbours": k, "temperature": temperature,
                           "seed": seed, "text_weight": text_weight}, text_weight)


def _is_degenerate(sizes: np.ndarray, min_cluster_fraction: float) -> bool:
    n, k = sizes.sum(), len(sizes)
    return bool(sizes.min() == 0 or sizes.min() < min_cluster_fraction * n / k)


def anchor_contributions(graph: SelectionGraph, labels) -> dict[str, np.ndarray]:
    """Per-anchor a_i^v for each view and the null expectation e_i, as float64 arrays (s,)."""
    labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    if labels.shape[0] != graph.n_points:
        raise ValueError(f"labels cover {labels.shape[0]} points, the graph {graph.n_points}")
    y = labels.cpu().long()[graph.anchors]
    y = torch.unique(y, return_inverse=True)[1]  # dense ids: the sizes below count anchors
    counts = torch.bincount(y).double()
    s = graph.size
    out = {"null": ((counts[y] - 1) / max(s - 1, 1)).numpy()}
    for view, nb in graph.neighbours.items():
        out[view] = (y[nb] == y[:, None]).double().mean(dim=1).numpy()
    return out


def _per_anchor(parts: dict[str, np.ndarray], text_weight: float) -> np.ndarray:
    return (1.0 - text_weight) * parts["image"] + text_weight * parts["text"] - parts["null"]


def _bootstrap_se(values: np.ndarray, resamples: int, seed: int) -> float:
    """Standard deviation of the mean of `values` over resamples with replacement."""
    if len(values) < 2 or resamples < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for b in range(0, resamples, 64):  # blocks of resamples keep memory at 64 * s indices
        m = min(64, resamples - b)
        idx = rng.integers(0, len(values), (m, len(values)))
        means[b:b + m] = values[idx].mean(axis=1)
    return float(means.std(ddof=1))


def score_partition(graph: SelectionGraph, labels, n_clusters: int,
                    min_cluster_fraction: float = 0.05, bootstrap: int = 1000,
                    seed: int = 0) -> dict[str, float | bool | int]:
    """The selection score Q of one partition of the N points, its components and error bar.

    Returns `score` (Q), `score_image` and `score_text` (each view's a - e), `standard_error`
    (bootstrap over anchors), `degenerate`, `smallest_cluster` (points) and
    `neighbour_agreement` (the old guard's kappa in the image view, for reporting)."""
    parts = anchor_contributions(graph, labels)
    q = _per_anchor(parts, graph.text_weight)
    sizes = np.bincount(np.asarray(torch.as_tensor(labels).cpu()), minlength=n_clusters)
    null = float(parts["null"].mean())
    a_image = float(parts["image"].mean())
    kappa = 0.0 if null >= 1.0 else (a_image - null) / (1.0 - null)
    return {"score": float(q.mean()),
            "score_image": a_image - null,
            "score_text": float(parts["text"].mean()) - null,
            "standard_error": _bootstrap_se(q, bootstrap, seed),
            "degenerate": _is_degenerate(sizes, min_cluster_fraction),
            "smallest_cluster": int(sizes.min()),
            "neighbour_agreement": kappa}


def compare_partitions(graph: SelectionGraph, labels_a, labels_b, n_clusters: int,
                       min_cluster_fraction: float = 0.05, bootstrap: int = 1000,
                       seed: int = 0) -> dict[str, object]:
    """Paired comparison of B against A on the same anchors and graph.

    Returns `a` and `b` (score_partition of each), `difference` (Q(B) - Q(A)),
    `standard_error` of that difference (paired bootstrap over anchors) and `z` (their ratio;
    0 when both partitions agree on every anchor)."""
    kw = dict(min_cluster_fraction=min_cluster_fraction, bootstrap=bootstrap, seed=seed)
    a = score_partition(graph, labels_a, n_clusters, **kw)
    b = score_partition(graph, labels_b, n_clusters, **kw)
    d = (_per_anchor(anchor_contributions(graph, labels_b), graph.text_weight)
         - _per_anchor(anchor_contributions(graph, labels_a), graph.text_weight))
    # the same seed resamples the same anchors for the paired difference as for each score
    se = _bootstrap_se(d, bootstrap, seed)
    diff = float(d.mean())
    return {"a": a, "b": b, "difference": diff, "standard_error": se,
            "z": diff / se if se > 0 else 0.0}


def prefer_alternative(comparison: dict, margin: float = 2.0) -> tuple[bool, str]:
    """Whether B (the alternative) should replace A (the default), and why.

    A degenerate candidate never wins over a non-degenerate one; otherwise B must be ahead by
    more than `margin` standard errors of the paired difference."""
    a_bad, b_bad = comparison["a"]["degenerate"], comparison["b"]["degenerate"]
    if a_bad != b_bad:
        return b_bad is False, ("the default is degenerate" if a_bad
                                else "the alternative is degenerate")
    d, se = comparison["difference"], comparison["standard_error"]
    if d > margin * se and d > 0:
        return True, f"the alternative is ahead by {d:.4f} ({comparison['z']:.1f} SE)"
    return False, f"the alternative is not clearly ahead ({d:+.4f}, {comparison['z']:+.1f} SE)"
