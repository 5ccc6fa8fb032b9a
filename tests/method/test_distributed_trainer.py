"""Stage 1 does not change with the number of workers: `batch_size` is the global batch.

Two gloo ranks (pure PyTorch, no Ray) run `Stage1Trainer` with DDP-wrapped heads and gathered
batch statistics, as the Ray Train workers do; a lone process runs the same settings. Before
the global-batch split each rank trained `batch_size` rows, so 2 workers took half the steps
at twice the batch (8 workers: TAC at batch 4,096, 8x fewer steps, same learning rate).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

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


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        torch.save(_train(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_and_two_workers_take_the_same_steps_and_reach_the_same_acc(tmp_path):
    assert not dist.is_initialized()
    single = _train(None)
    # fork where allowed (no CUDA threads started yet), as in test_distributed_losses
    forkable = "fork" in mp.get_all_start_methods() and not torch.cuda.is_available()
    method = os.environ.get("RAYCLUST_TEST_START_METHOD") or ("fork" if forkable else "spawn")
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method=method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    expected_steps = EPOCHS * int(np.ceil(640 / BATCH))
    assert single["steps"] == expected_steps
    for result in ranks:
        assert result["steps"] == expected_steps  # was half: each rank trained BATCH rows
    assert np.array_equal(ranks[0]["predicted"], ranks[1]["predicted"])  # DDP: one model
    assert single["acc"] >= 0.9, single["acc"]
    assert abs(ranks[0]["acc"] - single["acc"]) <= 0.02, (ranks[0]["acc"], single["acc"])
    # same global batches, gathered statistics: the training curves agree closely
    np.testing.assert_allclose(ranks[0]["loss"], single["loss"], rtol=0.02, atol=0.02)
