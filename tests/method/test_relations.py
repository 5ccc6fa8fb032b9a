"""LAIC-RS relational signals (rayclust/method/relations.py): the ridge closed form, its
streaming, the cross-class cosine, and relation-space neighbours on synthetic features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayclust.method.counterparts import tac_counterparts
from rayclust.method.neighbours import knn
from rayclust.method.relations import (cross_class_cosine, relation_features,
                                       relation_neighbours, ridge_relations)
from rayclust.synthetic import make_vmf_features


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.float64), dim=1)


@pytest.mark.parametrize("m, ridge", [(8, 0.1), (40, 0.01)])  # fewer and more nouns than d=16
def test_ridge_matches_the_augmented_least_squares_solution(m, ridge):
    u, s = _unit(30, 16, 0), _unit(m, 16, 1)
    got = ridge_relations(u, s, ridge).numpy()
    # min ||u - S^T r||^2 + ridge ||r||^2  ==  least squares on [S^T; sqrt(ridge) I] r = [u; 0]
    a = np.vstack([s.numpy().T, np.sqrt(ridge) * np.eye(m)])
    for i in range(len(u)):
        b = np.concatenate([u[i].numpy(), np.zeros(m)])
        np.testing.assert_allclose(got[i], np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-9)


def test_streaming_and_centering():
    u, s = _unit(50, 12, 2).float(), _unit(20, 12, 3).float()
    whole = ridge_relations(u, s, 0.05)
    assert whole.dtype == torch.float32 and whole.shape == (50, 20)
    torch.testing.assert_close(ridge_relations(u, s, 0.05, chunk_size=7), whole)
    centred = ridge_relations(u, s, 0.05, center=True)
    torch.testing.assert_close(centred, ridge_relations(u - u.mean(0), s - s.mean(0), 0.05))
    assert torch.allclose(relation_features(u, s, 0.05).norm(dim=1), torch.ones(50))
    with pytest.raises(ValueError, match="ridge must be > 0"):
        ridge_relations(u, s, 0.0)


def test_cross_class_cosine_matches_the_pairwise_mean():
    x = _unit(40, 5, 4)
    labels = torch.tensor([0] * 10 + [1] * 25 + [2] * 5)
    cos = x @ x.T
    cross = labels[:, None] != labels[None, :]
    assert cross_class_cosine(x, labels) == pytest.approx(float(cos[cross].mean()), abs=1e-12)
    with pytest.raises(ValueError, match="two classes"):
        cross_class_cosine(x, torch.zeros(40, dtype=torch.long))


def test_relations_beat_image_and_counterpart_neighbours_where_images_overlap():
    """Overlapping image clusters (kappa 30) with a fitting vocabulary: relation-space neighbours
    share the class more often than image neighbours and TAC-counterpart neighbours, and the
    relation features are less alike across classes than the counterparts (claim (i))."""
    data = make_vmf_features(n=600, n_clusters=6, dim=64, image_kappa=30.0, seed=0)
    u, labels = torch.tensor(data.image), torch.tensor(data.labels)
    counterparts, selected = tac_counterparts(u, torch.tensor(data.nouns), 6)
    nouns = torch.tensor(data.nouns)[selected]

    def agreement(neighbours):
        return float((labels[neighbours] == labels[:, None]).float().mean())

    relational = agreement(relation_neighbours(u, nouns, 10, center=True))
    assert relational >= 0.88, relational
    assert relational >= agreement(knn(u, 10)) + 0.1
    assert relational >= agreement(knn(counterparts, 10)) + 0.1
    spread = cross_class_cosine(relation_features(u, nouns, center=True), labels)
    assert spread <= cross_class_cosine(counterparts, labels) - 0.2, spread
