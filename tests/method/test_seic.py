"""SEIC stage 1: criterion weighting, objective and global pieces (ALGORITHM.md 4.1-4.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayclust.config import KMeansConfig, SEICConfig
from rayclust.method.heads import SEICHeads
from rayclust.method.seic import SEICCriterion, SEICObjective, prepare_seic
from rayclust.method.trainer import Stage1Inputs


def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _nce(x, y, scale):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    s = x @ y.T * scale
    n = len(s)
    row = np.mean([np.log(np.exp(s[i]).sum()) - s[i, i] for i in range(n)])
    col = np.mean([np.log(np.exp(s[:, j]).sum()) - s[j, j] for j in range(n)])
    return 0.5 * (row + col)


def _centre(z_v, p_v, z_t, p_t, scale):
    def centres(z, p):
        c = np.zeros((p.shape[1], z.shape[1]))
        for i in range(len(z)):
            k = int(p[i].argmax())
            c[k] += p[i, k] * z[i]
        return c, np.bincount(p.argmax(1), minlength=p.shape[1]) > 0
    cv, pv = centres(z_v, p_v)
    ct, pt = centres(z_t, p_t)
    valid = pv & pt
    return 0.0 if valid.sum() < 2 else _nce(cv[valid], ct[valid], scale)


def _balance(p_v, p_t, history, floor=0.01, cap=5.0):
    h = np.maximum(history, floor)
    h = h / h.sum()
    w = np.minimum((1 / len(h)) / h, cap)
    w = w / w.mean()
    hw = lambda p: -(w * p.mean(0) * np.log(np.maximum(p.mean(0), 1e-9))).sum()  # noqa: E731
    return -(hw(p_v) + hw(p_t))


def _batch(seed=0, b=8, k=3, d=4):
    rng = np.random.default_rng(seed)
    z_v = rng.standard_normal((b, d))
    z_t = z_v + 0.5 * rng.standard_normal((b, d))
    z_v /= np.linalg.norm(z_v, axis=1, keepdims=True)
    z_t /= np.linalg.norm(z_t, axis=1, keepdims=True)
    l_v = 2 * rng.standard_normal((b, k))
    l_t = l_v + rng.standard_normal((b, k))
    return z_v, l_v, z_t, l_t


def test_default_weights_are_the_paper_appendix_values():
    cfg = SEICConfig()
    assert (cfg.instance_weight, cfg.assignment_weight, cfg.centre_weight,
            cfg.balance_weight) == (0.5, 1.0, 1.0, 2.0)
    assert cfg.assignment_temperature == 0.5 and cfg.centre_temperature == 0.5


def test_criterion_parts_and_weighting():
    z_v, l_v, z_t, l_t = _batch()
    p_v, p_t = _softmax(l_v), _softmax(l_t)
    history = np.array([0.6, 0.35, 0.05])
    scale = 12.5
    expected = {"instance": _nce(z_v, z_t, scale),
                "assignment": _nce(p_v.T, p_t.T, 2.0),
                "centre": _centre(z_v, p_v, z_t, p_t, 2.0),
                "balance": _balance(p_v, p_t, history)}
    assert expected["centre"] != 0.0  # the batch exercises the centre term
    weights = dict(instance_weight=0.3, assignment_weight=0.7, centre_weight=1.1,
                   balance_weight=1.9)
    crit = SEICCriterion(SEICConfig(**weights), 3).double()
    crit.balance.history.copy_(torch.tensor(history))
    crit.eval()
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    loss, parts = crit(t(z_v), t(l_v), t(z_t), t(l_t), torch.tensor(scale, dtype=torch.float64))
    for name, value in expected.items():
        assert float(parts[name]) == pytest.approx(value, rel=1e-9), name
    total = (0.3 * expected["instance"] + 0.7 * expected["assignment"]
             + 1.1 * expected["centre"] + 1.9 * expected["balance"])
    assert float(loss) == pytest.approx(total, rel=1e-9)


def test_criterion_updates_balance_history_only_in_train_mode_and_backprops():
    z_v, l_v, z_t, l_t = (torch.tensor(a, dtype=torch.float32, requires_grad=True)
                          for a in _batch(1))
    crit = SEICCriterion(SEICConfig(), 3)
    scale = torch.tensor(14.0, requires_grad=True)
    crit.eval()
    crit(z_v, l_v, z_t, l_t, scale)
    assert torch.allclose(crit.balance.history, torch.full((3,), 1 / 3))
    crit.train()
    loss, _ = crit(z_v, l_v, z_t, l_t, scale)
    hist = np.bincount(l_v.detach().numpy().argmax(1), minlength=3) / 8
    assert crit.balance.history.tolist() == pytest.approx((0.9 / 3 + 0.1 * hist).tolist(),
                                                          rel=1e-6)
    loss.backward()
    for x in (z_v, l_v, z_t, l_t, scale):
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float(scale.grad) != 0


def test_objective_settings_and_loss_call():
    cfg = SEICConfig(epochs=3, batch_size=32, learning_rate=1e-2)
    obj = SEICObjective(cfg, n_clusters=4)
    assert obj.drop_last is False and obj.epochs == 3 and obj.batch_size == 32
    model, crit = obj.build(6)
    assert isinstance(model, SEICHeads)
    opt = obj.optimizer(model.parameters())
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-2
    g = torch.Generator().manual_seed(0)
    inputs = Stage1Inputs(F.normalize(torch.randn(10, 6, generator=g), dim=1),
                          F.normalize(torch.randn(10, 6, generator=g), dim=1))
    assert obj.epoch_views(inputs, g) == {}
    idx = torch.tensor([1, 4, 5, 9])
    loss, parts = obj.loss(model, crit.eval(), inputs, idx, {})
    ref, _ = crit(*model(inputs.image[idx], inputs.text[idx]))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()))


def test_prepare_seic():
    g = torch.Generator().manual_seed(3)
    u = F.normalize(torch.randn(45, 8, generator=g), dim=1)
    nouns = F.normalize(torch.randn(70, 8, generator=g), dim=1)
    cfg = SEICConfig(candidate_nouns_per_centre=6, nouns_per_image=4)
    pieces = prepare_seic(u, nouns, 3, cfg, KMeansConfig(iterations=10, restarts=1))
    inputs, candidates, fit = pieces.inputs, pieces.nouns_used, pieces.kmeans
    assert fit.centroids.shape == (3, 8) and fit.labels.shape == (45,)
    assert 6 <= len(candidates) <= 18
    assert inputs.image is u and inputs.text.shape == (45, 8)
    assert inputs.image_neighbours is None and inputs.text_neighbours is None
    assert torch.allclose(inputs.text.norm(dim=1), torch.ones(45), atol=1e-5)
