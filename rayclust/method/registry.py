"""Every clustering method, declared once.

A `MethodSpec` names the method, its hyper-parameter section (a dataclass of
`method.hyperparameters`, embedded in the application config under the method's name), the
estimator class that implements it (imported only when needed: the CLI and the config loader
list methods without importing torch), the pipeline stages it supports and the settings it uses
on a few hundred images (the demo). The config's `method` choices, its per-method sections, the
CLI help and the demo all come from `METHODS`.

Adding a method: one module with its estimator (a subclass of `method.estimators.Estimator`
with `prepare` and `objective`), its hyper-parameter section in `method.hyperparameters`, and a
`MethodSpec` line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from rayclust.method.hyperparameters import SEICConfig, TACConfig


@dataclass(frozen=True)
class MethodSpec:
    name: str                  # the config's `method` value and the name of its section
    summary: str               # one line for the CLI help and the config documentation
    params: type               # hyper-parameter section (a dataclass)
    estimator_path: str        # "module:Class" of its Estimator subclass
    stages: tuple[str, ...]    # the training stages it supports after stage 1 ("stage2")
    small_data: dict = field(default_factory=dict)  # settings for a few hundred images (demo)

    def estimator(self) -> type:
        """The estimator class (imports the method's module, and so torch)."""
        module, _, name = self.estimator_path.partition(":")
        return getattr(importlib.import_module(module), name)

    def supports(self, stage: str) -> bool:
        return stage in self.stages


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("seic", "SEIC (2025): consistency heads on frozen CLIP features, then "
                       "self-enhanced fine-tuning (stage 2)",
               SEICConfig, "rayclust.method.seic:SEIC", ("stage2",),
               small_data={"epochs": 60, "batch_size": 128}),
    MethodSpec("tac", "TAC (ICML 2024), the baseline", TACConfig, "rayclust.method.tac:TAC",
               # rayclust also fine-tunes on TAC's heads; the paper has no stage 2
               ("stage2",), small_data={"epochs": 40, "batch_size": 128, "knn": 10}),
)


def names() -> tuple[str, ...]:
    return tuple(m.name for m in METHODS)


def get(name: str) -> MethodSpec:
    for spec in METHODS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown method {name!r}; known: {', '.join(names())}")
