"""Coupled channel dimensions: the core abstraction (see docs/design-notes.md).

Every tensor axis a rule mentions is an *axis node*; every index along it is an
*element*. Rules declare two kinds of relation:

- a **tie** says element ``i`` of axis ``a`` and element ``j`` of axis ``b`` are the
  same channel (identity, concat offsets, slices, permutations); ties are unions;
- a **product** says an axis is the row-major product of other axes (Reshape
  splitting hidden into heads x head_dim, a grouped conv's channels into
  groups x channels-per-group); an element of a product axis is removed when
  any of its factors is removed.

Connected components of the ties are channels; components with no product
behind them are **atoms**, the units the policy removes. A derived component
(an element of a product axis) is removed when any atom it is made of is.

Elements are laid out lazily (see "Memory" in docs/design-notes.md): rules record
relations per axis, with index maps as ``range`` objects or small arrays, and
:meth:`DimGraph.solve` gives element ids only to the axes of *clusters* (axes joined
by ties and products) that hold a weight axis, and only to identity classes of at
most ``MAX_DIM`` indices. Everything else is never cut, so memory does not depend on
declared sizes.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from surgery.errors import SurgeryError


NOT_CHANNEL = "not a channel axis"  # block reason for spatial axes; such groups are not reported

# An identity class (axes tied index by index) longer than this is not analyzed per
# channel: it is blocked whole, and the ties into it block what they touch.
MAX_DIM = 2**24
# A class with no weight axis (a sliced input, a concat, a flattened spatial axis) is
# analyzed only up to this size or the weight indices of its cluster, whichever is
# larger: the data, not what a file declares, bounds the work.
MAX_FREE_DIM = 2**16
# The analysis refuses a model whose analyzed axes hold more elements than this in all.
MAX_ELEMENTS = 2**27


def too_large(size: int, limit: int) -> str:
    return f"a dim of size {size} is too large to analyze per channel (at most {limit} here)"


@dataclasses.dataclass
class Axis:
    key: tuple  # ("value", name, axis) or ("virtual", node name, tag)
    size: int  # -1 when not static
    offset: int = -1  # first element id once solved, -1 when the axis has no elements


def _norm_index(size: int, idx):
    """None (every index in order), a range, or an int64 array; False when out of range."""
    if idx is None:
        return None
    if isinstance(idx, range):
        if len(idx) == 0:
            return idx
        lo, hi = min(idx[0], idx[-1]), max(idx[0], idx[-1])
        if lo < 0 or hi >= size:
            return False
        if idx.step == 1 and idx.start == 0 and len(idx) == size:
            return None
        return idx
    arr = np.asarray(idx, dtype=np.int64).ravel()
    if len(arr) and (int(arr.min()) < 0 or int(arr.max()) >= size):
        return False
    if len(arr) == size and size and bool((arr == np.arange(size)).all()):
        return None
    return arr


def _count(size: int, idx) -> int:
    return size if idx is None else len(idx)


class DimGraph:
    """Axis nodes and the relations between their elements, filled in by rules."""

    def __init__(self) -> None:
        self.axes: list[Axis] = []
        self._by_key: dict[tuple, int] = {}
        self.n_elements = 0  # elements laid out by solve()
        # relations in the order rules declared them; indices None, a range or an array
        self._ties: list[tuple[int, int, object, object]] = []
        self.products: list[tuple[int, list[int]]] = []
        self._blocks: list[tuple[int, str, object]] = []
        self._inexact: list[tuple[int, str, object]] = []
        # axis id -> roles rules saw it play ("head", "head_dim", "repeat", "pre_repeat",
        # "hidden", "channel"), which name a group's kind (heads, MLP units, ...)
        self.roles: dict[int, set[str]] = defaultdict(set)

    # -- axis nodes -------------------------------------------------------
    def axis(self, key: tuple, size: int) -> int:
        idx = self._by_key.get(key)
        if idx is not None:
            return idx
        size = int(size) if size is not None else -1
        ax = Axis(key, size if size >= 0 else -1)  # a negative declared size is no size
        self.axes.append(ax)
        self._by_key[key] = len(self.axes) - 1
        return len(self.axes) - 1

    def find(self, key: tuple) -> int | None:
        return self._by_key.get(key)

    def elements(self, a: int, idx=None) -> np.ndarray:
        """Element ids of axis a (at ``idx``), once solved; empty for an axis without elements."""
        ax = self.axes[a]
        if ax.offset < 0:
            return np.zeros(0, dtype=np.int64)
        if idx is None:
            return np.arange(ax.offset, ax.offset + ax.size, dtype=np.int64)
        if isinstance(idx, range):
            return np.arange(ax.offset + idx.start, ax.offset + idx.stop, idx.step, dtype=np.int64)
        return ax.offset + np.asarray(idx, dtype=np.int64)

    # -- relations --------------------------------------------------------
    def tie(self, a: int, b: int, ia=None, ib=None, why: str = "") -> None:
        """Element ia[k] of a is the same channel as element ib[k] of b."""
        A, B = self.axes[a], self.axes[b]
        if A.size < 0 or B.size < 0:
            # a static axis tied to one whose size is unknown cannot be cut
            for x in (A, B):
                if x.size >= 0:
                    self.block(self._by_key[x.key], why or "tied to an axis of unknown size")
            return
        ia, ib = _norm_index(A.size, ia), _norm_index(B.size, ib)
        if ia is False or ib is False:
            self.block(a, "index map out of range")
            self.block(b, "index map out of range")
            return
        if _count(A.size, ia) != _count(B.size, ib):
            # sizes disagree (a dynamic dim guessed for analysis): cut neither
            self.block(a, why or "tied axes of different sizes")
            self.block(b, why or "tied axes of different sizes")
            return
        if _count(A.size, ia):
            self._ties.append((a, b, ia, ib))

    def product(self, flat: int, factors: list[int]) -> None:
        """Axis ``flat`` is the row-major product of ``factors``."""
        sizes = [self.axes[f].size for f in factors]
        F = self.axes[flat]
        if F.size < 0 or any(s < 0 for s in sizes) or math.prod(sizes) != F.size:
            for x in [flat, *factors]:
                self.block(x, "reshape over axes of unknown or inconsistent size")
            return
        self.products.append((flat, list(factors)))

    def block(self, a: int, why: str, idx=None) -> None:
        self._mark(self._blocks, a, why, idx)

    def block_reasons(self) -> list[str]:
        """Every reason a rule blocked something for, in the order they came."""
        return [why for _, why, _ in self._blocks]

    def role(self, a: int, role: str) -> None:
        self.roles[a].add(role)

    def mark_inexact(self, a: int, why: str, idx=None) -> None:
        self._mark(self._inexact, a, why, idx)

    def _mark(self, table: list, a: int, why: str, idx) -> None:
        size = self.axes[a].size
        if size <= 0:
            return
        idx = _norm_index(size, idx)
        if idx is False:
            idx = None  # indices past the axis: mark it all
        if _count(size, idx):
            table.append((a, why, idx))

    # -- solving ----------------------------------------------------------
    def solve(self, relevant=None) -> "Coupling":
        """Lay out elements and solve the coupling. ``relevant``: axis ids whose clusters
        matter (the weight axes; groups without one are never reported); None for all."""
        return Coupling(self, relevant)

    def _layout(self, relevant) -> tuple:
        """Give element ids to the axes worth analyzing; relations in element terms."""
        n_ax = len(self.axes)
        # clusters: axes joined by any tie or product; identity classes: by whole-axis ties
        ca, cb, ia_, ib_ = [], [], [], []
        for a, b, ia, ib in self._ties:
            ca.append(a)
            cb.append(b)
            if ia is None and ib is None:
                ia_.append(a)
                ib_.append(b)
        for flat, factors in self.products:
            for f in factors:
                ca.append(flat)
                cb.append(f)
        cluster = _components(n_ax, np.array(ca, np.int64), np.array(cb, np.int64))
        ident = _components(n_ax, np.array(ia_, np.int64), np.array(ib_, np.int64))
        weights = range(n_ax) if relevant is None else sorted(set(relevant))
        keep = np.zeros(n_ax, dtype=bool)
        w_size: dict[int, int] = defaultdict(int)  # cluster -> indices of its weight axes
        w_class: set[int] = set()
        for i in weights:
            keep[i] = True
            if self.axes[i].size >= 0:
                w_size[int(cluster[i])] += self.axes[i].size
                w_class.add(int(ident[i]))
        if n_ax:
            keep = np.isin(cluster, cluster[keep])
        symbolic: dict[int, str] = {}
        for i in np.flatnonzero(keep).tolist():
            c, size = int(ident[i]), self.axes[i].size
            limit = MAX_DIM if c in w_class else min(MAX_DIM, max(MAX_FREE_DIM, w_size[int(cluster[i])]))
            if size > limit:
                symbolic.setdefault(c, too_large(size, limit))
        off = 0
        for i, ax in enumerate(self.axes):
            ax.offset = -1
            if keep[i] and ax.size >= 0 and int(ident[i]) not in symbolic:
                ax.offset = off
                off += ax.size
                if off > MAX_ELEMENTS:
                    raise SurgeryError(
                        f"the model's channel axes hold more than {MAX_ELEMENTS} elements; "
                        "too many to analyze")
        self.n_elements = off

        def mat(a: int) -> bool:
            return self.axes[a].offset >= 0

        def why_symbolic(a: int) -> str | None:
            return symbolic.get(int(ident[a])) if keep[a] else None

        ta, tb, induced = [], [], []
        for a, b, ia, ib in self._ties:
            if mat(a) and mat(b):
                ta.append(self.elements(a, ia))
                tb.append(self.elements(b, ib))
            elif mat(a) and why_symbolic(b):
                induced.append((self.elements(a, ia), why_symbolic(b)))
            elif mat(b) and why_symbolic(a):
                induced.append((self.elements(b, ib), why_symbolic(a)))
        products = []
        for flat, factors in self.products:
            axes = [flat, *factors]
            if all(mat(x) for x in axes):
                products.append((flat, factors))
                continue
            why = next((why_symbolic(x) for x in axes if why_symbolic(x)), None)
            for x in axes:
                if mat(x) and why:
                    induced.append((self.elements(x), why))
        blocked = [(self.elements(a, idx), why) for a, why, idx in self._blocks if mat(a)]
        blocked += induced
        inexact = [(self.elements(a, idx), why) for a, why, idx in self._inexact if mat(a)]
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        return cat(ta), cat(tb), products, blocked, inexact


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not n:
        return np.zeros(0, dtype=np.int64)
    g = sp.coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    return labels.astype(np.int64)


class Coupling:
    """The solved coupling: channels (components), atoms and what each atom removes."""

    def __init__(self, g: DimGraph, relevant=None) -> None:
        self.graph = g
        ta, tb, self._products, blocked, inexact = g._layout(relevant)
        n = g.n_elements
        comp, deriv, blocked_extra = self._agreeing_components(n, ta, tb)
        self.comp = comp
        self.n_comp = int(comp.max()) + 1 if n else 0
        self.deriv = deriv  # component -> tuple of factor components
        self._leaves_cache: dict[int, tuple[int, ...]] = {}
        self.cyclic: set[int] = set()
        for c in list(deriv):
            self.leaves(c)

        # blocked and inexact components, with reasons
        self.block_reason: dict[int, str] = {}
        for e, why in blocked:
            for c in np.unique(comp[e]):
                self.block_reason.setdefault(int(c), why)
        for e in blocked_extra:
            for c in np.unique(comp[e]):
                self.block_reason.setdefault(int(c), "reshape factors that cannot agree")
        for c in self.cyclic:
            self.block_reason.setdefault(c, "cyclic reshape derivation")
        self.inexact_reason: dict[int, str] = {}
        for e, why in inexact:
            for c in np.unique(comp[e]):
                self.inexact_reason.setdefault(int(c), why)

        # A blocked derived component blocks every atom it is made of; an
        # inexact one makes them inexact.
        self.atom_block: dict[int, str] = {}
        self.atom_inexact: dict[int, str] = {}
        for table, out in ((self.block_reason, self.atom_block), (self.inexact_reason, self.atom_inexact)):
            for c, why in table.items():
                for leaf in self.leaves(c):
                    out.setdefault(leaf, why)

        # element -> atoms whose removal removes it (CSR, elements x components)
        rows, cols = [], []
        comp_leaves_ptr = {}
        for c in deriv:
            comp_leaves_ptr[c] = self.leaves(c)
        derived_mask = np.zeros(self.n_comp, dtype=bool)
        if deriv:
            derived_mask[list(deriv)] = True
        el = np.arange(n, dtype=np.int64)
        plain = ~derived_mask[comp] if n else np.zeros(0, bool)
        rows.append(el[plain])
        cols.append(comp[plain])
        if deriv:
            dc = comp[~plain]
            de = el[~plain]
            order = np.argsort(dc, kind="stable")
            dc, de = dc[order], de[order]
            uniq, starts = np.unique(dc, return_index=True)
            bounds = list(starts) + [len(dc)]
            for k, c in enumerate(uniq):
                els = de[bounds[k] : bounds[k + 1]]
                for leaf in comp_leaves_ptr[int(c)]:
                    rows.append(els)
                    cols.append(np.full(len(els), leaf, dtype=np.int64))
        r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        cc = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        self.removes = sp.csr_matrix(
            (np.ones(len(r), dtype=np.float32), (r, cc)), shape=(n, max(self.n_comp, 1))
        )  # elements x atoms
        self.atoms = np.array(
            sorted(set(range(self.n_comp)) - set(deriv)), dtype=np.int64
        )

    def _agreeing_components(self, n: int, ta: np.ndarray, tb: np.ndarray):
        """(components, derivations, element arrays of factors that cannot agree).

        Derivations must agree: a component reached by two factor tuples unifies those
        tuples position by position. Iterated to a fixpoint: every round that goes on
        merged components, so this ends after fewer rounds than elements."""
        blocked_extra: list[np.ndarray] = []
        merged_to = -1
        while True:
            comp = _components(n, ta, tb)
            deriv, extra_a, extra_b, bad = self._derivations(comp)
            blocked_extra.extend(bad)
            n_comp = int(comp.max()) + 1 if n else 0
            if not len(extra_a) or n_comp == merged_to:
                return comp, deriv, blocked_extra
            merged_to = n_comp
            ta = np.concatenate([ta, extra_a])
            tb = np.concatenate([tb, extra_b])

    def _derivations(self, comp):
        """component -> factor-component tuple, plus the unions needed to make them agree."""
        g = self.graph
        deriv: dict[int, tuple[int, ...]] = {}
        extra_a, extra_b, bad = [], [], []
        _, first = np.unique(comp, return_index=True)  # component -> one element of it
        for flat, factors in self._products:
            F = g.axes[flat]
            sizes = [g.axes[f].size for f in factors]
            idx = np.unravel_index(np.arange(F.size), sizes)
            fac = np.stack([comp[g.axes[f].offset + i] for f, i in zip(factors, idx)], axis=1)
            fcomp = comp[F.offset + np.arange(F.size)]
            for c, row in zip(fcomp.tolist(), map(tuple, fac.tolist())):
                old = deriv.get(c)
                if old is None:
                    deriv[c] = row
                elif old != row:
                    if len(old) != len(row):
                        bad.append(np.array([F.offset], dtype=np.int64))
                        continue
                    for x, y in zip(old, row):
                        if x != y:
                            extra_a.append(first[x])
                            extra_b.append(first[y])
        if extra_a:
            return deriv, np.array(extra_a, np.int64), np.array(extra_b, np.int64), bad
        return deriv, np.zeros(0, np.int64), np.zeros(0, np.int64), bad

    def leaves(self, c: int) -> tuple[int, ...]:
        """The atoms a component is made of (itself when it is an atom).

        Depth-first over the derivations with an explicit stack (a chain of reshapes
        can be deeper than Python's recursion limit); a component met again while its
        own leaves are being collected is a cycle: it is recorded in ``cyclic`` and
        stands for itself there."""
        cache, deriv = self._leaves_cache, self.deriv
        hit = cache.get(c)
        if hit is not None:
            return hit
        if c not in deriv:
            cache[c] = (c,)
            return cache[c]
        on_stack = {c}
        # frames: [component, its factors, next factor, leaves so far, their set]
        frames = [[c, deriv[c], 0, [], set()]]
        while True:
            fr = frames[-1]
            node, d, i, out, seen = fr
            if i < len(d):
                fr[2] = i + 1
                f = d[i]
                sub = cache.get(f)
                if sub is None:
                    if f not in deriv:
                        sub = cache[f] = (f,)
                    elif f in on_stack:
                        self.cyclic.add(f)
                        sub = (f,)
                    else:
                        on_stack.add(f)
                        frames.append([f, deriv[f], 0, [], set()])
                        continue
            else:
                frames.pop()
                on_stack.discard(node)
                sub = cache[node] = tuple(out)
                if not frames:
                    return sub
                out, seen = frames[-1][3], frames[-1][4]
            for leaf in sub:
                if leaf not in seen:
                    seen.add(leaf)
                    out.append(leaf)

    # -- queries ----------------------------------------------------------
    def component_elements(self, c: int) -> np.ndarray:
        if not hasattr(self, "_order"):
            self._order = np.argsort(self.comp, kind="stable")
            self._starts = np.searchsorted(self.comp[self._order], np.arange(self.n_comp + 1))
        return self._order[self._starts[c] : self._starts[c + 1]]

    def removed_elements(self, atoms) -> np.ndarray:
        """Boolean mask over elements removed when ``atoms`` are removed."""
        v = np.zeros(self.removes.shape[1], dtype=np.float32)
        v[np.asarray(list(atoms), dtype=np.int64)] = 1.0
        return (self.removes @ v) > 0

    def axis_signatures(self) -> np.ndarray:
        """Per atom, a key equal for atoms that touch the same set of axes.

        Rows of the (atoms x axes) incidence are hashed by two random projections;
        atoms that share a key are then confirmed to touch the same axes."""
        g = self.graph
        n = g.n_elements
        axis_of = np.empty(n, dtype=np.int64)
        for i, ax in enumerate(g.axes):
            if ax.offset >= 0:
                axis_of[ax.offset : ax.offset + ax.size] = i
        E = sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), axis_of)), shape=(n, len(g.axes)))
        T = (self.removes.T @ E).tocsr()
        T.data[:] = 1.0
        T.sort_indices()  # same set, same summation order, same key
        self._atom_axes = T
        rng = np.random.default_rng(12345)
        proj = rng.random((len(g.axes), 2))
        return T @ proj


def group_atoms(coupling: Coupling) -> list[tuple[tuple[int, ...], list[int]]]:
    """Atoms that touch the same axes form one group; returns (axes, atoms) pairs.

    Atoms are bucketed by two random projections of their axis set (a collision of
    two different sets in both is about as likely as two random doubles being equal)."""
    atoms = coupling.atoms
    if not len(atoms):
        return []
    keys = coupling.axis_signatures()[atoms]
    T = coupling._atom_axes
    _, first, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    members: dict[int, list[int]] = defaultdict(list)
    for atom, k in zip(atoms.tolist(), inv.ravel().tolist()):
        members[k].append(atom)
    out = []
    for k, f in enumerate(first.tolist()):
        a = int(atoms[f])
        out.append((tuple(T.indices[T.indptr[a] : T.indptr[a + 1]].tolist()), members[k]))
    return out
