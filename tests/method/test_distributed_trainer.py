"""Stage 1 does not change with the number of workers: `batch_size` is the global batch.

Two gloo ranks (pure PyTorch, no Ray) run `Stage1Trainer` with DDP-wrapped heads and gathered
batch statistics, as the Ray Train workers do; a lone process runs the same settings. Before
the global-batch split each rank trained `batch_size` rows, so 2 workers took half the steps
at twice the batch (8 workers: TAC at batch 4,096, 8x fewer steps, same learning rate).
"""

from __future__ import annotations


import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gloo_ranks import run_ranks
from rayclust.config import SEICConfig
from rayclust.method.metrics import cluster_accuracy
from rayclust.method.seic import SEICObjective
from rayclust.method.trainer import Stage1Inputs, Stage1Trainer, predict_proba
from rayclust.synthetic import make_vmf_features

WORLD, K, EPOCHS, BATCH = 2, 4, 8, 64


def _data():
    f = make_vmf_features(n=640, n_clusters=K, dim=32, image_kappa=40, text_kappa=60, seed=2,
                          nouns_per_class=1, distractor_nouns=0)
    return torch.tensor(f.image), torch.tensor(f.text), f.labels


def _train(rank: int | None) -> dict:
    image, text, labels = _data()
    world = WORLD if rank is not None else 1
    objective = SEICObjective(SEICConfig(epochs=EPOCHS, batch_size=BATCH), K,
                              gather_distributed=rank is not None)
    wrap = (lambda m: DistributedDataParallel(m)) if rank is not None else None
    trainer = Stage1Trainer(objective, "cpu", seed=0, rank=rank or 0, world_size=world,
                            wrap_model=wrap)
    state = trainer.fit(Stage1Inputs(image, text))
    predicted = predict_proba(state.module, image).argmax(1).numpy()
    return {"steps": sum(h.steps for h in state.history),
            "acc": cluster_accuracy(labels, predicted), "predicted": predicted,
            "loss": [h.loss for h in state.history]}


def test_one_and_two_workers_take_the_same_steps_and_reach_the_same_acc(tmp_path):
    assert not dist.is_initialized()
    single = _train(None)
    ranks = run_ranks(_train, WORLD, tmp_path)
    expected_steps = EPOCHS * int(np.ceil(640 / BATCH))
    assert single["steps"] == expected_steps
    for result in ranks:
        assert result["steps"] == expected_steps  # was half: each rank trained BATCH rows
    assert np.array_equal(ranks[0]["predicted"], ranks[1]["predicted"])  # DDP: one model
    assert single["acc"] >= 0.9, single["acc"]
    assert abs(ranks[0]["acc"] - single["acc"]) <= 0.02, (ranks[0]["acc"], single["acc"])
    # same global batches, gathered statistics: the training curves agree closely
    np.testing.assert_allclose(ranks[0]["loss"], single["loss"], rtol=0.02, atol=0.02)
