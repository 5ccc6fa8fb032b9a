"""Noun selection and text counterparts (ALGORITHM.md 3.2-3.3, 4.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayclust.method.counterparts import (class_mean_centres, default_semantic_centres,
                                          retrieve_counterparts, seic_candidate_nouns,
                                          seic_counterparts, tac_counterparts, tac_select_nouns)

S = math.sqrt
# Three semantic centres e1, e2, e3 and seven unit nouns. Softmax over centres (no temperature):
#   noun  owner  confidence                              cosine to owner
#   0     0      e^.9/(e^.9+e^.436+1)        = 0.4913    0.9
#   1     0      e^.8/(e^.8+e^-.6+1)         = 0.5896    0.8
#   2     1      e^.8/(e^.6+e^.8+1)          = 0.4409    0.8
#   3     0      e/(e+2)                     = 0.5761    1.0
#   4     0      e^.7/(e^.7+1+e^-.714)       = 0.5748    0.7
#   5     0      e^.6/(e^.6+2e^-.566)        = 0.6160    0.6
#   6     1      e^.6/(1+e^.6+e^-.8)         = 0.5570    0.6
# Centre 2 wins no noun. Top-3 of centre 0 by confidence: 5, 1, 3 (by cosine it would be 3, 0, 1).
CENTRES = torch.eye(3)
NOUNS = torch.tensor([[0.9, S(1 - 0.81), 0.0], [0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [1.0, 0.0, 0.0],
                      [0.7, 0.0, -S(1 - 0.49)], [0.6, -S(0.32), -S(0.32)], [0.0, 0.6, -0.8]])


def test_hand_confidences():
    def conf(v):
        e = [math.exp(c) for c in v]
        return max(e) / sum(e)
    confs = [conf(row) for row in NOUNS.tolist()]
    assert confs == pytest.approx([0.4913, 0.5896, 0.4409, 0.5761, 0.5748, 0.6160, 0.5570],
                                  abs=1e-4)


@pytest.mark.parametrize("chunk_size", [2, 65536])
def test_tac_select_nouns_most_confident_per_centre(chunk_size):
    got = tac_select_nouns(CENTRES, NOUNS, per_centre=3, chunk_size=chunk_size)
    assert got.tolist() == [1, 2, 3, 5, 6]
    assert tac_select_nouns(CENTRES, NOUNS, per_centre=1, chunk_size=chunk_size).tolist() == [5, 6]
    assert tac_select_nouns(CENTRES, NOUNS, per_centre=2, chunk_size=chunk_size).tolist() \
        == [1, 2, 5, 6]
    assert tac_select_nouns(CENTRES, NOUNS, per_centre=10, chunk_size=chunk_size).tolist() \
        == list(range(7))


def test_tac_select_nouns_random_against_loop():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    nouns = F.normalize(torch.randn(200, 8, generator=g), dim=1)
    got = tac_select_nouns(centres, nouns, per_centre=4, chunk_size=37).tolist()
    probs = torch.softmax(nouns.double() @ centres.double().T, dim=1).numpy()
    owner, conf = probs.argmax(1), probs.max(1)
    expected = []
    for m in range(6):
        mine = [j for j in range(200) if owner[j] == m]
        expected += sorted(mine, key=lambda j: -conf[j])[:4]
    assert got == sorted(expected)
    assert len(got) <= 4 * 6


def test_retrieve_counterparts_full_softmax_by_hand():
    u = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    nouns = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
    tau = 0.5
    expected = []
    for row in u.tolist():
        sims = [sum(a * b for a, b in zip(row, n)) for n in nouns.tolist()]
        w = [math.exp(s / tau) for s in sims]
        w = [x / sum(w) for x in w]
        mix = [sum(w[j] * nouns[j, c].item() for j in range(4)) for c in range(3)]
        norm = math.sqrt(sum(m * m for m in mix))
        expected.append([m / norm for m in mix])
    got = retrieve_counterparts(u, nouns, tau, chunk_size=1)
    assert got.tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert got.tolist()[1] == pytest.approx(expected[1], abs=1e-6)
    # row 0 by hand: sims (1, 0, 0, .6) -> weights prop. (e^2, 1, 1, e^1.2)
    w = [math.exp(2), 1, 1, math.exp(1.2)]
    mix = [w[0] + 0.6 * w[3], w[1] + 0.8 * w[3], w[2]]
    n = math.sqrt(sum(m * m for m in mix))
    assert got[0].tolist() == pytest.approx([m / n for m in mix], abs=1e-6)


def test_retrieve_counterparts_top_k_by_hand():
    u = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    nouns = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
    got = retrieve_counterparts(u, nouns, 0.5, top_k=2, chunk_size=1)
    # row 0: top-2 sims are noun 0 (1.0) and noun 3 (0.6): weights prop. e^2, e^1.2
    w0, w3 = math.exp(2.0), math.exp(1.2)
    mix = [w0 + 0.6 * w3, 0.8 * w3, 0.0]
    n = math.sqrt(sum(m * m for m in mix))
    assert got[0].tolist() == pytest.approx([m / n for m in mix], abs=1e-6)
    # row 1: sims (0, .6, .8, .48): top-2 nouns 2 (0.8) and 1 (0.6)
    w2, w1 = math.exp(1.6), math.exp(1.2)
    mix = [0.0, w1, w2]
    n = math.sqrt(sum(m * m for m in mix))
    assert got[1].tolist() == pytest.approx([m / n for m in mix], abs=1e-6)
    # top_k >= number of nouns is the full softmax
    full = retrieve_counterparts(u, nouns, 0.5)
    assert torch.allclose(retrieve_counterparts(u, nouns, 0.5, top_k=4), full, atol=1e-6)
    assert not torch.allclose(got, full, atol=1e-3)


def test_unit_rows_and_tiny_temperature_gives_nearest_noun():
    g = torch.Generator().manual_seed(1)
    u = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    nouns = F.normalize(torch.randn(30, 8, generator=g), dim=1)
    for top_k in (None, 5):
        s = retrieve_counterparts(u, nouns, 0.1, top_k=top_k, chunk_size=16)
        assert s.shape == (50, 8)
        assert torch.allclose(s.norm(dim=1), torch.ones(50), atol=1e-5)
        sharp = retrieve_counterparts(u, nouns, 1e-4, top_k=top_k, chunk_size=16)
        nearest = nouns[(u @ nouns.T).argmax(dim=1)]
        assert torch.allclose(sharp, nearest, atol=1e-4)


def test_seic_candidate_nouns_union_of_top_k1():
    g = torch.Generator().manual_seed(2)
    centroids = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    nouns = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    sims = (centroids @ nouns.T).numpy()
    expected = sorted(set(np.argsort(-sims, axis=1)[:, :5].flatten().tolist()))
    assert seic_candidate_nouns(centroids, nouns, per_centre=5).tolist() == expected
    assert seic_candidate_nouns(centroids, nouns, per_centre=500).tolist() == list(range(40))
    # two identical centroids contribute their nouns once
    twice = torch.cat([centroids[:1], centroids[:1]])
    assert seic_candidate_nouns(twice, nouns, 3).tolist() == sorted(np.argsort(-sims[0])[:3].tolist())


def test_seic_counterparts_mix_only_candidates():
    g = torch.Generator().manual_seed(3)
    u = F.normalize(torch.randn(30, 6, generator=g), dim=1)
    nouns = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    centroids = F.normalize(torch.randn(3, 6, generator=g), dim=1)
    s, cand = seic_counterparts(u, nouns, centroids, per_centre=4, per_image=50,
                                temperature=1e-4)
    assert len(cand) <= 12
    nearest_candidate = nouns[cand][(u @ nouns[cand].T).argmax(dim=1)]
    assert torch.allclose(s, nearest_candidate, atol=1e-4)


def test_default_semantic_centres_rule():
    big = 146347
    assert default_semantic_centres(50000, 10, big) == 167      # CIFAR-10: round(N/300)
    assert default_semantic_centres(13000, 10, big) == 43       # ImageNet-10
    assert default_semantic_centres(5000, 10, big) == 30        # STL-10: 17 < 3K = 30
    assert default_semantic_centres(3760, 47, big) == 141       # DTD: 3K
    assert default_semantic_centres(9500, 101, big) == 303      # UCF101: 3K
    assert default_semantic_centres(1281167, 1000, big) == 4271  # ImageNet
    assert default_semantic_centres(30000, 10, 200) == 40       # capped at nouns / 5
    assert default_semantic_centres(30000, 10, 200, nouns_per_centre=10) == 20
    assert default_semantic_centres(50, 30, 10000) == 50        # never more than N
    assert default_semantic_centres(10, 1, 5) == 2              # at least 2


def test_class_mean_centres():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    c = class_mean_centres(u, torch.tensor([0, 0, 1]), 2)
    r = 1 / math.sqrt(2)
    assert c.tolist()[0] == pytest.approx([r, r]) and c.tolist()[1] == pytest.approx([0.6, 0.8])


def test_tac_counterparts_end_to_end_small():
    g = torch.Generator().manual_seed(4)
    u = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    nouns = F.normalize(torch.randn(100, 8, generator=g), dim=1)
    s, selected = tac_counterparts(u, nouns, 3, semantic_centres=6, per_centre=2,
                                   kmeans_kwargs={"iterations": 10, "restarts": 1})
    assert s.shape == (60, 8)
    assert torch.allclose(s.norm(dim=1), torch.ones(60), atol=1e-5)
    assert 1 <= len(selected) <= 12
    assert torch.equal(selected, torch.sort(torch.unique(selected)).values)
