"""The method layer: pure PyTorch, no Ray, no application config.

Everything here works on in-memory tensors and is what `rayclust.pipeline` distributes. A user who
holds CLIP features can cluster them in three lines::

    from rayclust.method import SEIC
    model = SEIC(n_clusters=10).fit(image_features, noun_embeddings, nouns)
    model.labels_, model.cluster_names_

The estimators are exported lazily: `rayclust.method.registry` and `.hyperparameters` are read by
the config loader, which must not import torch.
"""

import importlib

_EXPORTS = {"SEIC": "rayclust.method.seic", "TAC": "rayclust.method.tac",
            "Estimator": "rayclust.method.estimators", "ClusterResult": "rayclust.method.estimators"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rayclust.method' has no attribute {name!r}")
