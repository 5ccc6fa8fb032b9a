"""Ray Train plumbing shared by stage 1 and stage 2 (RAY.md 2.1-2.2).

Each stage runs one `TorchTrainer` whose `RunConfig` lives in the run directory:
`storage_path=<run>/<stage>` and `name=train-<fingerprint of the settings>`. Running the same
command again therefore finds Ray Train's checkpoint-manager snapshot and resumes from the newest
checkpoint; changed settings get a fresh name and train from scratch. A dead worker restarts the
worker group from the newest checkpoint (`FailureConfig.max_failures`).

Checkpoints hold one `state.pt` written by rank 0; every rank calls `report` (it is a barrier).
"""

from __future__ import annotations

import glob
import io
import logging
import os
import signal
import tempfile
import time
from typing import Any, Callable

from rayclust import storage
from rayclust.config import Config, ConfigError
from rayclust.pipeline.ray_runtime import cluster_cpus, cluster_gpus
from rayclust.pipeline.run_directory import RunDirectory

STATE_FILE = "state.pt"
# Testing hook (see `fault_point`): "<stage>:<epoch>:<rank>", read by the driver and handed to
# the workers in their loop config (a running cluster's workers do not see the driver's env).
FAULT_ENV = "RAYCLUST_FAULT_KILL_WORKER"


def worker_count(config: Config, minimum: int = 0) -> int:
    """Workers for a stage: `train.workers`, else one per GPU, else 0 (in the driver).

    Counting GPUs joins or starts the Ray cluster first (ray_runtime.cluster_resources).
    """
    if config.train.workers is not None:
        return max(config.train.workers, minimum)
    return max(int(cluster_gpus(config)), minimum)


def uses_gpu(config: Config) -> bool:
    if config.train.use_gpu is not None:
        if config.train.use_gpu and not cluster_gpus(config):
            raise ConfigError("train.use_gpu is true but the Ray cluster has no GPU")
        return config.train.use_gpu
    return cluster_gpus(config) > 0


def check_room(config: Config, workers: int, decode: bool) -> None:
    """Fail with a message instead of hanging when the workers would leave no CPU for the Ray
    Data decode tasks that feed them (Ray would wait for a CPU forever)."""
    cpus = cluster_cpus(config)
    need = workers * config.train.cpus_per_worker + (config.embed.decode_cpus if decode else 0)
    if need > cpus:
        raise ConfigError(
            f"{workers} training worker(s) x {config.train.cpus_per_worker} CPU"
            + (f" + {config.embed.decode_cpus} CPU for decode tasks" if decode else "")
            + f" need {need:g} CPUs but the Ray cluster has {cpus:g}: lower train.workers or "
              "train.cpus_per_worker, or give a local cluster more logical CPUs (ray.num_cpus)")


def quiet_worker() -> None:
    """First call in each training worker: rank 0 logs rayclust's own epoch lines, so Ray Data's
    per-worker progress bars, Ray Train's per-report INFO lines (logged under a file-path logger
    name that `LoggingConfig` does not filter) and open_clip's INFO chatter are turned off."""
    import ray
    from ray.data import DataContext

    if ray.get_runtime_context().get_actor_id() is None:
        return  # Train's local mode runs the loop in the driver: leave its settings alone
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("rayclust").setLevel(logging.INFO)
    try:
        from ray.train.v2._internal.execution import context
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # a Ray version with another layout: only noisier
        pass


def fit(loop: Callable[[dict], Any], loop_config: dict, config: Config, run: RunDirectory,
        stage_dir: str, name: str, workers: int, datasets: dict | None = None):
    """Run `loop` on `workers` Ray Train workers with checkpoints under `stage_dir/name`."""
    from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig,
                           ScalingConfig)
    from ray.train.torch import TorchTrainer

    check_room(config, workers, decode=bool(datasets))
    use_gpu = uses_gpu(config)
    scaling = ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                            resources_per_worker={"CPU": config.train.cpus_per_worker,
                                                  **({"GPU": 1} if use_gpu else {})})
    fs, path = storage.filesystem(stage_dir, run.options)
    if not storage.is_remote(stage_dir):
        os.makedirs(path, exist_ok=True)
    run_config = RunConfig(
        name=name, storage_path=path,
        storage_filesystem=fs if storage.is_remote(stage_dir) else None,
        failure_config=FailureConfig(max_failures=config.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
        # rayclust logs each epoch itself; Ray Train's INFO lines repeat every report per rank
        logging_config=LoggingConfig(log_level="WARNING"))
    loop_config = {**loop_config, "fault": os.environ.get(FAULT_ENV)}
    trainer = TorchTrainer(loop, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, datasets=datasets)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


# -- inside a worker -------------------------------------------------------------------------

def rank_and_size() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def device():
    import ray.train.torch

    return ray.train.torch.get_device()


def restored_state(map_location="cpu") -> dict | None:
    """The payload of the newest checkpoint of this stage, or None on a fresh start."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_FILE), "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location=map_location,
                              weights_only=False)


def report(metrics: dict, state: dict | None, checkpoint_name: str | None) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint when `state` is given."""
    import ray.train
    import torch

    rank, _ = rank_and_size()
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=checkpoint_name)


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


def fault_point(fault: str | None, stage_dir: str, epoch: int) -> None:
    """Testing hook, called by each worker at the start of every epoch. With `fault` =
    "<stage>:<epoch>:<rank>" (from RAYCLUST_FAULT_KILL_WORKER, e.g. "stage2:2:1"), that rank
    SIGKILLs itself at the start of that epoch, as a lost node would, but only once the Train
    controller has registered the checkpoint reported just before (`epoch-<epoch>`): the restart
    then resumes from it whatever the machine's speed. A marker file in the stage folder makes it
    fire once per run directory. Local run directories only; a no-op without `fault`."""
    if not fault:
        return
    stage, at_epoch, at_rank = fault.split(":")
    if (os.path.basename(stage_dir.rstrip("/")) != stage or int(at_epoch) != epoch
            or rank_and_size()[0] != int(at_rank)):
        return
    fired = os.path.join(stage_dir, "fault-injected")
    if os.path.exists(fired):
        return
    wanted = f'"epoch-{epoch:04d}"'
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for snapshot in glob.glob(os.path.join(stage_dir, "train-*",
                                               "checkpoint_manager_snapshot.json")):
            with open(snapshot) as f:
                if wanted in f.read():
                    open(fired, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
