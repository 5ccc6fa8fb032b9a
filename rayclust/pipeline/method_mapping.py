"""The application config mapped onto the method layer, which takes plain hyper-parameters: the
one place that reads `method`, `clusters` and the method's section to build an estimator (later
stages take K and the method from the saved stage-1 model instead)."""

from __future__ import annotations

from typing import Callable

from rayclust.config import Config, method_section
from rayclust.method import registry


def estimator_for(config: Config, device="cpu", on_epoch_end: Callable | None = None):
    """The configured method's estimator (`method.estimators.Estimator`), not fitted."""
    cls = registry.get(config.method).estimator()
    return cls(config.clusters, method_section(config), kmeans=config.kmeans,
               guard=config.guard, device=device, seed=config.seed,
               top_nouns=config.output.top_nouns, on_epoch_end=on_epoch_end)
