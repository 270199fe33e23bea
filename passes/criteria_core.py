"""Importance criteria: a registry of Criterion objects that give one score per unit of a group.

A criterion sees the group (every weight slice it cuts, with the unit -> indices map)
and a context (seeded rng, calibration statistics when there are any). Low scores
are removed first. Register your own with ``@surgery.criterion("name")``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from surgery.analysis import Group
from surgery.errors import SurgeryError

@dataclasses.dataclass(frozen=True)
class Criterion:
    """An importance criterion as data: its name, the calibration statistics it wants
    (None: data-free; "moments" or "gram": data-aware) and its score function
    ``score(group, ctx) -> one float per unit``. Calling it scores."""

    name: str
    score: Callable[[Group, "CriterionContext"], np.ndarray]
    wants: str | None = None

    @property
    def stats(self) -> str | None:
        return self.wants or getattr(self.score, "needs_stats", None)

    @property
    def needs_data(self) -> bool:
        return self.stats is not None

    def __call__(self, group: Group, ctx: "CriterionContext") -> np.ndarray:
        return self.score(group, ctx)


#: name -> Criterion (plain functions put here by plugins or tests are wrapped on lookup)
CRITERIA: dict[str, Criterion] = {}


@dataclasses.dataclass
class CriterionContext:
    rng: np.random.Generator
    stats: Any = None  # passes.stats.Stats when calibration data was given
    analysis: Any = None  # the model's Analysis


def criterion(name: str, *, stats: str | None = None):
    """Register ``fn(group, ctx) -> scores`` (one float per unit) under ``name``; ``stats``
    (or a ``needs_stats`` attribute on ``fn``) names the calibration statistics it needs.
    Returns ``fn`` itself, so the function stays callable as written."""

    def deco(fn):
        CRITERIA[name] = Criterion(name, fn, stats)
        return fn

    return deco


def as_criterion(obj, name: str | None = None) -> Criterion:
    """A Criterion for a registry entry, a plain score function or a Criterion."""
    if isinstance(obj, Criterion):
        return obj
    return Criterion(name or getattr(obj, "__name__", "criterion"), obj)


def get_criterion(name) -> Criterion:
    """The criterion registered as ``name`` (entry points loaded on demand), or ``name``
    itself when it already is a Criterion (a bound one, such as the PyTorch path's taylor)."""
    if isinstance(name, Criterion):
        return name
    if name not in CRITERIA:
        known = _load_entry_points(name)
        if name not in CRITERIA:
            raise SurgeryError(f"unknown criterion '{name}' (known: {', '.join(sorted(set(CRITERIA) | known))})")
    return as_criterion(CRITERIA[name], name)


def _load_entry_points(name: str | None = None) -> set[str]:
    """Load the ``surgery.criteria`` entry point called ``name`` (every one when None), so a
    broken plugin only matters to whoever asks for it; returns every entry point's name."""
    from importlib.metadata import entry_points

    names = set()
    for ep in entry_points(group="surgery.criteria"):
        names.add(ep.name)
        if ep.name not in CRITERIA and (name is None or ep.name == name):
            try:
                CRITERIA[ep.name] = as_criterion(ep.load(), ep.name)
            except Exception as e:  # noqa: BLE001 - a broken plugin is the user's one-line error
                raise SurgeryError(f"criterion plugin '{ep.name}' ({ep.value}) failed to load: {e}") from e
    return names


def needs_stats(fn) -> str | None:
    """What calibration statistics a criterion needs: None (data-free), "moments" or "gram"."""
    return fn.stats if isinstance(fn, Criterion) else getattr(fn, "needs_stats", None)


def per_index(group: Group, key: str, elementwise: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Per unit: the sum of ``elementwise(w)`` over every weight entry it removes.

    Computed once for all groups of a model (one sparse product), then indexed."""
    return group.analysis.weight_stat(key, elementwise)[group.atoms]


@criterion("l2")
def l2(group: Group, ctx: CriterionContext) -> np.ndarray:
    """Group L2 norm: every weight a unit would remove, across all coupled layers."""
    return np.sqrt(per_index(group, "sumsq", np.square))


@criterion("l1")
def l1(group: Group, ctx: CriterionContext) -> np.ndarray:
    return per_index(group, "abs", np.abs)


@criterion("taylor")
def taylor(group: Group, ctx: CriterionContext) -> np.ndarray:
    """By name only a refusal: the PyTorch path passes a taylor Criterion bound to the
    module's gradients (surgery/torch_api.py)."""
    raise SurgeryError(TAYLOR_WHY)


TAYLOR_WHY = ("taylor needs a PyTorch module and a loss: first-order Taylor importance |w * dL/dw| needs "
              "gradients, which an ONNX model does not give; use surgery.prune(module, example_inputs, "
              "criterion='taylor') (optionally calib=batches, loss=fn) on the nn.Module, or a criterion for ONNX "
              "models (l2, l1, or a data-aware one with calibration data: activation, wanda, ...)")


@criterion("random")
def random(group: Group, ctx: CriterionContext) -> np.ndarray:
    return ctx.rng.random(len(group.atoms))

