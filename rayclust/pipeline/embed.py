"""The embed stage (ARCHITECTURE.md "Embed", RAY.md 1.1-1.8): images on Ray Data, or an import of
precomputed embeddings (`input.embeddings`, what `cluster-embeddings` sets). Either way it writes
`embeddings/part-*.parquet` holding only usable rows (id, uri, [label], embedding) and puts every
other input row in `errors/`, so the later stages read a clean corpus.

Images:

    read_parquet(manifest shards) -> decode tasks (CPU): fetch bytes through the storage module,
    decode, preprocess to uint8 at the model's input size, make a thumbnail; a readable error per
    bad image -> encoder actors (ActorPoolStrategy; GPU with bf16 autocast, or CPU): normalise on
    the device, encode, L2-normalise -> the driver, which writes each manifest shard's
    `embeddings/`, `errors/` and `thumbnails/` parts once all of the shard's rows have arrived.

A shard's three parts are written atomically and the embeddings part last, so it marks the shard
done: a re-run (after a crash or a SIGKILL at any point) skips finished shards and redoes only the
unfinished one. Every manifest row ends in exactly one of `embeddings` or `errors`. Rows stream
through the driver in manifest order, so it holds at most about one shard of vectors at a time;
nothing materialises the corpus.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayclust import storage
from rayclust.config import Config, ConfigError
from rayclust.pipeline.clip_actors import EncodeImages, actor_resources, describe_encoder
from rayclust.pipeline.corpus import Corpus
from rayclust.pipeline.decode import decode_batch
from rayclust.pipeline.faults import driver_fault_point
from rayclust.pipeline.manifest import build_manifest
from rayclust.pipeline.progress import Progress, log
from rayclust.pipeline.ray_runtime import configure_data, ensure_ray
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.run_tables import write_rejected
from rayclust.tables import embedding_array, errors_table

THUMBNAILS_SCHEMA = pa.schema([("id", pa.string()), ("thumbnail", pa.binary())])


class _ShardWriter:
    """Collects streamed rows per manifest shard and writes a shard once it is complete."""

    def __init__(self, run: RunDirectory, sizes: dict[str, int], has_label: bool):
        self.run, self.sizes, self.has_label = run, sizes, has_label
        self.pending: dict[str, list[pa.Table]] = {}
        self.counts: dict[str, int] = {}
        self.written: list[str] = []
        self.images = self.errors = 0

    def add(self, table: pa.Table) -> None:
        shards = table["shard"].to_pylist()
        for shard in dict.fromkeys(shards):
            rows = table.filter(pc.equal(table["shard"], shard))
            self.pending.setdefault(shard, []).append(rows)
            self.counts[shard] = self.counts.get(shard, 0) + rows.num_rows
            if self.counts[shard] == self.sizes[shard]:
                self._write(shard, pa.concat_tables(self.pending.pop(shard)))

    def _write(self, shard: str, rows: pa.Table) -> None:
        rows = _flag_unusable_vectors(rows)
        failed = pc.not_equal(rows["error"], "")
        bad, good = rows.filter(failed), rows.filter(pc.invert(failed))
        run = self.run
        errors = errors_table([{"uri": u, "stage": "embed", "error": e} for u, e in
                               zip(bad["uri"].to_pylist(), bad["error"].to_pylist())])
        run.write_table(errors, run.shard(run.errors, shard))
        thumbs = good.select(["id", "thumbnail"]).cast(THUMBNAILS_SCHEMA)
        run.write_table(thumbs, run.shard(run.thumbnails, shard))
        keep = ["id", "uri", "embedding"] + (["label"] if self.has_label else [])
        run.write_table(good.select(keep), run.shard(run.embeddings, shard))  # marks it done
        self.written.append(shard)
        self.images += good.num_rows
        self.errors += bad.num_rows


def _flag_unusable_vectors(rows: pa.Table) -> pa.Table:
    """An encoder output with NaN/inf values or all zeros (a broken model or weights) becomes an
    error row instead of reaching stage 1."""
    vectors = rows["embedding"].combine_chunks()
    d = vectors.type.list_size
    matrix = np.asarray(vectors.flatten().to_numpy(zero_copy_only=False),
                        np.float32).reshape(-1, d)
    unusable = ~np.isfinite(matrix).all(axis=1) | ~matrix.any(axis=1)
    decoded = np.array([e == "" for e in rows["error"].to_pylist()], dtype=bool)
    flag = unusable & decoded
    if not flag.any():
        return rows
    errors = np.where(flag, "the encoder returned an embedding with NaN, infinite or only zero "
                            "values", np.array(rows["error"].to_pylist(), dtype=object))
    return rows.set_column(rows.column_names.index("error"), "error",
                           pa.array(errors.tolist(), pa.string()))


def run_embed(config: Config, run: RunDirectory) -> list[str]:
    """The embed stage: import `input.embeddings` when set, else embed the images of
    `input.path`. Returns the embeddings part URIs."""
    if config.input.embeddings:
        return import_embeddings(config, run)
    return embed_images(config, run)


def read_import(config: Config) -> Corpus:
    """The precomputed embeddings, checked: a whole-file problem or too few usable rows is a
    `ConfigError`; bad rows are in `Corpus.rejected`."""
    uri = config.input.embeddings
    corpus = Corpus.read(uri, config.storage, stage="cluster-embeddings")
    if len(corpus.ids) < config.clusters:
        skipped = f" ({len(corpus.rejected)} more skipped as unusable)" if corpus.rejected else ""
        raise ConfigError(f"{uri}: {len(corpus.ids)} usable embedding(s){skipped} cannot form "
                          f"{config.clusters} clusters; lower `clusters`")
    return corpus


def import_embeddings(config: Config, run: RunDirectory) -> list[str]:
    """Copy the usable rows of `input.embeddings` into `embeddings/` (float32, as given) and the
    others into `errors/part-embeddings.parquet`; skipped when this source is imported already."""
    source = config.input.embeddings
    done = run.marker(run.embeddings)
    if done is not None and done.get("source") == source:
        return storage.parquet_files(run.embeddings, run.options)
    corpus = read_import(config)
    write_rejected(run, corpus.rejected, "embeddings")
    n, size = len(corpus.ids), config.input.rows_per_shard
    parts = []
    for i, start in enumerate(range(0, n, size)):
        stop = min(start + size, n)
        columns = {"id": pa.array(corpus.ids[start:stop], pa.string()),
                   "uri": pa.array(corpus.uris[start:stop], pa.string())}
        if corpus.labels is not None:
            columns["label"] = pa.array(corpus.labels[start:stop], pa.string())
        columns["embedding"] = embedding_array(corpus.features[start:stop], "float32")
        parts.append(run.write_table(pa.table(columns),
                                     run.part(run.embeddings, i)))
    _remove_other_parts(run, run.embeddings, parts)  # of an earlier import of another file
    run.mark_complete(run.embeddings, {"source": source, "rows": n,
                                       "dimension": int(corpus.features.shape[1]),
                                       "rejected": len(corpus.rejected)})
    log.info("embed: %d embedding(s) of dimension %d imported from %s, %d set aside", n,
             corpus.features.shape[1], source, len(corpus.rejected))
    return parts


def _remove_other_parts(run: RunDirectory, folder: str, keep: list[str]) -> None:
    for uri in storage.parquet_files(folder, run.options):
        if uri not in keep:
            storage.delete(uri, run.options)


def embed_images(config: Config, run: RunDirectory) -> list[str]:
    """Embed every manifest row not embedded yet; returns the embeddings part URIs."""
    if run.is_complete(run.embeddings):
        return storage.parquet_files(run.embeddings, run.options)
    parts = build_manifest(config, run)
    names = [storage.basename(p) for p in parts]
    todo = [p for p, n in zip(parts, names)
            if not run.exists(run.shard(run.embeddings, n))]
    for folder in (run.embeddings, run.errors, run.thumbnails):
        storage.remove_stale_temporaries(folder, run.options)  # from a killed earlier run
    if todo:
        ensure_ray(config)
        configure_data(config)
        _run_pipeline(config, run, todo)
    n_errors = sum(run.read_table(run.shard(run.errors, n)).num_rows for n in names)
    run.mark_complete(run.embeddings, {"parts": len(names), "errors": n_errors})
    if n_errors:
        log.warning("embedding: %d image(s) could not be used; see %s", n_errors, run.errors)
    return [run.shard(run.embeddings, n) for n in names]


def _run_pipeline(config: Config, run: RunDirectory, todo: list[str]) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    info = describe_encoder(config)
    sizes = {storage.basename(p): run.read_table(p, ["id"]).num_rows for p in todo}
    has_label = "label" in run.read_table(todo[0]).column_names
    e = config.embed
    actors, gpus_per_actor = actor_resources(config)
    fs, _ = storage.filesystem(todo[0], run.options)
    ds = ray.data.read_parquet([storage.filesystem(p, run.options)[1] for p in todo],
                               filesystem=fs, include_paths=True, override_num_blocks=len(todo))
    # Ray merges small manifest files into big read blocks and never splits a block between
    # tasks: without this streaming split a whole shard would decode in one task on one core.
    ds = ds.repartition(target_num_rows_per_block=e.decode_batch_size)
    ds = ds.map_batches(decode_batch, batch_size=e.decode_batch_size, batch_format="numpy",
                        num_cpus=e.decode_cpus, memory=e.decode_memory_mb * 2**20 or None,
                        fn_kwargs={"options": config.storage, "preprocess": info.preprocess,
                                   "thumbnail_size": e.thumbnail_size})
    ds = ds.map_batches(EncodeImages, batch_size=config.model.batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor,
                        num_cpus=e.cpus_per_actor, fn_constructor_kwargs={"config": config})
    writer = _ShardWriter(run, sizes, has_label)
    total = sum(sizes.values())
    log.info("embedding: %d image(s) in %d shard(s) on %d encoder actor(s) (%.2g GPU each)",
             total, len(todo), actors, gpus_per_actor)
    with Progress(total, "embedding", "img", e.progress_seconds) as progress:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.add(batch)
            driver_fault_point("embed", len(writer.written))
            progress.update(batch.num_rows, shards_written=len(writer.written),
                            errors=writer.errors)
    if writer.pending:
        missing = {s: writer.sizes[s] - writer.counts[s] for s in writer.pending}
        raise RuntimeError(f"embedding lost rows in shards {missing}")  # a bug, never input
