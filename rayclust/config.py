"""Typed run configuration: YAML in, validated dataclasses out, the resolved YAML written back.

Every field carries its documentation and, where the values are a closed set, the accepted values
(`field(metadata=...)`), so that error messages, `rayclust config --show` and the README table
all come from this one place. Unknown keys and bad values raise `ConfigError` naming the dotted
key and what is accepted. `--set a.b=c` overrides are parsed as YAML scalars, so `--set
stage1.epochs=5` is an int and `--set model.pretrained=none` is the string "none".
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from rayclust.method import registry
# the method layer's own sections, embedded here (and importable from here, as before)
from rayclust.method.hyperparameters import (ADAPTER_KINDS, LORA_RANK, GuardConfig, KMeansConfig,
                                             SEICConfig, TACConfig)
from rayclust.settings import setting as _f
from rayclust.storage import StorageOptions

__all__ = ["Config", "ConfigError", "GuardConfig", "KMeansConfig", "SEICConfig", "TACConfig",
           "from_dict", "load", "to_dict", "to_yaml"]


class ConfigError(ValueError):
    """A user mistake in a config file or `--set` override; the message says how to fix it."""


@dataclass
class InputConfig:
    path: str | None = _f(None, "Folder or s3:// prefix of images (searched recursively), or a "
                                "Parquet/CSV manifest with a `uri` column and optional `label`.")
    labels: str = _f("none", "Where ground-truth labels come from, for evaluation only: `none`, "
                             "`from_folder` (the image's parent folder name) or `manifest` (the "
                             "manifest's `label` column).", ("none", "from_folder", "manifest"))
    extensions: list[str] = _f(None, "File extensions taken from a folder or prefix.",
                               factory=lambda: ["jpg", "jpeg", "png", "webp", "bmp", "tif",
                                                "tiff", "gif"])
    max_images: int | None = _f(None, "Use at most this many images (the first in sorted URI "
                                      "order); `null` takes all.", minimum=1)
    embeddings: str | None = _f(None, "Parquet file or folder of precomputed CLIP embeddings "
                                      "(`embedding` column, optional id, uri, label), as "
                                      "`rayclust cluster-embeddings --embeddings` sets it: the "
                                      "embed stage then imports their usable rows instead of "
                                      "reading images.")
    rows_per_shard: int = _f(50000, "Rows per manifest shard. A shard is the unit of work and of "
                                    "resume: its embeddings, errors and thumbnails parts are "
                                    "written together once it is complete.", minimum=1)


@dataclass
class ModelConfig:
    name: str = _f("ViT-B-32", "open_clip architecture name (`open_clip.list_models()`), or "
                               "`hf-hub:org/repo`. `rayclust-tiny` is a built-in random test model.")
    pretrained: str = _f("laion2b_s34b_b79k", "open_clip pretrained tag "
                         "(`open_clip.list_pretrained_tags_by_model(name)`), a local checkpoint "
                         "path, or `none` for random weights (offline; exercises the pipeline).")
    device: str = _f("auto", "Encoder actors' device: `auto` (CUDA when Ray gave the actor a GPU), "
                             "`cpu`, `cuda` or `cuda:N`.")
    batch_size: int = _f(64, "Images per encoder forward pass.", minimum=1)
    text_batch_size: int = _f(512, "Prompts per text-encoder forward pass.", minimum=1)
    cache_dir: str | None = _f(None, "Where downloaded weights are cached (open_clip's default "
                                     "when null).")


@dataclass
class EmbedConfig:
    actors: int | None = _f(None, "Encoder actors in the pool; null = one per GPU (or 1 on CPU).",
                            minimum=1)
    gpus_per_actor: float | None = _f(None, "GPUs per encoder actor (fractions share a GPU); null "
                                            "= 1 when the cluster has GPUs, else 0 (CPU).",
                                      minimum=0.0)
    cpus_per_actor: float = _f(1.0, "CPUs reserved per encoder actor.", minimum=0.0)
    decode_batch_size: int = _f(32, "Images per CPU decode task batch.", minimum=1)
    decode_cpus: float = _f(1.0, "CPUs per decode task.", minimum=0.01)
    decode_memory_mb: int = _f(1024, "Memory reserved per decode task (decoded images are ~10x "
                                     "their JPEG size), so Ray does not over-schedule.",
                               minimum=0)
    thumbnail_size: int = _f(96, "Longest side of the JPEG thumbnail kept for the report; 0 "
                                 "disables thumbnails.", minimum=0)
    progress_seconds: float = _f(10.0, "Seconds between the driver's progress lines.",
                                 minimum=0.1)


@dataclass
class RayConfig:
    address: str | None = _f(None, "Ray cluster to join (`auto`, `ray://...`); null joins "
                                   "RAY_ADDRESS when set, else starts a local cluster.")
    num_cpus: int | None = _f(None, "Logical CPUs of a local cluster started by rayclust; null = "
                                    "all, but at least 4.",
                              minimum=1)


@dataclass
class VocabularyConfig:
    source: str = _f("wordnet", "`wordnet` (bundled WordNet 3.0 nouns), or a path/URI to a text "
                                "file with one noun per line.")
    max_nouns: int | None = _f(None, "Keep only the N most frequent nouns (WordNet: by SemCor "
                                     "tagged-sense count); `null` keeps all.", minimum=1)
    normalize_templates: bool = _f(False, "Normalise each prompt-template embedding before "
                                          "averaging (VLM4Cluster) instead of averaging raw "
                                          "embeddings (TAC's code).")
    embeddings: str | None = _f(None, "Parquet of precomputed `(noun, embedding)` to use instead "
                                      "of encoding the nouns.")
    cache_dir: str | None = _f(None, "Cache of noun embeddings per model; default "
                                     "`~/.cache/rayclust/vocabulary`.")








@dataclass
class TrainConfig:
    workers: int | None = _f(None, "Ray Train workers (data-parallel, DDP) for stage 1 and "
                                   "stage 2. null = one per GPU of the cluster, or 0 on a "
                                   "CPU-only cluster. 0 trains stage 1 inside the driver process "
                                   "(no Ray Train); stage 2 then runs on 1 worker.", minimum=0)
    use_gpu: bool | None = _f(None, "One GPU per worker; null = when the cluster has GPUs.")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per training worker.", minimum=0.0)
    max_failures: int = _f(2, "Times a stage restarts its worker group from the last checkpoint "
                              "after a worker dies, before the run fails.", minimum=0)
    keep_checkpoints: int = _f(2, "Checkpoints kept per stage (the newest).", minimum=1)


@dataclass
class Stage2Config:
    enabled: bool = _f(False, "Run SEIC stage 2: fine-tune the vision encoder and the image "
                              "head on the stage-1 model's pseudo-labels (needs the images, "
                              "not only embeddings).")
    epochs: int = _f(40, "Fine-tuning epochs.", minimum=1)
    batch_size: int = _f(128, "Images per step and worker (global batch = workers x this). "
                              "Every epoch visits a fresh global permutation of the corpus, in "
                              "ceil(N / global batch) steps.", minimum=2)
    learning_rate: float = _f(5e-5, "AdamW learning rate.", minimum=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", minimum=0.0)
    adapter: str = _f(ADAPTER_KINDS[0],
                      "What trains in the vision tower: `lora` (low-rank updates of the "
                      "attention Q and V projections), `last_blocks` (the last "
                      "`unfreeze_blocks` blocks), `full`, or `none` (head only).",
                      ADAPTER_KINDS)
    lora_rank: int = _f(LORA_RANK, "LoRA rank r.", minimum=1)
    lora_alpha: float | None = _f(None, "LoRA alpha (update scale alpha/r); null = r.",
                                  minimum=0.0)
    unfreeze_blocks: int = _f(2, "Blocks trained by `adapter: last_blocks`.", minimum=1)
    refresh_epochs: int = _f(1, "R: the pseudo-label table is recomputed over the whole corpus "
                                "every R epochs; 0 = online labels from each batch's weak view.",
                             minimum=0)
    confidence_momentum: float = _f(0.999, "EMA momentum of the confidence mean and variance "
                                           "in online mode (refresh_epochs: 0).", minimum=0.0)
    crop_min_scale: float = _f(0.5, "Smallest area fraction of the strong view's random crop.",
                               minimum=0.05)
    inference_batch_size: int = _f(256, "Images per forward pass at table refresh and "
                                        "assignment.", minimum=1)
    compile: bool = _f(False, "torch.compile the vision tower's forward (a one-off compile per "
                              "worker): 1.63x the step rate for ViT-B/32 LoRA at batch 256 on an "
                              "H200; on CPUs the strong view dominates and it gains little.")




@dataclass
class OutputConfig:
    embedding_dtype: str = _f("float32", "Arrow value type of stored embeddings.",
                              ("float32", "float16"))
    rows_per_file: int = _f(100000, "Maximum rows per output Parquet part.", minimum=1)
    top_nouns: int = _f(5, "Nouns listed per cluster in clusters.parquet.", minimum=1)


def _method_sections() -> list[tuple[str, type, Any]]:
    """One section per method of the registry, named after it (`seic`, `tac`, ...)."""
    return [(m.name, m.params, _f(None, f"{m.summary}: hyper-parameters.", factory=m.params))
            for m in registry.METHODS]


# The run configuration. Built from a field list so that the methods' sections come from the
# method registry: adding a method adds its section and its `method` choice here.
Config = dataclasses.make_dataclass("Config", [
    ("method", str, _f("seic", "Clustering method: "
                       + "; ".join(f"`{m.name}` {m.summary}" for m in registry.METHODS) + ".",
                       registry.names())),
    ("clusters", int, _f(10, "K, the number of clusters.", minimum=2)),
    ("seed", int, _f(0, "Seed of every random choice (sampling, k-means, initialisation).")),
    ("device", str, _f("auto", "Device for the method layer: `auto`, `cpu`, `cuda`, `cuda:N`.")),
    ("progress", bool, _f(True, "Progress bars and periodic progress lines.")),
    ("input", InputConfig, _f(None, "Image corpus.", factory=InputConfig)),
    ("storage", StorageOptions, _f(None, "S3 access (credentials come from the standard AWS "
                                         "chain, never from this file).",
                                   factory=StorageOptions)),
    ("model", ModelConfig, _f(None, "CLIP encoder.", factory=ModelConfig)),
    ("embed", EmbedConfig, _f(None, "The Ray Data embedding stage.", factory=EmbedConfig)),
    ("ray", RayConfig, _f(None, "Which Ray cluster runs the work.", factory=RayConfig)),
    ("vocabulary", VocabularyConfig, _f(None, "Noun vocabulary.", factory=VocabularyConfig)),
    ("kmeans", KMeansConfig, _f(None, "Spherical k-means.", factory=KMeansConfig)),
    *_method_sections(),
    ("train", TrainConfig, _f(None, "Ray Train workers for stage 1 and stage 2.",
                              factory=TrainConfig)),
    ("stage2", Stage2Config, _f(None, "Stage 2, self-enhanced fine-tuning.",
                                factory=Stage2Config)),
    ("guard", GuardConfig, _f(None, "Language helps or steps aside.", factory=GuardConfig)),
    ("output", OutputConfig, _f(None, "Output files.", factory=OutputConfig)),
])
Config.__module__ = __name__
Config.__doc__ = "The whole run configuration (what `<run>/config.yaml` holds)."


def method_section(config) -> Any:
    """The hyper-parameter section of the configured method."""
    return getattr(config, config.method)


# StorageOptions lives in the storage module (attribute docstrings); its docs for the table:
_STORAGE_DOCS = {
    "endpoint": "S3 endpoint URL (e.g. `http://127.0.0.1:9000` for MinIO); null means AWS.",
    "region": "AWS region; null lets the AWS SDK decide (AWS_DEFAULT_REGION, profile).",
    "anonymous": "Unsigned requests for public buckets (also `s3://anonymous@bucket/key`).",
}


def field_doc(cls: type, f: dataclasses.Field) -> str:
    if cls is StorageOptions:
        return _STORAGE_DOCS.get(f.name, "")
    return f.metadata.get("doc", "")


# --------------------------------------------------------------------------------------------
# Building from plain data


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(args[0])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric pretrained tag
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" Did you mean `{prefix}{close[0]}`?" if close else ""
        raise ConfigError(f"unknown key `{prefix}{key}`.{hint} Accepted keys here: "
                          f"{', '.join(fields)}.")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if _is_section(tp):
            kwargs[name] = _build(tp, data.get(name), key + ".")
            continue
        if name not in data:
            continue
        value = _coerce(data[name], tp, key)
        choices, minimum = f.metadata.get("choices"), f.metadata.get("min")
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not accepted; use one of: "
                              f"{', '.join(map(str, choices))}.")
        if minimum is not None and value is not None and value < minimum:
            raise ConfigError(f"{key}: {value!r} is too small; the minimum is {minimum}.")
        kwargs[name] = value
    return cls(**kwargs)


def _validate(config: Config) -> None:
    for method in registry.METHODS:  # each section checks what spans several of its keys
        problem = getattr(config, method.name).problem(config.clusters)
        if problem:
            raise ConfigError(f"{method.name}.{problem}")
    if config.stage2.crop_min_scale > 1:
        raise ConfigError("stage2.crop_min_scale is an area fraction: at most 1.")
    if config.guard.text_weight > 1:
        raise ConfigError("guard.text_weight is a share of the selection score: at most 1.")
    if config.guard.neighbours >= config.guard.sample:
        raise ConfigError("guard.neighbours must be smaller than guard.sample.")


def from_dict(data: dict | None) -> Config:
    config = _build(Config, data or {}, "")
    _validate(config)
    return config


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Overrides and files


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], yaml-parsed c)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set clusters=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key is empty or malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load(path: str | None = None, overrides: list[str] | None = None,
         read_text: Any = None, base: dict | None = None) -> Config:
    """Config from an optional YAML file (local or via `read_text(uri)`), then overrides."""
    data: dict = dict(base or {})
    if path is not None:
        try:
            text = read_text(path) if read_text else open(path, encoding="utf-8").read()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = _deep_merge(data, loaded or {})
    data = apply_overrides(data, overrides or [])
    return from_dict(data)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field: the documentation table."""
    rows = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            rows.extend(describe_fields(tp, f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        doc = field_doc(cls, f)
        rows.append((f"{prefix}{f.name}", yaml.safe_dump(default, default_flow_style=True)
                     .strip().removesuffix("...").strip(), doc))
    return rows
