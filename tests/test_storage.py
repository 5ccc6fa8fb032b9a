"""Behaviour of rayclust.storage on the local filesystem and on S3 (moto server)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rayclust import storage
from rayclust.storage import StorageError, StorageOptions

# --------------------------------------------------------------------------- #
# Pure URI helpers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "uri, parts, expected",
    [
        ("s3://b", ("a", "c.txt"), "s3://b/a/c.txt"),
        ("s3://b/", ("a/",), "s3://b/a"),
        ("s3://b/x/", ("/y/", "/z"), "s3://b/x/y/z"),
        ("s3://b/x", ("", "y"), "s3://b/x/y"),
        ("s3://b/x", (), "s3://b/x"),
        ("/data/out/", ("/emb", "part.parquet"), "/data/out/emb/part.parquet"),
        ("/", ("a",), "/a"),
        ("rel", ("a", "b"), "rel/a/b"),
        ("", ("a",), "a"),
    ],
)
def test_join(uri, parts, expected):
    assert storage.join(uri, *parts) == expected
    assert "//" not in expected.replace("s3://", "")


@pytest.mark.parametrize(
    "uri, base, par",
    [
        ("s3://b/a/c.txt", "c.txt", "s3://b/a"),
        ("s3://b/a/", "a", "s3://b"),
        ("s3://b", "b", "s3://b"),
        ("s3://anonymous@b/k/f.jpg", "f.jpg", "s3://anonymous@b/k"),
        ("/x/y/z.bin", "z.bin", "/x/y"),
        ("/x/y/", "y", "/x"),
    ],
)
def test_basename_and_parent(uri, base, par):
    assert storage.basename(uri) == base
    assert storage.parent(uri) == par


def test_is_remote():
    assert storage.is_remote("s3://b/k")
    assert storage.is_remote("S3://b/k")
    assert not storage.is_remote("/tmp/x")
    assert not storage.is_remote("file:///tmp/x")
    assert not storage.is_remote("relative/path")
    with pytest.raises(ValueError, match="unsupported"):
        storage.is_remote("gs://b/k")


def test_anonymous_uri_parsing():
    opts = StorageOptions(endpoint="http://127.0.0.1:9", region="us-east-1")
    fs, path = storage.filesystem("s3://anonymous@bkt/some/key.parquet", opts)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bkt/some/key.parquet"
    # Same as asking for anonymous in the options: one cached filesystem.
    fs2, _ = storage.filesystem("s3://bkt/x", StorageOptions(endpoint=opts.endpoint, region="us-east-1", anonymous=True))
    assert fs is fs2
    assert storage.filesystem("s3://bkt/x", opts)[0] is not fs


def test_credentials_in_uri_are_rejected_without_echo():
    with pytest.raises(ValueError) as info:
        storage.filesystem("s3://AKIDSECRETKEY:hunter22@bkt/k")
    assert "hunter22" not in str(info.value)
    assert "AKIDSECRETKEY" not in str(info.value)


def test_filesystem_paths(tmp_path, monkeypatch):
    fs, path = storage.filesystem(str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    assert storage.filesystem("rel/x")[1] == str(tmp_path / "rel" / "x")
    assert storage.filesystem(f"file://{tmp_path}/y")[1] == str(tmp_path / "y")
    fs, path = storage.filesystem("s3://bkt/dir/", StorageOptions(endpoint="minio:9000", region="eu-west-1"))
    assert path == "bkt/dir"
    assert fs.region == "eu-west-1"
    # Cached per options object (equal frozen options -> same filesystem).
    assert storage.filesystem("s3://other", StorageOptions(endpoint="minio:9000", region="eu-west-1"))[0] is fs


def test_invalid_endpoint():
    with pytest.raises(ValueError, match="endpoint"):
        storage.filesystem("s3://b/k", StorageOptions(endpoint="ftp://host:1"))


def test_options_repr_and_pickle_have_no_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    opts = StorageOptions(endpoint="http://127.0.0.1:9000", region="us-east-1")
    assert "sekrit" not in repr(opts)
    assert {f for f in opts.__dataclass_fields__} == {"endpoint", "region", "anonymous"}
    assert pickle.loads(pickle.dumps(opts)) == opts


# --------------------------------------------------------------------------- #
# Shared behaviour: run against local tmp dirs and S3 buckets
# --------------------------------------------------------------------------- #


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(root URI, options) for a fresh empty location on either backend."""
    if request.param == "local":
        return str(tmp_path / "root"), None
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root", server.options


def test_bytes_and_text_round_trip(root):
    base, opts = root
    uri = storage.join(base, "nested", "dir", "blob.bin")
    payload = bytes(range(256)) * 10
    storage.write_bytes(uri, payload, opts)
    assert storage.read_bytes(uri, opts) == payload
    assert storage.size(uri, opts) == len(payload)
    assert storage.exists(uri, opts) and not storage.is_dir(uri, opts)
    assert storage.is_dir(storage.parent(uri), opts)

    turi = storage.join(base, "note.txt")
    storage.write_text(turi, "héllo ✓\n", opts)
    assert storage.read_text(turi, opts) == "héllo ✓\n"
    storage.write_text(turi, "overwritten", opts)
    assert storage.read_text(turi, opts) == "overwritten"


def test_missing_file_names_uri(root):
    base, opts = root
    missing = storage.join(base, "nope", "missing.bin")
    for fn in (storage.read_bytes, storage.size, storage.read_parquet, storage.list_files):
        with pytest.raises(FileNotFoundError) as info:
            fn(missing, opts)
        assert missing in str(info.value), fn.__name__
    assert not storage.exists(missing, opts)
    assert not storage.is_dir(missing, opts)
    storage.delete(missing, opts)  # missing is not an error


def test_list_files(root):
    base, opts = root
    for rel in [
        "b.JPG",
        "a.jpg",
        "sub/c.png",
        "sub/deeper/d.jpeg",
        "sub/notes.txt",
        ".hidden.jpg",
        ".cache/e.jpg",
        "sub/.f.png",
    ]:
        storage.write_bytes(storage.join(base, rel), b"x", opts)
    storage.makedirs(storage.join(base, "emptydir"), opts)

    everything = storage.list_files(base, opts)
    assert everything == sorted(everything)
    assert [os.path.relpath(u, base) if not storage.is_remote(u) else u[len(base) + 1 :] for u in everything] == [
        "a.jpg",
        "b.JPG",
        "sub/c.png",
        "sub/deeper/d.jpeg",
        "sub/notes.txt",
    ]

    images = storage.list_files(base, opts, extensions=[".jpg", "PNG", ".jpeg"])
    assert [storage.basename(u) for u in images] == ["a.jpg", "b.JPG", "c.png", "d.jpeg"]

    top = storage.list_files(base, opts, extensions=".jpg", recursive=False)
    assert [storage.basename(u) for u in top] == ["a.jpg", "b.JPG"]

    # A single file lists as itself.
    assert storage.list_files(storage.join(base, "a.jpg"), opts) == [storage.join(base, "a.jpg")]

    if opts is None:
        assert all(os.path.isabs(u) for u in everything)
    else:
        assert all(u.startswith(base + "/") for u in everything)


def test_delete(root):
    base, opts = root
    f = storage.join(base, "d", "f.bin")
    g = storage.join(base, "d", "sub", "g.bin")
    storage.write_bytes(f, b"1", opts)
    storage.write_bytes(g, b"2", opts)
    storage.delete(f, opts)
    assert not storage.exists(f, opts) and storage.exists(g, opts)
    with pytest.raises(IsADirectoryError):
        storage.delete(storage.join(base, "d"), opts)
    storage.delete(storage.join(base, "d"), opts, recursive=True)
    assert not storage.exists(g, opts)
    assert not storage.exists(storage.join(base, "d"), opts)


def _embedding_table(n: int, offset: int = 0) -> pa.Table:
    values = pa.array(np.arange(offset * 4, (offset + n) * 4, dtype=np.float32))
    return pa.table(
        {
            "id": pa.array(range(offset, offset + n), pa.int64()),
            "path": pa.array([f"img_{i}.jpg" for i in range(offset, offset + n)]),
            "embedding": pa.FixedSizeListArray.from_arrays(values, 4),
        }
    )


def test_write_read_parquet_round_trip(root):
    base, opts = root
    table = _embedding_table(10)
    uri = storage.join(base, "emb.parquet")
    storage.write_parquet(table, uri, opts)
    back = storage.read_parquet(uri, opts)
    assert back.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert back.equals(table)
    only = storage.read_parquet(uri, opts, columns=["id"])
    assert only.column_names == ["id"]


def test_read_parquet_directory(root):
    base, opts = root
    d = storage.join(base, "parts")
    # Written out of order: reading must follow name order.
    storage.write_parquet(_embedding_table(3, offset=3), storage.join(d, "part-00001.parquet"), opts)
    storage.write_parquet(_embedding_table(3, offset=0), storage.join(d, "part-00000.parquet"), opts)
    storage.write_parquet(_embedding_table(2, offset=6), storage.join(d, "part-00002.parquet"), opts)
    # Junk a writer or another tool leaves around.
    storage.write_bytes(storage.join(d, "_SUCCESS"), b"", opts)
    storage.write_bytes(storage.join(d, "_metadata.parquet"), b"not parquet", opts)
    storage.write_bytes(storage.join(d, ".part-00003.parquet.tmp"), b"partial", opts)
    storage.write_bytes(storage.join(d, "part-00004.parquet.tmp"), b"partial", opts)
    storage.write_bytes(storage.join(d, ".part-00005.parquet"), b"partial", opts)
    storage.write_parquet(_embedding_table(1, offset=99), storage.join(d, "nested", "x.parquet"), opts)

    files = storage.parquet_files(d, opts)
    assert [storage.basename(f) for f in files] == [f"part-0000{i}.parquet" for i in range(3)]
    assert files[0] == storage.join(d, "part-00000.parquet")

    table = storage.read_parquet(d, opts)
    assert table.column("id").to_pylist() == list(range(8))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert storage.read_parquet(d + "/", opts, columns=["path"]).column_names == ["path"]


def test_read_parquet_empty_directory(root):
    base, opts = root
    d = storage.join(base, "empty")
    storage.write_bytes(storage.join(d, "_SUCCESS"), b"", opts)
    with pytest.raises(FileNotFoundError, match="no \\*.parquet files") as info:
        storage.read_parquet(d, opts)
    assert d in str(info.value)


# --------------------------------------------------------------------------- #
# Local specifics
# --------------------------------------------------------------------------- #


def test_local_atomic_writes_leave_no_temp_files(tmp_path):
    d = tmp_path / "out"
    storage.write_bytes(str(d / "a.bin"), b"abc")
    storage.write_text(str(d / "b.txt"), "text")
    storage.write_parquet(_embedding_table(2), str(d / "c.parquet"))
    storage.write_parquet(_embedding_table(3), str(d / "c.parquet"))  # replace in place
    assert sorted(os.listdir(d)) == ["a.bin", "b.txt", "c.parquet"]
    assert pq.read_table(d / "c.parquet").num_rows == 3


def test_local_failed_write_keeps_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "t.parquet"
    storage.write_parquet(_embedding_table(2), str(target))
    with pytest.raises(Exception):
        storage.write_parquet("not a table", str(target))  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == ["t.parquet"]
    assert storage.read_parquet(str(target)).num_rows == 2


def test_makedirs_local_and_s3_noop(tmp_path):
    storage.makedirs(str(tmp_path / "x" / "y"))
    assert storage.is_dir(str(tmp_path / "x" / "y"))
    storage.makedirs("s3://no-network-needed/prefix")  # no-op, no request


def test_fsspec_filesystem(tmp_path, s3_server, s3_bucket):
    from fsspec.implementations.local import LocalFileSystem

    assert isinstance(storage.fsspec_filesystem(str(tmp_path)), LocalFileSystem)
    storage.write_bytes(f"s3://{s3_bucket}/k/v.bin", b"via-arrow", s3_server.options)
    fs = storage.fsspec_filesystem(f"s3://{s3_bucket}/k", s3_server.options)
    assert type(fs).__name__ == "S3FileSystem" and fs.__module__.startswith("s3fs")
    assert fs.cat_file(f"{s3_bucket}/k/v.bin") == b"via-arrow"


# --------------------------------------------------------------------------- #
# S3 specifics
# --------------------------------------------------------------------------- #


def test_s3_listing_returns_s3_uris(s3_server, s3_bucket):
    opts = s3_server.options
    s3_server.client.put_object(Bucket=s3_bucket, Key="imgs/one.jpg", Body=b"1")
    s3_server.client.put_object(Bucket=s3_bucket, Key="imgs/two/three.jpg", Body=b"3")
    assert storage.list_files(f"s3://{s3_bucket}/imgs", opts) == [
        f"s3://{s3_bucket}/imgs/one.jpg",
        f"s3://{s3_bucket}/imgs/two/three.jpg",
    ]
    # Bucket root works too.
    assert storage.list_files(f"s3://{s3_bucket}", opts, extensions=["jpg"]) == [
        f"s3://{s3_bucket}/imgs/one.jpg",
        f"s3://{s3_bucket}/imgs/two/three.jpg",
    ]


def test_s3_objects_are_visible_to_boto3(s3_server, s3_bucket):
    storage.write_text(f"s3://{s3_bucket}/a/b.txt", "hello", s3_server.options)
    body = s3_server.client.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read()
    assert body == b"hello"
    keys = [o["Key"] for o in s3_server.client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["a/b.txt"]  # no temp or marker objects


def test_s3_missing_bucket_errors_hide_secrets(s3_server):
    opts = s3_server.options
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret == "testing"
    uri = "s3://no-such-bucket-here/k.bin"
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(uri, opts)
    assert uri in str(info.value) and secret not in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        storage.list_files("s3://no-such-bucket-here/prefix", opts)
    assert secret not in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        storage.write_bytes(uri, b"x", opts)
    assert uri in str(info.value) and secret not in str(info.value)


def test_s3_unreachable_endpoint_raises_storage_error(s3_server):
    # Port 1 on loopback: connection refused immediately, nothing leaves the host.
    opts = StorageOptions(endpoint="http://127.0.0.1:1", region="us-east-1")
    with pytest.raises(StorageError) as info:
        storage.exists("s3://bkt/key", opts)
    message = str(info.value)
    assert "s3://bkt/key" in message and "http://127.0.0.1:1" in message
    assert "testing" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_s3_anonymous_uri_reads_public_object(s3_server, s3_bucket):
    s3_server.client.put_object(Bucket=s3_bucket, Key="pub/x.txt", Body=b"public", ACL="public-read")
    uri = f"s3://anonymous@{s3_bucket}/pub/x.txt"
    assert storage.read_bytes(uri, s3_server.options) == b"public"
    assert storage.list_files(f"s3://anonymous@{s3_bucket}/pub", s3_server.options) == [uri]
