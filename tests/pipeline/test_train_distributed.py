"""Stage 1 and stage 2 on real 2-worker Ray Train (gloo) runs: resume, table sync, worker kill."""

import glob
import json
import os
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

pytestmark = pytest.mark.ray

STAGE2 = {"train.workers": 2, "stage2.enabled": "true", "stage2.batch_size": 4,
          "stage2.lora_rank": 4, "stage2.inference_batch_size": 8, "stage2.shuffle_buffer": 8,
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


def test_stage2_end_to_end_on_two_workers(image_folder, tmp_path):
    config = tiny_config(tmp_path, image_folder, **STAGE2, **{"stage2.epochs": 2})
    run_dir = str(tmp_path / "run")
    outputs = run(config, run_dir)
    metrics = outputs["metrics_values"]
    assert metrics["assignment_source"] == "stage2"
    history = metrics["stage2"]["history"]
    assert [h["epoch"] for h in history] == [0, 1] and all(h["steps"] > 0 for h in history)
    assert metrics["stage2"]["resumes"] == []
    # table 0 from stage 1, table 1 refreshed before epoch 1, table 2 = the final assignment pass
    final = _check_tables(run_dir, [1, 2])
    _check_assignments(run_dir, final)
    checkpoints = sorted(os.path.basename(p) for p in
                         glob.glob(os.path.join(run_dir, "stage2", "train-*", "epoch-*")))
    assert checkpoints == ["epoch-0001", "epoch-0002"]
    import torch
    saved = torch.load(os.path.join(run_dir, "stage2", "model.pt"), weights_only=False)
    assert saved["adapter"] and all("lora" in k.lower() or "parametrizations" in k
                                    for k in saved["adapter"])
    # running the same command again does no work and changes nothing
    started = time.time()
    again = run(config, run_dir)
    assert time.time() - started < 30
    assert again["metrics_values"]["labels"] == metrics["labels"]


def _kill_a_training_worker_after(path: str, timeout: float = 300) -> threading.Thread:
    """Wait for `path`, then SIGKILL one Ray Train worker process (as a lost node would)."""
    def kill():
        deadline = time.time() + timeout
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
                proc.kill()
                return

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_stage2_survives_a_killed_worker(image_folder, tmp_path):
    config = tiny_config(tmp_path, image_folder, **STAGE2, **{"stage2.epochs": 3})
    run_dir = str(tmp_path / "run")
    # after epoch 1's table exists, the kill lands inside epoch 1's training
    killer = _kill_a_training_worker_after(
        os.path.join(run_dir, "stage2", "sync", "epoch-0001-rank-1.json"))
    outputs = run(config, run_dir)
    killer.join(timeout=1)
    stage2 = outputs["metrics_values"]["stage2"]
    assert stage2["resumes"] == [1], "the worker group should restart from epoch 1's checkpoint"
    assert [h["epoch"] for h in stage2["history"]] == [0, 1, 2]
    final = _check_tables(run_dir, [1, 2, 3])
    _check_assignments(run_dir, final)
