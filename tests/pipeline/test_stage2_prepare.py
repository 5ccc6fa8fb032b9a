"""The stage-2 driver writes the first pseudo-label table once per training (issue 10 item 5): a
resume, perhaps on another device whose stage-1 confidences differ in the last bits, must find
the very table its checkpoints hashed."""

import os

import numpy as np

from rayclust.method import ClusterResult
from rayclust.method.pseudo_labels import PseudoLabelTable
from rayclust.pipeline import stage2
from rayclust.pipeline.run_directory import RunDirectory
from tests.pipeline.conftest import tiny_config


class _Corpus:
    ids = [f"id-{i}" for i in range(20)]
    uris = [f"/images/{i % 3}/{i}.jpg" for i in range(20)]


def _stage1(confidence):
    return ClusterResult(np.arange(20) % 3, confidence.astype(np.float32), "heads", [], [])


def test_first_table_is_written_once_per_training(tmp_path):
    config = tiny_config(tmp_path)
    run = RunDirectory(str(tmp_path / "run"))
    corpus = _Corpus()
    confidence = np.linspace(0.4, 0.9, 20, dtype=np.float32)
    first = stage2.prepare(config, run, corpus, _stage1(confidence), key="k1")
    path = run.pseudo_label_table(0)
    table = PseudoLabelTable.from_arrow(run.read_table(path), corpus.ids)
    assert first["first_table_hash"] == table.hash()
    written = os.stat(path).st_mtime_ns, os.stat(run.stage2_file("images.parquet")).st_mtime_ns

    # the same training again, stage 1 recomputed elsewhere: one ulp off in every confidence
    elsewhere = np.nextafter(confidence, np.float32(1))
    again = stage2.prepare(config, run, corpus, _stage1(elsewhere), key="k1")
    assert again["first_table_hash"] == first["first_table_hash"]
    assert (os.stat(path).st_mtime_ns, os.stat(run.stage2_file("images.parquet")).st_mtime_ns) == written
    assert PseudoLabelTable.from_arrow(run.read_table(path), corpus.ids).hash() == table.hash()

    # other settings (another key) train from scratch on the new stage-1 result
    other = stage2.prepare(config, run, corpus, _stage1(elsewhere), key="k2")
    rewritten = PseudoLabelTable.from_arrow(run.read_table(path), corpus.ids)
    assert other["first_table_hash"] == rewritten.hash() != table.hash()
    assert np.array_equal(rewritten.confidence.numpy(), elsewhere)
