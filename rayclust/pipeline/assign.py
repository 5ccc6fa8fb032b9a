"""Assignment outputs: `assignments/`, `clusters.parquet` and `metrics.json`.

assignments/part-*.parquet  id, uri, cluster, confidence, [label]
clusters.parquet            cluster, size, name, top_nouns, [purity, majority_label]
metrics.json                label-free scores always; ACC/NMI/ARI when labels exist; the
                            guard's candidates (`guard`: heads and kmeans, each with its
                            selection score and standard error) and their paired comparison
                            (`selection`)
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pyarrow as pa

from rayclust import storage
from rayclust.config import Config
from rayclust.method import ClusterResult
from rayclust.method.metrics import label_metrics
from rayclust.pipeline.run_directory import RunDirectory, part_name
from rayclust.pipeline.corpus import Corpus


def write_assignments(config: Config, run: RunDirectory, corpus: Corpus, result: ClusterResult
                      ) -> list[str]:
    n = len(corpus.ids)
    size = config.output.rows_per_file
    parts = []
    for i, start in enumerate(range(0, n, size)):
        stop = min(start + size, n)
        columns = {"id": pa.array(corpus.ids[start:stop], pa.string()),
                   "uri": pa.array(corpus.uris[start:stop], pa.string()),
                   "cluster": pa.array(result.labels[start:stop].astype(np.int32)),
                   "confidence": pa.array(result.confidence[start:stop].astype(np.float32))}
        if corpus.labels is not None:
            columns["label"] = pa.array(corpus.labels[start:stop], pa.string())
        parts.append(run.write_table(pa.table(columns),
                                     storage.join(run.assignments, part_name(i))))
    run.mark_complete(run.assignments, {"rows": n, "parts": len(parts)})
    return parts


def clusters_table(config: Config, corpus: Corpus, result: ClusterResult) -> pa.Table:
    k = config.clusters
    sizes = np.bincount(result.labels, minlength=k)
    columns = {"cluster": pa.array(np.arange(k, dtype=np.int32)),
               "size": pa.array(sizes.astype(np.int64)),
               "name": pa.array(result.names, pa.string()),
               "top_nouns": pa.array(result.top_nouns, pa.list_(pa.string()))}
    if corpus.labels is not None:
        purity, majority = [], []
        for c in range(k):
            members = [corpus.labels[i] for i in np.flatnonzero(result.labels == c)]
            if members:
                label, count = Counter(members).most_common(1)[0]
                purity.append(count / len(members))
                majority.append(label)
            else:
                purity.append(None)
                majority.append(None)
        columns["purity"] = pa.array(purity, pa.float64())
        columns["majority_label"] = pa.array(majority, pa.string())
    return pa.table(columns)


def write_outputs(config: Config, run: RunDirectory, corpus: Corpus, result: ClusterResult,
                  summary: dict, extra: dict | None = None) -> dict[str, object]:
    """Write every output of a finished clustering; returns their URIs."""
    assignments = write_assignments(config, run, corpus, result)
    run.write_table(clusters_table(config, corpus, result), run.clusters)
    chosen = result.scores.get(result.source, {})
    metrics: dict = {
        "method": config.method, "clusters": config.clusters, "images": len(corpus.ids),
        "assignment_source": result.source,
        "label_free": chosen,
        "guard": result.scores,
        "stage1": summary,
    }
    if corpus.labels is not None:
        metrics["labels"] = label_metrics(corpus.labels, result.labels)
        metrics["classes"] = len(set(corpus.labels))
        if result.kmeans_labels is not None:
            metrics["kmeans_baseline_labels"] = label_metrics(corpus.labels, result.kmeans_labels)
    if result.selection:
        metrics["selection"] = result.selection
    metrics.update(extra or {})
    metrics["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run.write_json(run.metrics, metrics)
    return {"assignments": assignments, "clusters": run.clusters, "metrics": run.metrics,
            "metrics_values": metrics}
