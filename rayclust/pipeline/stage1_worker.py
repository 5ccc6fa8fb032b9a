"""The stage-1 training loop of one Ray Train worker.

Every worker reads the embeddings and the cached global pieces, builds the same heads (same seed)
and trains its slice of each global batch (`Stage1Trainer` with rank/world size: every rank
draws the same permutation, cuts the same global batches of `batch_size` and takes its own equal
slice of each, so the run takes the same steps whatever the worker count). The heads are wrapped
in DDP; the method's batch-statistics terms (assignment and centre contrast, the balancing
regulariser, TAC's entropy and cluster contrast) gather the slices of all workers, so they see
the global batch exactly as one process with `batch_size` would.
"""

from __future__ import annotations

import torch

from rayclust.config import from_dict
from rayclust.method import make_method
from rayclust.method.trainer import EpochLog, Stage1Inputs, Stage1Trainer, TrainState
from rayclust.pipeline import train_runtime
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory


def stage1_worker(cfg: dict) -> None:
    from ray.train.torch import prepare_model

    from rayclust.pipeline.corpus import Corpus
    from rayclust.pipeline.stage1 import _log_epoch

    train_runtime.quiet_worker()
    config = from_dict(cfg["config"])
    run = RunDirectory(cfg["run"], config.storage)
    rank, world = train_runtime.rank_and_size()
    device = train_runtime.device()
    corpus = Corpus.read(cfg["embeddings"], run.options)
    cached = run.load_torch(cfg["global"])
    u = torch.nn.functional.normalize(torch.tensor(corpus.features, dtype=torch.float32), dim=1)
    inputs = Stage1Inputs(u, cached["text"], cached["image_neighbours"],
                          cached["text_neighbours"])
    del corpus, cached
    estimator = make_method(config, device=device)
    objective = estimator.objective(gather_distributed=world > 1)

    def end_of_epoch(state: TrainState, epoch_log: EpochLog) -> None:
        if rank == 0:
            _log_epoch(epoch_log, objective.epochs, world)
        train_runtime.report({"epoch": state.epoch, "loss": epoch_log.loss, **epoch_log.parts},
                             state.state_dict(), f"epoch-{state.epoch:04d}")

    trainer = Stage1Trainer(objective, device, config.seed, rank, world, end_of_epoch,
                            wrap_model=(lambda m: prepare_model(m, move_to_device=False))
                            if world > 1 else None)
    state = trainer.init_state(u.shape[1])
    saved = train_runtime.restored_state(device)
    if saved is not None:
        state.load_state_dict(saved)
        if rank == 0:
            log.info("stage 1: resuming after epoch %d", state.epoch)
    trainer.fit(inputs, state)
