"""Stage-1 quality where the truth is known: von Mises-Fisher clusters on the 512-d sphere.

Four settings (documented in the README, "Quality on synthetic features"):
* easy: 10 well-separated clusters with noisy paired text vectors: SEIC reaches ACC >= 0.95;
* overlapping image clusters (kappa 60, k-means near chance) with a vocabulary whose nouns sit
  near the class text centres: language helps, SEIC beats k-means by a wide margin;
* a vocabulary that does not fit the domain (only random distractor nouns): the heads alone fall
  below k-means, and the language guard steps aside so the result is at least k-means;
* classes with two far-apart visual modes plus a visually close pair of classes, with a fitting
  vocabulary (synthetic.make_two_mode_features): k-means splits the modes and merges the pair,
  the heads join what the nouns join, and the guard keeps them (the old image-only guard did
  not: k-means' image neighbour agreement was the higher).
"""

import numpy as np
import pytest
import torch

from rayclust.config import GuardConfig, SEICConfig, TACConfig
from rayclust.method import SEIC, TAC
from rayclust.method.estimators import GlobalPieces
from rayclust.method.kmeans import spherical_kmeans
from rayclust.method.metrics import cluster_accuracy, neighbour_agreement
from rayclust.method.trainer import Stage1Inputs
from rayclust.synthetic import make_two_mode_features, make_vmf_features

# full SEIC/TAC trainings on 3,000 points: seconds each, outside the fast lane
pytestmark = pytest.mark.slow

N = 3000


def kmeans_acc(features):
    fit = spherical_kmeans(torch.tensor(features.image), 10, seed=0)
    return cluster_accuracy(features.labels, fit.labels.numpy())


@pytest.mark.parametrize("method", ["seic", "tac"])
def test_stage1_reaches_095_on_separated_vmf_clusters(method):
    f = make_vmf_features(n=N, n_clusters=10, dim=512, image_kappa=400, text_kappa=300, seed=1)
    inputs = Stage1Inputs(torch.tensor(f.image), torch.tensor(f.text))
    if method == "seic":
        model = SEIC(10, SEICConfig(epochs=30), guard=GuardConfig(enabled=False))
    else:
        from rayclust.method.neighbours import knn
        inputs.image_neighbours, inputs.text_neighbours = knn(inputs.image, 50), knn(inputs.text, 50)
        model = TAC(10, TACConfig(epochs=20), guard=GuardConfig(enabled=False))
    # the counterparts come from the generator (the text view of each point), not from nouns
    pieces = GlobalPieces(inputs, nouns_used=torch.arange(len(f.noun_names)))
    model.fit(f.image, f.nouns, f.noun_names, pieces=pieces)
    assert model.result_.source == "heads"
    acc = cluster_accuracy(f.labels, model.labels_)
    assert acc >= 0.95, acc


def test_language_helps_when_image_clusters_overlap():
    f = make_vmf_features(n=N, image_kappa=60, seed=0)
    baseline = kmeans_acc(f)
    model = SEIC(10, SEICConfig(epochs=30)).fit(f.image, f.nouns, f.noun_names)
    acc = cluster_accuracy(f.labels, model.labels_)
    assert model.result_.source == "heads"
    assert baseline < 0.4 and acc >= baseline + 0.2, (acc, baseline)
    # clusters are named after nouns planted near their class: mostly right
    majority = [np.bincount(f.labels[model.labels_ == k], minlength=10).argmax()
                for k in range(10)]
    named_right = sum(name.startswith(f"class{c}_") for name, c in
                      zip(model.cluster_names_, majority))
    assert named_right >= 7, model.cluster_names_


def test_language_steps_aside_when_the_vocabulary_does_not_fit():
    f = make_vmf_features(n=N, image_kappa=150, nouns_per_class=0, distractor_nouns=2000, seed=0)
    baseline = kmeans_acc(f)
    model = SEIC(10, SEICConfig(epochs=30)).fit(f.image, f.nouns, f.noun_names)
    heads_only = cluster_accuracy(f.labels, model.predict_proba(f.image).argmax(1))
    final = cluster_accuracy(f.labels, model.labels_)
    assert heads_only < baseline - 0.05, (heads_only, baseline)  # language alone would hurt
    assert model.result_.source == "kmeans"
    assert final >= baseline - 1e-9, (final, baseline)
    # new points are assigned like the kept k-means, not by the discarded heads
    assert (model.predict(f.image) == model.labels_).mean() > 0.99


def test_the_guard_keeps_heads_that_join_visual_modes():
    # SEIC only, to keep the suite short; benchmarks/methods.py runs TAC on a larger version
    f = make_two_mode_features(n=1200, n_clusters=6, two_mode_classes=3, close_pairs=1,
                               semantic_weight=0.3, seed=0)
    model = SEIC(6, SEICConfig(epochs=15, batch_size=256)).fit(f.image, f.nouns, f.noun_names)
    res = model.result_
    baseline = cluster_accuracy(f.labels, res.kmeans_labels)
    acc = cluster_accuracy(f.labels, model.labels_)
    assert res.source == "heads", res.selection
    assert baseline < 0.7 and acc >= baseline + 0.2, (acc, baseline)
    # the old guard's image-only neighbour agreement ranked k-means first
    u = torch.nn.functional.normalize(torch.tensor(f.image), dim=1)
    assert (neighbour_agreement(u, torch.tensor(res.kmeans_labels))
            > neighbour_agreement(u, torch.tensor(model.labels_)))
    sel = res.selection
    assert sel["chosen"] == "heads" and sel["difference"] < -sel["margin"] * sel["standard_error"]
