"""Label-free model selection (rayclust.method.selection) on planted partitions.

No training here: the "heads" are planted partitions (the truth, or the truth with a merge), the
alternative is spherical k-means on the images, so each case runs in about a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayclust.method.kmeans import spherical_kmeans
from rayclust.method.metrics import cluster_accuracy, neighbour_agreement
from rayclust.method.selection import (anchor_contributions, compare_partitions,
                                       prefer_alternative, score_partition, selection_graph,
                                       vocabulary_view)
from rayclust.synthetic import make_two_mode_features, make_vmf_features


def _tensors(f):
    return (F.normalize(torch.tensor(f.image), dim=1), F.normalize(torch.tensor(f.nouns), dim=1))


def _two_mode(**kw):
    # three classes with two far-apart visual modes, one visually close pair, six classes
    base = dict(n=1200, n_clusters=6, two_mode_classes=3, close_pairs=1, semantic_weight=0.3,
                seed=0)
    base.update(kw)
    return make_two_mode_features(**base)


def test_vocabulary_view_is_the_softmax_mean_of_the_whole_vocabulary():
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(7, 16, generator=g), dim=1)
    e = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    expected = torch.softmax(u @ e.T / 0.05, dim=1) @ e
    # streamed in chunks of 3 nouns (7 * 3 elements) with a running maximum: same result
    close = lambda a, b: np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)  # noqa: E731
    close(vocabulary_view(u, e, 0.05, chunk_elements=21), expected)
    close(vocabulary_view(u, e, 0.05), expected)
    # a tiny temperature does not overflow: it picks the nearest noun
    nearest = e[(u @ e.T).argmax(1)]
    close(vocabulary_view(u, e, 1e-5, chunk_elements=21), nearest)


def test_graph_size_and_resolution():
    f = make_vmf_features(n=600, n_clusters=4, dim=32, image_kappa=50, nouns_per_class=5,
                          distractor_nouns=10, seed=0)
    u, e = _tensors(f)
    small = selection_graph(u, e, 4, sample=400, neighbours=10)
    assert small.size == 400 and small.neighbours["image"].shape == (400, 10)
    assert small.neighbours["text"].shape == (400, 10)
    # fewer points than `sample`: all points, and k shrinks with N so k / s stays put
    few = selection_graph(u[:200], e, 4, sample=400, neighbours=10)
    assert few.size == 200 and few.settings["neighbours"] == 5
    # large K asks for more anchors than `sample`
    assert selection_graph(u, e, 25, sample=200, anchors_per_cluster=20).size == 500
    # anchors never list themselves
    nb = small.neighbours["image"]
    assert not (nb == torch.arange(400)[:, None]).any()
    with pytest.raises(ValueError, match="cover"):
        score_partition(small, np.zeros(10, int), 4)


def test_score_is_modularity_by_hand():
    # 4 anchors, two exact pairs, 1 neighbour each: image and text graphs pair (0,1) and (2,3)
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.14, 0.99]])
    x = F.normalize(x, dim=1)
    graph = selection_graph(x, x, 2, sample=100, neighbours=1)
    assert graph.settings["neighbours"] == 1
    parts = anchor_contributions(graph, np.array([0, 0, 1, 1]))
    # every neighbour agrees; e_i = (n_c - 1) / (s - 1) = 1/3; Q = 1 - 1/3
    np.testing.assert_allclose(parts["image"], 1.0)
    np.testing.assert_allclose(parts["null"], 1 / 3)
    assert score_partition(graph, np.array([0, 0, 1, 1]), 2)["score"] == pytest.approx(2 / 3)
    # labels split both pairs: a = 0, Q = -1/3
    assert score_partition(graph, np.array([0, 1, 0, 1]), 2)["score"] == pytest.approx(-1 / 3)
    # one cluster: a = 1, e = 1, Q = 0 (and degenerate at K = 2)
    one = score_partition(graph, np.zeros(4, int), 2)
    assert one["score"] == pytest.approx(0.0) and one["degenerate"]


def test_two_modes_with_a_fitting_vocabulary_keep_the_heads():
    """Failure (a) of issue 10: k-means splits each two-mode class and merges the visually close
    pair; the old image-only neighbour agreement scored it at least as high as the truth."""
    f = _two_mode()
    u, e = _tensors(f)
    km = spherical_kmeans(u, 6, seed=0, restarts=3).labels
    assert cluster_accuracy(f.labels, km.numpy()) < 0.75
    old_truth = neighbour_agreement(u, torch.tensor(f.labels), k=10)
    old_km = neighbour_agreement(u, km, k=10)
    assert old_km >= old_truth  # the old guard would have replaced perfect heads
    graph = selection_graph(u, e, 6, seed=0)
    cmp = compare_partitions(graph, f.labels, km, 6)
    switch, _ = prefer_alternative(cmp, margin=2.0)
    assert not switch
    assert cmp["difference"] < -3 * cmp["standard_error"], cmp  # truth clearly ahead
    # the text view is what tells them apart: in the image view the two are about even
    assert abs(cmp["b"]["score_image"] - cmp["a"]["score_image"]) < 0.02
    assert cmp["a"]["score_text"] > cmp["b"]["score_text"] + 0.05


def test_an_unrelated_vocabulary_keeps_kmeans():
    """Same images, nouns unrelated to the classes: nothing label-free can see the planted
    classes, so the partition of the images (k-means) must win."""
    f = _two_mode(nouns_per_class=0, distractor_nouns=1000)
    u, e = _tensors(f)
    km = spherical_kmeans(u, 6, seed=0, restarts=3).labels
    graph = selection_graph(u, e, 6, seed=0)
    cmp = compare_partitions(graph, f.labels, km, 6)
    switch, reason = prefer_alternative(cmp, margin=2.0)
    assert switch, (reason, cmp)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_merge_is_never_preferred(seed):
    """Failure (b) of issue 10: merging two true classes and leaving a cluster empty raised the
    old score (kappa stays 1). Here the merge scores lower, is flagged degenerate, and loses."""
    f = make_vmf_features(n=900, n_clusters=6, dim=256, image_kappa=150, text_kappa=100,
                          nouns_per_class=10, distractor_nouns=100, noun_kappa=300, seed=seed)
    u, e = _tensors(f)
    truth = torch.tensor(f.labels)
    merged = torch.where(truth == 5, torch.tensor(4), truth)  # cluster 5 left empty
    km = spherical_kmeans(u, 6, seed=seed).labels
    graph = selection_graph(u, e, 6, seed=seed)
    # the old score cannot see the merge: kappa stays where it was
    assert neighbour_agreement(u, merged) == pytest.approx(neighbour_agreement(u, truth),
                                                           abs=1e-3)
    for default in (truth, km):
        cmp = compare_partitions(graph, default, merged, 6)
        assert cmp["b"]["degenerate"] and not cmp["a"]["degenerate"]
        assert cmp["difference"] < 0  # the score alone already prefers the default
        assert not prefer_alternative(cmp, margin=0.0)[0]
    # a merge that leaves no cluster empty (merge two classes, split a third at random) loses
    # on the score itself
    split = truth.clone()
    split[(truth == 5)] = 4
    half = (truth == 0) & (torch.rand(len(truth), generator=torch.Generator().manual_seed(0))
                           < 0.5)
    split[half] = 5
    cmp = compare_partitions(graph, truth, split, 6)
    assert not cmp["b"]["degenerate"]
    assert cmp["difference"] < -3 * cmp["standard_error"]
    # and the degenerate default loses to a sound alternative whatever the scores
    assert prefer_alternative(compare_partitions(graph, merged, truth, 6), margin=100.0)[0]


def test_criterion_peaks_near_the_true_number_of_clusters():
    f = make_vmf_features(n=1400, n_clusters=7, dim=256, image_kappa=80, text_kappa=60,
                          nouns_per_class=10, distractor_nouns=100, noun_kappa=160, seed=2)
    u, e = _tensors(f)
    graph = selection_graph(u, e, 10, seed=0)  # one graph for every K, built for the largest
    scores = {}
    for k in range(4, 11):
        labels = spherical_kmeans(u, k, seed=0, restarts=3, iterations=50).labels
        scores[k] = score_partition(graph, labels, k, bootstrap=50)["score"]
    best = max(scores, key=scores.get)
    assert abs(best - 7) <= 1, scores


def test_paired_standard_error():
    f = make_vmf_features(n=800, n_clusters=5, dim=64, image_kappa=40, text_kappa=40,
                          nouns_per_class=10, distractor_nouns=50, noun_kappa=80, seed=3)
    u, e = _tensors(f)
    graph = selection_graph(u, e, 5, seed=0)
    truth = torch.tensor(f.labels)
    same = compare_partitions(graph, truth, truth, 5)
    assert same["difference"] == 0 and same["standard_error"] == 0 and same["z"] == 0
    assert not prefer_alternative(same, margin=0.0)[0]
    # relabel 10% of the points: the bootstrap error of the paired difference is that of a
    # mean, sd(d) / sqrt(s), up to resampling noise
    g = torch.Generator().manual_seed(1)
    noisy = torch.where(torch.rand(len(truth), generator=g) < 0.1,
                        torch.randint(0, 5, (len(truth),), generator=g), truth)
    cmp = compare_partitions(graph, truth, noisy, 5, bootstrap=2000, seed=4)
    assert cmp["a"]["standard_error"] > 0 and cmp["b"]["standard_error"] > 0
    q = lambda lab: anchor_contributions(graph, lab)  # noqa: E731
    w = graph.text_weight
    d = ((1 - w) * q(noisy)["image"] + w * q(noisy)["text"] - q(noisy)["null"]
         - (1 - w) * q(truth)["image"] - w * q(truth)["text"] + q(truth)["null"])
    assert cmp["difference"] == pytest.approx(d.mean())
    assert cmp["standard_error"] == pytest.approx(d.std() / np.sqrt(len(d)), rel=0.15)
    assert cmp["difference"] < 0 and prefer_alternative(cmp)[0] is False


def test_tiny_clusters_are_degenerate():
    f = make_vmf_features(n=600, n_clusters=3, dim=32, image_kappa=50, nouns_per_class=5,
                          distractor_nouns=10, seed=0)
    u, e = _tensors(f)
    graph = selection_graph(u, e, 4, seed=0)
    labels = torch.tensor(f.labels)
    labels[:4] = 3  # a fourth cluster of 4 points: 4 < 0.05 * 600 / 4
    assert score_partition(graph, labels, 4)["degenerate"]
    assert not score_partition(graph, labels, 4, min_cluster_fraction=0.01)["degenerate"]
    assert score_partition(graph, labels, 4)["smallest_cluster"] == 4
