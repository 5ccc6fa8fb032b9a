"""SEIC stage 2 on Ray Train: fine-tune the vision encoder and the image head on the stage-1
model's pseudo-labels (ALGORITHM.md 4.4), then assign every image with the fine-tuned model.

The driver writes
    <run>/stage2/images.parquet          idx, id, uri: the embedded corpus with a dense index
    <run>/pseudo_labels/epoch-0000.parquet  the first table, from the stage-1 result
and starts a `TorchTrainer` (stage2_worker) that streams the images by Ray Data, refreshes the
table every `stage2.refresh_epochs`, checkpoints every epoch under `<run>/stage2/train-<key>/` and
ends with one inference pass over the whole corpus: `pseudo_labels/epoch-<E>.parquet`, which
becomes `assignments/`. A finished stage writes `<run>/stage2/_SUCCESS` and is skipped on
re-runs with the same settings.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import torch

from rayclust import storage
from rayclust.config import Config, ConfigError, to_dict
from rayclust.method import ClusterResult
from rayclust.method.metrics import label_free_scores
from rayclust.method.naming import typical_nouns, unique_names
from rayclust.method.pseudo_labels import PseudoLabelTable
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory


def table_uri(run: RunDirectory, epoch: int) -> str:
    return storage.join(run.pseudo_labels, f"epoch-{epoch:04d}.parquet")


def images_uri(run: RunDirectory) -> str:
    return storage.join(run.stage2, "images.parquet")


def _fingerprint(config: Config, stage1_key: str, n: int) -> str:
    s2 = {k: v for k, v in to_dict(config.stage2).items() if k not in ("epochs", "enabled")}
    settings = {"stage2": s2, "stage1": stage1_key, "n": n, "seed": config.seed,
                "model": [config.model.name, config.model.pretrained]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def images_dataset(config: Config, run: RunDirectory, preprocess, rank: int | None = None,
                   world: int | None = None):
    """Ray Data stream of (idx, pixels uint8 at the model's input size, ok), decoded by CPU tasks.

    Without `world`: the whole corpus, the training input that Ray Train splits across the
    workers. With it: the rows with idx % world == rank, one worker's share of a table refresh
    (not the training split, which may drop up to world-1 tail rows, RAY.md 2.3).
    The (idx, uri) rows start as in-memory Arrow blocks of `embed.decode_batch_size` rows
    (~100 bytes a row); on this scale that avoids a file-listing and read stage per epoch."""
    import ray

    from rayclust.pipeline.decode import decode_pixels

    e = config.embed
    rows = run.read_table(images_uri(run), ["idx", "uri"])
    if world is not None:
        rows = rows.filter(pa.array(rows["idx"].to_numpy() % world == rank))
    blocks = [rows.slice(i, e.decode_batch_size)
              for i in range(0, rows.num_rows, e.decode_batch_size)]
    ds = ray.data.from_arrow(blocks or [rows])
    return ds.map_batches(decode_pixels, batch_size=e.decode_batch_size, batch_format="numpy",
                          num_cpus=e.decode_cpus, memory=e.decode_memory_mb * 2**20 or None,
                          fn_kwargs={"options": config.storage, "preprocess": preprocess})


def prepare(config: Config, run: RunDirectory, corpus, stage1: ClusterResult) -> dict:
    """Write the dense image index and the first table (from stage 1); the workers' config."""
    n = len(corpus.ids)
    run.write_table(pa.table({"idx": pa.array(np.arange(n, dtype=np.int64)),
                              "id": pa.array(corpus.ids, pa.string()),
                              "uri": pa.array(corpus.uris, pa.string())}), images_uri(run))
    first = PseudoLabelTable.from_predictions(torch.as_tensor(stage1.labels, dtype=torch.long),
                                              torch.as_tensor(stage1.confidence))
    run.write_table(first.to_arrow(corpus.ids), table_uri(run, 0))
    return {"config": to_dict(config), "run": run.root, "images": images_uri(run),
            "stage1_model": storage.join(run.stage1, "model.pt"),
            "first_table": table_uri(run, 0)}


def training_images(config: Config, run: RunDirectory):
    from rayclust.pipeline.embed import describe_encoder

    return images_dataset(config, run, describe_encoder(config).preprocess)


def run_stage2(config: Config, run: RunDirectory, corpus, stage1: ClusterResult,
               vocabulary_uri: str) -> tuple[ClusterResult, dict] | None:
    """Fine-tune and assign; None when stage 2 does not apply (the guard kept k-means)."""
    from rayclust.pipeline import train_runtime
    from rayclust.pipeline.stage2_worker import stage2_worker

    if stage1.source != "heads":
        log.warning("stage 2 skipped: the language guard kept k-means, so there is no image "
                    "head worth fine-tuning towards; the stage-1 result is final")
        return None
    if any(uri is None for uri in corpus.uris):
        raise ConfigError("stage 2 fine-tunes on the images, but these embeddings have no `uri` "
                          "column; set stage2.enabled=false")
    n = len(corpus.ids)
    stage1_model = storage.join(run.stage1, "model.pt")
    saved = run.load_torch(stage1_model)
    # stage 1's settings and how far it trained: more stage-1 epochs mean a new starting model
    key = _fingerprint(config, f"{saved['fingerprint']}@{saved['state']['epoch']}", n)
    marker = storage.join(run.stage2, "_SUCCESS")
    if run.exists(marker):
        done = run.read_json(marker)
        if done.get("fingerprint") == key and done.get("epochs") == config.stage2.epochs:
            log.info("stage 2: already complete (%s)", marker)
            return _result(config, run, corpus, done, vocabulary_uri), done

    loop_config = prepare(config, run, corpus, stage1)
    workers = train_runtime.worker_count(config, minimum=1)
    log.info("stage 2: fine-tuning (%s adapter) on %d Ray Train worker(s), %d epoch(s), "
             "pseudo-labels refreshed %s", config.stage2.adapter, workers, config.stage2.epochs,
             f"every {config.stage2.refresh_epochs} epoch(s)" if config.stage2.refresh_epochs
             else "online per batch")
    train_runtime.fit(stage2_worker, loop_config, config, run, run.stage2, f"train-{key}",
                      workers, datasets={"train": training_images(config, run)})
    summary = run.read_json(storage.join(run.stage2, "final.json"))
    summary.update(fingerprint=key, epochs=config.stage2.epochs, workers=workers)
    run.mark_complete(run.stage2, summary)
    return _result(config, run, corpus, summary, vocabulary_uri), summary


def _result(config: Config, run: RunDirectory, corpus, summary: dict, vocabulary_uri: str
            ) -> ClusterResult:
    """The final table as a clustering, named in the frozen CLIP space (the text tower did not
    move, so nouns are compared with the stage-1 image embeddings)."""
    from rayclust.pipeline.vocabulary import read_vocabulary

    table = PseudoLabelTable.from_arrow(run.read_table(summary["table"]), corpus.ids)
    if table.hash() != summary["table_hash"]:
        raise RuntimeError(f"{summary['table']} does not match the hash its run recorded")
    k = config.clusters
    nouns, noun_matrix = read_vocabulary(vocabulary_uri, run.options)
    u = torch.nn.functional.normalize(torch.tensor(corpus.features, dtype=torch.float32), dim=1)
    e = torch.nn.functional.normalize(torch.tensor(noun_matrix, dtype=torch.float32), dim=1)
    labels = table.labels
    top = typical_nouns(u, labels, k, e, nouns, config.output.top_nouns)
    sizes = np.bincount(labels.numpy(), minlength=k).tolist()
    g = config.guard
    scores = {"stage2": label_free_scores(u, labels, k, table.confidence, g.neighbours,
                                          g.sample, config.seed)}
    return ClusterResult(labels.numpy(), table.confidence.numpy(), "stage2", top,
                         unique_names(top, sizes), scores)
