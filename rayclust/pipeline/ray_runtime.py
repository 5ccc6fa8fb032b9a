"""Joining or starting the Ray cluster, and the Ray Data settings rayclust relies on."""

from __future__ import annotations

import logging
import os

from rayclust.config import Config


def ensure_ray(config: Config) -> None:
    """Join `ray.address` / RAY_ADDRESS, or start a local cluster; no-op when already connected.

    A local cluster inherits this process's environment, so S3 credentials from the standard
    chain reach the workers without ever being written anywhere.
    """
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING,
              "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        _local_workers_use_this_interpreter()
        # at least 4 logical CPUs: 2 training workers plus decode tasks fit on a small machine
        ray.init(num_cpus=config.ray.num_cpus or max(os.cpu_count() or 1, 4),
                 runtime_env={"worker_process_setup_hook":
                              "rayclust.pipeline.ray_runtime.quiet_ray_internals"}, **kwargs)


def quiet_ray_internals() -> None:
    """Worker setup hook of a local cluster: Ray Train's placement-group cleaner polls the State
    API, which a cluster without the dashboard does not serve, and warns every few seconds."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)


def _local_workers_use_this_interpreter() -> None:
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


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
