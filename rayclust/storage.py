"""Storage: every read and write in rayclust goes through this module.

Paths are plain strings: local paths (``/data/out``, ``out/run1``, ``file:///data``)
or S3 URIs (``s3://bucket/key``). :func:`filesystem` resolves a string to a
``(pyarrow.fs.FileSystem, path)`` pair, and every helper here (bytes, text,
listing, Parquet) is written against that pair, so local and S3 behave the same.

Design:

* One explicit filesystem per :class:`StorageOptions`. Endpoint, region and
  anonymous access are spelled out in a small frozen dataclass that is passed to
  every reader and writer (and shipped to Ray workers, which is why it holds
  plain values only). Filesystems are built from it explicitly instead of from
  ambient settings such as ``AWS_ENDPOINT_URL``, which pyarrow does not honour
  in every version, and are cached per options object.
* Credentials are never part of the options. They come from the standard AWS
  chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE`` and ``~/.aws`` files, web identity, instance metadata), which
  pyarrow's S3 client consults when no keys are passed. So options can be
  logged, pickled and put in configs safely, and error messages are scrubbed of
  any secret the environment holds.
* pyarrow's native S3 filesystem is the default rather than s3fs: Parquet and
  Ray Data read through it without an fsspec wrapper, it does multipart
  uploads in C++ without holding the GIL, and it pickles cleanly to workers.
  :func:`fsspec_filesystem` gives an s3fs equivalent for tools that need fsspec.
* Writes are atomic: local files are written under a hidden temp name in the
  target directory and then ``os.replace``-d; S3 objects only become visible
  when the upload completes. Temp names start with ``.`` so listings skip them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "StorageError",
    "StorageOptions",
    "basename",
    "delete",
    "exists",
    "filesystem",
    "fsspec_filesystem",
    "is_dir",
    "is_remote",
    "join",
    "list_files",
    "makedirs",
    "parent",
    "parquet_files",
    "read_bytes",
    "read_parquet",
    "read_text",
    "size",
    "write_bytes",
    "write_parquet",
    "write_text",
]

_S3 = "s3://"
_ANON_USER = "anonymous"
# Environment variables whose values must never appear in a message.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# pyarrow reports these as plain OSError; they mean "nothing there".
_NOT_FOUND_MARKERS = ("NO_SUCH_BUCKET", "NO_SUCH_KEY", "RESOURCE_NOT_FOUND", "Path does not exist")


class StorageError(OSError):
    """An S3 request failed for a reason other than a missing path.

    Typical causes: bad or missing credentials, access denied, unreachable or
    wrong endpoint. The message names the URI and endpoint, never secrets.
    A subclass of OSError so generic I/O error handling still catches it.
    """


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Credentials are deliberately not fields."""

    endpoint: str | None = None
    """S3 endpoint URL, e.g. ``"http://127.0.0.1:9000"`` for MinIO or a test
    server. The scheme is taken from it (``https`` when omitted). ``None``
    means AWS itself."""

    region: str | None = None
    """AWS region such as ``"us-east-1"``. ``None`` lets the AWS SDK decide
    (``AWS_DEFAULT_REGION``, profile, instance metadata)."""

    anonymous: bool = False
    """Send unsigned requests (public buckets) instead of using the AWS
    credential chain. Also selected per URI with ``s3://anonymous@bucket/key``."""


# --------------------------------------------------------------------------- #
# URI helpers (pure string operations, no I/O)
# --------------------------------------------------------------------------- #


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs, False for local paths and ``file://`` URIs."""
    return _scheme(uri) == "s3"


def absolute(uri: str) -> str:
    """s3 URIs unchanged; a local path or ``file://`` URI as an absolute local path."""
    return os.fspath(uri) if is_remote(uri) else _local_path(uri)


def _scheme(uri: str) -> str | None:
    uri = os.fspath(uri)
    if "://" not in uri:
        return None
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in ("s3", "file"):
        raise ValueError(f"unsupported storage scheme {scheme!r} in {uri!r}; use s3:// or a local path")
    return scheme


def _split_s3(uri: str) -> tuple[str, str, bool]:
    """``s3://[anonymous@]bucket/key`` -> (URI prefix to rebuild with, "bucket/key", anonymous)."""
    rest = uri[len(_S3) :]
    authority, _, key = rest.partition("/")
    anonymous = False
    if "@" in authority:
        user, _, bucket = authority.rpartition("@")
        if user != _ANON_USER:
            # Don't echo the URI: the user part may be an access key.
            raise ValueError(
                "credentials in s3:// URIs are not supported (only 's3://anonymous@bucket/...'); "
                "use the AWS credential chain (environment, profile, instance role)"
            )
        anonymous = True
    else:
        bucket = authority
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    prefix = f"{_S3}{_ANON_USER}@" if anonymous else _S3
    path = f"{bucket}/{key.strip('/')}".rstrip("/")
    return prefix, path, anonymous


def _local_path(uri: str) -> str:
    uri = os.fspath(uri)
    if _scheme(uri) == "file":
        uri = urlsplit(uri).path
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a local path or s3 URI, without doubled slashes.

    Leading/trailing slashes on ``parts`` are ignored (``join("s3://b/x/", "/y")``
    is ``"s3://b/x/y"``), unlike ``os.path.join`` which would restart at ``/y``.
    """
    uri = os.fspath(uri)
    segments = [s for p in parts for s in [os.fspath(p).strip("/")] if s]
    if not segments:
        return uri
    if is_remote(uri):
        base = uri.rstrip("/")
    else:
        base = uri.rstrip("/") or ("/" if uri.startswith("/") else "")
    if not base:
        return "/".join(segments)
    return base + ("" if base.endswith("/") else "/") + "/".join(segments)


def parent(uri: str) -> str:
    """The containing directory / prefix. A bucket root is its own parent."""
    uri = os.fspath(uri)
    if is_remote(uri):
        prefix, path, _ = _split_s3(uri)
        head = path.rpartition("/")[0] if "/" in path else path
        return prefix + head
    trimmed = uri.rstrip("/") or uri
    return os.path.dirname(trimmed) or "."


def basename(uri: str) -> str:
    """The last path segment (trailing slashes ignored); for ``s3://b`` it is ``b``."""
    uri = os.fspath(uri)
    if is_remote(uri):
        return _split_s3(uri)[1].rpartition("/")[2]
    return os.path.basename(uri.rstrip("/"))


# --------------------------------------------------------------------------- #
# Filesystems
# --------------------------------------------------------------------------- #


def _endpoint_parts(endpoint: str) -> tuple[str, str]:
    """``"http://host:9000"`` -> ("http", "host:9000"); no scheme means https."""
    url = endpoint if "://" in endpoint else f"https://{endpoint}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"invalid S3 endpoint {endpoint!r}; expected e.g. 'http://127.0.0.1:9000'")
    if parts.path.strip("/"):
        raise ValueError(f"S3 endpoint {endpoint!r} must not contain a path")
    return parts.scheme, parts.netloc


@functools.lru_cache(maxsize=32)
def _s3_filesystem(options: StorageOptions) -> pafs.S3FileSystem:
    kwargs: dict = {"region": options.region, "anonymous": options.anonymous}
    if options.endpoint:
        scheme, host = _endpoint_parts(options.endpoint)
        kwargs.update(endpoint_override=host, scheme=scheme)
    # No keys passed: pyarrow then walks the standard AWS credential chain.
    return pafs.S3FileSystem(**kwargs)


_LOCAL = pafs.LocalFileSystem()


def _resolve(uri: str, options: StorageOptions | None) -> tuple[pafs.FileSystem, str, StorageOptions, str]:
    """-> (filesystem, path, effective options, prefix that turns a path back into a URI)."""
    uri = os.fspath(uri)
    options = options or StorageOptions()
    if is_remote(uri):
        prefix, path, anonymous = _split_s3(uri)
        if anonymous and not options.anonymous:
            options = dataclasses.replace(options, anonymous=True)
        return _s3_filesystem(options), path, options, prefix
    return _LOCAL, _local_path(uri), options, ""


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Resolve ``uri`` to ``(pyarrow filesystem, path)``.

    For S3 the path is ``"bucket/key"``; locally it is an absolute path.
    S3 filesystems are cached per (frozen) options, so repeated calls are cheap.
    """
    fs, path, _, _ = _resolve(uri, options)
    return fs, path


@functools.lru_cache(maxsize=32)
def _s3fs_filesystem(options: StorageOptions):
    import s3fs  # fsspec is only needed by the few tools that ask for it

    client_kwargs: dict = {}
    if options.region:
        client_kwargs["region_name"] = options.region
    endpoint_url = None
    if options.endpoint:
        scheme, host = _endpoint_parts(options.endpoint)
        endpoint_url = f"{scheme}://{host}"
    return s3fs.S3FileSystem(anon=options.anonymous, endpoint_url=endpoint_url, client_kwargs=client_kwargs)


def fsspec_filesystem(uri: str, options: StorageOptions | None = None):
    """An fsspec filesystem for ``uri``: s3fs for S3 (same endpoint/region/anonymous
    as :func:`filesystem`), fsspec's local filesystem otherwise."""
    if is_remote(uri):
        _, _, opts, _ = _resolve(uri, options)
        return _s3fs_filesystem(opts)
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


# --------------------------------------------------------------------------- #
# Error translation
# --------------------------------------------------------------------------- #


def _scrub(message: str) -> str:
    for var in _SECRET_ENV:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            message = message.replace(secret, "***")
    return message


@contextlib.contextmanager
def _errors(uri: str, options: StorageOptions | None) -> Iterator[None]:
    """Re-raise pyarrow errors as FileNotFoundError / StorageError naming ``uri``.

    ``from None`` keeps the raw pyarrow/AWS text out of tracebacks; what is
    useful from it is copied into our (scrubbed) message instead.
    """
    try:
        yield
    except FileNotFoundError as exc:
        if exc.filename == uri:  # already ours
            raise
        raise FileNotFoundError(2, "no such file or directory", uri) from None
    except (StorageError, IsADirectoryError, NotADirectoryError):
        raise
    except OSError as exc:
        text = str(exc)
        if any(marker in text for marker in _NOT_FOUND_MARKERS):
            raise FileNotFoundError(2, "no such file, directory or bucket", uri) from None
        if not is_remote(uri):
            raise
        endpoint = (options.endpoint if options else None) or "AWS default endpoint"
        raise StorageError(f"S3 request for {uri} (endpoint {endpoint}) failed: {_scrub(text)}") from None


def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


# --------------------------------------------------------------------------- #
# Queries
# --------------------------------------------------------------------------- #


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """True if ``uri`` is an existing file or directory (S3: object or non-empty prefix/bucket)."""
    fs, path, opts, _ = _resolve(uri, options)
    with _errors(uri, opts):
        return _info(fs, path).type != pafs.FileType.NotFound


def is_dir(uri: str, options: StorageOptions | None = None) -> bool:
    """True if ``uri`` is a directory (S3: a bucket or a prefix with objects under it)."""
    fs, path, opts, _ = _resolve(uri, options)
    with _errors(uri, opts):
        return _info(fs, path).type == pafs.FileType.Directory


def size(uri: str, options: StorageOptions | None = None) -> int:
    """Size of the file at ``uri`` in bytes."""
    fs, path, opts, _ = _resolve(uri, options)
    with _errors(uri, opts):
        info = _info(fs, path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(2, "no such file", uri)
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(21, "is a directory", uri)
    return int(info.size)


def makedirs(uri: str, options: StorageOptions | None = None) -> None:
    """Create a local directory and its parents; a no-op on S3 (prefixes are implicit)."""
    if is_remote(uri):
        return
    os.makedirs(_local_path(uri), exist_ok=True)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _normalise_extensions(extensions: Iterable[str] | None) -> tuple[str, ...] | None:
    if extensions is None:
        return None
    if isinstance(extensions, str):  # a lone ".jpg" would otherwise iterate per character
        extensions = [extensions]
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def list_files(
    uri: str,
    options: StorageOptions | None = None,
    extensions: Iterable[str] | None = None,
    recursive: bool = True,
) -> list[str]:
    """Files under directory/prefix ``uri``, as sorted full URIs in the input's style.

    S3 gives ``s3://bucket/...`` (``s3://anonymous@bucket/...`` if asked that way),
    local gives absolute paths. ``extensions`` (e.g. ``[".jpg", "png"]``) matches
    case-insensitively. Anything whose name, or any directory below ``uri``,
    starts with ``.`` is skipped (hidden files, our own temp files). If ``uri``
    is a single file, it is returned alone (when it matches the filter).
    """
    fs, path, opts, prefix = _resolve(uri, options)
    exts = _normalise_extensions(extensions)

    def keep(name: str) -> bool:
        return exts is None or name.lower().endswith(exts)

    with _errors(uri, opts):
        root = _info(fs, path)
        if root.type == pafs.FileType.NotFound:
            raise FileNotFoundError(2, "no such directory", uri)
        if root.type == pafs.FileType.File:
            return [prefix + path] if keep(root.base_name) else []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))

    out = []
    base = path.rstrip("/") + "/"
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(base) :] if info.path.startswith(base) else info.base_name
        if any(_is_hidden(part) for part in relative.split("/")):
            continue
        if keep(info.base_name):
            out.append(prefix + info.path)
    return sorted(out)


# --------------------------------------------------------------------------- #
# Bytes and text
# --------------------------------------------------------------------------- #


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """The whole content of the file at ``uri``."""
    fs, path, opts, _ = _resolve(uri, options)
    with _errors(uri, opts):
        with fs.open_input_stream(path) as f:
            return f.read()


def read_text(uri: str, options: StorageOptions | None = None, encoding: str = "utf-8") -> str:
    """The file at ``uri`` decoded as text."""
    return read_bytes(uri, options).decode(encoding)


@contextlib.contextmanager
def _local_temp(final_path: str) -> Iterator[str]:
    """Yield a hidden temp path next to ``final_path``; on success rename it into place.

    Same directory so ``os.replace`` is an atomic rename on one filesystem;
    readers see either the old file or the complete new one, never a partial one.
    """
    directory, name = os.path.split(final_path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Atomically write ``data`` to ``uri``, creating local parent directories."""
    fs, path, opts, _ = _resolve(uri, options)
    if not is_remote(uri):
        with _local_temp(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return
    # An S3 object only becomes visible once its upload completes: atomic as is.
    with _errors(uri, opts):
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_text(uri: str, text: str, options: StorageOptions | None = None, encoding: str = "utf-8") -> None:
    """Atomically write ``text`` to ``uri``."""
    write_bytes(uri, text.encode(encoding), options)


def delete(uri: str, options: StorageOptions | None = None, recursive: bool = False) -> None:
    """Delete a file, or a directory/prefix with ``recursive=True``. Missing is not an error."""
    fs, path, opts, _ = _resolve(uri, options)
    with _errors(uri, opts):
        info = _info(fs, path)
        if info.type == pafs.FileType.NotFound:
            return
        if info.type == pafs.FileType.Directory:
            if not recursive:
                raise IsADirectoryError(21, "is a directory (pass recursive=True)", uri)
            fs.delete_dir(path)
            return
        try:
            fs.delete_file(path)
        except FileNotFoundError:  # deleted concurrently: fine
            pass


# --------------------------------------------------------------------------- #
# Parquet
# --------------------------------------------------------------------------- #


def _is_parquet_part(name: str) -> bool:
    # "_SUCCESS", "_metadata", ".part.parquet.tmp", ".crc" etc. are not data.
    return name.lower().endswith(".parquet") and not name.startswith((".", "_"))


def parquet_files(dir_uri: str, options: StorageOptions | None = None) -> list[str]:
    """The ``*.parquet`` files directly under ``dir_uri`` (sorted by name, as full URIs),
    ignoring names starting with ``.`` or ``_``. Raises FileNotFoundError if the
    directory does not exist."""
    fs, path, opts, prefix = _resolve(dir_uri, options)
    return [prefix + p for p in _parquet_parts(fs, path, dir_uri, opts)]


def _parquet_parts(fs: pafs.FileSystem, path: str, uri: str, options: StorageOptions) -> list[str]:
    with _errors(uri, options):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    parts = [i for i in infos if i.type == pafs.FileType.File and _is_parquet_part(i.base_name)]
    return [i.path for i in sorted(parts, key=lambda i: i.base_name)]


def read_parquet(
    uri: str, options: StorageOptions | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Read a Parquet file, or all parts directly under a directory/prefix (in name order).

    Raises FileNotFoundError if ``uri`` does not exist or a directory holds no parts.
    """
    fs, path, opts, _ = _resolve(uri, options)
    with _errors(uri, opts):
        info = _info(fs, path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(2, "no such Parquet file or directory", uri)
        if info.type == pafs.FileType.File:
            return pq.read_table(path, filesystem=fs, columns=columns)
    parts = _parquet_parts(fs, path, uri, opts)
    if not parts:
        raise FileNotFoundError(2, "directory contains no *.parquet files", uri)
    with _errors(uri, opts):
        tables = [pq.read_table(p, filesystem=fs, columns=columns) for p in parts]
    # "default" promotion tolerates parts where a column is all-null (type null).
    return pa.concat_tables(tables, promote_options="default")


def write_parquet(table: pa.Table, uri: str, options: StorageOptions | None = None) -> None:
    """Atomically write ``table`` as a single Parquet file at ``uri``.

    The Arrow schema is stored in the file, so types such as
    ``fixed_size_list<float32>[n]`` come back unchanged from :func:`read_parquet`.
    """
    fs, path, opts, _ = _resolve(uri, options)
    if not is_remote(uri):
        with _local_temp(path) as tmp:
            pq.write_table(table, tmp)
        return
    with _errors(uri, opts):
        pq.write_table(table, path, filesystem=fs)


def remove_stale_temporaries(dir_uri: str, options: StorageOptions | None = None) -> int:
    """Delete hidden `.<name>.*.tmp` files a killed writer left in a local directory; returns
    how many. (S3 writes are single PUTs and leave nothing behind.) Readers ignore such files
    anyway; this keeps a resumed run directory clean."""
    if is_remote(dir_uri):
        return 0
    fs, path = filesystem(dir_uri, options)
    if not os.path.isdir(path):
        return 0
    stale = [n for n in os.listdir(path) if n.startswith(".") and n.endswith(".tmp")]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    return len(stale)
