"""Stage-2 pseudo-label table and SoftMatch weighting (ALGORITHM.md 4.4)."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from rayclust.method.pseudo_labels import (ConfidenceEMA, PseudoLabelTable, soft_weights,
                                           weighted_cross_entropy)


def predictions(n: int = 50, k: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(n, k, generator=g).mul(2).softmax(-1)
    confidence, labels = probs.max(-1)
    return labels, confidence


def test_soft_weights_rule():
    c = torch.tensor([0.2, 0.5, 0.6, 0.9])
    w = soft_weights(c, mean=0.5, var=0.01)
    assert w.dtype == torch.float32
    assert w[1:].tolist() == [1.0, 1.0, 1.0]
    assert float(w[0]) == pytest.approx(math.exp(-0.09 / 0.02), rel=1e-6)
    # var == 0: the hard-threshold limit
    assert soft_weights(c, 0.5, 0.0).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert soft_weights(torch.full((3,), 0.75), 0.75, 0.0).tolist() == [1.0, 1.0, 1.0]
    constant = PseudoLabelTable.from_predictions(torch.zeros(7, dtype=torch.long), torch.full((7,), 0.3))
    assert constant.weight.tolist() == [1.0] * 7  # all equal: var 0, mean exactly c
    assert torch.equal(soft_weights(c, torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64)), w)


def test_table_from_predictions():
    labels, confidence = predictions()
    table = PseudoLabelTable.from_predictions(labels, confidence)
    c = confidence.double()
    expected = soft_weights(c, float(c.mean()), float(c.var(unbiased=False)))
    assert torch.allclose(table.weight, expected, atol=1e-7)
    assert table.labels.dtype == torch.int64 and table.weight.dtype == torch.float32 and len(table) == 50
    assert bool(((table.weight == 1) == (c >= c.mean())).all())
    stats = table.stats(n_clusters=6)
    assert stats["n"] == 50 and len(stats["cluster_sizes"]) == 6 and sum(stats["cluster_sizes"]) == 50
    assert stats["mean_confidence"] == pytest.approx(float(c.mean()), rel=1e-6)
    assert 0 < stats["mean_weight"] <= 1


def test_hash_is_order_independent_of_summation_and_sensitive_to_content():
    labels, confidence = predictions(n=1000)
    a = PseudoLabelTable.from_predictions(labels, confidence)
    torch.set_num_threads(2)  # reductions must not depend on threading
    b = PseudoLabelTable.from_predictions(labels.clone(), confidence.clone())
    assert a.hash() == b.hash() and len(a.hash()) == 64
    labels2 = labels.clone()
    labels2[0] = (labels2[0] + 1) % 4
    assert PseudoLabelTable.from_predictions(labels2, confidence).hash() != a.hash()


def test_arrow_roundtrip_reorders_and_validates():
    labels, confidence = predictions(n=6)
    table = PseudoLabelTable.from_predictions(labels, confidence)
    ids = [f"img{i}" for i in range(6)]
    arrow = table.to_arrow(ids)
    assert arrow.schema.names == ["id", "label", "confidence", "weight"]
    assert [arrow.schema.field(n).type for n in arrow.schema.names] == [pa.string(), pa.int32(),
                                                                          pa.float32(), pa.float32()]
    back = PseudoLabelTable.from_arrow(arrow, ids)
    assert back.hash() == table.hash()
    shuffled = arrow.take([3, 1, 5, 0, 2, 4])
    assert PseudoLabelTable.from_arrow(shuffled, ids).hash() == table.hash()
    order = [5, 0, 3, 1, 4, 2]
    sub = PseudoLabelTable.from_arrow(arrow, [ids[i] for i in order])
    assert torch.equal(sub.labels, table.labels[order]) and torch.equal(sub.weight, table.weight[order])

    with pytest.raises(ValueError, match="not in the pseudo-label table"):
        PseudoLabelTable.from_arrow(arrow, ids[:5] + ["nope"])
    with pytest.raises(ValueError, match="duplicate"):
        PseudoLabelTable.from_arrow(pa.concat_tables([arrow, arrow.slice(0, 1)]), ids)
    with pytest.raises(ValueError, match="not requested"):
        PseudoLabelTable.from_arrow(arrow, ids[:5])
    with pytest.raises(ValueError, match="duplicates"):
        PseudoLabelTable.from_arrow(arrow, ids[:5] + ids[:1])
    with pytest.raises(ValueError, match="columns"):
        PseudoLabelTable.from_arrow(arrow.drop_columns(["weight"]), ids)
    with pytest.raises(ValueError, match="ids"):
        table.to_arrow(ids[:3])


def test_confidence_ema():
    ema = ConfidenceEMA(n_clusters=4, momentum=0.9)
    assert float(ema.mean) == 0.25 and float(ema.var) == 1.0 and not bool(ema.initialised)
    ema.update(torch.tensor([0.4]))  # a single value carries no variance: ignored
    assert float(ema.mean) == 0.25 and not bool(ema.initialised)
    first = torch.tensor([0.3, 0.5, 0.7, 0.9])
    ema.update(first)  # the first batch sets the statistics
    assert float(ema.mean) == pytest.approx(0.6) and float(ema.var) == pytest.approx(float(first.var()))
    c = torch.tensor([0.2, 0.4, 0.4, 0.6])
    ema.update(c)  # then the EMA runs
    assert float(ema.mean) == pytest.approx(0.9 * 0.6 + 0.1 * 0.4)
    assert float(ema.var) == pytest.approx(0.9 * float(first.var()) + 0.1 * float(c.var()))
    assert torch.equal(ema.weights(c), soft_weights(c, float(ema.mean), float(ema.var)))
    ema.update(torch.tensor([0.4]))  # still ignored
    assert float(ema.mean) == pytest.approx(0.58)
    clone = ConfidenceEMA(n_clusters=4, momentum=0.9)
    clone.load_state_dict(ema.state_dict())
    assert float(clone.mean) == float(ema.mean) and float(clone.var) == float(ema.var)
    assert bool(clone.initialised)
    assert ConfidenceEMA(10).momentum == 0.999


def test_online_weights_start_from_the_first_batch():
    """Issue 10 item 5: with SoftMatch's prior (mean 1/K, var 1) and momentum 0.999, a confident
    stage-1 model got weight ~1 on every image for thousands of steps; from the first batch on,
    the below-average half of a batch is down-weighted."""
    g = torch.Generator().manual_seed(0)
    ema = ConfidenceEMA(n_clusters=10)
    weights = []
    for _ in range(5):
        c = 0.5 + 0.5 * torch.rand(256, generator=g)  # a trained model: well above 1/K
        ema.update(c)
        weights.append(ema.weights(c))
    assert float(ema.mean) == pytest.approx(0.75, abs=0.03)
    for w in weights:
        assert float((w < 0.9).float().mean()) > 0.25
        assert 0.6 < float(w.mean()) < 0.95


def test_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1])
    w = torch.tensor([1.0, 0.5, 0.0, 1.0, 0.25])
    loss = weighted_cross_entropy(logits, labels, w)
    expected = (w * F.cross_entropy(logits, labels, reduction="none")).sum() / 5
    assert torch.allclose(loss, expected)
    assert weighted_cross_entropy(logits.bfloat16(), labels, w).dtype == torch.float32
    zero = weighted_cross_entropy(logits, labels, torch.zeros(5))
    zero.backward()
    assert float(zero.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0
