"""The method layer: pure PyTorch, no Ray.

Everything here works on in-memory tensors and is what `rayclust.pipeline` distributes. A user who
holds CLIP features can cluster them in three lines::

    from rayclust.method import SEIC
    model = SEIC(n_clusters=10).fit(image_features, noun_embeddings, nouns)
    model.labels_, model.cluster_names_
"""

from rayclust.method.estimators import SEIC, TAC, ClusterResult, make_method

__all__ = ["SEIC", "TAC", "ClusterResult", "make_method"]
