"""Shared pytest fixtures for rayclust.

S3: one in-process moto S3 server per test session, bound to 127.0.0.1 on a free
port. Tests reach it only through explicit ``StorageOptions(endpoint=...)``,
exactly like production code reaching MinIO or AWS.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from rayclust.storage import StorageOptions

# Dummy credentials for the session. Set unconditionally (not setdefault) so a
# developer's real AWS keys or profile are never sent, even to a local server.
_S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_S3_CLEARED_ENV = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass
class S3Server:
    """A running moto S3 server. ``options`` is what code under test should use."""

    endpoint: str
    region: str = "us-east-1"
    _client: object = field(default=None, repr=False)

    @property
    def options(self) -> StorageOptions:
        return StorageOptions(endpoint=self.endpoint, region=self.region)

    @property
    def client(self):
        """A boto3 S3 client for this server, for test setup and inspection."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id=_S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=_S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
            )
        return self._client

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return it."""
        self.client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the whole session (stopped at the end)."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in (*_S3_TEST_ENV, *_S3_CLEARED_ENV)}
    os.environ.update(_S3_TEST_ENV)
    for key in _S3_CLEARED_ENV:
        os.environ.pop(key, None)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(endpoint=f"http://{host}:{port}")
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty, uniquely named bucket on ``s3_server``; returns its name."""
    return s3_server.make_bucket(f"test-{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the session (started after the S3 test credentials are in the
    environment, so its workers inherit them)."""
    import ray

    from rayclust.pipeline.ray_runtime import (local_cluster_on_loopback,
                                               local_cluster_without_preemption_watch,
                                               local_workers_use_this_interpreter)

    if not ray.is_initialized():
        local_workers_use_this_interpreter()
        local_cluster_on_loopback()
        local_cluster_without_preemption_watch()
        # a cluster of its own ("local": never one a `ray start` left behind), on loopback only
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4,
                 include_dashboard=False, configure_logging=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _uses_the_session_cluster(path: str) -> bool:
    return any(part in path for part in ("/tests/pipeline/", "test_cli.py"))


def pytest_collection_modifyitems(items):
    """Tests that get the shared Ray cluster are marked `ray`, so `-m "not ray"` is the fast lane
    (no cluster at all)."""
    for item in items:
        if _uses_the_session_cluster(str(item.fspath)):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _ray_for_pipeline_tests(request):
    """Pipeline and CLI tests run stages on Ray: give them the shared cluster."""
    if _uses_the_session_cluster(str(request.node.fspath)):
        request.getfixturevalue("ray_cluster")
