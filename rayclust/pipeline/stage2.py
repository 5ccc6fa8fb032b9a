"""SEIC stage 2 on Ray Train: fine-tune the vision encoder and the image head on the stage-1
model's pseudo-labels (ALGORITHM.md 4.4), then assign every image with the fine-tuned model.

The driver writes (once per stage-2 settings, `stage2/prepared.json`)
    <run>/stage2/images.parquet          idx, id, uri: the embedded corpus with a dense index
    <run>/pseudo_labels/epoch-0000.parquet  the first table, from the stage-1 result
and starts a `TorchTrainer` (stage2_worker). Each epoch every worker streams, through Ray Data
decode tasks of its own, its equal share of that epoch's global permutation of the corpus
(`method.sampling`; the manifest's URI order groups images by class). The table is refreshed
every `stage2.refresh_epochs`, checkpoints go under `<run>/stage2/train-<key>/` every epoch, and
the loop ends with one inference pass over the whole corpus: `pseudo_labels/epoch-<E>.parquet`,
which becomes `assignments/`. A finished stage writes `<run>/stage2/_SUCCESS` and is skipped on
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
from rayclust.method.sampling import epoch_rows
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


# Decode parallelism comes from the number of input blocks; more blocks than this only add
# per-block puts and metadata tasks (each epoch of each worker builds its own stream).
_MAX_BLOCKS = 1024


def rows_dataset(config: Config, rows: pa.Table, preprocess):
    """Ray Data stream of (idx, pixels uint8 at the model's input size, ok) for `rows`
    (idx, uri), decoded by CPU tasks. The rows start as in-memory Arrow blocks of at least
    `embed.decode_batch_size` rows (~100 bytes a row), each a contiguous run of `rows`: on this
    scale that avoids a file-listing and read stage per stream."""
    import ray

    from rayclust.pipeline.decode import decode_pixels

    e = config.embed
    size = max(e.decode_batch_size, -(-rows.num_rows // _MAX_BLOCKS))
    blocks = [rows.slice(i, size) for i in range(0, rows.num_rows, size)]
    ds = ray.data.from_arrow(blocks or [rows])
    return ds.map_batches(decode_pixels, batch_size=e.decode_batch_size, batch_format="numpy",
                          num_cpus=e.decode_cpus, memory=e.decode_memory_mb * 2**20 or None,
                          fn_kwargs={"options": config.storage, "preprocess": preprocess})


def read_images(run: RunDirectory, uri: str | None = None) -> pa.Table:
    """images.parquet (idx, id, uri), checked to be in idx order (row i is image i)."""
    images = run.read_table(uri or images_uri(run), ["idx", "id", "uri"])
    if not np.array_equal(images["idx"].to_numpy(), np.arange(images.num_rows)):
        raise RuntimeError(f"{uri or images_uri(run)} is not the dense index 0..N-1 in order")
    return images


def images_dataset(config: Config, run: RunDirectory, preprocess, rank: int, world: int,
                   images: pa.Table | None = None):
    """One worker's share of a table refresh: the rows with idx % world == rank, each exactly
    once (not a training share, which repeats a few rows to even out the steps)."""
    rows = read_images(run) if images is None else images
    rows = rows.select(["idx", "uri"])
    return rows_dataset(config, rows.filter(pa.array(rows["idx"].to_numpy() % world == rank)),
                        preprocess)


def epoch_dataset(config: Config, images: pa.Table, preprocess, epoch: int, rank: int,
                  world: int):
    """One worker's training stream for `epoch`: its share of that epoch's global permutation
    (`method.sampling.epoch_rows`), `steps_per_epoch * stage2.batch_size` rows. Ray Data does not
    preserve the order across blocks, but every block is a random draw from the corpus, so the
    composition of each batch is as random as the permutation."""
    order = epoch_rows(images.num_rows, config.stage2.batch_size, config.seed, epoch, rank, world)
    return rows_dataset(config, images.select(["idx", "uri"]).take(order), preprocess)


def epoch_batches(config: Config, dataset, steps: int):
    """The `steps` batches (dicts of numpy arrays, `stage2.batch_size` rows each) of an epoch's
    stream; raises if the stream ends early (a silent short epoch would leave the other ranks
    waiting in a collective)."""
    batches = dataset.iter_batches(batch_size=config.stage2.batch_size, batch_format="numpy",
                                   drop_last=True)
    count = 0
    for batch in batches:
        if count == steps:
            break
        count += 1
        yield batch
    if count < steps:
        raise RuntimeError(f"the epoch's image stream gave {count} batches, expected {steps}")


def prepare(config: Config, run: RunDirectory, corpus, stage1: ClusterResult,
            key: str | None = None) -> dict:
    """Write the dense image index and the first table (from stage 1); the workers' config.

    Both are written once per stage-2 training `key` (recorded in `stage2/prepared.json`): a
    resume must find the very table its checkpoints hashed, and stage 1's result recomputed on
    another device can differ in the last bits of a confidence."""
    n = len(corpus.ids)
    marker = storage.join(run.stage2, "prepared.json")
    done = run.read_json(marker) if run.exists(marker) else {}
    if not (key is not None and done.get("key") == key and run.exists(images_uri(run))
            and run.exists(table_uri(run, 0))):
        run.write_table(pa.table({"idx": pa.array(np.arange(n, dtype=np.int64)),
                                  "id": pa.array(corpus.ids, pa.string()),
                                  "uri": pa.array(corpus.uris, pa.string())}), images_uri(run))
        first = PseudoLabelTable.from_predictions(
            torch.as_tensor(stage1.labels, dtype=torch.long), torch.as_tensor(stage1.confidence))
        run.write_table(first.to_arrow(corpus.ids), table_uri(run, 0))
        done = {"key": key, "first_table_hash": first.hash(), "n": n}
        run.write_json(marker, done)
    return {"config": to_dict(config), "run": run.root, "images": images_uri(run),
            "stage1_model": storage.join(run.stage1, "model.pt"),
            "first_table": table_uri(run, 0), "first_table_hash": done["first_table_hash"]}


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

    loop_config = prepare(config, run, corpus, stage1, key)
    workers = train_runtime.worker_count(config, minimum=1)
    # the workers build their own decode streams, so `fit` sees no dataset: check the room here
    train_runtime.check_room(config, workers, decode=True)
    log.info("stage 2: fine-tuning (%s adapter) on %d Ray Train worker(s), %d epoch(s), "
             "pseudo-labels refreshed %s", config.stage2.adapter, workers, config.stage2.epochs,
             f"every {config.stage2.refresh_epochs} epoch(s)" if config.stage2.refresh_epochs
             else "online per batch")
    train_runtime.fit(stage2_worker, loop_config, config, run, run.stage2, f"train-{key}",
                      workers)
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
