"""Stage 1 and stage 2 on real 2-worker Ray Train (gloo) runs: resume, table sync, worker kill."""

import glob
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayclust import storage
from rayclust.method.pseudo_labels import PseudoLabelTable
from rayclust.pipeline.run import cluster_embeddings, run
from rayclust.pipeline.train_runtime import FAULT_ENV
from rayclust.synthetic import make_vmf_features
from rayclust.tables import embedding_array
from tests.pipeline.conftest import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

STAGE2 = {"train.workers": 2, "stage2.enabled": "true", "stage2.epochs": 2,
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


def test_stage1_on_two_workers_resumes_from_its_checkpoints(tmp_path, monkeypatch):
    """Stage 1 on 2 Ray Train workers; rank 1 SIGKILLs itself once the checkpoint of epoch 1 is
    registered (train_runtime.fault_point: an event the code emits), and the restarted worker
    group resumes from it instead of training from scratch. (Running the same command again
    with more epochs resumes from the same checkpoints through the same restore; the driver-side
    resume is tests/pipeline/test_run_local.py.)"""
    emb, voc = _synthetic_inputs(tmp_path)
    settings = {"train.workers": 2, "seic.batch_size": 64, "seic.candidate_nouns_per_centre": 20,
                "seic.epochs": 3}
    monkeypatch.setenv(FAULT_ENV, "stage1:1:1")
    out = cluster_embeddings(tiny_config(tmp_path, **settings), str(tmp_path / "run"), emb, voc)
    assert os.path.exists(tmp_path / "run" / "stage1" / "fault-injected"), "no kill fired"
    stage1 = out["metrics_values"]["stage1"]
    assert stage1["workers"] == 2
    assert stage1["resumes"] == [1], ("one restart, from the registered checkpoint of epoch 1",
                                      stage1["resumes"])
    history = json.load(open(tmp_path / "run" / "stage1" / "history.json"))["epochs"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["loss"] == stage1["final_loss"]
    checkpoints = sorted(os.path.basename(p) for p in
                         glob.glob(str(tmp_path / "run" / "stage1" / "train-*" / "epoch-*")))
    assert checkpoints == ["epoch-0002", "epoch-0003"]  # train.keep_checkpoints: the newest 2
    assert out["stages"] == {"embed": "ran", "vocabulary": "ran", "stage1": "ran",
                             "assign": "ran"}
    assert out["metrics_values"]["labels"]["acc"] == pytest.approx(1.0)
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


EPOCHS = 3


def test_stage2_on_two_workers_survives_a_killed_worker(finished_run, image_folder, tmp_path,
                                                        monkeypatch):
    """Stage 2 on 2 Ray Train workers, on a copy of the session's finished run (embedding,
    vocabulary and the trained stage-1 heads are reused: the stage-1 training settings are the
    same, only the guard is off, so stage 1 just re-decides). During it, rank 1 SIGKILLs itself
    (as a lost node would) at the start of epoch 1, once the Train controller has registered the
    checkpoint of epoch 1 (train_runtime.fault_point): an event the code emits, not a sleep, so
    the restart point does not depend on the machine's speed. One Ray Train run covers the
    table sync, the checkpoints, the failure and the final assignment."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run[1], run_dir)
    monkeypatch.setenv(FAULT_ENV, "stage2:1:1")
    config = tiny_config(tmp_path, image_folder, **{**STAGE2, "stage2.epochs": EPOCHS})
    outputs = run(config, run_dir)
    assert outputs["stages"] == {"embed": "skipped", "vocabulary": "skipped", "stage1": "ran",
                                 "stage2": "ran", "assign": "ran"}
    assert os.path.exists(os.path.join(run_dir, "stage2", "fault-injected")), "no kill fired"
    metrics = outputs["metrics_values"]
    assert metrics["stage1"]["workers"] == 2 and metrics["assignment_source"] == "stage2"
    stage2 = metrics["stage2"]
    assert stage2["resumes"] == [1], ("one restart, from the registered checkpoint of epoch 1",
                                      stage2["resumes"])
    history = stage2["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert all(h["steps"] > 0 for h in history)
    # table 0 from stage 1, tables 1..E-1 refreshed before each later epoch, table E = the final
    # assignment pass; every worker holds the same hash of each
    final = _check_tables(run_dir, list(range(1, EPOCHS + 1)))
    _check_assignments(run_dir, final)
    checkpoints = sorted(os.path.basename(p) for p in
                         glob.glob(os.path.join(run_dir, "stage2", "train-*", "epoch-*")))
    assert checkpoints == ["epoch-0002", "epoch-0003"]  # train.keep_checkpoints: the newest 2
    import torch
    saved = torch.load(os.path.join(run_dir, "stage2", "model.pt"), weights_only=False)
    assert saved["adapter"] and all("lora" in k for k in saved["adapter"])
    # running the same command again does no work and changes nothing
    monkeypatch.delenv(FAULT_ENV)
    started = time.time()
    again = run(config, run_dir)
    assert again["stages"] == dict.fromkeys(again["stages"], "skipped")
    assert time.time() - started < 30
    assert again["metrics_values"]["labels"] == metrics["labels"]
