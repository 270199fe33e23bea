"""What a channel rule sees: the node, static shapes, constants, and the DimGraph calls.

A rule must account for every axis of every input and output of its node: tie
it, make it part of a product, block it, or declare it free (the op adapts to a
new size by itself, like Shape). Axes a rule leaves unmentioned are blocked by
the caller, so a forgotten axis can never be cut silently.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_ir as ir

from surgery.dims import NOT_CHANNEL, DimGraph

RULES: dict[tuple[str, str], Callable[["RuleContext"], None]] = {}
_MISSING = object()


class Unsupported(Exception):
    """The rule cannot handle this node; every axis it touches is blocked with this reason."""


def register(table: dict, what: str, domain: str, op_types: tuple[str, ...], value) -> None:
    """Enter ``value`` for every op in a registry; one family owns an op, so a second entry
    for the same (domain, op) is an error, not a silent override by import order."""
    for op in op_types:
        key = (domain, op)
        if key in table and table[key] is not value:
            raise ValueError(f"two {what} registered for {domain + '.' if domain else ''}{op}")
        table[key] = value


def rule(*op_types: str, domain: str = ""):
    def deco(fn):
        register(RULES, "channel rules", domain, op_types, fn)
        return fn

    return deco


def value_shape(v: ir.Value | None) -> tuple[int | None, ...] | None:
    if v is None or v.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in v.shape)


def const_array(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = v.const_value
    if t is None:
        return None
    try:
        return t.numpy()
    except Exception:  # noqa: BLE001 - string tensors and the like
        return None


class RuleContext:
    def __init__(self, graph: DimGraph, opset: int, shapes: dict[str, tuple] | None = None) -> None:
        self.g = graph
        self.opset = opset
        self.filled = shapes or {}  # value name -> shape with anonymous dims made concrete
        self.node: ir.Node | None = None
        self.mentioned: set[tuple[str, int]] = set()
        self._shapes: dict[int, tuple] = {}
        self._from_weights: dict[ir.Value, bool | None] = {}  # None while being computed

    # -- node access ------------------------------------------------------
    def start(self, node: ir.Node) -> None:
        self.node = node
        self.mentioned = set()

    @property
    def op(self) -> str:
        return self.node.op_type

    def input(self, i: int) -> ir.Value | None:
        ins = self.node.inputs
        return ins[i] if i < len(ins) else None

    def output(self, i: int) -> ir.Value | None:
        outs = self.node.outputs
        return outs[i] if i < len(outs) else None

    def attr(self, name: str, default=None):
        a = self.node.attributes.get(name)
        return default if a is None else a.value

    def shape(self, v: ir.Value | None) -> tuple[int | None, ...]:
        s = self._shapes.get(id(v)) if v is not None else None
        if s is None:
            s = self.filled.get(v.name) if v is not None else None
            if s is None:
                s = value_shape(v)
            if v is not None:
                self._shapes[id(v)] = s
        if s is None:
            raise Unsupported(f"shape of '{v.name if v is not None else '?'}' unknown")
        return s

    def rank(self, v: ir.Value) -> int:
        return len(self.shape(v))

    def const(self, v: ir.Value | None) -> np.ndarray | None:
        return const_array(v)

    def from_weights(self, v: ir.Value | None) -> bool:
        """Computed from initializers alone (a weight behind a Transpose or Cast).

        Iterative (an explicit stack over producers), memoized per value for the whole
        graph: a deep chain of computed values never recurses."""
        if v is None:
            return True
        memo = self._from_weights
        hit = memo.get(v, _MISSING)
        if hit is not _MISSING and hit is not None:
            return hit
        stack = [v]
        while stack:
            x = stack[-1]
            if memo.get(x) is not None:  # finished meanwhile
                stack.pop()
                continue
            node = x.producer()
            if x.const_value is not None or node is None or not node.inputs:
                memo[x] = x.const_value is not None
                stack.pop()
                continue
            result, pending = True, None
            for i in node.inputs:  # in order, stopping at the first False, like all()
                if i is None:
                    continue
                r = memo.get(i, _MISSING)
                if r is _MISSING:
                    pending = i
                    break
                if not r:  # False, or None: on the stack (a cycle, impossible in a DAG)
                    result = False
                    break
            if pending is not None:
                memo[x] = None  # in progress
                stack.append(pending)
                continue
            memo[x] = result
            stack.pop()
        return memo[v]

    def const_required(self, v: ir.Value | None, what: str) -> np.ndarray:
        c = const_array(v)
        if c is None:
            raise Unsupported(f"{what} is computed at run time")
        return c

    # -- axes -------------------------------------------------------------
    def ax(self, v: ir.Value, k: int) -> int:
        s = self.shape(v)
        if k < 0:
            k += len(s)
        if not 0 <= k < len(s):
            raise Unsupported(f"axis {k} out of range for {v.name}")
        self.mentioned.add((v.name, k))
        return self.g.axis(("value", v.name, k), s[k] if s[k] is not None else -1)

    def virtual(self, tag: str, size: int) -> int:
        return self.g.axis(("virtual", self.node.name, tag), size)

    def size(self, v: ir.Value, k: int) -> int | None:
        s = self.shape(v)
        return s[k]

    # -- relations --------------------------------------------------------
    def tie(self, va, ka, vb, kb, ia=None, ib=None) -> None:
        a = self.ax(va, ka) if not isinstance(va, int) else va
        b = self.ax(vb, kb) if not isinstance(vb, int) else vb
        self.g.tie(a, b, ia, ib, why=f"{self.op} {self.node.name}: axis of unknown size")

    def tie_same(self, va, vb) -> None:
        """Tie every axis of two same-shaped values."""
        for k in range(self.rank(va)):
            self.tie(va, k, vb, k)

    def product(self, flat: int, factors: list[int]) -> None:
        self.g.product(flat, factors)

    def block(self, v, k=None, why: str = "", idx=None) -> None:
        a = self.ax(v, k) if not isinstance(v, int) else v
        self.g.block(a, f"{self.op} '{self.node.name}': {why}", idx)

    def free(self, v: ir.Value, k: int | None = None) -> None:
        """The op adapts to any size of this axis by itself (Shape reads it at run time)."""
        ks = range(self.rank(v)) if k is None else [k]
        for kk in ks:
            self.ax(v, kk)

    def param(self, v: ir.Value | None) -> None:
        """A parameter input (a shape, pads, axes, scales): its entries are not channels."""
        if v is None or v.shape is None:
            return
        for kk in range(len(v.shape)):
            self.g.block(self.ax(v, kk), f"{self.op} parameter ({NOT_CHANNEL})")

    def role(self, v, k, role: str) -> None:
        self.g.role(self.ax(v, k) if not isinstance(v, int) else v, role)

    def inexact(self, a: int, why: str) -> None:
        self.g.mark_inexact(a, f"{self.op} '{self.node.name}': {why}")

    def broadcast(self, inputs: list[ir.Value | None], out: ir.Value) -> None:
        """numpy broadcasting: equal-size axes tie, size-1 axes that broadcast do not."""
        so = self.shape(out)
        r = len(so)
        for j in range(r):
            self.ax(out, j)  # axes every input broadcasts into are copies: cut freely (Expand)
        single = len([v for v in inputs if v is not None]) == 1
        if single:  # an Expand that repeats a size-1 axis (repeat_kv), not one adding axes
            sv0 = self.shape(inputs[0])
            single = any(d == 1 and so[k + r - len(sv0)] not in (1, None) for k, d in enumerate(sv0))
        for v in inputs:
            if v is None:
                continue
            sv = self.shape(v)
            for k, d in enumerate(sv):
                j = k + r - len(sv)
                if d == 1 and so[j] != 1:  # broadcast: not tied, nothing to cut there
                    self.g.block(self.ax(v, k), f"{self.op} broadcast ({NOT_CHANNEL})")
                    if single:  # Expand: the copies of a repeat (GQA's repeat_kv)
                        self.role(out, j, "repeat")
                    continue
                self.tie(v, k, out, j)
                if single:
                    self.role(v, k, "pre_repeat")


def dim_keys(v: ir.Value, filled: tuple | None = None) -> list:
    """Per axis: the int size, the symbol name, or None when unknown."""
    if v.shape is None and filled is None:
        raise Unsupported(f"shape of '{v.name}' unknown")
    out = []
    for k, d in enumerate(v.shape if v.shape is not None else filled):
        if isinstance(d, int):
            out.append(d)
        elif filled is not None and filled[k] is not None:
            out.append(filled[k])
        else:
            name = getattr(d, "value", None)
            out.append(("sym", name) if name and not name.startswith("unk__") else None)
    return out


def shape_sources(v: ir.Value | None) -> list | None:
    """Where each entry of a shape tensor comes from: an int literal, ("dim", t, k) for
    ``Shape(t)[k]`` read at run time (it follows any cut of t's axis k by itself), or
    None when untraceable. None overall when the structure cannot be traced.

    Iterative: the values it is computed from are traced with an explicit stack, so a
    long chain of shape arithmetic (Identity, Cast, Concat, ...) never recurses."""
    memo: dict = {None: None}
    busy: set = set()
    stack = [v]
    while stack:
        x = stack[-1]
        if x in memo:
            stack.pop()
            continue
        deps, combine = _shape_step(x)
        missing = [d for d in deps if d not in memo]
        if missing:
            if x in busy:  # a dependency cycle (impossible in a DAG): untraceable
                memo[x] = None
                stack.pop()
                continue
            busy.add(x)
            stack.extend(reversed(missing))
            continue
        busy.discard(x)
        memo[x] = combine([memo[d] for d in deps])
        stack.pop()
    return memo[v]


def _shape_step(v: ir.Value):
    """One step of shape_sources: (the values v's entries come from, a function of
    their shape_sources giving v's)."""
    c = const_array(v)
    if c is not None:
        lit = [int(x) for x in np.atleast_1d(c).tolist()]
        return (), lambda _: lit
    node = v.producer()
    if node is None:
        return (), _untraceable
    op = node.op_type
    if op == "Shape":
        t = node.inputs[0]
        if t is None or t.shape is None:
            return (), _untraceable
        r = len(t.shape)
        a = node.attributes
        start = a["start"].value if "start" in a else 0
        end = a["end"].value if "end" in a else r
        start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
        dims = [("dim", t, k) for k in range(max(0, start), min(r, end))]
        return (), lambda _: dims
    if op in ("Identity", "Cast", "Squeeze", "Unsqueeze") or (op == "Reshape" and len(v.shape or ()) == 1):
        return (node.inputs[0],), lambda got: got[0]
    inner = where_guarded(node)
    if inner is not None:  # the legacy exporter's Expand guard: -1 entries become 1
        return (inner,), lambda got: None if got[0] is None else [None if e == -1 else e for e in got[0]]
    if op == "Concat":
        pieces = list(node.inputs)

        def concat(got):
            out: list = []
            for piece, src in zip(pieces, got):
                if src is None:
                    s = value_shape(piece)
                    if s is None or len(s) != 1 or s[0] is None:
                        return None
                    src = [None] * s[0]
                out.extend(src)
            return out

        return pieces, concat
    if op == "Gather":
        idx = const_array(node.inputs[1])

        def gather(got):
            if got[0] is None or idx is None:
                return None
            return [got[0][int(i)] for i in np.atleast_1d(idx).tolist()]

        return (node.inputs[0],), gather
    if op == "Slice":
        params = [const_array(node.inputs[i]) if i < len(node.inputs) and node.inputs[i] is not None else None
                  for i in range(1, 5)]

        def slice_(got):
            if got[0] is None or params[0] is None or params[1] is None:
                return None
            starts, ends = int(params[0].ravel()[0]), int(params[1].ravel()[0])
            step = int(params[3].ravel()[0]) if params[3] is not None else 1
            return got[0][slice(starts, ends, step)]

        return (node.inputs[0],), slice_
    return (), _untraceable


def _untraceable(_) -> None:
    return None


def where_guarded(node: ir.Node) -> ir.Value | None:
    """``s`` when node is ``Where(Equal(s, -1), ones, s)``, else None."""
    if node.op_type != "Where" or len(node.inputs) != 3:
        return None
    cond, s = node.inputs[0], node.inputs[2]
    eq = cond.producer() if cond is not None else None
    if eq is None or eq.op_type != "Equal" or s is None or eq.inputs[0] is not s:
        return None
    c = const_array(eq.inputs[1])
    return s if c is not None and np.all(c == -1) else None


def shape_literals(v: ir.Value | None) -> list[int | None] | None:
    """Entries of a shape tensor: an int where the graph holds a literal, None where it is
    computed at run time. None overall when the shape's structure cannot be traced."""
    src = shape_sources(v)
    if src is None:
        return None
    return [e if isinstance(e, int) else None for e in src]


# -- FLOP formulas: one per op family, read by the report and the --target-flops search --

FlopTerm = tuple[int, list[tuple[ir.Value, list[int]]]]  # coef x prod(value.shape[k] for k in axes) ...
FLOPS: dict[tuple[str, str], Callable[[ir.Node], list[FlopTerm]]] = {}


def flops(*op_types: str, domain: str = ""):
    """Register an op family's FLOP formula: ``node -> [(coef, [(value, axes), ...]), ...]``,
    each term ``coef x`` the product of those values' dims. surgery.metrics counts them at
    the model's sizes and passes.targets as functions of the kept channels, so the two
    can never disagree. A formula returns [] when a shape it needs is unknown."""

    def deco(fn):
        register(FLOPS, "FLOP formulas", domain, op_types, fn)
        return fn

    return deco


def flop_terms(node: ir.Node) -> list[FlopTerm]:
    fn = FLOPS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
    return fn(node) if fn is not None else []


def all_axes(v: ir.Value) -> list[int]:
    return list(range(len(v.shape)))


def shapes_known(*values: ir.Value | None) -> bool:
    return all(v is not None and v.shape is not None for v in values)


# -- rewrites: how an op's attributes and constant inputs change after a cut --

REWRITES: dict[tuple[str, str], Callable] = {}


def rewrite(*op_types: str, domain: str = ""):
    """Register an op family's rewrite: ``(ctx: rules.cut_context.CutContext, node) -> None``,
    called by passes.cut before the weights are sliced, while the node still has its old
    shapes. It fixes what spells out a size (a group count, a reshape target, split sizes,
    slice bounds) so the node fits the kept channels."""

    def deco(fn):
        register(REWRITES, "rewrites", domain, op_types, fn)
        return fn

    return deco


def op_key(node: ir.Node) -> tuple[str, str]:
    """A node's registry key: (domain, op_type), the default domain spelled ""."""
    return (node.domain if node.domain != "ai.onnx" else "", node.op_type)


# -- roles other passes read: consumers (criteria, compensation) and normalization scales --


@dataclasses.dataclass(frozen=True)
class ConsumerRole:
    """An op that reads an activation X (input 0) through a weight W (input 1): the data-aware
    criteria score X's channels through it and compensation refits it.

    ``axes(node, x_rank, w_rank) -> (x_axis, w_axis)``: the axes of X and W it contracts
    (non-negative). ``dense_weight(node, W) -> (outputs, X channels, taps)``: entry
    [o, c, t] multiplies channel c of X (at tap t) into output o."""

    axes: Callable[[ir.Node, int, int], tuple[int, int]]
    dense_weight: Callable[[ir.Node, np.ndarray], np.ndarray]


CONSUMERS: dict[tuple[str, str], ConsumerRole] = {}


def consumer(*op_types: str, axes: Callable[[ir.Node, int, int], tuple[int, int]], domain: str = ""):
    """Register ops as consumers; decorates their ``dense_weight`` (see ConsumerRole)."""

    def deco(fn):
        register(CONSUMERS, "consumer roles", domain, op_types, ConsumerRole(axes, fn))
        return fn

    return deco


NORM_SCALE: dict[tuple[str, str], int] = {}  # (domain, op) -> input index of the per-channel scale


def norm_scale(*op_types: str, input: int, domain: str = ""):
    """Declare which input of a normalization is its per-channel scale (read by the
    ``bn-scale`` criterion). A decorator that returns what it decorates (the op's rule)."""
    register(NORM_SCALE, "normalization scales", domain, op_types, input)
    return lambda fn: fn


def node_attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value
