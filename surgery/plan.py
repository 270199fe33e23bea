"""The plan: the whole decision, as data. Which units each group loses, and every
weight slice that goes with them, by the tensor names of the input model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from surgery.analysis import Analysis
from surgery.errors import SurgeryError


@dataclasses.dataclass
class PlanGroup:
    id: int
    name: str
    unit: int
    units: int
    removed_units: list[int]  # positions within the group's prunable units
    exact: bool | None
    tensors: list[dict]  # {"tensor", "axis", "removed"}

    def as_dict(self) -> dict:
        return {
            "id": self.id, "name": self.name, "unit": self.unit, "units": self.units,
            "units_removed": len(self.removed_units), "removed_units": self.removed_units,
            "exact": self.exact, "tensors": self.tensors,
        }


@dataclasses.dataclass
class Plan:
    groups: list[PlanGroup]

    def as_dict(self) -> dict:
        return {"format": "surgery-plan/1", "groups": [g.as_dict() for g in self.groups]}

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1))

    def tensor_cuts(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """tensor -> [(axis, removed indices)], merged over groups."""
        acc: dict[tuple[str, int], set[int]] = {}
        for g in self.groups:
            for t in g.tensors:
                acc.setdefault((t["tensor"], int(t["axis"])), set()).update(int(i) for i in t["removed"])
        out: dict[str, list[tuple[int, np.ndarray]]] = {}
        for (name, axis), idx in acc.items():
            out.setdefault(name, []).append((axis, np.array(sorted(idx), dtype=np.int64)))
        return out


def build_plan(analysis: Analysis, removed: dict[int, np.ndarray]) -> Plan:
    """removed: group id -> removed atoms."""
    init = analysis.model.graph.initializers
    out = []
    per_group = analysis.removed_indices_per_group({k: v for k, v in removed.items() if len(v)})
    for g in analysis.groups:
        atoms = removed.get(g.id)
        if atoms is None or not len(atoms):
            continue
        pos = {a: i for i, a in enumerate(g.atoms.tolist())}
        tensors = []
        for axis_id, idx in sorted(per_group[g.id].items()):
            kind, name, k = analysis.dims.axes[axis_id].key
            if kind == "value" and name in init:
                entry = {"tensor": name, "axis": int(k), "removed": [int(i) for i in idx]}
                folded = init[name].meta.get("surgery.folded_from")
                if folded:  # computed in the input file by a constant subgraph from these weights
                    entry["folded_from"] = list(folded)
                tensors.append(entry)
        out.append(PlanGroup(g.id, g.name, g.unit, len(g.atoms), sorted(pos[a] for a in atoms.tolist()),
                             True if g.exact else None, tensors))
    return Plan(out)


def read_plan(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    p = Path(path_or_dict)
    if not p.is_file():
        raise SurgeryError(f"plan file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{p} is not a JSON plan: {e}") from e
    except RecursionError as e:  # json's parser recurses per nesting level
        raise SurgeryError(f"plan file {p} is nested too deeply to be a surgery plan") from e
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
        raise SurgeryError(f"{p} is not a surgery plan (no 'groups' list)")
    return data


def atoms_from_plan(analysis: Analysis, data: dict) -> dict[int, np.ndarray]:
    """Recover the removed units from a plan's tensor slices, and check they say exactly that.

    A hand-edited plan may list any slices; it is accepted only when they are
    exactly the slices of some set of whole units."""
    by_name = {g.name: g for g in analysis.groups}
    init = analysis.model.graph.initializers
    listed: dict[int, set[int]] = {}
    chosen: dict[int, np.ndarray] = {}
    _validate(data)
    for entry in data["groups"]:
        name = entry.get("name")
        g = by_name.get(name)
        if g is None:
            raise SurgeryError(f"plan group '{name}' does not exist in this model (wrong model, or another export of it?)")
        mine: dict[int, set[int]] = {}
        for t in entry.get("tensors", []):
            tname, axis = t["tensor"], int(t["axis"])
            if tname not in init:
                raise SurgeryError(f"plan names tensor '{tname}', which is not a weight of this model")
            aid = analysis.dims.find(("value", tname, axis))
            if aid is None:
                raise SurgeryError(f"plan cuts axis {axis} of '{tname}', which no group of this model cuts")
            mine.setdefault(aid, set()).update(int(i) for i in t["removed"])
        pick = []
        for u, atom in enumerate(g.atoms.tolist()):
            fp = analysis.footprint(atom)
            on = {a: set(v.tolist()) for a, v in fp.items() if a in mine}
            if on and all(on[a] <= mine[a] for a in on):
                pick.append(atom)
        if len(pick) == len(g.atoms) and not len(g.blocked_atoms):
            raise SurgeryError(f"plan removes every unit of group '{name}'; a group must keep at least one")
        chosen[g.id] = np.array(pick, dtype=np.int64)
        for a, s in mine.items():
            listed.setdefault(a, set()).update(s)
    want = {a: s for a, s in listed.items()}
    got = {}
    all_atoms = np.concatenate(list(chosen.values())) if chosen else np.zeros(0, np.int64)
    for a, idx in analysis.removed_indices(all_atoms).items():
        kind, name, _ = analysis.dims.axes[a].key
        if kind == "value" and name in init:
            got[a] = set(idx.tolist())
    for a in sorted(set(want) | set(got)):
        if want.get(a, set()) != got.get(a, set()):
            _, name, k = analysis.dims.axes[a].key
            extra = sorted(got.get(a, set()) - want.get(a, set()))[:5]
            missing = sorted(want.get(a, set()) - got.get(a, set()))[:5]
            raise SurgeryError(
                f"plan is not a set of whole units at '{name}' axis {k}: "
                + (f"coupled indices not listed {extra}" if extra else f"indices that no whole unit removes {missing}")
            )
    return chosen


def _validate(data: dict) -> None:
    """Shape of a (possibly hand-edited) plan, checked before anything is looked up."""
    for gi, entry in enumerate(data["groups"]):
        where = f"plan group #{gi}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise SurgeryError(f"{where} has no 'name'")
        tensors = entry.get("tensors")
        if not isinstance(tensors, list):
            raise SurgeryError(f"{where} ('{entry['name']}') has no 'tensors' list")
        for t in tensors:
            ok = (
                isinstance(t, dict) and isinstance(t.get("tensor"), str)
                and isinstance(t.get("axis"), int) and not isinstance(t.get("axis"), bool)
                and isinstance(t.get("removed"), list)
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in t["removed"])
            )
            if not ok:
                raise SurgeryError(
                    f"{where} ('{entry['name']}'): each tensor entry needs 'tensor' (str), 'axis' (int) "
                    f"and 'removed' (list of non-negative ints), got {_brief(t)}"
                )


def _brief(obj, limit: int = 80) -> str:
    """A short JSON rendering of a bad plan entry for an error message (never raises:
    an entry nested deeper than the encoder can recurse is described, not printed)."""
    try:
        return json.dumps(obj)[:limit]
    except (RecursionError, TypeError, ValueError):
        return f"a {type(obj).__name__} nested too deeply to show"
