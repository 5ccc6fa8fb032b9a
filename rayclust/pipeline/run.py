"""The ordered list of stages, and the entry points that run them: `run` (images or, with
`input.embeddings`, precomputed embeddings), `embed`, `cluster_embeddings` and `stage` (one stage
on an existing run directory, what `rayclust stage`, job entry points and Tune trials call).

Every stage is `run_<stage>(config, run) -> list of URIs written`: it reads its inputs only from
the run directory, writes `_SUCCESS` (with a fresh stamp) when complete, and does nothing when it
is complete already for the same settings and inputs. A run killed between two stages therefore
resumes with the next stage only. Stage modules are imported when their stage runs: the CLI
imports this module, and a wrong input should fail in a second, not after importing torch.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import yaml

from rayclust import storage
from rayclust.config import Config, ConfigError, apply_overrides, from_dict, to_yaml
from rayclust.pipeline.embed import read_import
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.run_tables import count_errors, read_vocabulary
from rayclust.storage import StorageOptions


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str                                  # "module:function", imported when it runs
    folder: Callable[[RunDirectory], str]       # where its outputs and `_SUCCESS` go
    needs: Callable[[Config], tuple[str, ...]]  # stages whose outputs it reads
    applies: Callable[[Config], bool] = lambda config: True

    def function(self) -> Callable[[Config, RunDirectory], list[str]]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


STAGES: tuple[Stage, ...] = (
    Stage("embed", "rayclust.pipeline.embed:run_embed", lambda r: r.embeddings, lambda c: ()),
    Stage("vocabulary", "rayclust.pipeline.vocabulary:run_vocabulary", lambda r: r.vocabulary,
          lambda c: ()),
    Stage("stage1", "rayclust.pipeline.stage1:run_stage1", lambda r: r.stage1,
          lambda c: ("embed", "vocabulary")),
    Stage("stage2", "rayclust.pipeline.stage2:run_stage2", lambda r: r.stage2,
          lambda c: ("embed", "vocabulary", "stage1"), applies=lambda c: c.stage2.enabled),
    Stage("assign", "rayclust.pipeline.assign:run_assign", lambda r: r.assignments,
          lambda c: ("embed", "stage1", *(("stage2",) if c.stage2.enabled else ()))),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ConfigError(f"unknown stage {name!r}; the stages are {', '.join(STAGE_NAMES)}")


def run_stage(name: str, config: Config, run: RunDirectory) -> tuple[list[str], bool]:
    """Run one stage on `run`; (URIs written, whether it did work or was complete already)."""
    stage = get_stage(name)
    for need in stage.needs(config):
        folder = get_stage(need).folder(run)
        if not run.is_complete(folder):
            raise ConfigError(f"stage `{name}` needs the output of stage `{need}`, which has not "
                              f"completed in {run.root} ({run.success(folder)} is "
                              f"missing): run `rayclust stage {need} --run-dir {run.root}` first")
    before = run.stamp(stage.folder(run))
    uris = stage.function()(config, run)
    ran = run.stamp(stage.folder(run)) != before
    if not ran:
        log.info("%s: complete in %s, skipped", name, stage.folder(run))
    return uris, ran


def open_run(config: Config, run_dir: str) -> RunDirectory:
    run = RunDirectory(run_dir, config.storage)
    if not storage.is_remote(run_dir):
        os.makedirs(run_dir, exist_ok=True)
    storage.write_text(run.config, to_yaml(config), config.storage)
    return run


def _run_stages(config: Config, run: RunDirectory) -> dict:
    stages, written = {}, {}
    for stage in STAGES:
        if stage.applies(config):
            written[stage.name], ran = run_stage(stage.name, config, run)
            stages[stage.name] = "ran" if ran else "skipped"
    return _outputs(run, stages, written)


def _outputs(run: RunDirectory, stages: dict, written: dict) -> dict:
    out = {"run_dir": run.root, "config": run.config, "stages": stages, "written": written,
           "vocabulary": run.vocabulary_table()}
    if run.is_complete(run.assignments):
        out.update(assignments=storage.parquet_files(run.assignments, run.options),
                   clusters=run.clusters, metrics=run.metrics,
                   metrics_values=run.read_json(run.metrics))
    return out


def check_model(config: Config, dimension: int | None = None) -> None:
    """Fail on an unknown open_clip model name (or, given `dimension`, a model whose embeddings
    have another size) in the driver, before Ray starts.

    The encoder is otherwise first built in a Ray task (weights download on a worker), so such
    a mistake surfaced only after a local cluster had started and a worker had imported torch:
    a minute or more on a small machine. `load_encoder` raises its usual message with close
    matches before it builds or downloads anything for an unknown name; the embedding size of a
    known architecture is in open_clip's bundled config, no weights needed. Hub models and local
    checkpoint folders are checked where they are loaded.
    """
    import open_clip

    from rayclust.encoders import load_encoder

    m = config.model
    pretrained = str(m.pretrained or "")
    if (m.name.startswith(("hf-hub:", "local-dir:")) or pretrained.startswith("hf-hub:")
            or (pretrained and os.path.isdir(pretrained))):
        return  # the name is not a bundled open_clip architecture then
    arch = m.name.replace("/", "-")  # open_clip accepts 'ViT-B/32' for 'ViT-B-32'
    if arch not in open_clip.list_models():
        load_encoder(m.name, None, device="cpu")  # raises EncoderLoadError with close matches
    model_dim = (open_clip.get_model_config(arch) or {}).get("embed_dim")
    if dimension is not None and model_dim is not None and model_dim != dimension:
        raise ConfigError(f"the embeddings have dimension {dimension} but model {m.name} "
                          f"encodes the vocabulary with dimension {model_dim}: set "
                          "model.name/model.pretrained to the model that made them, or pass "
                          "--vocabulary")


def run(config: Config, run_dir: str) -> dict:
    """Every stage in order (ARCHITECTURE.md), skipping those complete in the run directory."""
    if not config.input.embeddings:
        check_model(config)
    return _run_stages(config, open_run(config, run_dir))


def embed(config: Config, run_dir: str) -> dict:
    """The embed stage alone: manifest, embeddings, errors, thumbnails."""
    check_model(config)
    rd = open_run(config, run_dir)
    parts, _ = run_stage("embed", config, rd)
    images = sum(storage.read_parquet(p, rd.options, ["id"]).num_rows for p in parts)
    return {"run_dir": rd.root, "embeddings": parts, "images": images,
            "errors": count_errors(rd)}


def cluster_embeddings(config: Config, run_dir: str, embeddings: str,
                       vocabulary: str | None = None) -> dict:
    """Cluster precomputed embeddings (e.g. clip-retrieval output) without touching images.

    `embeddings`: Parquet file or folder with an `embedding` column (fixed_size_list or
    list<float>) and optional `id`, `uri`, `label`. `vocabulary`: Parquet of (noun, embedding)
    from the same CLIP model; without it the nouns are encoded with `model.*`.

    The inputs are checked before anything is written or Ray is started, so a wrong file fails
    in seconds (the embed stage then reads the file again to import it). Unusable rows go to
    `<run>/errors/part-embeddings.parquet` and the rest are clustered.
    """
    if not storage.exists(embeddings, config.storage):
        raise ConfigError(f"--embeddings {embeddings} does not exist")
    config.input.embeddings = embeddings
    if vocabulary is not None:
        if not storage.exists(vocabulary, config.storage):
            raise ConfigError(f"--vocabulary {vocabulary} does not exist")
        config.vocabulary.embeddings = vocabulary
    dimension = read_import(config).features.shape[1]
    if config.vocabulary.embeddings:
        _, nouns = read_vocabulary(config.vocabulary.embeddings, config.storage)
        if nouns.shape[1] != dimension:
            raise ConfigError(
                f"{embeddings} has embeddings of dimension {dimension} but the vocabulary "
                f"{config.vocabulary.embeddings} has {nouns.shape[1]}: both must come from the "
                "same CLIP model")
        del nouns
    else:
        check_model(config, dimension)
    log.info("cluster-embeddings: embeddings of dimension %d from %s", dimension, embeddings)
    return run(config, run_dir)


def read_run_config(run_dir: str, options, overrides: list[str] | None = None) -> Config:
    """The config a run directory was made with, plus `overrides` (KEY=VALUE)."""
    uri = RunDirectory(run_dir, options).config
    if not storage.exists(uri, options):
        raise ConfigError(f"{run_dir} is not a run directory (it has no config.yaml); create "
                          "one with `rayclust run` or `rayclust embed`")
    data = yaml.safe_load(storage.read_text(uri, options)) or {}
    return from_dict(apply_overrides(data, overrides or []))


def stage(name: str, run_dir: str, overrides: list[str] | None = None, options=None) -> dict:
    """Run stage `name` on the run directory `run_dir` with the config it holds (plus
    `overrides`, which are written back to its config.yaml)."""
    get_stage(name)  # an unknown name fails before anything is read
    config = read_run_config(run_dir, options or StorageOptions(), overrides)
    if not get_stage(name).applies(config):
        raise ConfigError(f"stage `{name}` is off in this run's config; add --set "
                          f"{name}.enabled=true to run it")
    rd = RunDirectory(run_dir, config.storage)
    if overrides:
        storage.write_text(rd.config, to_yaml(config), config.storage)
    if name in ("embed", "vocabulary") and not config.input.embeddings:
        check_model(config)
    written, ran = run_stage(name, config, rd)
    return {**_outputs(rd, {name: "ran" if ran else "skipped"}, {name: written}),
            "stage": name}


__all__ = ["STAGES", "STAGE_NAMES", "Stage", "check_model", "cluster_embeddings", "embed",
           "open_run", "read_run_config", "run", "run_stage", "stage"]
