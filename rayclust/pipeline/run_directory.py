"""The run directory (ARCHITECTURE.md): one place for every path of a run, local or s3://.

Stages meet only here. Each stage owns a folder and is complete when its `_SUCCESS` marker
exists; the marker's JSON holds a `stamp`, new every time the stage completes, which the stages
after it fold into their own fingerprints (a stage that re-ran makes the later ones run again).
A re-run skips complete stages and finishes missing parts of incomplete ones (parts are written
atomically under deterministic names, so nothing is duplicated).

    config.yaml                     the resolved config of the run
    manifest/part-*.parquet         embed: id, uri, [label] of every input image
    embeddings/part-*.parquet       embed: id, uri, [label], embedding (usable rows only)
    errors/part-*.parquet           every input row that could not be used: uri, stage, error
    thumbnails/part-*.parquet       embed: id, thumbnail (JPEG bytes)
    vocabulary/part-00000.parquet   vocabulary: noun, embedding
    stage1/                         model.pt (the fitted estimator), result.json,
                                    assignment.parquet, history.json, global.pt (cache),
                                    checkpoint.pt or train-<key>/ (Ray Train checkpoints)
    stage2/                         images.parquet, prepared.json, model.pt, final.json,
                                    result.json, assignment.parquet, sync/, train-<key>/
    pseudo_labels/epoch-*.parquet   stage 2: id, label, confidence per table refresh
    assignments/part-*.parquet      assign: id, uri, cluster, confidence, [label]
    clusters.parquet, metrics.json  assign
    tune/, report/                  the Ray Tune search and the HTML report (later stages)
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import dataclass

import pyarrow as pa

from rayclust import storage
from rayclust.storage import StorageOptions


def stable_id(uri: str) -> str:
    """A stable id for an input, derived from its normalised URI (16 hex chars of SHA-1)."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


@dataclass(frozen=True)
class RunDirectory:
    root: str
    options: StorageOptions = StorageOptions()

    def __post_init__(self):
        # Ray workers do not share the driver's working directory: a relative run directory
        # must be pinned to the driver's before any path leaves this process.
        object.__setattr__(self, "root", storage.absolute(self.root))

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # -- well-known locations
    @property
    def config(self) -> str: return self.path("config.yaml")
    @property
    def tune(self) -> str: return self.path("tune")
    @property
    def report(self) -> str: return self.path("report")
    @property
    def manifest(self) -> str: return self.path("manifest")
    @property
    def embeddings(self) -> str: return self.path("embeddings")
    @property
    def errors(self) -> str: return self.path("errors")
    @property
    def thumbnails(self) -> str: return self.path("thumbnails")
    @property
    def vocabulary(self) -> str: return self.path("vocabulary")
    @property
    def stage1(self) -> str: return self.path("stage1")
    @property
    def stage2(self) -> str: return self.path("stage2")
    @property
    def pseudo_labels(self) -> str: return self.path("pseudo_labels")
    @property
    def assignments(self) -> str: return self.path("assignments")
    @property
    def clusters(self) -> str: return self.path("clusters.parquet")
    @property
    def metrics(self) -> str: return self.path("metrics.json")

    # -- files inside the stage folders
    def part(self, folder: str, index: int) -> str:
        """`folder`/part-<index>.parquet (manifest, embeddings of an import, assignments)."""
        return storage.join(folder, part_name(index))

    def shard(self, folder: str, name: str) -> str:
        """A manifest shard's part, by the shard's file name, in embeddings/, errors/ or
        thumbnails/ (the three are written together once the shard is complete)."""
        return storage.join(folder, name)

    def success(self, folder: str) -> str:
        """The completion marker of the stage whose folder this is."""
        return storage.join(folder, "_SUCCESS")

    def vocabulary_table(self) -> str:
        return storage.join(self.vocabulary, part_name(0))

    def errors_part(self, name: str) -> str:
        """errors/part-<name>.parquet: one deterministic part per producer (a re-run rewrites)."""
        return storage.join(self.errors, f"part-{name}.parquet")

    def model(self, stage_dir: str) -> str:
        return storage.join(stage_dir, "model.pt")

    def result(self, stage_dir: str) -> str:
        """<stage>/result.json: the stage's clustering (source, names, scores, summary)."""
        return storage.join(stage_dir, "result.json")

    def assignment(self, stage_dir: str) -> str:
        """<stage>/assignment.parquet: id, cluster, confidence (and stage 1's k-means)."""
        return storage.join(stage_dir, "assignment.parquet")

    def stage1_file(self, name: str) -> str:
        """global.pt, checkpoint.pt, history.json"""
        return storage.join(self.stage1, name)

    def stage2_file(self, name: str) -> str:
        """images.parquet, prepared.json, final.json"""
        return storage.join(self.stage2, name)

    def sync_record(self, epoch: int, rank: int) -> str:
        return storage.join(self.stage2, "sync", f"epoch-{epoch:04d}-rank-{rank}.json")

    def pseudo_label_table(self, epoch: int) -> str:
        return storage.join(self.pseudo_labels, f"epoch-{epoch:04d}.parquet")

    # -- markers
    def is_complete(self, stage_dir: str) -> bool:
        return storage.exists(self.success(stage_dir), self.options)

    def mark_complete(self, stage_dir: str, info: dict | None = None) -> dict:
        """Write `_SUCCESS` with `info` and a fresh `stamp`; returns what was written."""
        marker = {**(info or {}), "stamp": uuid.uuid4().hex[:16]}
        storage.write_text(self.success(stage_dir), json.dumps(marker), self.options)
        return marker

    def marker(self, stage_dir: str) -> dict | None:
        """The `_SUCCESS` JSON of a complete stage, else None."""
        uri = self.success(stage_dir)
        if not storage.exists(uri, self.options):
            return None
        text = storage.read_text(uri, self.options)
        return json.loads(text) if text.strip() else {}

    def stamp(self, stage_dir: str) -> str | None:
        marker = self.marker(stage_dir)
        return None if marker is None else marker.get("stamp", "")

    # -- IO through the storage module
    def write_table(self, table: pa.Table, uri: str) -> str:
        storage.write_parquet(table, uri, self.options)
        return uri

    def read_table(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        return storage.read_parquet(uri, self.options, columns)

    def write_json(self, uri: str, data: dict) -> str:
        storage.write_text(uri, json.dumps(data, indent=2, sort_keys=False) + "\n", self.options)
        return uri

    def read_json(self, uri: str) -> dict:
        return json.loads(storage.read_text(uri, self.options))

    def exists(self, uri: str) -> bool:
        return storage.exists(uri, self.options)

    def save_torch(self, obj, uri: str) -> None:
        import torch
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        storage.write_bytes(uri, buffer.getvalue(), self.options)

    def load_torch(self, uri: str, map_location="cpu"):
        import torch
        return torch.load(io.BytesIO(storage.read_bytes(uri, self.options)),
                          map_location=map_location, weights_only=False)
