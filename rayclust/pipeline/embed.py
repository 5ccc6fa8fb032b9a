"""Image embedding stage on Ray Data (ARCHITECTURE.md "Embed", RAY.md 1.1-1.8).

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

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayclust import storage
from rayclust.config import Config
from rayclust.pipeline.decode import decode_batch
from rayclust.preprocess import ImagePreprocess
from rayclust.pipeline.manifest import build_manifest
from rayclust.pipeline.progress import Progress, log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.tables import embedding_array, errors_table

THUMBNAILS_SCHEMA = pa.schema([("id", pa.string()), ("thumbnail", pa.binary())])


@dataclass(frozen=True)
class EncoderInfo:
    """What the driver needs to know about the model without holding it."""

    preprocess: ImagePreprocess
    cache_key: str
    embed_dim: int


def _load(config: Config, device: str):
    from rayclust.encoders import load_encoder
    m = config.model
    return load_encoder(m.name, m.pretrained, device=device, cache_dir=m.cache_dir,
                        seed=config.seed)


_DESCRIBED: dict[tuple, EncoderInfo] = {}


def load_on_actor(config: Config):
    """The encoder inside a Ray actor: on the GPU Ray assigned it (or `model.device`)."""
    import ray
    import torch

    device = config.model.device if config.model.device != "auto" else (
        "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    return _load(config, device)


def describe_encoder(config: Config) -> EncoderInfo:
    """Load the model once in a Ray task (weights download on a worker, not the driver)."""
    import ray

    m = config.model
    key = (m.name, m.pretrained, m.cache_dir, config.seed)
    if key not in _DESCRIBED:
        @ray.remote(num_cpus=1)
        def describe(config: Config) -> EncoderInfo:
            encoder = _load(config, "cpu")
            return EncoderInfo(encoder.preprocess, encoder.cache_key, encoder.embed_dim)

        try:
            _DESCRIBED[key] = ray.get(describe.remote(config))
        except ray.exceptions.RayTaskError as exc:
            # a user mistake (unknown model, weights not downloadable) keeps its own clear
            # message instead of arriving wrapped in a remote traceback
            from rayclust.encoders import EncoderLoadError
            if isinstance(exc.cause, EncoderLoadError):
                raise exc.cause from None
            raise
    return _DESCRIBED[key]


def actor_resources(config: Config) -> tuple[int, float]:
    """(actors, GPUs per actor) for encoder pools, from the config and the cluster."""
    from rayclust.pipeline.ray_runtime import cluster_gpus

    e = config.embed
    gpus = cluster_gpus(config)
    per_actor = e.gpus_per_actor if e.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    actors = e.actors or (max(1, int(gpus // per_actor)) if per_actor else 1)
    return actors, per_actor


class EncodeImages:
    """Ray Data callable class: holds the open_clip model, encodes a batch of uint8 images."""

    def __init__(self, config: Config):
        self.encoder = load_on_actor(config)
        self.dtype = config.output.embedding_dtype

    def __call__(self, batch: dict) -> pa.Table:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        d = self.encoder.embed_dim
        vectors = np.zeros((len(ok), d), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.encoder.encode_uint8(batch["pixels"][ok]).numpy()
        columns = {k: v for k, v in batch.items() if k not in ("pixels",)}
        table = pa.table({k: pa.array(list(v) if v.dtype == object else v)
                          for k, v in columns.items()})
        return table.append_column("embedding", embedding_array(vectors, self.dtype))


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
            rows = table.filter(pa.compute.equal(table["shard"], shard))
            self.pending.setdefault(shard, []).append(rows)
            self.counts[shard] = self.counts.get(shard, 0) + rows.num_rows
            if self.counts[shard] == self.sizes[shard]:
                self._write(shard, pa.concat_tables(self.pending.pop(shard)))

    def _write(self, shard: str, rows: pa.Table) -> None:
        failed = pa.compute.not_equal(rows["error"], "")
        bad, good = rows.filter(failed), rows.filter(pa.compute.invert(failed))
        run = self.run
        errors = errors_table([{"uri": u, "stage": "embed", "error": e} for u, e in
                               zip(bad["uri"].to_pylist(), bad["error"].to_pylist())])
        run.write_table(errors, storage.join(run.errors, shard))
        thumbs = good.select(["id", "thumbnail"]).cast(THUMBNAILS_SCHEMA)
        run.write_table(thumbs, storage.join(run.thumbnails, shard))
        keep = ["id", "uri", "embedding"] + (["label"] if self.has_label else [])
        run.write_table(good.select(keep), storage.join(run.embeddings, shard))  # marks it done
        self.written.append(shard)
        self.images += good.num_rows
        self.errors += bad.num_rows


def embed_images(config: Config, run: RunDirectory) -> list[str]:
    """Embed every manifest row not embedded yet; returns the embeddings part URIs."""
    from rayclust.pipeline.ray_runtime import configure_data, ensure_ray

    if run.is_complete(run.embeddings):
        return storage.parquet_files(run.embeddings, run.options)
    parts = build_manifest(config, run)
    names = [storage.basename(p) for p in parts]
    todo = [p for p, n in zip(parts, names)
            if not run.exists(storage.join(run.embeddings, n))]
    for folder in (run.embeddings, run.errors, run.thumbnails):
        storage.remove_stale_temporaries(folder, run.options)  # from a killed earlier run
    if todo:
        ensure_ray(config)
        configure_data(config)
        _run_pipeline(config, run, todo)
    n_errors = sum(run.read_table(storage.join(run.errors, n)).num_rows for n in names)
    run.mark_complete(run.embeddings, {"parts": len(names), "errors": n_errors})
    if n_errors:
        log.warning("embedding: %d image(s) could not be used; see %s", n_errors, run.errors)
    return [storage.join(run.embeddings, n) for n in names]


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
            progress.update(batch.num_rows, shards_written=len(writer.written),
                            errors=writer.errors)
    if writer.pending:
        missing = {s: writer.sizes[s] - writer.counts[s] for s in writer.pending}
        raise RuntimeError(f"embedding lost rows in shards {missing}")  # a bug, never input
