"""`rayclust run` end to end on generated images with a tiny random open_clip model."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rayclust import config as cfg
from rayclust import storage
from rayclust.pipeline.run import cluster_embeddings, run
from tests.pipeline.conftest import CLASSES, tiny_config

N_INPUTS = 3 * 9 + 4  # generated images + corrupt + empty + RGBA png + misnamed PNG


def test_every_output_and_its_schema(finished_run):
    config, run_dir, outputs = finished_run
    # config.yaml is the fully resolved config
    with open(os.path.join(run_dir, "config.yaml")) as handle:
        assert cfg.from_dict(yaml.safe_load(handle)) == config

    manifest = storage.read_parquet(os.path.join(run_dir, "manifest"))
    assert manifest.schema.names == ["id", "uri", "label"]
    assert manifest.num_rows == N_INPUTS
    assert len(storage.parquet_files(os.path.join(run_dir, "manifest"))) == 4  # 10 rows a part

    emb = storage.read_parquet(os.path.join(run_dir, "embeddings"))
    assert emb.schema.names == ["id", "uri", "embedding", "label"]
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    vectors = np.stack(emb["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    errors = storage.read_parquet(os.path.join(run_dir, "errors"))
    assert errors.schema.names == ["uri", "stage", "error"]
    bad = {os.path.basename(u): e for u, e in zip(errors["uri"].to_pylist(),
                                                   errors["error"].to_pylist())}
    assert set(bad) == {"corrupt.jpg", "empty.png"}
    assert "empty" in bad["empty.png"] and "image" in bad["corrupt.jpg"]
    # nothing lost, nothing duplicated
    assert emb.num_rows + errors.num_rows == N_INPUTS
    assert len(set(emb["id"].to_pylist())) == emb.num_rows
    assert set(emb["id"].to_pylist()) | set(
        manifest.filter(pa.compute.is_in(manifest["uri"], errors["uri"]))["id"].to_pylist()
    ) == set(manifest["id"].to_pylist())

    vocab = storage.read_parquet(os.path.join(run_dir, "vocabulary"))
    assert vocab.schema.names == ["noun", "embedding"] and vocab.num_rows == 300
    assert vocab.schema.field("embedding").type == pa.list_(pa.float32(), 64)

    assign = storage.read_parquet(os.path.join(run_dir, "assignments"))
    assert assign.schema == pa.schema([("id", pa.string()), ("uri", pa.string()),
                                       ("cluster", pa.int32()), ("confidence", pa.float32()),
                                       ("label", pa.string())])
    assert sorted(assign["id"].to_pylist()) == sorted(emb["id"].to_pylist())
    clusters_seen = assign["cluster"].to_numpy()
    assert clusters_seen.min() >= 0 and clusters_seen.max() < 3
    conf = assign["confidence"].to_numpy()
    assert ((conf > 0) & (conf <= 1)).all()

    clusters = pq.read_table(os.path.join(run_dir, "clusters.parquet"))
    assert clusters.schema.names == ["cluster", "size", "name", "top_nouns", "purity",
                                     "majority_label"]
    assert clusters.schema.field("top_nouns").type == pa.list_(pa.string())
    assert clusters["size"].to_numpy().sum() == emb.num_rows
    for row in clusters.to_pylist():
        if row["size"]:
            assert row["name"] and len(row["top_nouns"]) == 5 and row["name"] in row["top_nouns"]
            assert row["majority_label"] in CLASSES and 0 < row["purity"] <= 1

    with open(os.path.join(run_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics["images"] == emb.num_rows and metrics["errors"] == 2
    assert set(metrics["labels"]) == {"acc", "nmi", "ari"}
    assert 1 / 3 <= metrics["labels"]["acc"] <= 1
    assert "neighbour_agreement" in metrics["label_free"]
    assert metrics["assignment_source"] in {"heads", "kmeans"}
    assert set(metrics["guard"]) == {"heads", "kmeans"}
    assert metrics["stage1"]["epochs"] == 3
    assert outputs["metrics_values"] == metrics

    for stage in ("manifest", "embeddings", "vocabulary", "stage1", "assignments"):
        assert os.path.exists(os.path.join(run_dir, stage, "_SUCCESS"))
    assert os.path.exists(os.path.join(run_dir, "stage1", "checkpoint.pt"))


def test_rerun_is_idempotent_and_does_not_re_embed(finished_run):
    config, run_dir, _ = finished_run
    part = os.path.join(run_dir, "embeddings", "part-00000.parquet")
    before = os.stat(part).st_mtime_ns
    first = storage.read_parquet(os.path.join(run_dir, "assignments")).sort_by("id")
    run(config, run_dir)
    assert os.stat(part).st_mtime_ns == before
    again = storage.read_parquet(os.path.join(run_dir, "assignments")).sort_by("id")
    assert again.equals(first)


def test_partial_embedding_resumes_missing_parts_only(finished_run, tmp_path):
    config, source, _ = finished_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(source, run_dir)
    kept = os.path.join(run_dir, "embeddings", "part-00000.parquet")
    kept_mtime = os.stat(kept).st_mtime_ns
    # as if the process died while embedding part 2: its outputs and the markers are missing
    for path in ("embeddings/part-00002.parquet", "embeddings/_SUCCESS", "stage1/_SUCCESS",
                 "assignments/_SUCCESS", "metrics.json"):
        os.remove(os.path.join(run_dir, path))
    run(config, run_dir)
    assert os.stat(kept).st_mtime_ns == kept_mtime
    emb = storage.read_parquet(os.path.join(run_dir, "embeddings"))
    errors = storage.read_parquet(os.path.join(run_dir, "errors"))
    assert emb.num_rows + errors.num_rows == N_INPUTS
    assert len(set(emb["id"].to_pylist())) == emb.num_rows


def _precomputed(run_dir, tmp_path):
    """The finished run's embeddings and vocabulary, for stage-1 tests that need no images."""
    return os.path.join(run_dir, "embeddings"), os.path.join(run_dir, "vocabulary")


def test_stage1_resume_matches_an_uninterrupted_run(finished_run, tmp_path):
    emb, vocab = _precomputed(finished_run[1], tmp_path)
    whole = cluster_embeddings(tiny_config(tmp_path, **{"seic.epochs": 4}), str(tmp_path / "a"),
                               emb, vocab)
    # the same run stopped after 2 epochs, then continued to 4
    cluster_embeddings(tiny_config(tmp_path, **{"seic.epochs": 2}), str(tmp_path / "b"), emb,
                       vocab)
    resumed = cluster_embeddings(tiny_config(tmp_path, **{"seic.epochs": 4}),
                                 str(tmp_path / "b"), emb, vocab)
    history = json.load(open(tmp_path / "b" / "stage1" / "history.json"))["epochs"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    a = storage.read_parquet(str(tmp_path / "a" / "assignments")).sort_by("id")
    b = storage.read_parquet(str(tmp_path / "b" / "assignments")).sort_by("id")
    assert a["cluster"].equals(b["cluster"])
    np.testing.assert_allclose(a["confidence"].to_numpy(), b["confidence"].to_numpy(), atol=1e-6)
    assert whole["metrics_values"]["stage1"]["resumes"] == []
    assert resumed["metrics_values"]["stage1"]["resumes"] == [2]  # from checkpoint.pt, epoch 2
    assert whole["metrics_values"]["stage1"]["final_loss"] == pytest.approx(
        resumed["metrics_values"]["stage1"]["final_loss"], abs=1e-5)


def test_tac_method_runs(finished_run, tmp_path):
    emb, vocab = _precomputed(finished_run[1], tmp_path)
    outputs = cluster_embeddings(tiny_config(tmp_path, method="tac"), str(tmp_path / "run"),
                                 emb, vocab)
    assert outputs["metrics_values"]["method"] == "tac"
    assert outputs["metrics_values"]["stage1"]["epochs"] == 2
    # the values used, with those left unset derived from K (TAC's K < 100 regime)
    used = outputs["metrics_values"]["stage1"]["hyperparameters"]
    assert (used["epochs"], used["batch_size"], used["distill_temperature"]) == (2, 16, 0.5)


def test_cached_global_pieces_load_to_the_working_device(finished_run):
    """A repeat or resume on another device reads `stage1/global.pt` onto that device (it was
    read to the CPU, and a CUDA run then multiplied CUDA features by CPU centroids). The `meta`
    device stands in for a GPU here; tests/test_gpu.py repeats a run on CUDA."""
    import torch

    from rayclust.pipeline.method_mapping import estimator_for
    from rayclust.pipeline.run_directory import RunDirectory
    from rayclust.pipeline.run_tables import read_corpus, read_run_vocabulary
    from rayclust.pipeline.stage1 import global_pieces

    config, run_dir, _ = finished_run
    run_directory = RunDirectory(run_dir, config.storage)
    corpus = read_corpus(run_directory)
    nouns, matrix = read_run_vocabulary(run_directory)
    estimator = estimator_for(config, torch.device("meta"))
    u, e = torch.tensor(corpus.features), torch.tensor(matrix)
    pieces = global_pieces(config, run_directory, estimator, u, e)
    assert pieces.inputs.text.device.type == "meta"
    assert pieces.nouns_used.device.type == "meta"
    assert pieces.kmeans.centroids.device.type == "meta"
    assert pieces.kmeans.labels.device.type == "meta"


def test_cluster_embeddings_from_precomputed(finished_run, tmp_path):
    config, run_dir, _ = finished_run
    emb = storage.read_parquet(os.path.join(run_dir, "embeddings"))
    # clip-retrieval style: list<float>, no id column
    vectors = emb["embedding"].cast(pa.list_(pa.float32()))
    plain = pa.table({"embedding": vectors, "label": emb["label"]})
    pq.write_table(plain, tmp_path / "emb.parquet")
    out = cluster_embeddings(tiny_config(tmp_path), str(tmp_path / "ce"),
                             str(tmp_path / "emb.parquet"), os.path.join(run_dir, "vocabulary"))
    assign = storage.read_parquet(str(tmp_path / "ce" / "assignments"))
    assert assign.num_rows == emb.num_rows
    assert assign["id"].to_pylist()[0] == "row-000000000"
    assert out["metrics_values"]["images"] == emb.num_rows
    assert "labels" in out["metrics_values"]


def test_cluster_embeddings_rejects_mismatched_vocabulary(finished_run, tmp_path):
    _, run_dir, _ = finished_run
    vocab = pa.table({"noun": ["a", "b", "c"],
                      "embedding": pa.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
                                            pa.list_(pa.float32()))})
    pq.write_table(vocab, tmp_path / "v.parquet")
    with pytest.raises(cfg.ConfigError, match="same CLIP model"):
        cluster_embeddings(tiny_config(tmp_path), str(tmp_path / "ce"),
                           os.path.join(run_dir, "embeddings"), str(tmp_path / "v.parquet"))
