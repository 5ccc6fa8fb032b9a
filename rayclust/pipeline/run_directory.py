"""The run directory (ARCHITECTURE.md): one place for every path of a run, local or s3://.

A stage is complete when its `_SUCCESS` marker exists; a re-run skips complete stages and
finishes missing parts of incomplete ones (parts are written atomically under deterministic
names, so nothing is duplicated).
"""

from __future__ import annotations

import hashlib
import io
import json
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

    # -- markers
    def is_complete(self, stage_dir: str) -> bool:
        return storage.exists(storage.join(stage_dir, "_SUCCESS"), self.options)

    def mark_complete(self, stage_dir: str, info: dict | None = None) -> None:
        storage.write_text(storage.join(stage_dir, "_SUCCESS"), json.dumps(info or {}),
                           self.options)

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
