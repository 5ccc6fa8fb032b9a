"""Stage 1: cluster heads on frozen embeddings, in the driver or on Ray Train workers.

Global pieces (k-means, noun selection, text counterparts, neighbour tables) are computed once by
the driver and cached in `<run>/stage1/global.pt`. Training then runs either here
(`train.workers: 0`, checkpoint `<run>/stage1/checkpoint.pt` after every epoch) or on a
`TorchTrainer` (checkpoints `<run>/stage1/train-<key>/epoch-*`, see train_runtime). Either way,
re-running the same command continues where it stopped. Every file carries a fingerprint of the
settings that produced it (`epochs` excluded, so raising it continues training) and is ignored
when the settings change. `<run>/stage1/model.pt` holds the final heads.
"""

from __future__ import annotations

import hashlib
import json

import torch

from rayclust import storage
from rayclust.config import Config, ConfigError, to_dict
from rayclust.encoders import resolve_device
from rayclust.method import ClusterResult, make_method
from rayclust.method.kmeans import KMeansResult
from rayclust.method.trainer import EpochLog, Stage1Inputs, TrainState
from rayclust.pipeline.corpus import Corpus
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.vocabulary import read_vocabulary


def _fingerprint(config: Config, corpus: Corpus, n_nouns: int, part: str) -> str:
    """What the cached pieces depend on. `epochs` is left out on purpose: raising it and running
    again continues training from the last checkpoint."""
    section = {k: v for k, v in to_dict(getattr(config, config.method)).items() if k != "epochs"}
    settings = {"method": config.method, "clusters": config.clusters, "seed": config.seed,
                "kmeans": to_dict(config.kmeans), "section": section,
                "n": len(corpus.ids), "first": corpus.ids[:1], "last": corpus.ids[-1:],
                "nouns": n_nouns, "part": part}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def method_device(config: Config) -> torch.device:
    return resolve_device(config.device)


def train_stage1(config: Config, run: RunDirectory, corpus: Corpus, vocabulary_uri: str,
                 embeddings_uri: str) -> tuple[ClusterResult, dict]:
    """Train (or resume) stage 1 and return the final clustering and a training summary.

    `train.workers` 0 trains in this process; more run `TorchTrainer` workers (DDP) that read the
    corpus from `embeddings_uri` and the cached global pieces from `<run>/stage1/global.pt`.
    """
    nouns, noun_matrix = read_vocabulary(vocabulary_uri, run.options)
    if noun_matrix.shape[1] != corpus.features.shape[1]:
        raise ConfigError(f"embeddings have dimension {corpus.features.shape[1]} but the "
                          f"vocabulary has {noun_matrix.shape[1]}: both must come from the same "
                          "CLIP model (set model.name/model.pretrained or vocabulary.embeddings)")
    if len(corpus.ids) < config.clusters:
        raise ConfigError(f"{len(corpus.ids)} embedded images cannot form {config.clusters} "
                          "clusters; lower `clusters`")
    from rayclust.pipeline.train_runtime import worker_count

    workers = worker_count(config)
    device = method_device(config)
    train_key = _fingerprint(config, corpus, len(nouns), "train")
    model_uri = storage.join(run.stage1, "model.pt")
    estimator = make_method(config, device=device)
    # the global batch, after defaults derived from K (TAC's regimes) are filled in
    batch = estimator.objective().batch_size
    if workers > 1 and batch // workers < 2:
        raise ConfigError(f"{config.method}.batch_size {batch} is the global batch: split over "
                          f"{workers} workers it leaves fewer than 2 rows per worker; raise it or "
                          "lower train.workers")
    u = torch.nn.functional.normalize(torch.tensor(corpus.features, dtype=torch.float32), dim=1)
    e = torch.nn.functional.normalize(torch.tensor(noun_matrix, dtype=torch.float32), dim=1)
    inputs, kmeans_fit = _global_pieces(config, run, corpus, estimator, u, e, len(nouns), device)

    state = None
    if run.exists(model_uri):  # finished before with these settings: no training at all
        saved = run.load_torch(model_uri, map_location=device)
        if (saved.get("fingerprint") == train_key
                and saved["state"]["epoch"] == estimator.objective().epochs):
            state = estimator.trainer().init_state(u.shape[1])
            state.load_state_dict(saved["state"])
            log.info("stage 1: already trained (%s)", model_uri)
    if state is None and workers == 0:
        state = _fit_here(config, run, estimator, inputs, train_key, u.shape[1])
    elif state is None:
        state = _fit_on_ray_train(config, run, estimator, embeddings_uri, train_key, workers,
                                  u.shape[1])
    estimator.inputs_, estimator.state_ = inputs, state
    estimator.result_ = estimator.finish(u.to(device), e.to(device), nouns, kmeans_fit)

    history = [vars(h) for h in state.history]
    run.write_json(storage.join(run.stage1, "history.json"), {"epochs": history})
    run.save_torch({"model": state.module.state_dict(), "method": config.method,
                    "clusters": config.clusters, "dim": int(u.shape[1]),
                    "fingerprint": train_key, "state": state.state_dict()}, model_uri)
    summary = {"epochs": len(history), "final_loss": history[-1]["loss"] if history else None,
               "train_seconds": float(sum(h["seconds"] for h in history)),
               "nouns_in_text_space": int(len(estimator.nouns_used_)),
               "device": str(device), "workers": workers,
               # the values used, after those left unset were derived (e.g. TAC's K >= 100 regime)
               "hyperparameters": to_dict(estimator.objective().cfg)}
    if estimator.result_.source == "kmeans":
        scores, sel = estimator.result_.scores, estimator.result_.selection
        log.warning("stage 1: the language guard kept k-means (selection score %.4f vs heads "
                    "%.4f, difference %+.4f +- %.4f: %s): the vocabulary did not help on these "
                    "features", scores["kmeans"]["score"], scores["heads"]["score"],
                    sel["difference"], sel["standard_error"], sel["reason"])
    run.mark_complete(run.stage1, summary)
    return estimator.result_, summary


def _global_pieces(config, run, corpus, estimator, u, e, n_nouns, device):
    """k-means, noun selection, counterparts and neighbour tables: computed once, cached in
    `<run>/stage1/global.pt` (training workers read them from there)."""
    global_uri = storage.join(run.stage1, "global.pt")
    global_key = _fingerprint(config, corpus, n_nouns, "global")
    if run.exists(global_uri):
        # to the working device: a run resumed or repeated on another device than the one that
        # wrote the cache (a GPU run re-run, a CPU cache read on a GPU) must not mix devices
        cached = run.load_torch(global_uri, map_location=device)
        if cached.get("fingerprint") == global_key:
            inputs = Stage1Inputs(u, cached["text"], cached["image_neighbours"],
                                  cached["text_neighbours"])
            kmeans_fit = None
            if cached.get("kmeans_centroids") is not None:
                kmeans_fit = KMeansResult(cached["kmeans_centroids"], cached["kmeans_labels"],
                                          cached["kmeans_inertia"])
            estimator.nouns_used_ = cached["nouns_used"]
            log.info("stage 1: global pieces from cache %s", global_uri)
            return inputs, kmeans_fit
    inputs, nouns_used, kmeans_fit = estimator.prepare(u.to(device), e.to(device))
    estimator.nouns_used_ = nouns_used
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    run.save_torch({"fingerprint": global_key, "text": cpu(inputs.text),
                    "image_neighbours": cpu(inputs.image_neighbours),
                    "text_neighbours": cpu(inputs.text_neighbours),
                    "nouns_used": cpu(nouns_used),
                    "kmeans_centroids": cpu(kmeans_fit.centroids) if kmeans_fit else None,
                    "kmeans_labels": cpu(kmeans_fit.labels) if kmeans_fit else None,
                    "kmeans_inertia": kmeans_fit.inertia if kmeans_fit else None},
                   global_uri)
    log.info("stage 1: %d nouns in the text space", len(nouns_used))
    return inputs, kmeans_fit


def _log_epoch(epoch_log: EpochLog, epochs: int, workers: int = 0) -> None:
    where = f" on {workers} worker(s)" if workers else ""
    log.info("stage 1 epoch %d/%d%s: loss %.4f (%s) %.2fs", epoch_log.epoch + 1, epochs, where,
             epoch_log.loss, ", ".join(f"{k} {v:.3f}" for k, v in epoch_log.parts.items()),
             epoch_log.seconds)


def _fit_here(config, run, estimator, inputs, train_key, dim) -> TrainState:
    """Stage 1 in this process; `<run>/stage1/checkpoint.pt` after every epoch."""
    checkpoint_uri = storage.join(run.stage1, "checkpoint.pt")
    epochs = estimator.objective().epochs

    def save_checkpoint(state: TrainState, epoch_log: EpochLog) -> None:
        run.save_torch({"fingerprint": train_key, "state": state.state_dict()}, checkpoint_uri)
        _log_epoch(epoch_log, epochs)

    trainer = estimator.trainer(on_epoch_end=save_checkpoint)
    state = None
    if run.exists(checkpoint_uri):
        saved = run.load_torch(checkpoint_uri, map_location=estimator.device)
        if saved.get("fingerprint") == train_key:
            state = trainer.init_state(dim)
            state.load_state_dict(saved["state"])
            log.info("stage 1: resuming after epoch %d from %s", state.epoch, checkpoint_uri)
        else:
            log.info("stage 1: settings changed since %s; training from scratch", checkpoint_uri)
    return trainer.fit(inputs, state)


def _fit_on_ray_train(config, run, estimator, embeddings_uri, train_key, workers, dim
                      ) -> TrainState:
    """Stage 1 on `workers` TorchTrainer workers; checkpoints in `<run>/stage1/train-<key>/`."""
    from rayclust.config import to_dict
    from rayclust.pipeline import train_runtime
    from rayclust.pipeline.stage1_worker import stage1_worker

    log.info("stage 1: training on %d Ray Train worker(s)", workers)
    result = train_runtime.fit(
        stage1_worker, {"config": to_dict(config), "run": run.root, "embeddings": embeddings_uri,
                        "global": storage.join(run.stage1, "global.pt")},
        config, run, run.stage1, f"train-{train_key}", workers)
    if result.checkpoint is None:
        raise RuntimeError("stage 1 finished without a checkpoint")  # a bug, never input
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(storage.join(folder, train_runtime.STATE_FILE),
                           map_location=estimator.device, weights_only=False)
    state = estimator.trainer().init_state(dim)
    state.load_state_dict(saved)
    return state
