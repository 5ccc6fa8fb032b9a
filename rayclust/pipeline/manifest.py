"""List the corpus once into `<run>/manifest/part-*.parquet` (id, uri, [label]).

Inputs: a local folder or s3:// prefix (searched recursively for image extensions), or a Parquet
or CSV manifest with a `uri` column and an optional `label`. Rows are sorted by URI and sharded
into shards of at most `input.rows_per_shard`. A re-run reads the manifest and never lists again.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from rayclust import storage
from rayclust.config import Config, ConfigError
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory, stable_id
from rayclust.tables import errors_table

MANIFEST_SUFFIXES = (".parquet", ".csv")


def _read_manifest(uri: str, config: Config) -> pa.Table:
    opts = config.storage
    if uri.lower().endswith(".csv"):
        table = pacsv.read_csv(pa.BufferReader(storage.read_bytes(uri, opts)))
    else:
        table = storage.read_parquet(uri, opts)
    if "uri" not in table.column_names:
        raise ConfigError(f"manifest {uri} has no `uri` column (columns: "
                          f"{', '.join(table.column_names)})")
    if config.input.labels == "manifest" and "label" not in table.column_names:
        raise ConfigError(f"input.labels is `manifest` but {uri} has no `label` column")
    keep = ["uri"] + (["label"] if "label" in table.column_names and
                      config.input.labels != "none" else [])
    return table.select(keep)


def list_inputs(config: Config) -> tuple[pa.Table, list[dict]]:
    """(table of uri[, label], error rows) for the configured input."""
    source = config.input.path
    if not source:
        raise ConfigError("input.path is not set: give a folder, an s3:// prefix or a manifest "
                          "(e.g. `rayclust run CONFIG --set input.path=/data/images`)")
    opts = config.storage
    if not storage.exists(source, opts):
        raise ConfigError(f"input.path {source} does not exist")
    if not storage.is_dir(source, opts) and source.lower().endswith(MANIFEST_SUFFIXES):
        table = _read_manifest(source, config)
    else:
        if config.input.labels == "manifest":
            raise ConfigError("input.labels is `manifest` but input.path is a folder; use "
                              "`from_folder` or point input.path at a manifest")
        uris = storage.list_files(source, opts, extensions=config.input.extensions)
        columns = {"uri": uris}
        if config.input.labels == "from_folder":
            columns["label"] = [storage.basename(storage.parent(u)) for u in uris]
        table = pa.table(columns)
    errors = []
    nulls = pc.is_null(table["uri"])
    if pc.any(nulls).as_py():
        errors += [{"uri": "", "stage": "manifest", "error": f"row {i}: empty uri"}
                   for i in pc.indices_nonzero(nulls).to_pylist()]
        table = table.filter(pc.invert(nulls))
    table = table.sort_by("uri")
    uris = table["uri"].to_pylist()
    keep = [i for i, u in enumerate(uris) if i == 0 or u != uris[i - 1]]
    if len(keep) < len(uris):
        dup = sorted(set(range(len(uris))) - set(keep))
        errors += [{"uri": uris[i], "stage": "manifest", "error": "duplicate uri (kept once)"}
                   for i in dup]
        table = table.take(keep)
    if config.input.max_images is not None:
        table = table.slice(0, config.input.max_images)
    if "label" in table.column_names:
        table = table.set_column(table.column_names.index("label"), "label",
                                 pc.cast(table["label"], pa.string()))
    ids = pa.array([stable_id(u) for u in table["uri"].to_pylist()], pa.string())
    return table.add_column(0, "id", ids), errors


def build_manifest(config: Config, run: RunDirectory) -> list[str]:
    """Write the manifest once; return its part URIs."""
    if run.is_complete(run.manifest):
        return storage.parquet_files(run.manifest, run.options)
    table, errors = list_inputs(config)
    if table.num_rows == 0:
        raise ConfigError(f"no images found under {config.input.path} (extensions: "
                          f"{', '.join(config.input.extensions)})")
    size = config.input.rows_per_shard
    parts = []
    for i, start in enumerate(range(0, table.num_rows, size)):
        parts.append(run.write_table(table.slice(start, size),
                                     run.part(run.manifest, i)))
    if errors:
        run.write_table(errors_table(errors), run.errors_part("manifest"))
    run.mark_complete(run.manifest, {"rows": table.num_rows, "parts": len(parts)})
    log.info("manifest: %d images in %d part(s), %d input problem(s)", table.num_rows,
             len(parts), len(errors))
    return parts
