"""Listing inputs into the sharded manifest: folders, CSV/Parquet manifests, labels, duplicates."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayclust import config as cfg
from rayclust import storage
from rayclust.pipeline.manifest import build_manifest, list_inputs
from rayclust.pipeline.run_directory import RunDirectory, stable_id


def _config(path, *extra):
    return cfg.load(None, [f"input.path={path}", *extra])


def test_csv_manifest_with_labels_and_duplicates(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("uri,label,other\n/b.jpg,cat,1\n/a.jpg,dog,2\n/b.jpg,cat,3\n/c.jpg,7,4\n")
    table, errors = list_inputs(_config(csv, "input.labels=manifest"))
    assert table.column_names == ["id", "uri", "label"]
    assert table["uri"].to_pylist() == ["/a.jpg", "/b.jpg", "/c.jpg"]
    assert table["label"].to_pylist() == ["dog", "cat", "7"]
    assert table["id"].to_pylist() == [stable_id(u) for u in ["/a.jpg", "/b.jpg", "/c.jpg"]]
    assert errors == [{"uri": "/b.jpg", "stage": "manifest", "error": "duplicate uri (kept once)"}]


def test_parquet_manifest_and_missing_columns(tmp_path):
    pq.write_table(pa.table({"uri": ["s3://b/x.png", "s3://b/y.png"]}), tmp_path / "m.parquet")
    table, errors = list_inputs(_config(tmp_path / "m.parquet"))
    assert table.num_rows == 2 and errors == [] and "label" not in table.column_names
    with pytest.raises(cfg.ConfigError, match="no `label` column"):
        list_inputs(_config(tmp_path / "m.parquet", "input.labels=manifest"))
    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(cfg.ConfigError, match="no `uri` column"):
        list_inputs(_config(tmp_path / "bad.parquet"))


def test_folder_labels_sharding_and_no_relisting(tmp_path):
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "img" / cls)
        for i in range(5):
            (tmp_path / "img" / cls / f"{i}.jpg").write_bytes(b"x")
    (tmp_path / "img" / "a" / "notes.txt").write_text("skip me")
    config = _config(tmp_path / "img", "input.labels=from_folder", "input.rows_per_shard=4")
    run = RunDirectory(str(tmp_path / "run"))
    parts = build_manifest(config, run)
    assert [storage.basename(p) for p in parts] == ["part-00000.parquet", "part-00001.parquet",
                                                    "part-00002.parquet"]
    table = storage.read_parquet(run.manifest)
    assert table.num_rows == 10 and set(table["label"].to_pylist()) == {"a", "b"}
    (tmp_path / "img" / "a" / "new.jpg").write_bytes(b"x")  # a re-run does not list again
    assert build_manifest(config, run) == parts
    assert storage.read_parquet(run.manifest).num_rows == 10


def test_input_mistakes(tmp_path):
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        list_inputs(_config(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(cfg.ConfigError, match="no images found"):
        build_manifest(_config(tmp_path / "empty"), RunDirectory(str(tmp_path / "run")))
    with pytest.raises(cfg.ConfigError, match="labels is `manifest`"):
        list_inputs(_config(tmp_path / "empty", "input.labels=manifest"))


def test_run_directory_pins_relative_paths(tmp_path, monkeypatch):
    """Ray workers run in other working directories: a relative run directory becomes absolute."""
    monkeypatch.chdir(tmp_path)
    run = RunDirectory("runs/demo")
    assert run.root == str(tmp_path / "runs" / "demo")
    assert run.embeddings == str(tmp_path / "runs" / "demo" / "embeddings")
    assert RunDirectory("s3://bucket/runs/demo").root == "s3://bucket/runs/demo"


def test_local_cluster_listens_on_loopback_only(ray_cluster):
    """Servers the tests start stay on 127.0.0.1 (Ray otherwise swaps loopback for the
    machine's network address; ray_runtime.local_cluster_on_loopback)."""
    import ray

    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")

    @ray.remote
    def node_address():
        return ray.util.get_node_ip_address()

    assert ray.get(node_address.remote()) == "127.0.0.1"
