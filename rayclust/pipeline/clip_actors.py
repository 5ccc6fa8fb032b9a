"""The CLIP model on Ray: loading it where Ray placed the work, describing it to the driver
without holding it, and the encoder actors of the embed and vocabulary stages (RAY.md 1.3-1.5).

Both actor classes hold the same open_clip model (its image tower for `EncodeImages`, its text
tower for `EncodeNouns`) and run in an `ActorPoolStrategy` pool sized by `actor_resources`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayclust.config import Config
from rayclust.pipeline.ray_runtime import cluster_gpus
from rayclust.preprocess import ImagePreprocess
from rayclust.tables import embedding_array
from rayclust.vocabulary import TAC_TEMPLATES


@dataclass(frozen=True)
class EncoderInfo:
    """What the driver needs to know about the model without holding it."""

    preprocess: ImagePreprocess
    cache_key: str
    embed_dim: int


def load_clip(config: Config, device: str):
    """The configured open_clip model (`model.*`) on `device` (weights download on first use)."""
    from rayclust.encoders import load_encoder

    m = config.model
    return load_encoder(m.name, m.pretrained, device=device, cache_dir=m.cache_dir,
                        seed=config.seed)


def load_on_actor(config: Config):
    """The encoder inside a Ray actor: on the GPU Ray assigned it (or `model.device`)."""
    import ray
    import torch

    device = config.model.device if config.model.device != "auto" else (
        "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    return load_clip(config, device)


_DESCRIBED: dict[tuple, EncoderInfo] = {}


def describe_encoder(config: Config) -> EncoderInfo:
    """Preprocessing, embedding size and cache key of the configured model, once per process.

    A bundled open_clip architecture with random weights or a local checkpoint file is described
    here, from its config built on the meta device (no weights, no worker: a Ray task importing
    torch and open_clip cost a fresh worker process 13 s of CPU on a 2-core machine, at every
    command, even with the vocabulary cached). A model whose weights or config must be
    downloaded (a pretrained tag, a hub model) or read from a model folder is described by
    loading it in a Ray task: the download happens on a worker, and a failed one is the user's
    one-line error here instead of an encoder actor dying mid-pipeline."""
    m = config.model
    key = (m.name, m.pretrained, m.cache_dir, config.seed)
    if key not in _DESCRIBED:
        import ray

        from rayclust.encoders import describe_model

        here = describe_model(m.name, m.pretrained, config.seed)
        if here is not None and not here.downloads:
            _DESCRIBED[key] = EncoderInfo(here.preprocess, here.cache_key, here.embed_dim)
            return _DESCRIBED[key]

        @ray.remote(num_cpus=1)
        def describe(config: Config) -> EncoderInfo:
            encoder = load_clip(config, "cpu")
            return EncoderInfo(encoder.preprocess, encoder.cache_key, encoder.embed_dim)

        try:
            _DESCRIBED[key] = ray.get(describe.remote(config))
        except ray.exceptions.RayTaskError as exc:
            # a user mistake (unknown model, weights not downloadable) keeps its own clear
            # message instead of arriving wrapped in a remote traceback
            from rayclust.encoders import EncoderLoadError
            if isinstance(exc.cause, EncoderLoadError):
                raise exc.cause from None
            raise
    return _DESCRIBED[key]


def actor_resources(config: Config) -> tuple[int, float]:
    """(actors, GPUs per actor) for encoder pools, from the config and the cluster."""
    e = config.embed
    gpus = cluster_gpus(config)
    per_actor = e.gpus_per_actor if e.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    actors = e.actors or (max(1, int(gpus // per_actor)) if per_actor else 1)
    return actors, per_actor


class EncodeImages:
    """Ray Data callable class: holds the open_clip model, encodes a batch of uint8 images."""

    def __init__(self, config: Config):
        self.encoder = load_on_actor(config)
        self.dtype = config.output.embedding_dtype

    def __call__(self, batch: dict) -> pa.Table:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        d = self.encoder.embed_dim
        vectors = np.zeros((len(ok), d), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.encoder.encode_uint8(batch["pixels"][ok]).numpy()
        columns = {k: v for k, v in batch.items() if k not in ("pixels",)}
        table = pa.table({k: pa.array(list(v) if v.dtype == object else v)
                          for k, v in columns.items()})
        return table.append_column("embedding", embedding_array(vectors, self.dtype))


class EncodeNouns:
    """Ray Data callable class: the text tower of the same open_clip model, one prompt ensemble
    per noun (TAC's templates)."""

    def __init__(self, config: Config):
        self.encoder = load_on_actor(config)
        self.config = config

    def __call__(self, batch: dict) -> dict:
        matrix = self.encoder.encode_prompt_ensemble(
            list(batch["noun"]), TAC_TEMPLATES, batch_size=self.config.model.text_batch_size,
            normalize_templates=self.config.vocabulary.normalize_templates).numpy()
        return {"index": batch["index"], "embedding": matrix}
