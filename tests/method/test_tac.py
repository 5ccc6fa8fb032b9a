"""TAC's criterion, objective and global pieces (ALGORITHM.md 3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayclust.config import KMeansConfig, TACConfig
from rayclust.method.heads import TACHeads
from rayclust.method.tac import TACCriterion, TACObjective, prepare_tac
from rayclust.method.trainer import Stage1Inputs

P_V = [[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]]
P_T = [[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]]
Q_V = [[0.1, 0.9], [0.3, 0.7], [0.8, 0.2]]
Q_T = [[0.6, 0.4], [0.25, 0.75], [0.95, 0.05]]


def _lcc(a, b, tau):
    rows, k = len(a), len(a[0])
    cols = []
    for mat in (a, b):
        for j in range(k):
            col = [mat[i][j] for i in range(rows)]
            n = math.sqrt(sum(c * c for c in col))
            cols.append([c / n for c in col])
    total = 0.0
    for v in range(2 * k):
        pos = (v + k) % (2 * k)
        logits = {w: sum(x * y for x, y in zip(cols[v], cols[w])) / tau
                  for w in range(2 * k) if w != v}
        total += math.log(sum(math.exp(x) for x in logits.values())) - logits[pos]
    return total / (2 * k)


def _con(a, b):
    return -sum(math.log(sum(x * y for x, y in zip(ra, rb))) for ra, rb in zip(a, b)) / len(a)


def _ent(p):
    mean = [sum(r[j] for r in p) / len(p) for j in range(len(p[0]))]
    return -sum(m * math.log(m) for m in mean)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_total_is_distill_plus_consistency_minus_lambda_entropy():
    distill = _lcc(P_V, Q_T, 0.5) + _lcc(P_T, Q_V, 0.5)
    consistency = _con(P_V, P_T)
    entropy = _ent(P_T) + _ent(P_V)
    loss, parts = TACCriterion(0.5, 5.0)(_t(P_V), _t(P_T), _t(Q_V), _t(Q_T))
    assert float(parts["distill"]) == pytest.approx(distill, rel=1e-9)
    assert float(parts["consistency"]) == pytest.approx(consistency, rel=1e-9)
    assert float(parts["entropy"]) == pytest.approx(entropy, rel=1e-9)
    assert float(loss) == pytest.approx(distill + consistency - 5.0 * entropy, rel=1e-9)
    # the pairing matters: image anchors with text neighbours, text anchors with image neighbours
    wrong = _lcc(P_V, Q_V, 0.5) + _lcc(P_T, Q_T, 0.5)
    assert abs(wrong - distill) > 1e-3
    # lambda and the temperature are used
    loss2, _ = TACCriterion(2.0, 1.5)(_t(P_V), _t(P_T), _t(Q_V), _t(Q_T))
    expected2 = _lcc(P_V, Q_T, 2.0) + _lcc(P_T, Q_V, 2.0) + consistency - 1.5 * entropy
    assert float(loss2) == pytest.approx(expected2, rel=1e-9)


def test_criterion_gradients_flow():
    logits = [torch.randn(8, 3, requires_grad=True) for _ in range(4)]
    loss, _ = TACCriterion(0.5, 5.0)(*(x.softmax(1) for x in logits))
    loss.backward()
    for x in logits:
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _inputs(n=24, d=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=g), dim=1)
    s = F.normalize(torch.randn(n, d, generator=g), dim=1)
    img_nb = torch.randint(0, n, (n, k), generator=g)
    txt_nb = torch.randint(0, n, (n, k), generator=g)
    return Stage1Inputs(u, s, img_nb, txt_nb)


def test_epoch_views_draw_from_each_anchors_neighbours():
    inputs = _inputs()
    obj = TACObjective(TACConfig(), n_clusters=3)
    views = obj.epoch_views(inputs, torch.Generator().manual_seed(0))
    for i in range(inputs.n):
        assert int(views["text_neighbour"][i]) in inputs.text_neighbours[i].tolist()
        assert int(views["image_neighbour"][i]) in inputs.image_neighbours[i].tolist()
    again = obj.epoch_views(inputs, torch.Generator().manual_seed(0))
    assert torch.equal(views["text_neighbour"], again["text_neighbour"])
    # uniform over the k columns: over many epochs every column of a row gets drawn
    nb = Stage1Inputs(inputs.image, inputs.text, torch.arange(4).repeat(24, 1) + 10,
                      torch.arange(4).repeat(24, 1))
    seen = set()
    for e in range(20):
        seen |= set(obj.epoch_views(nb, torch.Generator().manual_seed(e))["text_neighbour"]
                    .tolist())
    assert seen == {0, 1, 2, 3}


def test_loss_wires_heads_to_the_right_views():
    torch.manual_seed(0)
    inputs = _inputs()
    obj = TACObjective(TACConfig(), n_clusters=3)
    model = TACHeads(6, 3).eval()  # eval: batch norm uses running stats, outputs are per-row
    seen = {}

    def recorder(p_v, p_t, q_v, q_t):
        seen.update(p_v=p_v, p_t=p_t, q_v=q_v, q_t=q_t)
        return p_v.sum(), {}

    idx = torch.tensor([3, 7, 11, 0])
    views = obj.epoch_views(inputs, torch.Generator().manual_seed(1))
    obj.loss(model, recorder, inputs, idx, views)
    sm = lambda x: torch.softmax(x, dim=1)  # noqa: E731
    assert torch.allclose(seen["p_v"], sm(model.image(inputs.image[idx])))
    assert torch.allclose(seen["p_t"], sm(model.text(inputs.text[idx])))
    assert torch.allclose(seen["q_t"], sm(model.text(inputs.text[views["text_neighbour"][idx]])))
    assert torch.allclose(seen["q_v"],
                          sm(model.image(inputs.image[views["image_neighbour"][idx]])))


def test_objective_settings():
    cfg = TACConfig(epochs=7, batch_size=64, learning_rate=2e-3)
    obj = TACObjective(cfg, n_clusters=5)
    assert obj.drop_last is True and obj.epochs == 7 and obj.batch_size == 64
    model, crit = obj.build(12)
    assert isinstance(model, TACHeads) and crit.entropy_weight == 5.0
    opt = obj.optimizer(model.parameters())
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["lr"] == 2e-3 and opt.defaults["betas"] == (0.9, 0.99)
    assert opt.defaults["weight_decay"] == 0


def test_prepare_tac_shapes_and_tables():
    g = torch.Generator().manual_seed(2)
    u = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    nouns = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    cfg = TACConfig(semantic_centres=5, nouns_per_centre=3, knn=50)  # knn clipped to N - 1
    pieces = prepare_tac(u, nouns, 3, cfg, KMeansConfig(iterations=10, restarts=1))
    inputs, selected = pieces.inputs, pieces.nouns_used
    assert pieces.kmeans is None  # M semantic centres, no K-centre fit for the guard
    assert inputs.text.shape == (40, 8)
    assert torch.allclose(inputs.text.norm(dim=1), torch.ones(40), atol=1e-5)
    assert inputs.image_neighbours.shape == (40, 39) and inputs.text_neighbours.shape == (40, 39)
    rows = torch.arange(40)[:, None]
    assert not (inputs.image_neighbours == rows).any()
    assert not (inputs.text_neighbours == rows).any()
    assert len(selected) <= 15


@pytest.mark.parametrize("k, expected", [(10, (20, 512, 0.5)), (99, (20, 512, 0.5)),
                                         (100, (100, 8192, 5.0)), (1000, (100, 8192, 5.0))])
def test_regime_follows_k_when_unset(k, expected):
    """TAC's official training switches to 100 epochs, batch 8,192 and tau-hat 5.0 at K >= 100."""
    obj = TACObjective(TACConfig(), n_clusters=k)
    assert (obj.epochs, obj.batch_size, obj.cfg.distill_temperature) == expected
    _, criterion = obj.build(8)
    assert criterion.distill.temperature == expected[2]
    # what the user set is kept in either regime
    mine = TACObjective(TACConfig(epochs=3, batch_size=256, distill_temperature=1.5), k)
    assert (mine.epochs, mine.batch_size, mine.cfg.distill_temperature) == (3, 256, 1.5)
    assert TACConfig().batch_size is None  # the config itself stays unset: derived per K
