"""Documented settings: a dataclass field that carries its documentation, accepted values and
minimum (`setting`), so that the config loader's error messages, `rayclust config --describe`
and the README table all come from the definition.

Foundation layer: used by the application config (`rayclust.config`) and by the method layer's
own hyper-parameter sections (`rayclust.method.hyperparameters`), which the config embeds.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any, doc: str, choices: tuple | None = None, minimum: float | None = None,
            factory: Any = None) -> Any:
    """A dataclass field with `doc`, optional accepted `choices` and `minimum`."""
    meta = {"doc": doc, "choices": choices, "min": minimum}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
