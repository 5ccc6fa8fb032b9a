"""Stage 2 on Ray Train: fine-tune the vision encoder and the image head on the stage-1 model's
pseudo-labels (ALGORITHM.md 4.4), then assign every image with the fine-tuned model.

Reads `embeddings/`, `vocabulary/` and `stage1/` (the saved estimator gives K and the method;
its assignment is the first table). The driver writes, once per stage-2 settings
(`stage2/prepared.json`),
    stage2/images.parquet               idx, id, uri: the embedded corpus with a dense index
    pseudo_labels/epoch-0000.parquet    the first table, from the stage-1 assignment
and starts a `TorchTrainer` (stage2_worker). Each epoch every worker streams, through Ray Data
decode tasks of its own, its equal share of that epoch's global permutation of the corpus
(`image_stream`). The table is refreshed every `stage2.refresh_epochs`, checkpoints go under
`stage2/train-<key>/` every epoch, and the loop ends with one inference pass over the whole
corpus: `pseudo_labels/epoch-<E>.parquet`. The driver names and scores that assignment with the
estimator's own naming and scoring and writes `stage2/result.json` and `assignment.parquet`.
When the guard kept k-means there is no image head worth fine-tuning: the stage completes as
skipped and stage 1's result stays final.
"""

from __future__ import annotations

import hashlib
import json

import torch

from rayclust.config import Config, ConfigError, to_dict
from rayclust.method import registry
from rayclust.method.estimators import ClusterResult, Estimator, load_estimator
from rayclust.method.pseudo_labels import PseudoLabelTable
from rayclust.pipeline import train_runtime
from rayclust.pipeline.corpus import Corpus
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.run_tables import images_table, read_corpus, read_run_vocabulary
from rayclust.pipeline.stage2_worker import stage2_worker
from rayclust.pipeline.stage_results import read_result, write_result

SKIPPED_KMEANS = "the language guard kept k-means"


def fingerprint(config: Config, run: RunDirectory) -> str:
    """Stage 2's settings and the stage-1 result it starts from (its stamp: a stage 1 that ran
    again, e.g. with more epochs, means a new starting model)."""
    s2 = {k: v for k, v in to_dict(config.stage2).items() if k not in ("epochs", "enabled")}
    settings = {"stage2": s2, "stage1": run.stamp(run.stage1), "seed": config.seed,
                "model": [config.model.name, config.model.pretrained]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def outputs(run: RunDirectory) -> list[str]:
    done = run.marker(run.stage2) or {}
    if done.get("skipped"):
        return []
    return [run.model(run.stage2), run.result(run.stage2), run.assignment(run.stage2),
            run.stage2_file("final.json")]


def prepare(config: Config, run: RunDirectory, corpus: Corpus, stage1: ClusterResult,
            key: str | None = None) -> dict:
    """Write the dense image index and the first table (from stage 1); the workers' config.

    Both are written once per stage-2 training `key` (recorded in `stage2/prepared.json`): a
    resume must find the very table its checkpoints hashed."""
    marker = run.stage2_file("prepared.json")
    done = run.read_json(marker) if run.exists(marker) else {}
    first_uri = run.pseudo_label_table(0)
    if not (key is not None and done.get("key") == key
            and run.exists(run.stage2_file("images.parquet")) and run.exists(first_uri)):
        run.write_table(images_table(corpus), run.stage2_file("images.parquet"))
        first = PseudoLabelTable.from_predictions(
            torch.as_tensor(stage1.labels, dtype=torch.long), torch.as_tensor(stage1.confidence))
        run.write_table(first.to_arrow(corpus.ids), first_uri)
        done = {"key": key, "first_table_hash": first.hash(), "n": len(corpus.ids)}
        run.write_json(marker, done)
    return {"config": to_dict(config), "run": run.root,
            "first_table_hash": done["first_table_hash"]}


def run_stage2(config: Config, run: RunDirectory) -> list[str]:
    """Fine-tune and assign (or skip when complete, or when the guard kept k-means)."""
    key = fingerprint(config, run)
    done = run.marker(run.stage2)
    if done is not None and done.get("fingerprint") == key and (
            done.get("skipped") or done.get("epochs") == config.stage2.epochs):
        log.info("stage 2: already complete (%s)", run.stage2)
        return outputs(run)
    saved = run.load_torch(run.model(run.stage1))
    if not registry.get(saved["method"]).supports("stage2"):
        raise ConfigError(f"method {saved['method']} has no stage 2; set stage2.enabled=false")
    corpus = read_corpus(run)
    stage1, _ = read_result(run, run.stage1, corpus.ids)
    if stage1.source != "heads":
        log.warning("stage 2 skipped: %s, so there is no image head worth fine-tuning towards; "
                    "the stage-1 result is final", SKIPPED_KMEANS)
        run.mark_complete(run.stage2, {"fingerprint": key, "skipped": SKIPPED_KMEANS})
        return outputs(run)
    if any(uri is None for uri in corpus.uris):
        raise ConfigError("stage 2 fine-tunes on the images, but these embeddings have no `uri` "
                          "column; set stage2.enabled=false")

    loop_config = prepare(config, run, corpus, stage1, key)
    workers = train_runtime.worker_count(config, minimum=1)
    # the workers build their own decode streams, so `fit` sees no dataset: check the room here
    train_runtime.check_room(config, workers, decode=True)
    log.info("stage 2: fine-tuning (%s adapter) on %d Ray Train worker(s), %d epoch(s), "
             "pseudo-labels refreshed %s", config.stage2.adapter, workers, config.stage2.epochs,
             f"every {config.stage2.refresh_epochs} epoch(s)" if config.stage2.refresh_epochs
             else "online per batch")
    train_runtime.fit(stage2_worker, loop_config, config, run, run.stage2, f"train-{key}",
                      workers)
    summary = run.read_json(run.stage2_file("final.json"))
    summary.update(fingerprint=key, epochs=config.stage2.epochs, workers=workers)
    estimator = load_estimator(saved)
    result = _result(run, corpus, summary, estimator)
    write_result(run, run.stage2, corpus.ids, result, estimator.method, estimator.n_clusters,
                 summary)
    run.mark_complete(run.stage2, summary)
    return outputs(run)


def _result(run: RunDirectory, corpus: Corpus, summary: dict, estimator: Estimator
            ) -> ClusterResult:
    """The final table as a clustering, named and scored by the stage-1 estimator in the frozen
    CLIP space (the text tower did not move, so nouns are compared with the stage-1 image
    embeddings)."""
    table = PseudoLabelTable.from_arrow(run.read_table(summary["table"]), corpus.ids)
    if table.hash() != summary["table_hash"]:
        raise RuntimeError(f"{summary['table']} does not match the hash its run recorded")
    nouns, noun_matrix = read_run_vocabulary(run)
    u = torch.nn.functional.normalize(torch.tensor(corpus.features, dtype=torch.float32), dim=1)
    e = torch.nn.functional.normalize(torch.tensor(noun_matrix, dtype=torch.float32), dim=1)
    top, names = estimator.name_clusters(u, table.labels, e, nouns)
    scores = {"stage2": estimator.label_free_scores(u, table.labels, table.confidence)}
    return ClusterResult(table.labels.numpy(), table.confidence.numpy(), "stage2", top, names,
                         scores)
