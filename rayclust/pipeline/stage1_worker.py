"""The stage-1 training loop of one Ray Train worker.

Every worker reads the embeddings and the cached global pieces from the run directory, builds
the same heads (same seed) and trains its slice of each global batch (the estimator's trainer
with rank/world size: every rank draws the same permutation, cuts the same global batches of
`batch_size` and takes its own equal slice of each, so the run takes the same steps whatever
the worker count). The heads are wrapped in DDP; the method's batch-statistics terms
(assignment and centre contrast, the balancing regulariser, TAC's entropy and cluster contrast)
gather the slices of all workers, so they see the global batch exactly as one process with
`batch_size` would.
"""

from __future__ import annotations

import torch

from rayclust.config import from_dict
from rayclust.method.estimators import GlobalPieces
from rayclust.method.trainer import EpochLog, TrainState
from rayclust.pipeline import train_runtime
from rayclust.pipeline.method_mapping import estimator_for
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.run_tables import read_corpus


def log_epoch(epoch_log: EpochLog, epochs: int, workers: int = 0) -> None:
    where = f" on {workers} worker(s)" if workers else ""
    log.info("stage 1 epoch %d/%d%s: loss %.4f (%s) %.2fs", epoch_log.epoch + 1, epochs, where,
             epoch_log.loss, ", ".join(f"{k} {v:.3f}" for k, v in epoch_log.parts.items()),
             epoch_log.seconds)


def checkpoint_payload(state: TrainState, resumes: list[int]) -> dict:
    """What a stage-1 checkpoint holds: the training state and the epochs resumed from."""
    return {"state": state.state_dict(), "resumes": list(resumes)}


def read_payload(saved: dict) -> tuple[dict, list[int]]:
    """(state dict, epochs resumed from) of a checkpoint; one written before resumes were
    recorded is the bare state dict."""
    if "resumes" not in saved:
        return saved, []
    return saved["state"], saved["resumes"]


def stage1_worker(cfg: dict) -> None:
    from ray.train.torch import prepare_model

    train_runtime.quiet_worker()
    config = from_dict(cfg["config"])
    run = RunDirectory(cfg["run"], config.storage)
    rank, world = train_runtime.rank_and_size()
    device = train_runtime.device()
    corpus = read_corpus(run)
    u = torch.nn.functional.normalize(torch.tensor(corpus.features, dtype=torch.float32), dim=1)
    pieces = GlobalPieces.from_dict(run.load_torch(cfg["global"]), u)
    del corpus
    estimator = estimator_for(config, device)
    epochs = estimator.objective().epochs
    resumes: list[int] = []

    def end_of_epoch(state: TrainState, epoch_log: EpochLog) -> None:
        if rank == 0:
            log_epoch(epoch_log, epochs, world)
        train_runtime.report({"epoch": state.epoch, "loss": epoch_log.loss, **epoch_log.parts},
                             checkpoint_payload(state, resumes),
                             f"epoch-{state.epoch:04d}")
        # testing hook: a rank may SIGKILL itself here, before the next epoch
        train_runtime.fault_point(cfg.get("fault"), run.stage1, state.epoch)

    trainer = estimator.trainer(rank=rank, world_size=world, on_epoch_end=end_of_epoch,
                                wrap_model=(lambda m: prepare_model(m, move_to_device=False))
                                if world > 1 else None)
    state = trainer.init_state(u.shape[1])
    saved = train_runtime.restored_state(device)
    if saved is not None:
        state_dict, earlier = read_payload(saved)
        state.load_state_dict(state_dict)
        resumes.extend([*earlier, state.epoch])
        if rank == 0:
            log.info("stage 1: resuming after epoch %d", state.epoch)
    trainer.fit(pieces.inputs, state)
