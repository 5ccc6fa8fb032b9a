"""The stage-2 worker loop in Ray Train local mode (`num_workers=0`: in this process, no worker
start-up), with online pseudo-labels (`refresh_epochs: 0`)."""

import shutil

import numpy as np
import pytest

from rayclust.method import ClusterResult
from rayclust.method.pseudo_labels import PseudoLabelTable
from rayclust.pipeline import stage2
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.corpus import Corpus
from rayclust.pipeline.stage2_worker import stage2_worker
from tests.pipeline.conftest import tiny_config

pytestmark = pytest.mark.ray


def test_stage2_loop_in_local_mode_with_online_labels(finished_run, image_folder, tmp_path):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    shutil.copytree(finished_run[1], tmp_path / "run")
    config = tiny_config(tmp_path, image_folder, **{
        "stage2.enabled": "true", "stage2.epochs": 1, "stage2.refresh_epochs": 0,
        "stage2.batch_size": 4, "stage2.lora_rank": 4,
        "stage2.learning_rate": 1e-3, "embed.decode_batch_size": 8})
    run = RunDirectory(str(tmp_path / "run"))
    corpus = Corpus.read(run.embeddings, run.options)
    assignments = run.read_table(run.assignments)
    by_id = dict(zip(assignments["id"].to_pylist(), zip(assignments["cluster"].to_pylist(),
                                                         assignments["confidence"].to_pylist())))
    labels, confidence = zip(*(by_id[i] for i in corpus.ids))
    first = ClusterResult(np.array(labels), np.array(confidence, dtype=np.float32), "heads", [], [])
    loop_config = stage2.prepare(config, run, corpus, first)
    # the worker builds its own per-epoch streams: no dataset goes through the trainer
    TorchTrainer(stage2_worker, train_loop_config=loop_config,
                 scaling_config=ScalingConfig(num_workers=0)).fit()

    final = run.read_json(run.stage2_file("final.json"))
    (epoch,) = final["history"]
    # one worker: every image once, the last batch filled up from the epoch's first images
    assert epoch["steps"] == -(-len(corpus.ids) // 4)
    assert 0 < epoch["mean_weight"] <= 1 and np.isfinite(epoch["loss"])
    assert 1 / 3 <= epoch["batch_majority_share"] <= 1
    table = PseudoLabelTable.from_arrow(run.read_table(final["table"]), corpus.ids)
    assert final["table"].endswith("epoch-0001.parquet") and table.hash() == final["table_hash"]
    assert len(table) == len(corpus.ids) and set(table.labels.tolist()) <= {0, 1, 2}
    # the first table is stage 1's result, verbatim
    zero = PseudoLabelTable.from_arrow(run.read_table(run.pseudo_label_table(0)), corpus.ids)
    assert zero.labels.tolist() == list(labels)
