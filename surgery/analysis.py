"""Groups: the sets of channel units that must be removed together, read off the coupling.

A group is every atom whose removal touches the same set of axes (all channels a
conv produces, together with everything downstream that reads them; all heads of
one attention). Its units are its atoms that are not blocked.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import numpy as np
import onnx_ir as ir
import scipy.sparse as sp

from surgery.dims import NOT_CHANNEL, Coupling, DimGraph, group_atoms
from surgery.errors import SurgeryError
from surgery.passes.dependency import build_dim_graph


@dataclasses.dataclass
class WeightSlice:
    """One weight axis a group cuts: ``units[u]`` marks the indices unit u removes."""

    tensor: str
    axis: int
    value: ir.Value
    units: sp.csr_matrix  # units x axis length

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()


@dataclasses.dataclass
class Group:
    id: int
    name: str  # "<tensor>@<axis>" of its first weight axis
    atoms: np.ndarray  # prunable atoms: the units
    blocked_atoms: np.ndarray
    blocked_reason: str | None
    inexact_reason: str | None
    axes: tuple[int, ...]
    unit: int  # channels one unit removes from the group's first weight axis
    weight_axes: list[int]
    kind: str = "channel"  # heads | kv_heads | q_per_kv | head_dim | hidden | mlp | channel
    analysis: "Analysis" = dataclasses.field(repr=False, default=None)

    @cached_property
    def slices(self) -> list[WeightSlice]:
        """Every weight axis this group cuts, with the unit -> indices map."""
        a = self.analysis
        out = []
        for ax_id in self.weight_axes:
            kind, name, k = a.dims.axes[ax_id].key
            ax = a.dims.axes[ax_id]
            sub = a._removes_csc[:, self.atoms][ax.offset : ax.offset + ax.size] if len(self.atoms) else None
            units = sp.csr_matrix(sub.T) if sub is not None else sp.csr_matrix((0, ax.size))
            out.append(WeightSlice(name, k, a.model.graph.initializers[name], units))
        return out

    def weight_slices_names(self) -> list:
        """(tensor, axis) of every weight axis the group cuts, without building the unit maps."""
        out = []
        for ax_id in self.weight_axes:
            _, name, k = self.analysis.dims.axes[ax_id].key
            out.append(WeightSlice(name, k, None, None))
        return out

    @property
    def prunable(self) -> bool:
        return len(self.atoms) >= 2 or (len(self.atoms) >= 1 and len(self.blocked_atoms) >= 1)

    @property
    def exact(self) -> bool:
        return self.inexact_reason is None


class Analysis:
    """The result of lowering a model into coupled dims: groups, and how to cut them."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        _name_nodes(model)
        self.dims: DimGraph = build_dim_graph(model)
        # only clusters that hold a weight axis can make a group (see docs/design-notes.md)
        inits = model.graph.initializers
        weights = [i for i, ax in enumerate(self.dims.axes) if ax.key[0] == "value" and ax.key[1] in inits]
        self.coupling: Coupling = self.dims.solve(weights)
        self.groups: list[Group] = self._groups()
        # what passes derive from this analysis alone (weight statistics, consumers, target
        # terms), under a key each pass owns; read before the cut, which changes the model
        # in place (whoever goes on from a cut model analyzes it afresh)
        self.derived: dict = {}

    # -- construction -----------------------------------------------------
    def _initializer_axes(self) -> dict[int, tuple[str, int, ir.Value]]:
        out = {}
        inits = self.model.graph.initializers
        for i, ax in enumerate(self.dims.axes):
            kind, name, k = ax.key
            if kind == "value" and name in inits and ax.offset >= 0:
                out[i] = (name, k, inits[name])
        return out

    def _groups(self) -> list[Group]:
        c = self.coupling
        g = self.dims
        init_axes = self._initializer_axes()
        groups = []
        for axes, atoms in group_atoms(c):
            w_axes = [a for a in axes if a in init_axes]
            if not w_axes:
                continue  # removing it saves no weight
            atoms = np.array(sorted(atoms), dtype=np.int64)
            blocked = np.array([a for a in atoms if a in c.atom_block], dtype=np.int64)
            free = np.array([a for a in atoms if a not in c.atom_block], dtype=np.int64)
            reason = next((c.atom_block[a] for a in atoms if a in c.atom_block), None)
            if not len(free) and NOT_CHANNEL in reason:
                continue  # kernel taps and spatial positions are not channels
            if len(atoms) == 1 and not len(blocked):
                continue  # a single unit (a depthwise conv's one channel per group) can never go
            inexact = next((c.atom_inexact[a] for a in atoms if a in c.atom_inexact), None)
            # name a group after its first matrix or kernel (a projection, not a RoPE table)
            mats = [a for a in w_axes if len(init_axes[a][2].const_value.shape) >= 2]
            first = min(mats or w_axes)
            fname, fk, _ = init_axes[first]
            unit = self._unit_size(atoms[:8], first)
            groups.append(
                Group(
                    id=-1,
                    name=f"{fname}@{fk}",
                    atoms=free,
                    blocked_atoms=blocked,
                    blocked_reason=reason,
                    inexact_reason=inexact,
                    axes=tuple(axes),
                    unit=unit,
                    weight_axes=w_axes,
                    kind=_kind(set().union(*(g.roles.get(a, ()) for a in axes))),
                    analysis=self,
                )
            )
        groups.sort(key=lambda gr: min(a for a in gr.axes if a in init_axes))
        count: dict[str, int] = {}
        for gr in groups:
            count[gr.name] = count.get(gr.name, 0) + 1
        seen: dict[str, int] = {}
        for i, gr in enumerate(groups):
            gr.id = i
            if count[gr.name] > 1:  # e.g. a grouped conv's groups and its channels-per-group
                atom = int(gr.atoms[0]) if len(gr.atoms) else int(gr.blocked_atoms[0])
                gr.name += self._factor_label(atom)
            n = seen[gr.name] = seen.get(gr.name, 0) + 1
            if n > 1:
                gr.name = f"{gr.name}#{n}"
        return groups

    # -- queries ----------------------------------------------------------
    @cached_property
    def value_axes(self) -> dict[str, list[int]]:
        """value or initializer name -> its axis ids."""
        out: dict[str, list[int]] = {}
        for i, ax in enumerate(self.dims.axes):
            if ax.key[0] == "value":
                out.setdefault(ax.key[1], []).append(i)
        return out

    def removed_indices(self, atoms) -> dict[int, np.ndarray]:
        """axis id -> sorted indices removed along it, for removing ``atoms``."""
        if not len(atoms):
            return {}
        return self._by_axis(np.flatnonzero(self.coupling.removed_elements(atoms)))

    def _by_axis(self, els: np.ndarray) -> dict[int, np.ndarray]:
        """Sorted element ids -> {axis id: indices along that axis}."""
        starts, ids = self._axis_starts
        pos = np.searchsorted(starts, els, side="right") - 1
        if not len(pos):
            return {}
        bounds = np.flatnonzero(np.diff(pos)) + 1
        lo = np.concatenate([[0], bounds]).tolist()
        hi = np.concatenate([bounds, [len(els)]]).tolist()
        local = els - starts[pos]
        return {int(ids[pos[a]]): local[a:b] for a, b in zip(lo, hi)}

    def removed_indices_per_group(self, removed: dict[int, np.ndarray]) -> dict[int, dict[int, np.ndarray]]:
        """Like removed_indices for each group's removed atoms, in one sparse product."""
        gids = list(removed)
        if not gids:
            return {}
        rows = np.concatenate([removed[g] for g in gids])
        cols = np.concatenate([np.full(len(removed[g]), k) for k, g in enumerate(gids)])
        S = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(self.coupling.removes.shape[1], len(gids)))
        R = (self.coupling.removes @ S).tocsc()
        out = {}
        for k, g in enumerate(gids):
            out[g] = self._by_axis(np.sort(R.indices[R.indptr[k] : R.indptr[k + 1]]))
        return out

    def atom_sums(self, element_values: np.ndarray) -> np.ndarray:
        """Per atom: the sum of ``element_values`` over every element it removes."""
        return self.coupling.removes.T @ element_values

    def weight_stat(self, key: str, elementwise) -> np.ndarray:
        """Per atom: the sum of ``elementwise(weight)`` over every weight entry it removes
        along each cut axis (computed once per model and cached)."""
        cache = self.derived.setdefault("weight_stats", {})
        if key not in cache:
            vec = np.zeros(self.dims.n_elements, dtype=np.float64)
            per_tensor: dict[str, list[tuple[int, int]]] = {}
            for ax_id, (name, k, _) in self._initializer_axes().items():
                per_tensor.setdefault(name, []).append((ax_id, k))
            inits = self.model.graph.initializers
            for name, axes in per_tensor.items():
                arr = inits[name].const_value.numpy()
                if arr.dtype.kind != "f":
                    continue
                val = elementwise(arr.astype(np.float32, copy=False))
                for ax_id, k in axes:
                    ax = self.dims.axes[ax_id]
                    other = tuple(j for j in range(arr.ndim) if j != k)
                    vec[ax.offset : ax.offset + ax.size] = val.sum(axis=other, dtype=np.float64)
            cache[key] = self.atom_sums(vec)
        return cache[key]

    @cached_property
    def _removes_csc(self):
        return self.coupling.removes.tocsc()

    @cached_property
    def _axis_starts(self) -> tuple[np.ndarray, np.ndarray]:
        ids = [i for i, ax in enumerate(self.dims.axes) if ax.offset >= 0 and ax.size > 0]
        return np.array([self.dims.axes[i].offset for i in ids], dtype=np.int64), np.array(ids, dtype=np.int64)

    def _factor_label(self, atom: int) -> str:
        """' (groups of Conv_3)' when the unit is a factor a rule made up (a grouped conv's
        groups, a reshape's heads), so names of groups sharing a first weight differ."""
        starts, ids = self._axis_starts
        els = self.coupling.component_elements(atom)
        for p in np.unique(np.searchsorted(starts, els, side="right") - 1).tolist():
            kind, node, tag = self.dims.axes[int(ids[p])].key
            if kind == "virtual":
                return f" ({tag} of {node})"
        return ""

    def _unit_size(self, atoms, axis_id: int) -> int:
        M = self._removes_csc
        ax = self.dims.axes[axis_id]
        best = 0
        for a in atoms.tolist():
            els = M.indices[M.indptr[a] : M.indptr[a + 1]]
            best = max(best, int(((els >= ax.offset) & (els < ax.offset + ax.size)).sum()))
        return best

    def footprint(self, atom: int) -> dict[int, np.ndarray]:
        """axis id -> indices removed along it by removing this one atom."""
        M = self._removes_csc
        return self._by_axis(np.sort(M.indices[M.indptr[atom] : M.indptr[atom + 1]]))

    def atoms_touching(self, axis_ids) -> set[int]:
        """Atoms whose removal would cut any of these axes."""
        rows = []
        for a in axis_ids:
            ax = self.dims.axes[a]
            if ax.offset >= 0:
                rows.append(np.arange(ax.offset, ax.offset + ax.size))
        if not rows:
            return set()
        sub = self.coupling.removes[np.concatenate(rows)]
        return set(np.unique(sub.indices).tolist())


KINDS = ("heads", "kv_heads", "q_per_kv", "head_dim", "hidden", "mlp", "channel")


def _kind(roles: set[str]) -> str:
    """What a group's units are, from the roles its axes play (see the rules)."""
    if "head" in roles:
        if "repeat" in roles:
            return "q_per_kv"  # one query head in every key/value group
        return "kv_heads" if "pre_repeat" in roles else "heads"
    if "head_dim" in roles:
        return "head_dim"
    if "hidden" in roles:
        return "hidden"
    if "channel" in roles:
        return "channel"
    return "mlp"


def _name_nodes(model: ir.Model) -> None:
    """Virtual axes are keyed by node name, so every node needs a unique one."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def refuse_nonfinite(analysis: Analysis) -> None:
    """Refuse a weight that a prunable group cuts if it holds NaN or infinities: no
    criterion can rank its channels, and a masked comparison through it means nothing."""
    seen: set[str] = set()
    for g in analysis.groups:
        if not g.prunable:
            continue
        for s in g.weight_slices_names():
            if s.tensor in seen:
                continue
            seen.add(s.tensor)
            v = analysis.model.graph.initializers.get(s.tensor)
            arr = v.const_value.numpy() if v is not None and v.const_value is not None else None
            if arr is None or not np.issubdtype(arr.dtype, np.floating):
                continue
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            if bad:
                raise SurgeryError(f"weight {s.tensor!r} holds {bad} NaN or infinite value(s) of {arr.size}; "
                                   "its channels cannot be ranked nor a cut through it verified")
