"""Image embedding stage (single process; the Ray Data version replaces the loop, not the files).

For each manifest part: read bytes through the storage module, decode (errors become rows of
`errors/`), preprocess to uint8 at the model's input size, encode, and write
`embeddings/part-i.parquet` (id, uri, embedding, [label]) after `errors/part-i.parquet`. A part
whose embeddings file exists is skipped, so a re-run finishes missing work and duplicates nothing.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from rayclust import storage
from rayclust.config import Config
from rayclust.encoders import ClipEncoder
from rayclust.images import ImageDecodeError, decode_image
from rayclust.pipeline.manifest import build_manifest
from rayclust.pipeline.progress import Progress, log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.tables import embedding_array, errors_table


def _embed_part(rows: pa.Table, encoder: ClipEncoder, config: Config, progress: Progress
                ) -> tuple[pa.Table, pa.Table]:
    ids, uris = rows["id"].to_pylist(), rows["uri"].to_pylist()
    labels = rows["label"].to_pylist() if "label" in rows.column_names else None
    kept: list[int] = []
    vectors: list[np.ndarray] = []
    errors: list[dict] = []
    batch_rows: list[int] = []
    batch_pixels: list[np.ndarray] = []

    def flush():
        if batch_pixels:
            vectors.append(encoder.encode_uint8(np.stack(batch_pixels)).numpy())
            kept.extend(batch_rows)
            progress.update(len(batch_rows), errors=len(errors))
            batch_rows.clear()
            batch_pixels.clear()

    for i, uri in enumerate(uris):
        try:
            image = decode_image(storage.read_bytes(uri, config.storage))
            batch_pixels.append(encoder.preprocess.to_uint8(image))
            batch_rows.append(i)
        except (ImageDecodeError, OSError) as exc:
            errors.append({"uri": uri, "stage": "embed", "error": str(exc) or type(exc).__name__})
            progress.update(1, errors=len(errors))
        if len(batch_pixels) >= config.model.batch_size:
            flush()
    flush()
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, encoder.embed_dim), np.float32)
    columns = {"id": pa.array([ids[i] for i in kept], pa.string()),
               "uri": pa.array([uris[i] for i in kept], pa.string()),
               "embedding": embedding_array(matrix, config.output.embedding_dtype)}
    if labels is not None:
        columns["label"] = pa.array([labels[i] for i in kept], pa.string())
    return pa.table(columns), errors_table(errors)


def embed_images(config: Config, run: RunDirectory, encoder_factory: Callable[[], ClipEncoder]
                 ) -> list[str]:
    """Embed every manifest row; returns the embeddings part URIs.

    The input is listed (and validated) before `encoder_factory()` loads the model, so a wrong
    path fails at once instead of after a weight download."""
    if run.is_complete(run.embeddings):
        return storage.parquet_files(run.embeddings, run.options)
    parts = build_manifest(config, run)
    encoder = encoder_factory()
    total = sum(storage.read_parquet(p, run.options, ["id"]).num_rows for p in parts)
    out = []
    with Progress(total, "embedding images", config.progress, unit="img") as progress:
        for part in parts:
            name = storage.basename(part)
            target = storage.join(run.embeddings, name)
            if run.exists(target):  # finished by an earlier run
                rows = run.read_table(target, ["id"]).num_rows
                errs = run.read_table(storage.join(run.errors, name)).num_rows
                progress.update(rows + errs)
                out.append(target)
                continue
            table, errors = _embed_part(run.read_table(part), encoder, config, progress)
            run.write_table(errors, storage.join(run.errors, name))
            out.append(run.write_table(table, target))  # written last: marks the part done
    n_errors = sum(run.read_table(storage.join(run.errors, storage.basename(p))).num_rows
                   for p in out)
    run.mark_complete(run.embeddings, {"parts": len(out), "errors": n_errors})
    if n_errors:
        log.warning("embedding: %d image(s) could not be used; see %s", n_errors, run.errors)
    return out
