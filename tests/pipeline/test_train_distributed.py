"""Stage 1 and stage 2 on real 2-worker Ray Train (gloo) runs: resume, table sync, worker kill."""

import glob
import json
import os
import shutil
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayclust import storage
from rayclust.method.pseudo_labels import PseudoLabelTable
from rayclust.pipeline.run import cluster_embeddings, run
from rayclust.synthetic import make_vmf_features
from rayclust.tables import embedding_array
from tests.pipeline.conftest import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STAGE2 = {"train.workers": 2, "seic.epochs": 2, "stage2.enabled": "true", "stage2.epochs": 2,
          "stage2.batch_size": 4,
          "stage2.lora_rank": 4, "stage2.inference_batch_size": 8,
          # random tiny encoder: the guard would rightly keep k-means and skip stage 2
          "guard.enabled": "false", "embed.decode_batch_size": 8}


def _synthetic_inputs(tmp_path):
    data = make_vmf_features(n=400, n_clusters=3, dim=32, seed=0)
    emb, voc = str(tmp_path / "emb.parquet"), str(tmp_path / "voc.parquet")
    pq.write_table(pa.table({"embedding": embedding_array(data.image.astype(np.float32)),
                             "label": [str(v) for v in data.labels]}), emb)
    pq.write_table(pa.table({"noun": data.noun_names,
                             "embedding": embedding_array(data.nouns.astype(np.float32))}), voc)
    return emb, voc


def test_stage1_on_two_workers_resumes_from_its_checkpoints(tmp_path):
    emb, voc = _synthetic_inputs(tmp_path)
    settings = {"train.workers": 2, "seic.batch_size": 64, "seic.candidate_nouns_per_centre": 20}
    first = cluster_embeddings(tiny_config(tmp_path, **settings, **{"seic.epochs": 2}),
                               str(tmp_path / "run"), emb, voc)
    assert first["metrics_values"]["stage1"]["workers"] == 2
    checkpoints = sorted(os.path.basename(p) for p in
                         glob.glob(str(tmp_path / "run" / "stage1" / "train-*" / "epoch-*")))
    assert checkpoints == ["epoch-0001", "epoch-0002"]
    # the same command with more epochs: Ray Train restores epoch 2 and trains only epoch 3
    again = cluster_embeddings(tiny_config(tmp_path, **settings, **{"seic.epochs": 3}),
                               str(tmp_path / "run"), emb, voc)
    history = json.load(open(tmp_path / "run" / "stage1" / "history.json"))["epochs"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # epochs 1-2 come from the restored checkpoint, not from training them again
    assert history[1]["loss"] == first["metrics_values"]["stage1"]["final_loss"]
    assert again["metrics_values"]["labels"]["acc"] == pytest.approx(1.0)
    assignments = storage.read_parquet(str(tmp_path / "run" / "assignments"))
    assert assignments.num_rows == 400


def _check_tables(run_dir: str, epochs: list[int], world: int = 2) -> PseudoLabelTable:
    ids = storage.read_parquet(os.path.join(run_dir, "stage2", "images.parquet"))["id"].to_pylist()
    table = None
    for epoch in epochs:
        table = PseudoLabelTable.from_arrow(
            storage.read_parquet(os.path.join(run_dir, "pseudo_labels", f"epoch-{epoch:04d}.parquet")),
            ids)
        hashes = [json.load(open(os.path.join(run_dir, "stage2", "sync",
                                              f"epoch-{epoch:04d}-rank-{r}.json")))["hash"]
                  for r in range(world)]
        assert hashes == [table.hash()] * world, f"workers disagree on the epoch-{epoch} table"
    return table


def _check_assignments(run_dir: str, final: PseudoLabelTable) -> None:
    embedded = storage.read_parquet(os.path.join(run_dir, "embeddings"))
    assignments = storage.read_parquet(os.path.join(run_dir, "assignments"))
    assert sorted(assignments["id"].to_pylist()) == sorted(embedded["id"].to_pylist())
    ids = storage.read_parquet(os.path.join(run_dir, "stage2", "images.parquet"))["id"].to_pylist()
    by_id = dict(zip(assignments["id"].to_pylist(), assignments["cluster"].to_pylist()))
    assert [by_id[i] for i in ids] == final.labels.tolist()


@pytest.fixture(scope="module")
def stage2_run(image_folder, tmp_path_factory):
    """One `rayclust run` with stage 1 and stage 2 on 2 Ray Train workers; later tests copy it."""
    tmp = tmp_path_factory.mktemp("stage2")
    config = tiny_config(tmp, image_folder, **STAGE2)
    run_dir = str(tmp / "run")
    return config, run_dir, run(config, run_dir)


def _copy(run_dir: str, tmp_path, drop: tuple[str, ...] = ()) -> str:
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    for name in drop:
        path = os.path.join(copy, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return copy


def test_stage2_end_to_end_on_two_workers(stage2_run):
    config, run_dir, outputs = stage2_run
    metrics = outputs["metrics_values"]
    assert metrics["stage1"]["workers"] == 2 and metrics["assignment_source"] == "stage2"
    history = metrics["stage2"]["history"]
    assert [h["epoch"] for h in history] == [0, 1] and all(h["steps"] > 0 for h in history)
    assert metrics["stage2"]["resumes"] == []
    # table 0 from stage 1, table 1 refreshed before epoch 1, table 2 = the final assignment pass
    final = _check_tables(run_dir, [1, 2])
    _check_assignments(run_dir, final)
    for stage in ("stage1", "stage2"):
        checkpoints = sorted(os.path.basename(p) for p in
                             glob.glob(os.path.join(run_dir, stage, "train-*", "epoch-*")))
        assert checkpoints == ["epoch-0001", "epoch-0002"], stage
    import torch
    saved = torch.load(os.path.join(run_dir, "stage2", "model.pt"), weights_only=False)
    assert saved["adapter"] and all("lora" in k for k in saved["adapter"])
    # running the same command again does no work and changes nothing
    started = time.time()
    again = run(config, run_dir)
    assert time.time() - started < 30
    assert again["metrics_values"]["labels"] == metrics["labels"]


def test_stage1_resumes_from_its_ray_train_checkpoints(stage2_run, image_folder, tmp_path):
    config, run_dir, outputs = stage2_run
    copy = _copy(run_dir, tmp_path)
    # the same command with one more stage-1 epoch: Ray Train restores epoch 2, trains epoch 3
    more = tiny_config(tmp_path, image_folder, **{**STAGE2, "stage2.enabled": "false",
                                                  "seic.epochs": 3})
    again = run(more, copy)
    history = json.load(open(os.path.join(copy, "stage1", "history.json")))["epochs"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    first = json.load(open(os.path.join(run_dir, "stage1", "history.json")))["epochs"]
    assert history[:2] == first  # restored, not trained again
    assert again["metrics_values"]["stage1"]["epochs"] == 3
    assert again["metrics_values"]["assignment_source"] in ("heads", "kmeans")


def _kill_a_training_worker_once_registered(stage_dir: str, checkpoint: str,
                                            timeout: float = 300) -> threading.Thread:
    """SIGKILL one Ray Train worker process (as a lost node would) once the Train controller has
    registered `checkpoint`. A reported checkpoint counts only after the controller's next poll of
    the workers (every 2 s, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a kill inside that window would
    resume from the checkpoint before."""
    def registered() -> bool:
        for snapshot in glob.glob(os.path.join(stage_dir, "train-*",
                                               "checkpoint_manager_snapshot.json")):
            with open(snapshot) as f:
                if f'"{checkpoint}"' in f.read():
                    return True
        return False

    def kill():
        deadline = time.time() + timeout
        while not registered() and time.time() < deadline:
            time.sleep(0.05)
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
                proc.kill()
                return

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_stage2_survives_a_killed_worker(stage2_run, image_folder, tmp_path):
    _, run_dir, _ = stage2_run
    # the finished run without its stage 2: embedding and stage 1 are reused as they are
    copy = _copy(run_dir, tmp_path, ("stage2", "pseudo_labels", "assignments", "clusters.parquet",
                                     "metrics.json"))
    # 5 epochs, so that the work left after epoch 1's checkpoint is registered outlasts the
    # controller's 2 s poll: the kill lands inside the training function, in epoch 1 to 4
    epochs = 5
    config = tiny_config(tmp_path, image_folder, **{**STAGE2, "stage2.epochs": epochs})
    killer = _kill_a_training_worker_once_registered(os.path.join(copy, "stage2"), "epoch-0001")
    outputs = run(config, copy)
    killer.join(timeout=1)
    stage2 = outputs["metrics_values"]["stage2"]
    assert len(stage2["resumes"]) == 1 and 1 <= stage2["resumes"][0] < epochs, (
        "one restart, from a registered checkpoint before the last epoch", stage2["resumes"])
    assert [h["epoch"] for h in stage2["history"]] == list(range(epochs))
    final = _check_tables(copy, list(range(1, epochs + 1)))
    _check_assignments(copy, final)
