"""Stage 1: cluster heads on frozen embeddings, in the driver or on Ray Train workers.

Reads `embeddings/` and `vocabulary/`; writes `stage1/`: `model.pt` (the fitted estimator: its
method, K, hyper-parameters and heads, `method.estimators.load_estimator`), `result.json` and
`assignment.parquet` (`stage_results`), `history.json`, then `_SUCCESS`.

Global pieces (k-means, noun selection, text counterparts, neighbour tables) are computed once by
the driver and cached in `stage1/global.pt`. Training then runs either here (`train.workers: 0`,
checkpoint `stage1/checkpoint.pt` after every epoch) or on a `TorchTrainer` (checkpoints
`stage1/train-<key>/epoch-*`, see train_runtime). Either way, re-running continues where it
stopped. Every file carries a fingerprint of the settings and inputs that produced it (`epochs`
excluded, so raising it continues training) and is ignored when they change.
"""

from __future__ import annotations

import hashlib
import json

import torch

from rayclust import storage
from rayclust.config import Config, ConfigError, method_section, to_dict
from rayclust.encoders import resolve_device
from rayclust.method.estimators import Estimator, GlobalPieces
from rayclust.method.trainer import EpochLog, TrainState
from rayclust.pipeline import train_runtime
from rayclust.pipeline.method_mapping import estimator_for
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.run_tables import read_corpus, read_run_vocabulary
from rayclust.pipeline.stage1_worker import (checkpoint_payload, log_epoch, read_payload,
                                             stage1_worker)
from rayclust.pipeline.stage_results import write_result


def fingerprint(config: Config, run: RunDirectory, part: str) -> str:
    """What stage 1's files depend on: the method's settings and the inputs' stamps. `epochs` is
    left out on purpose: raising it and running again continues training."""
    section = {k: v for k, v in to_dict(method_section(config)).items() if k != "epochs"}
    settings = {"method": config.method, "clusters": config.clusters, "seed": config.seed,
                "kmeans": to_dict(config.kmeans), "section": section, "part": part,
                "embeddings": run.stamp(run.embeddings), "vocabulary": run.stamp(run.vocabulary)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _complete_key(config: Config, run: RunDirectory, epochs: int) -> str:
    """The finished stage: training, plus what decides the result after it (guard, naming)."""
    settings = {"train": fingerprint(config, run, "train"), "epochs": epochs,
                "guard": to_dict(config.guard), "top_nouns": config.output.top_nouns}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def outputs(run: RunDirectory) -> list[str]:
    return [run.model(run.stage1), run.result(run.stage1), run.assignment(run.stage1),
            run.stage1_file("history.json")]


def run_stage1(config: Config, run: RunDirectory) -> list[str]:
    """Train (or resume, or skip when complete) stage 1; returns the URIs it wrote."""
    device = resolve_device(config.device)
    estimator = estimator_for(config, device)
    epochs = estimator.objective().epochs  # after defaults derived from K (TAC's regimes)
    done = run.marker(run.stage1)
    complete_key = _complete_key(config, run, epochs)
    if done is not None and done.get("fingerprint") == complete_key:
        log.info("stage 1: already complete (%s)", run.stage1)
        return outputs(run)

    corpus = read_corpus(run)
    nouns, noun_matrix = read_run_vocabulary(run)
    if noun_matrix.shape[1] != corpus.features.shape[1]:
        raise ConfigError(f"embeddings have dimension {corpus.features.shape[1]} but the "
                          f"vocabulary has {noun_matrix.shape[1]}: both must come from the same "
                          "CLIP model (set model.name/model.pretrained or vocabulary.embeddings)")
    if len(corpus.ids) < config.clusters:
        raise ConfigError(f"{len(corpus.ids)} embedded images cannot form {config.clusters} "
                          "clusters; lower `clusters`")
    workers = train_runtime.worker_count(config)
    batch = estimator.objective().batch_size  # the global batch
    if workers > 1 and batch // workers < 2:
        raise ConfigError(f"{config.method}.batch_size {batch} is the global batch: split over "
                          f"{workers} workers it leaves fewer than 2 rows per worker; raise it or "
                          "lower train.workers")
    u = torch.nn.functional.normalize(torch.tensor(corpus.features, dtype=torch.float32), dim=1)
    e = torch.nn.functional.normalize(torch.tensor(noun_matrix, dtype=torch.float32), dim=1)
    pieces = global_pieces(config, run, estimator, u, e)

    train_key = fingerprint(config, run, "train")
    state = _trained_state(run, estimator, train_key, epochs, u.shape[1])
    resumes: list[int] = []  # epochs the training resumed from (a restart or a re-run)
    if state is None and workers == 0:
        state, resumes = _fit_here(run, estimator, pieces, train_key, u.shape[1])
    elif state is None:
        state, resumes = _fit_on_ray_train(config, run, estimator, train_key, workers,
                                           u.shape[1])
    estimator.fit(u, e, nouns, pieces=pieces, state=state)  # trained: no further epochs
    result = estimator.result_

    history = [vars(h) for h in estimator.state_.history]
    run.write_json(run.stage1_file("history.json"), {"epochs": history})
    run.save_torch({**estimator.state_dict(), "fingerprint": train_key}, run.model(run.stage1))
    summary = {"epochs": len(history), "final_loss": history[-1]["loss"] if history else None,
               "train_seconds": float(sum(h["seconds"] for h in history)),
               "nouns_in_text_space": int(len(estimator.pieces_.nouns_used)),
               "device": str(device), "workers": workers, "resumes": resumes,
               # the values used, after those left unset were derived (e.g. TAC's K >= 100 regime)
               "hyperparameters": estimator.hyperparameters()}
    if result.source == "kmeans":
        scores, sel = result.scores, result.selection
        log.warning("stage 1: the language guard kept k-means (selection score %.4f vs heads "
                    "%.4f, difference %+.4f +- %.4f: %s): the vocabulary did not help on these "
                    "features", scores["kmeans"]["score"], scores["heads"]["score"],
                    sel["difference"], sel["standard_error"], sel["reason"])
    write_result(run, run.stage1, corpus.ids, result, config.method, config.clusters, summary)
    run.mark_complete(run.stage1, {"fingerprint": complete_key, "epochs": epochs,
                                   "source": result.source})
    return outputs(run)


def global_pieces(config: Config, run: RunDirectory, estimator: Estimator, u: torch.Tensor,
                   e: torch.Tensor) -> GlobalPieces:
    """k-means, noun selection, counterparts and neighbour tables: computed once, cached in
    `stage1/global.pt` (training workers read them from there)."""
    global_uri = run.stage1_file("global.pt")
    global_key = fingerprint(config, run, "global")
    device = estimator.device
    if run.exists(global_uri):
        # to the working device: a run resumed or repeated on another device than the one that
        # wrote the cache (a GPU run re-run, a CPU cache read on a GPU) must not mix devices
        cached = run.load_torch(global_uri, map_location=device)
        if cached.get("fingerprint") == global_key:
            log.info("stage 1: global pieces from cache %s", global_uri)
            return GlobalPieces.from_dict(cached, u.to(device))
    pieces = estimator.prepare(u.to(device), e.to(device))
    run.save_torch({"fingerprint": global_key, **pieces.to_dict()}, global_uri)
    log.info("stage 1: %d nouns in the text space", len(pieces.nouns_used))
    return pieces


def _trained_state(run: RunDirectory, estimator: Estimator, train_key: str, epochs: int,
                   dim: int) -> TrainState | None:
    """The heads of a `model.pt` trained with these settings for all epochs (a run stopped
    after saving the model but before completing the stage), else None."""
    model_uri = run.model(run.stage1)
    if not run.exists(model_uri):
        return None
    saved = run.load_torch(model_uri, map_location=estimator.device)
    if saved.get("fingerprint") != train_key or saved["state"]["epoch"] != epochs:
        return None
    state = estimator.trainer().init_state(dim)
    state.load_state_dict(saved["state"])
    log.info("stage 1: already trained (%s)", model_uri)
    return state


def _fit_here(run: RunDirectory, estimator: Estimator, pieces: GlobalPieces, train_key: str,
              dim: int) -> tuple[TrainState, list[int]]:
    """Stage 1 in this process; `stage1/checkpoint.pt` after every epoch. Returns the trained
    state and the epochs it resumed from."""
    checkpoint_uri = run.stage1_file("checkpoint.pt")
    epochs = estimator.objective().epochs
    resumes: list[int] = []

    def save_checkpoint(state: TrainState, epoch_log: EpochLog) -> None:
        run.save_torch({"fingerprint": train_key, **checkpoint_payload(state, resumes)},
                       checkpoint_uri)
        log_epoch(epoch_log, epochs)

    trainer = estimator.trainer(on_epoch_end=save_checkpoint)
    state = None
    if run.exists(checkpoint_uri):
        saved = run.load_torch(checkpoint_uri, map_location=estimator.device)
        if saved.pop("fingerprint", None) == train_key:
            state = trainer.init_state(dim)
            state_dict, earlier = read_payload(saved)
            state.load_state_dict(state_dict)
            resumes.extend([*earlier, state.epoch])
            log.info("stage 1: resuming after epoch %d from %s", state.epoch, checkpoint_uri)
        else:
            log.info("stage 1: settings changed since %s; training from scratch", checkpoint_uri)
    return trainer.fit(pieces.inputs, state), resumes


def _fit_on_ray_train(config: Config, run: RunDirectory, estimator: Estimator, train_key: str,
                      workers: int, dim: int) -> tuple[TrainState, list[int]]:
    """Stage 1 on `workers` TorchTrainer workers; checkpoints in `stage1/train-<key>/`. Returns
    the trained state and the epochs the workers resumed from (a restart after a lost worker, or
    the same command run again)."""
    log.info("stage 1: training on %d Ray Train worker(s)", workers)
    result = train_runtime.fit(
        stage1_worker, {"config": to_dict(config), "run": run.root,
                        "global": run.stage1_file("global.pt")},
        config, run, run.stage1, f"train-{train_key}", workers)
    if result.checkpoint is None:
        raise RuntimeError("stage 1 finished without a checkpoint")  # a bug, never input
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(storage.join(folder, train_runtime.STATE_FILE),
                           map_location=estimator.device, weights_only=False)
    state_dict, resumes = read_payload(saved)
    state = estimator.trainer().init_state(dim)
    state.load_state_dict(state_dict)
    return state, resumes
