"""Joining or starting the Ray cluster, and the Ray Data settings rayclust relies on."""

from __future__ import annotations

import logging
import os

from rayclust.config import Config


# Whether ensure_ray connected this process to Ray (started a local cluster or joined one).
# A caller that had connected already (a test session, a Ray job's driver) keeps its connection.
_CONNECTED_HERE = False


def ensure_ray(config: Config) -> None:
    """Join `ray.address` / RAY_ADDRESS, or start a local cluster; no-op when already connected.

    A local cluster inherits this process's environment, so S3 credentials from the standard
    chain reach the workers without ever being written anywhere. It is started with
    `address="local"`: a bare `ray.init()` would instead join whatever cluster a `ray start` on
    this machine last recorded in /tmp/ray, which the config (`ray.address: null`) promises not to
    do. Its processes listen on 127.0.0.1 only: nothing outside this machine needs to reach them.
    """
    import ray

    global _CONNECTED_HERE
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING,
              "configure_logging": False}
    _CONNECTED_HERE = True
    if address:
        ray.init(address=address, **kwargs)
    else:
        local_workers_use_this_interpreter()
        local_cluster_on_loopback()
        local_cluster_without_preemption_watch()
        # at least 4 logical CPUs: 2 training workers plus decode tasks fit on a small machine
        ray.init(address="local", _node_ip_address="127.0.0.1",
                 num_cpus=config.ray.num_cpus or max(os.cpu_count() or 1, 4),
                 runtime_env={"worker_process_setup_hook":
                              "rayclust.pipeline.ray_runtime.quiet_ray_internals"}, **kwargs)


def shutdown_if_connected_here() -> None:
    """Disconnect from Ray if `ensure_ray` connected, stopping the local cluster it started.

    The CLI calls this in a `finally`, so the cluster is stopped while the command still runs,
    after a user error too, instead of by Ray's atexit hook during interpreter shutdown (which
    runs only after Python has joined any non-daemon thread still alive). A joined cluster is
    only disconnected from, never stopped, and a connection made before the command (a test
    session calling `cli.main`) is left alone.
    """
    global _CONNECTED_HERE
    if not _CONNECTED_HERE:
        return
    _CONNECTED_HERE = False
    import ray

    if ray.is_initialized():
        ray.shutdown()


def local_cluster_on_loopback() -> None:
    """Make a local cluster listen on 127.0.0.1 only.

    `ray.init(_node_ip_address="127.0.0.1")` alone is not enough: Ray replaces a loopback
    address by the machine's routable one (services.resolve_ip_for_localhost), so GCS, raylet
    and workers listened on the network address. Ray's single-machine mode (the default on macOS
    and Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) resolves the node to loopback instead; the
    variable is also inherited by the cluster's processes. A local cluster serves this machine
    only, so nothing is lost."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants  # read when ray.init resolves the node address

    ray_constants.ENABLE_RAY_CLUSTER = False


def local_cluster_without_preemption_watch() -> None:
    """Ray Train 2.60 starts a PreemptionWatcher actor with every worker group, to react when a
    node is drained (spot instances, autoscaler scale-down). A local cluster is one machine that
    nobody drains; the watcher only cost a fresh process and ~6 s before each group (and each
    restart) could train on a 2-core machine. Read by the Train controller, which a local
    cluster's processes start with this environment; a joined cluster keeps Ray's default."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def quiet_ray_internals() -> None:
    """Worker setup hook of a local cluster: Ray Train's placement-group cleaner polls the State
    API, which a cluster without the dashboard does not serve, and warns every few seconds."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)


def local_workers_use_this_interpreter() -> None:
    """Under `uv run`, Ray by default ships the current directory as a `working_dir` package
    (the whole project, .venv included: gigabytes, hashed at every start) and starts every
    worker through `uv run`. A local cluster's workers already share this interpreter and its
    installed rayclust, so rayclust turns that off unless RAY_ENABLE_UV_RUN_RUNTIME_ENV is set."""
    if "RAY_ENABLE_UV_RUN_RUNTIME_ENV" in os.environ:
        return
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    from ray._private import ray_constants  # read when ray.init builds the runtime env

    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False


def configure_data(config: Config) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = config.progress
    # Rows reach the driver in manifest order, so shards complete one after another and the
    # driver buffers at most about one shard.
    ctx.execution_options.preserve_order = True
    # Ray Data 2.60's default Parquet reader (datasource V2) starts up to 32 FooterReader actors
    # per read_parquet, each a fresh Python process: 7 of them, 17 s of CPU, for a one-file
    # manifest on a 2-core machine, at every embed. The V1 reader runs one read task per file on
    # the job's pooled workers. rayclust's manifest shards are small files it wrote itself, so
    # V2's footer statistics buy nothing here.
    ctx.use_datasource_v2 = False


def cluster_resources(config: Config | None) -> dict[str, float]:
    """The Ray cluster's total resources, joining or starting the cluster first.

    The one place where rayclust asks Ray about the cluster (worker counts, GPU use, the
    CPU-room check, encoder pools), so no path can query a cluster the command has not started:
    `cluster-embeddings` used to reach `ray.cluster_resources()` before any `ray.init`. Without a
    config the caller must have connected already.
    """
    import ray

    if config is not None:
        ensure_ray(config)
    elif not ray.is_initialized():
        raise RuntimeError("cluster_resources(None) before ensure_ray: pass the config")
    return dict(ray.cluster_resources())


def cluster_gpus(config: Config | None = None) -> float:
    return float(cluster_resources(config).get("GPU", 0.0))


def cluster_cpus(config: Config | None = None) -> float:
    return float(cluster_resources(config).get("CPU", 0.0))
