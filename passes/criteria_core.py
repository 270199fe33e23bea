"""Importance criteria: a registry of functions that give one score per unit of a group.

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

CRITERIA: dict[str, Callable[[Group, "CriterionContext"], np.ndarray]] = {}


@dataclasses.dataclass
class CriterionContext:
    rng: np.random.Generator
    stats: Any = None  # passes.stats.Stats when calibration data was given
    analysis: Any = None  # the model's Analysis


def criterion(name: str):
    """Register ``fn(group, ctx) -> scores`` (one float per unit) under ``name``."""

    def deco(fn):
        CRITERIA[name] = fn
        return fn

    return deco


def get_criterion(name: str):
    if name not in CRITERIA:
        known = _load_entry_points(name)
        if name not in CRITERIA:
            raise SurgeryError(f"unknown criterion '{name}' (known: {', '.join(sorted(set(CRITERIA) | known))})")
    return CRITERIA[name]


def _load_entry_points(name: str | None = None) -> set[str]:
    """Load the ``surgery.criteria`` entry point called ``name`` (every one when None), so a
    broken plugin only matters to whoever asks for it; returns every entry point's name."""
    from importlib.metadata import entry_points

    names = set()
    for ep in entry_points(group="surgery.criteria"):
        names.add(ep.name)
        if ep.name not in CRITERIA and (name is None or ep.name == name):
            try:
                CRITERIA[ep.name] = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin is the user's one-line error
                raise SurgeryError(f"criterion plugin '{ep.name}' ({ep.value}) failed to load: {e}") from e
    return names


def needs_stats(fn) -> str | None:
    """What calibration statistics a criterion needs: None (data-free), "moments" or "gram"."""
    return getattr(fn, "needs_stats", None)


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
    """Placeholder: surgery.torch_api registers the real one, which needs gradients."""
    raise SurgeryError("taylor needs a PyTorch module and a loss: surgery.prune(module, example_inputs, "
                       "criterion='taylor', loss=...)")


@criterion("random")
def random(group: Group, ctx: CriterionContext) -> np.ndarray:
    return ctx.rng.random(len(group.atoms))

