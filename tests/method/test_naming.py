"""Cluster naming: distinctive typical nouns and unique names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rayclust.method.naming import cluster_centres, typical_nouns, unique_names

D = 32
E = torch.eye(D)
G = E[7]  # a direction every cluster shares
# cluster centres c_k = 0.8 g + 0.6 e_k: "thing" = g has cosine 0.8 with every centre, more than
# the specific noun e_k (0.6) but with no distinctive part (0.8 - 0.8 = 0 vs 0.6 - 0.2 = 0.4).
CENTRES = torch.stack([0.8 * G + 0.6 * E[k] for k in range(3)])


def _features(per=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per)
    x = CENTRES[labels] + 0.01 * torch.randn(len(labels), D, generator=g)
    return F.normalize(x, dim=1), labels


def _vocab(n_filler=20, seed=1):
    """Filler nouns live in dims 10.. (orthogonal to every centre: distinctive score 0)."""
    g = torch.Generator().manual_seed(seed)
    filler = torch.zeros(n_filler, D)
    filler[:, 10:] = torch.randn(n_filler, D - 10, generator=g)
    return F.normalize(filler, dim=1), [f"filler{i}" for i in range(n_filler)]


def test_typical_noun_is_the_distinctive_one_not_the_generic_one():
    x, labels = _features()
    filler, filler_names = _vocab()
    kitten = F.normalize(0.9 * E[0] + math.sqrt(1 - 0.81) * E[5], dim=0)  # score 0.36 < 0.4
    emb = torch.cat([filler, torch.stack([G, E[0], E[1], E[2], kitten])])
    names = filler_names + ["thing", "cat", "dog", "car", "kitten"]
    top = typical_nouns(x, labels, 3, emb, names, top=2)
    assert [t[0] for t in top] == ["cat", "dog", "car"]
    assert top[0] == ["cat", "kitten"]
    assert all("thing" not in t for t in top)
    # by raw cosine "thing" would have won every cluster: the test has teeth
    centres, _ = cluster_centres(x, labels, 3)
    assert (centres @ G > centres @ E[:3].T).diagonal().all()


def test_typical_nouns_across_noun_chunks():
    x, labels = _features()
    filler, filler_names = _vocab(n_filler=8300)
    # "cat" sits in the first chunk of 8192 nouns, "dog" and "car" in the second
    emb = torch.cat([filler[:100], E[0:1], filler[100:8250], E[1:3], G[None], filler[8250:]])
    names = filler_names[:100] + ["cat"] + filler_names[100:8250] + ["dog", "car", "thing"] \
        + filler_names[8250:]
    assert names.index("dog") > 8192
    top = typical_nouns(x, labels, 3, emb, names, top=3)
    assert [t[0] for t in top] == ["cat", "dog", "car"]
    assert all(len(t) == 3 for t in top)


def test_empty_cluster_gets_no_nouns():
    x, labels = _features()
    labels = torch.where(labels == 2, torch.tensor(3), labels)  # cluster 2 empty, K = 4
    filler, filler_names = _vocab()
    emb = torch.cat([filler, E[:2]])
    top = typical_nouns(x, labels, 4, emb, filler_names + ["cat", "dog"], top=2)
    assert top[2] == []
    assert top[0][0] == "cat" and top[1][0] == "dog"


def test_cluster_centres_and_sizes():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    centres, sizes = cluster_centres(x, torch.tensor([0, 0, 2]), 3)
    assert sizes.tolist() == [2, 0, 1]
    r = 1 / math.sqrt(2)
    assert torch.allclose(centres, torch.tensor([[r, r], [0.0, 0.0], [0.6, 0.8]]), atol=1e-6)


def test_unique_names_deduplicates_by_cluster_size():
    # sizes: cluster 1 is largest and takes "apple"; cluster 0 falls back to "pear";
    # cluster 2 has only "apple" left -> "apple (2)"; cluster 3 is empty -> "".
    names = unique_names([["apple", "pear"], ["apple", "fig"], ["apple"], []], [5, 10, 3, 0])
    assert names == ["pear", "apple", "apple (2)", ""]
    assert unique_names([["a"], ["a"], ["a"]], [3, 2, 1]) == ["a", "a (2)", "a (3)"]
    assert unique_names([["x", "y"], ["y", "x"]], [1, 1]) == ["x", "y"]
    out = unique_names([["a", "b"], ["a", "b"], ["a", "b"], ["a"]], [4, 3, 2, 1])
    assert len(set(out)) == 4
