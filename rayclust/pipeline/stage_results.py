"""A stage's clustering in the run directory: how stage 1 hands its result to stage 2 and to
the assign stage, and stage 2 its own to assign.

    <stage>/result.json        method, clusters, source, names, top_nouns, scores, selection,
                               summary (what the stage measured about itself)
    <stage>/assignment.parquet id, cluster, confidence, [kmeans_cluster] in corpus order
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rayclust.method.estimators import ClusterResult
from rayclust.pipeline.run_directory import RunDirectory


def write_result(run: RunDirectory, stage_dir: str, ids: list[str], result: ClusterResult,
                 method: str, n_clusters: int, summary: dict) -> list[str]:
    columns = {"id": pa.array(ids, pa.string()),
               "cluster": pa.array(result.labels.astype(np.int32)),
               "confidence": pa.array(result.confidence.astype(np.float32))}
    if result.kmeans_labels is not None:
        columns["kmeans_cluster"] = pa.array(result.kmeans_labels.astype(np.int32))
    table = run.write_table(pa.table(columns), run.assignment(stage_dir))
    record = run.write_json(run.result(stage_dir), {
        "method": method, "clusters": n_clusters, "source": result.source,
        "names": result.names, "top_nouns": result.top_nouns, "scores": result.scores,
        "selection": result.selection, "summary": summary})
    return [table, record]


def read_result(run: RunDirectory, stage_dir: str, ids: list[str]
                ) -> tuple[ClusterResult, dict]:
    """(the clustering with rows in the order of `ids`, result.json)."""
    record = run.read_json(run.result(stage_dir))
    table = run.read_table(run.assignment(stage_dir))
    stored = table["id"].to_pylist()
    if stored != list(ids):
        raise RuntimeError(f"{run.assignment(stage_dir)} does not list the corpus of "
                           f"{run.embeddings} in order")
    kmeans = (table["kmeans_cluster"].to_numpy() if "kmeans_cluster" in table.column_names
              else None)
    result = ClusterResult(table["cluster"].to_numpy().astype(np.int64),
                           table["confidence"].to_numpy().astype(np.float32), record["source"],
                           record["top_nouns"], record["names"], record["scores"], kmeans,
                           record["selection"])
    return result, record
