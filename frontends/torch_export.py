"""PyTorch frontend: export an ``nn.Module`` to ONNX and map ONNX weights back to it.

Public API
----------
``export_module(module, example_inputs, *, dynamic_shapes=None) -> onnx.ModelProto``
    ``torch.onnx.export(module, args, kwargs=..., dynamo=True, optimize=False)`` in
    eval mode (the module's train/eval flags are restored afterwards), with the
    exporter's logging, warnings and prints silenced. ``example_inputs`` is a tensor,
    a tuple/list of positional arguments, or a dict of keyword arguments. With
    ``optimize=False`` BatchNorm stays a ``BatchNormalization`` node and every
    parameter, buffer and tensor attribute is an initializer named by its qualified
    name (``layer1.0.conv1.weight``); constants built in ``forward`` become
    ``Constant`` nodes. The export is deterministic (same module, same inputs, same
    bytes) and the returned proto has all data embedded. Three rewrites follow, so the
    channel analysis sees what the module computes: ``CastLike`` of a constant folded
    (:func:`fold_castlike`), the zero bias of a bias-free conv dropped
    (:func:`drop_zero_bias`), and ``torch.split`` (``SplitToSequence`` read by constant
    ``SequenceAt``: GPT-2's fused q|k|v) turned into one ``Split``
    (:func:`split_sequences`).

``TorchMap(proto, module)``
    Where every weight of the exported model comes from in the module:
    ``sources[name] -> TensorSource(kind, qualname, module)`` for the file's
    initializers, with kind ``"parameter"``, ``"buffer"``, ``"attribute"`` (a plain
    tensor attribute, which ``torch.export`` lifts as a constant) or ``"constant"``
    (built in ``forward``: no home in the module). The ONNX loader folds constant
    weight subgraphs (a Linear applied to a 3-D input exports as
    ``MatMul(x, Transpose(weight))``; ``nn.MultiheadAttention`` splits
    ``in_proj_weight``), so the initializers a plan names may be computed from
    parameters. ``to_module_cuts(tensor_cuts, model)`` maps a plan's cuts back onto
    the module's tensors: for a folded weight it finds, by evaluating the folding on
    index probes (each parameter replaced by the index along one axis) through the
    very same loader, which entries of which parameter each entry is; the fold must
    be a pure re-indexing (checked on a random probe), and the removed entries must
    be whole slices of the parameter that no kept entry uses. Anything else raises
    :class:`NotRepresentable` naming the tensor and the module.

``onnx_feeds(proto, example_inputs)``
    The example inputs as onnxruntime feeds (tensors in ``torch.export``'s flattening
    order: positional arguments, then keyword arguments in the given order, nested
    containers depth first).

``module_scope(node)``
    The qualified module name an exported ONNX node came from (the dynamo exporter
    stores the name scopes in the node's metadata), or None.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import logging
import re
import warnings
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from surgery.errors import SurgeryError

__all__ = [
    "NotRepresentable",
    "TensorSource",
    "TorchMap",
    "export_module",
    "module_scope",
    "onnx_feeds",
    "split_inputs",
]

_QUIET_LOGGERS = ("torch.onnx", "torch._dynamo", "torch.export", "torch._export", "torch.fx",
                  "torch._inductor", "torch._subclasses", "torch.utils._sympy", "onnxscript", "onnx_ir",
                  "transformers")


class NotRepresentable(SurgeryError):
    """A cut the ONNX model can take but the PyTorch module cannot express."""


# --------------------------------------------------------------------------- #
# export
# --------------------------------------------------------------------------- #


def split_inputs(example_inputs) -> tuple[tuple, dict]:
    """tensor -> ((t,), {}); tuple/list -> (tuple, {}); dict -> ((), dict)."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


@contextlib.contextmanager
def quiet():
    """Silence the exporter: its prints, warnings and loggers (also used by tests and benches)."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


@contextlib.contextmanager
def eval_mode(module):
    """Put every submodule in eval mode; restore each one's flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, t in flags:
            m.training = t


def export_module(module, example_inputs, *, dynamic_shapes=None) -> onnx.ModelProto:
    """Export ``module`` with the dynamo exporter, unoptimized, in eval mode (see module doc)."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise SurgeryError(f"export_module expects a torch.nn.Module, got {type(module).__name__}")
    args, kwargs = split_inputs(example_inputs)
    with eval_mode(module), torch.no_grad(), quiet():
        try:
            prog = torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True, optimize=False,
                                     dynamic_shapes=dynamic_shapes, verbose=False, report=False)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            root = e
            while root.__cause__ is not None and root.__cause__ is not root:
                root = root.__cause__
            msg = re.sub(r"\x1b\[[0-9;]*m", "", str(root)).strip().splitlines()
            raise SurgeryError(f"torch.onnx.export failed for {type(module).__name__}: "
                               f"{type(root).__name__}: {msg[0] if msg else ''}") from e
        proto = prog.model_proto
    fold_castlike(proto)
    drop_zero_bias(proto)
    split_sequences(proto)
    return proto


def split_sequences(proto: onnx.ModelProto) -> int:
    """Rewrite ``SplitToSequence(x, sizes)`` whose every use is ``SequenceAt(seq, i)``
    with a constant ``i`` into one ``Split`` (what ``torch.split`` exports as without the
    exporter's optimizer; GPT-2 splits its fused q|k|v projection so). The channel
    analysis has a rule for Split, none for sequences: without this, the heads behind
    the split are blocked. Needs constant sizes and a static length of the split axis."""
    g = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13 or not any(n.op_type == "SplitToSequence" for n in g.node):  # Split takes sizes as input from 13
        return 0
    consts, users, dims = _graph_facts(g)
    outputs = {o.name for o in g.output}
    new_nodes, drop, count = [], set(), 0
    for node in g.node:
        if id(node) in drop:
            continue
        plan = _split_plan(node, consts, users, dims, outputs)
        if plan is None:
            new_nodes.append(node)
            continue
        new_nodes.extend(_as_split(node, *plan, consts, drop))
        count += 1
    if count:
        del g.node[:]
        g.node.extend(new_nodes)
        names = {o for nd in g.node for o in nd.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
        vis = [vi for vi in g.value_info if vi.name in names]
        del g.value_info[:]
        g.value_info.extend(vis)
    return count


def _graph_facts(g: onnx.GraphProto) -> tuple[dict[str, np.ndarray], dict[str, list], dict[str, list]]:
    """(constant values by name, the nodes using each name (None: a use inside a
    subgraph), the static dims of every value with a shape)."""
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer if not t.external_data}
    for node in g.node:
        if node.op_type == "Constant" and len(node.output) == 1 and not node.domain:
            value = _constant_value(node)
            if value is not None:
                consts[node.output[0]] = value
    users: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            users.setdefault(i, []).append(node)
    for node in g.node:  # a sequence read inside a subgraph is left alone
        for a in node.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                for n2 in sub.node:
                    for i in n2.input:
                        users.setdefault(i, []).append(None)
    dims: dict[str, list] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return consts, users, dims


def _split_plan(node, consts: dict, users: dict, dims: dict, outputs: set) -> tuple | None:
    """(axis, sizes, SequenceAt users) when ``node`` is a SplitToSequence that can become a
    Split (constant sizes, every use a SequenceAt at a constant index), else None."""
    if not (node.op_type == "SplitToSequence" and not node.domain and len(node.input) == 2
            and node.input[1] in consts and node.output[0] not in outputs):
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    shape = dims.get(node.input[0])
    seq_users = users.get(node.output[0], [])
    if shape is None or not seq_users or not all(
            u is not None and u.op_type == "SequenceAt" and not u.domain and len(u.input) == 2
            and u.input[1] in consts and consts[u.input[1]].size == 1 for u in seq_users):
        return None
    axis = int(attrs.get("axis", 0)) % len(shape)
    length = shape[axis]
    sizes = np.asarray(consts[node.input[1]]).astype(np.int64)
    if length is not None and sizes.ndim == 0 and int(sizes) > 0:
        n, rest = divmod(length, int(sizes))
        sizes = np.array([int(sizes)] * n + ([rest] if rest else []), dtype=np.int64)
    if sizes.ndim == 1 and len(sizes) and (length is None or sizes.sum() == length):
        return axis, sizes, seq_users
    return None


def _as_split(node, axis: int, sizes: np.ndarray, seq_users: list, consts: dict, drop: set) -> list:
    """The Constant and Split (and an Identity per piece read twice) replacing ``node`` and
    its SequenceAt users; the users' ids go into ``drop``."""
    n = len(sizes)
    outs: list[str | None] = [None] * n
    extra = []
    for u in seq_users:
        k = int(np.asarray(consts[u.input[1]]).reshape(())) % n
        if outs[k] is None:
            outs[k] = u.output[0]
        else:  # the same piece read twice
            ident = onnx.helper.make_node("Identity", [outs[k]], [u.output[0]], name=f"{u.name}_identity")
            ident.metadata_props.extend(u.metadata_props)
            extra.append(ident)
        drop.add(id(u))
    outs = [o if o is not None else f"{node.output[0]}_unused_{k}" for k, o in enumerate(outs)]
    sizes_name = f"{node.output[0]}_split_sizes"
    const = onnx.helper.make_node("Constant", [], [sizes_name], name=f"{node.name}_sizes",
                                  value=numpy_helper.from_array(sizes, sizes_name))
    split = onnx.helper.make_node("Split", [node.input[0], sizes_name], outs, name=node.name, axis=axis)
    for nd in (const, split):
        nd.metadata_props.extend(node.metadata_props)
    return [const, split, *extra]


def drop_zero_bias(proto: onnx.ModelProto) -> int:
    """Drop the bias input of a Conv/ConvTranspose when it is ``Expand(<zeros>, shape)``
    (what a ``bias=False`` conv exports as without the exporter's optimizer), then the
    nodes only it used. The module has no bias, so neither should the model: an Expand
    over a channel axis would block the conv's output channels."""
    g = proto.graph
    zeros: set[str] = set()
    for t in g.initializer:
        if not t.external_data and t.data_type in _FLOATS and not numpy_helper.to_array(t).any():
            zeros.add(t.name)
    producer = {}
    for node in g.node:
        if node.op_type == "Constant" and not node.domain:
            value = _constant_value(node)
            if value is not None and value.dtype.kind == "f" and not value.any():
                zeros.update(node.output)
        for o in node.output:
            producer[o] = node
    count = 0
    for node in g.node:
        if node.op_type in ("Conv", "ConvTranspose") and not node.domain and len(node.input) == 3 and node.input[2]:
            src = producer.get(node.input[2])
            if src is not None and src.op_type == "Expand" and src.input and src.input[0] in zeros:
                del node.input[2]
                count += 1
    if count:
        _remove_dead_nodes(proto)
    return count


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _remove_dead_nodes(proto: onnx.ModelProto) -> None:
    g = proto.graph
    while True:
        used = {o.name for o in g.output}
        for node in g.node:
            used.update(node.input)
            for a in node.attribute:  # subgraphs read outer values by name
                for sub in [a.g] if a.HasField("g") else list(a.graphs):
                    for n2 in sub.node:
                        used.update(n2.input)
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    live = set(used)
    dead = [t for t in g.initializer if t.name not in live]
    for t in dead:
        g.initializer.remove(t)
    names = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
    vis = [vi for vi in g.value_info if vi.name in names]
    del g.value_info[:]
    g.value_info.extend(vis)


def _constant_value(node) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def fold_castlike(proto: onnx.ModelProto) -> int:
    """Replace ``CastLike(constant, x)`` by a constant of x's (static) dtype, in place.

    Without the exporter's optimizer, a bias-free conv gets a zero bias spelled
    ``Expand(CastLike(0, input), Shape(weight))``; the CastLike reads a graph input (for
    its dtype only), so the loader cannot fold the bias and the channel analysis
    blocks the conv's output. Folding it makes that bias a plain constant."""
    g = proto.graph
    if not any(n.op_type == "CastLike" for n in g.node):
        return 0
    dtypes: dict[str, int] = {}
    try:  # element types of every value (the exporter does not always record them)
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False).graph.value_info
    except Exception:  # noqa: BLE001 - best effort; declared types still apply
        inferred = []
    for vi in [*inferred, *g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            dtypes[vi.name] = vi.type.tensor_type.elem_type
    consts: dict[str, np.ndarray] = {}
    for t in g.initializer:
        dtypes[t.name] = t.data_type
        if not t.external_data:
            consts[t.name] = numpy_helper.to_array(t)
    count = 0
    for i, node in enumerate(g.node):
        if node.op_type == "Constant" and len(node.output) == 1 and not node.domain:
            value = _constant_value(node)
            if value is not None:
                consts[node.output[0]] = value
                dtypes[node.output[0]] = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        elif (node.op_type == "CastLike" and not node.domain and len(node.input) == 2
              and node.input[0] in consts and node.input[1] in dtypes):
            to = dtypes[node.input[1]]
            try:
                value = consts[node.input[0]].astype(onnx.helper.tensor_dtype_to_np_dtype(to))
            except (KeyError, TypeError, ValueError):
                continue
            new = onnx.helper.make_node("Constant", [], list(node.output), name=node.name,
                                        value=numpy_helper.from_array(value, node.output[0]))
            new.metadata_props.extend(node.metadata_props)
            g.node[i].CopyFrom(new)
            consts[node.output[0]] = value
            dtypes[node.output[0]] = to
            count += 1
    return count


# --------------------------------------------------------------------------- #
# where each weight comes from
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class TensorSource:
    kind: str  # "parameter" | "buffer" | "attribute" | "constant"
    qualname: str | None  # qualified tensor name in the module (None for a forward-built constant)
    module: str | None  # qualified name of the module that owns or (for constants) uses it


def module_scope(node) -> str | None:
    """Qualified module name of an exported node (onnx.NodeProto or onnx_ir.Node)."""
    props = node.metadata_props
    if isinstance(props, dict):
        raw = props.get("pkg.torch.onnx.name_scopes")
    else:
        raw = next((p.value for p in props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or len(scopes) < 2:
        return None
    return str(scopes[-2])  # the last entry is the op itself


def module_tensors(module) -> dict[str, tuple[str, Any]]:
    """Qualified name -> (kind, tensor) for every parameter, buffer and tensor attribute
    (shared tensors under every name they have)."""
    import torch

    out: dict[str, tuple[str, Any]] = {}
    for mname, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for k, p in mod._parameters.items():
            if p is not None:
                out.setdefault(prefix + k, ("parameter", p))
        for k, b in mod._buffers.items():
            if b is not None:
                out.setdefault(prefix + k, ("buffer", b))
        for k, v in vars(mod).items():
            if isinstance(v, torch.Tensor) and not k.startswith("_") and prefix + k not in out:
                out[prefix + k] = ("attribute", v)
    return out


def _owner(qualname: str) -> str:
    return qualname.rpartition(".")[0]


def _alias_names(qualname: str) -> list[str]:
    """Spellings other exporter versions use for a module tensor."""
    flat = qualname.replace(".", "_")
    return [f"p_{flat}", f"b_{flat}", f"c_{flat}", flat]


@dataclasses.dataclass
class _Probes:
    """The loader's folding evaluated on probes of the float sources ``ok_src``: all ones
    times the source's number (``id_out``), random values (``rand`` in, ``rand_out`` out),
    and per axis a, every entry's index along a (``axis_out[a]``)."""

    arrays: dict[str, np.ndarray]
    ok_src: list[str]
    maxrank: int
    rand: dict[str, np.ndarray]
    id_out: dict[str, np.ndarray]
    rand_out: dict[str, np.ndarray]
    axis_out: list[dict[str, np.ndarray]]


class TorchMap:
    """ONNX initializer <-> module tensor, including weights the loader folded."""

    def __init__(self, proto: onnx.ModelProto, module) -> None:
        self.proto = proto
        self.module = module
        self.tensors = module_tensors(module)
        alias = {}
        for q in self.tensors:
            for a in _alias_names(q):
                alias.setdefault(a, q)
        consumers: dict[str, list] = {}
        for node in proto.graph.node:
            for i in node.input:
                consumers.setdefault(i, []).append(node)
        self.sources: dict[str, TensorSource] = {}
        for init in proto.graph.initializer:
            q = init.name if init.name in self.tensors else alias.get(init.name)
            if q is not None:
                self.sources[init.name] = TensorSource(self.tensors[q][0], q, _owner(q))
        for node in proto.graph.node:
            if node.op_type == "Constant" and node.output:
                scope = module_scope(node)
                for out in node.output:
                    self.sources.setdefault(out, TensorSource("constant", None, scope))
        for init in proto.graph.initializer:
            if init.name not in self.sources:
                scope = next((module_scope(n) for n in consumers.get(init.name, []) if module_scope(n) is not None), None)
                self.sources[init.name] = TensorSource("constant", None, scope)
        self._derivations: dict[str, dict] | None = None
        self._derived_for: int | None = None

    # -- derivations of the loaded model's initializers -----------------------
    def derivation(self, name: str, model) -> dict:
        """How initializer ``name`` of the loaded IR ``model`` relates to the module:
        {"kind": "direct", "source": qualname} | {"kind": "index", "sources": [qualnames],
        "src": int array, "idx": [int arrays per axis]} | {"kind": "computed", "sources": [...]}
        | {"kind": "constant", "module": scope}."""
        if self._derived_for != id(model):
            self._derivations = self._derive(model)
            self._derived_for = id(model)
        return self._derivations[name]

    def _derive(self, model) -> dict[str, dict]:
        from surgery.frontends.onnx_loader import META_FOLDED_FROM

        out: dict[str, dict] = {}
        folded: dict[str, list[str]] = {}
        for name, value in model.graph.initializers.items():
            src = self.sources.get(name)
            if src is not None and src.qualname is not None:
                out[name] = {"kind": "direct", "source": src.qualname}
                continue
            origin = [s for s in (value.meta.get(META_FOLDED_FROM) or ()) if s in self.sources and self.sources[s].qualname]
            if origin and name not in self.sources:
                folded[name] = origin
            else:
                scope = src.module if src is not None else self._scope_of(model, name)
                out[name] = {"kind": "constant", "module": scope}
        if folded:
            out.update(self._probe(model, folded))
        return out

    @staticmethod
    def _scope_of(model, name: str) -> str | None:
        value = model.graph.initializers.get(name)
        if value is None:
            return None
        for user, _ in value.uses():
            s = module_scope(user)
            if s is not None:
                return s
        return None

    def _probe(self, model, folded: dict[str, list[str]]) -> dict[str, dict]:
        """Evaluate the loader's folding on index probes (see the module doc)."""
        from surgery.frontends.onnx_loader import load_onnx

        inits = {t.name: t for t in self.proto.graph.initializer}
        names = sorted({s for srcs in folded.values() for s in srcs})
        arrays = {n: numpy_helper.to_array(inits[n]) for n in names if n in inits}
        floats = [n for n in names if n in arrays and arrays[n].dtype.kind == "f"]
        result: dict[str, dict] = {}
        if not floats:
            for f, srcs in folded.items():
                result[f] = {"kind": "computed", "sources": [self.sources[s].qualname for s in srcs]}
            return result
        limit = {np.dtype(np.float16): 2048, np.dtype(np.float32): 1 << 24, np.dtype(np.float64): 1 << 53}
        ok_src = [n for n in floats if max(arrays[n].shape, default=1) < limit.get(arrays[n].dtype, 256)
                  and len(floats) < limit.get(arrays[n].dtype, 256)]
        maxrank = max((arrays[n].ndim for n in ok_src), default=0)
        rng = np.random.default_rng(0)

        def run(fill) -> dict[str, np.ndarray]:
            p = onnx.ModelProto()
            p.CopyFrom(self.proto)
            for t in p.graph.initializer:
                if t.name in fill:
                    t.CopyFrom(numpy_helper.from_array(fill[t.name].astype(arrays[t.name].dtype), t.name))
            with quiet():
                m = load_onnx(p)
            return {f: m.graph.initializers[f].const_value.numpy() for f in folded if f in m.graph.initializers}

        ids = {n: np.full(arrays[n].shape, k + 1) for k, n in enumerate(ok_src)}
        rand = {n: rng.standard_normal(arrays[n].shape) for n in ok_src}
        axis_out = []
        for a in range(maxrank):
            fill = {}
            for n in ok_src:
                shp = arrays[n].shape
                if a < len(shp):
                    view = [1] * len(shp)
                    view[a] = shp[a]
                    fill[n] = np.broadcast_to(np.arange(shp[a]).reshape(view), shp)
                else:
                    fill[n] = np.zeros(shp)
            axis_out.append(fill)
        pr = _Probes(arrays, ok_src, maxrank, rand, run(ids), run(rand), [run(fill) for fill in axis_out])
        for f, srcs in folded.items():
            result[f] = self._probe_one(model, f, srcs, pr)
        return result

    def _probe_one(self, model, f: str, srcs: list[str], pr: "_Probes") -> dict:
        """What the probes say of folded tensor f: a constant, an index map of its sources, or computed."""
        arrays, ok_src, rand = pr.arrays, pr.ok_src, pr.rand
        quals = [self.sources[s].qualname for s in srcs]
        computed = {"kind": "computed", "sources": quals}
        if f not in pr.id_out or f not in pr.rand_out or any(s not in ok_src for s in srcs):
            return computed
        actual = model.graph.initializers[f].const_value.numpy()
        if np.array_equal(pr.id_out[f], actual) and np.array_equal(pr.rand_out[f], actual):
            # depends on the parameters' shapes only (a bias-free conv's zero bias)
            return {"kind": "constant", "module": self._scope_of(model, f), "shape_of": quals}
        src_ids = np.rint(pr.id_out[f]).astype(np.int64)
        order = {k + 1: n for k, n in enumerate(ok_src)}
        valid = np.isin(src_ids, [ok_src.index(s) + 1 for s in srcs])
        if not valid.all() or not np.allclose(pr.id_out[f], src_ids):
            return computed
        idx = [np.rint(pr.axis_out[a][f]).astype(np.int64) if f in pr.axis_out[a] else None for a in range(pr.maxrank)]
        recon = np.empty(src_ids.shape, dtype=np.float64)
        for sid in np.unique(src_ids).tolist():
            n = order[sid]
            sel = src_ids == sid
            r = arrays[n].ndim
            if any(idx[a] is None for a in range(r)):
                return computed
            coords = tuple(np.clip(idx[a][sel], 0, arrays[n].shape[a] - 1) for a in range(r))
            if any(not np.array_equal(c, idx[a][sel]) for a, c in enumerate(coords)):
                return computed
            recon[sel] = rand[n].astype(arrays[n].dtype)[coords] if r else rand[n].astype(arrays[n].dtype)
        if not np.array_equal(recon.astype(pr.rand_out[f].dtype), pr.rand_out[f]):
            return computed
        uniq = [order[s] for s in np.unique(src_ids).tolist()]
        remap = {order_id: k for k, order_id in enumerate(np.unique(src_ids).tolist())}
        local = np.vectorize(remap.get, otypes=[np.int64])(src_ids) if src_ids.size else src_ids
        return {"kind": "index", "sources": [self.sources[n].qualname for n in uniq],
                "onnx_sources": uniq, "src": local, "idx": idx}

    # -- plan cuts -> module cuts ----------------------------------------------
    def to_module_cuts(self, tensor_cuts: dict[str, list[tuple[int, np.ndarray]]], model,
                       ) -> tuple[dict[str, list[tuple[int, np.ndarray]]], list[dict]]:
        """Plan cuts (ONNX initializer names of the loaded ``model``) -> (cuts by qualified
        module tensor name, cuts of forward-built constants that have no home in the
        module). Raises NotRepresentable when a cut is not whole slices of a module tensor."""
        removed: dict[str, np.ndarray] = {}
        kept: dict[str, np.ndarray] = {}
        shapes = {q: tuple(t.shape) for q, (_, t) in self.tensors.items()}
        unmapped = []

        def masks(q):
            if q not in removed:
                removed[q] = np.zeros(shapes[q], dtype=bool)
                kept[q] = np.zeros(shapes[q], dtype=bool)
            return removed[q], kept[q]

        for name, cuts in tensor_cuts.items():
            if name not in model.graph.initializers:
                raise SurgeryError(f"plan cuts '{name}', which is not a weight of the exported model")
            d = self.derivation(name, model)
            shape = tuple(model.graph.initializers[name].shape.numpy())
            cut_mask = np.zeros(shape, dtype=bool)
            for axis, idx in cuts:
                sl = [slice(None)] * len(shape)
                sl[axis] = np.asarray(idx, dtype=np.int64)
                cut_mask[tuple(sl)] = True
            if d["kind"] == "direct":
                q = d["source"]
                if shapes[q] != shape:
                    raise NotRepresentable(f"'{q}' has shape {list(shapes[q])} in the module but {list(shape)} in ONNX")
                r, k = masks(q)
                r |= cut_mask
                k |= ~cut_mask
            elif d["kind"] == "index":
                for s, q in enumerate(d["sources"]):
                    sel = d["src"] == s
                    coords = tuple(d["idx"][a][sel] for a in range(len(shapes[q])))
                    r, k = masks(q)
                    r[coords] |= cut_mask[sel]
                    k[coords] |= ~cut_mask[sel]
            elif d["kind"] == "computed":
                owners = sorted({_owner(q) or "<root>" for q in d["sources"]})
                raise NotRepresentable(
                    f"ONNX weight '{name}' is computed from {', '.join(d['sources'])} by arithmetic at export "
                    f"(module {', '.join(owners)}); a cut of it cannot be mapped back onto the parameters")
            else:
                if d.get("shape_of"):
                    continue  # computed from parameter shapes (a zero bias): follows the module
                unmapped.append({"tensor": name, "module": d.get("module"), "shape": list(shape),
                                 "cuts": [(int(a), len(i)) for a, i in cuts]})
        # a weight used directly and left uncut keeps everything it holds
        for q in list(removed):
            for onnx_name, src in self.sources.items():
                if src.qualname == q and onnx_name in model.graph.initializers and onnx_name not in tensor_cuts:
                    if self.derivation(onnx_name, model)["kind"] == "direct" and _has_uses(model, onnx_name):
                        kept[q][...] = True
        out: dict[str, list[tuple[int, np.ndarray]]] = {}
        for q, r in removed.items():
            if r.any():
                out[q] = self._whole_slices(q, r, kept[q])
        return out, unmapped

    def _whole_slices(self, q: str, r: np.ndarray, k: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Module tensor q's cut as (axis, indices) whole slices: ``r`` marks the entries the
        plan removes, ``k`` those some use keeps. Raises NotRepresentable when it is not one."""
        if (r & k).any():
            raise NotRepresentable(
                f"the plan removes part of '{q}' (module '{_owner(q) or '<root>'}', "
                f"{type(self.module.get_submodule(_owner(q))).__name__}) that another use of it keeps")
        free = r | ~k  # removed, or used by nothing
        cuts = []
        cover = np.zeros_like(r)
        for a in range(r.ndim):
            other = tuple(j for j in range(r.ndim) if j != a)
            full = free.all(axis=other) & r.any(axis=other)
            idx = np.flatnonzero(full)
            if len(idx):
                cuts.append((a, idx.astype(np.int64)))
                sl = [slice(None)] * r.ndim
                sl[a] = idx
                cover[tuple(sl)] = True
        if (r & ~cover).any():
            raise NotRepresentable(
                f"the plan's cut of '{q}' (module '{_owner(q) or '<root>'}') is not a set of whole slices of it")
        return cuts


def _has_uses(model, name: str) -> bool:
    v = model.graph.initializers.get(name)
    return v is not None and (bool(list(v.uses())) or v.is_graph_output())


# --------------------------------------------------------------------------- #
# feeds
# --------------------------------------------------------------------------- #


def flat_tensors(obj) -> list:
    """Tensor leaves of a nested structure, in torch pytree order."""
    import torch
    from torch.utils._pytree import tree_leaves

    return [x for x in tree_leaves(obj) if isinstance(x, torch.Tensor)]


def onnx_feeds(proto: onnx.ModelProto, example_inputs) -> dict[str, np.ndarray]:
    args, kwargs = split_inputs(example_inputs)
    tensors = flat_tensors((args, kwargs))
    inits = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in inits]
    if len(tensors) != len(names):
        raise SurgeryError(f"the exported model has {len(names)} inputs ({', '.join(names)}) but the example "
                           f"inputs hold {len(tensors)} tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
