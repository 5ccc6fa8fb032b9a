"""The assign stage: the run's final outputs from the last clustering stage that ran.

Reads `embeddings/` and `stage1/` (and `stage2/` when `stage2.enabled`); K and the method come
from the stage results, not from the config. Writes

assignments/part-*.parquet  id, uri, cluster, confidence, [label]
clusters.parquet            cluster, size, name, top_nouns, [purity, majority_label]
metrics.json                label-free scores always; ACC/NMI/ARI when labels exist; the
                            guard's candidates (`guard`: heads and kmeans, each with its
                            selection score and standard error) and their paired comparison
                            (`selection`)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from rayclust import storage
from rayclust.config import Config
from rayclust.method.estimators import ClusterResult
from rayclust.method.metrics import label_metrics
from rayclust.pipeline.corpus import Corpus
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.run_tables import count_errors, read_corpus
from rayclust.pipeline.stage_results import read_result


def _inputs_key(config: Config, run: RunDirectory) -> str:
    settings = {"stage1": run.stamp(run.stage1),
                "stage2": run.stamp(run.stage2) if config.stage2.enabled else None,
                "rows_per_file": config.output.rows_per_file}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_assign(config: Config, run: RunDirectory) -> list[str]:
    """Write assignments, clusters.parquet and metrics.json (skipped when complete for the same
    stage results); returns their URIs."""
    key = _inputs_key(config, run)
    done = run.marker(run.assignments)
    if done is not None and done.get("inputs") == key:
        return [*storage.parquet_files(run.assignments, run.options), run.clusters, run.metrics]
    corpus = read_corpus(run)
    result, record = read_result(run, run.stage1, corpus.ids)
    extra: dict = {"errors": count_errors(run), "run_dir": run.root}
    if config.stage2.enabled:
        stage2 = run.marker(run.stage2) or {}
        if stage2.get("skipped"):
            extra["stage2"] = {"skipped": stage2["skipped"]}
        else:
            extra["stage1_assignment"] = {"source": result.source,
                                          "label_free": result.scores.get(result.source, {})}
            if corpus.labels is not None:
                extra["stage1_assignment"]["labels"] = label_metrics(corpus.labels,
                                                                     result.labels)
            result, stage2_record = read_result(run, run.stage2, corpus.ids)
            extra["stage2"] = stage2_record["summary"]
    k = record["clusters"]
    parts = write_assignments(config, run, corpus, result)
    run.write_table(clusters_table(k, corpus, result), run.clusters)
    metrics = metrics_record(record["method"], k, corpus, result, record["summary"], extra)
    run.write_json(run.metrics, metrics)
    run.mark_complete(run.assignments, {"rows": len(corpus.ids), "parts": len(parts),
                                        "inputs": key})
    return [*parts, run.clusters, run.metrics]


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
        parts.append(run.write_table(pa.table(columns), run.part(run.assignments, i)))
    for uri in storage.parquet_files(run.assignments, run.options):
        if uri not in parts:  # an earlier run's part beyond this run's last: not ours now
            storage.delete(uri, run.options)
    return parts


def clusters_table(k: int, corpus: Corpus, result: ClusterResult) -> pa.Table:
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


def metrics_record(method: str, k: int, corpus: Corpus, result: ClusterResult, summary: dict,
                   extra: dict) -> dict:
    metrics: dict = {
        "method": method, "clusters": k, "images": len(corpus.ids),
        "assignment_source": result.source,
        "label_free": result.scores.get(result.source, {}),
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
    metrics.update(extra)
    metrics["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return metrics
