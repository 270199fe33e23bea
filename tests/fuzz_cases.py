"""Hypothesis strategies for hostile CLI runs (tests/test_fuzz.py, bench/fuzz.py).

Four families, each drawing a whole case: files written into a fresh folder and the
command line to run on them.

- ``graphs``: small CNN/MLP programs from a vocabulary of ops in the layouts
  exporters write, then mutated: attributes, declared shapes, dtypes, names,
  opsets, dangling or duplicated values, external-data layouts (including
  locations that collide with the output's data file, absolute or escaping ones);
- ``mutated``: byte-level mutations of the shipped models;
- ``argv``: odd command lines on a valid model;
- ``plans``: hand-edited plan files replayed with ``surgery apply``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto as T, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [REPO / "models" / "resnet_tiny.onnx", REPO / "models" / "mobilenet_tiny.onnx"]
HUGE = [0, -1, -7, 2**31, 2**40, 2**62, 2**63 - 1]


class Case:
    """A folder's files and the arguments to run; ``out`` the model exit 0 must write."""

    def __init__(self, family: str, args: list[str], out: Path | None, note: str = ""):
        self.family, self.args, self.out, self.note = family, args, out, note
        self.folder = Path(args[1]).parent  # every case's files live beside its model


# --------------------------------------------------------------------------- graphs

class Builder:
    def __init__(self, rng: random.Random, c: int, h: int):
        self.rng, self.nodes, self.inits, self.n = rng, [], [], 0
        self.cur, self.shape = "x", [1, c, h, h]

    def name(self, p: str) -> str:
        self.n += 1
        return f"{p}{self.n}"

    def weight(self, *shape: int) -> str:
        n = self.name("w")
        a = np.random.default_rng(self.n).standard_normal(shape).astype(np.float32) * 0.3
        self.inits.append(numpy_helper.from_array(a, n))
        return n

    def node(self, op: str, ins: list[str], shape: list[int], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=self.name("n"), **attrs))
        self.cur, self.shape = out, shape
        return out


def _conv(b: Builder):
    if len(b.shape) != 4:
        return
    c, h = b.shape[1], b.shape[2]
    groups = b.rng.choice([g for g in (1, 2, 4, c) if c % g == 0])
    out = b.rng.choice([4, 8, 12]) * (groups if groups > 1 else 1)
    k = b.rng.choice([1, 3]) if h >= 3 else 1
    b.node("Conv", [b.cur, b.weight(out, c // groups, k, k), b.weight(out)], [1, out, h, h],
           group=groups, pads=[k // 2] * 4)


def _unary(op: str):
    def f(b: Builder):
        b.node(op, [b.cur], list(b.shape))
    return f


def _bn(b: Builder):
    if len(b.shape) != 4:
        return
    c = b.shape[1]
    ws = [b.weight(c) for _ in range(3)]
    var = b.name("var")
    b.inits.append(numpy_helper.from_array(np.abs(np.random.default_rng(1).standard_normal(c)).astype(np.float32) + 0.5, var))
    b.node("BatchNormalization", [b.cur, *ws[:2], ws[2], var], list(b.shape))


def _residual(b: Builder):
    if len(b.shape) != 4:
        return
    start, shape = b.cur, list(b.shape)
    c = shape[1]
    b.node("Conv", [b.cur, b.weight(c, c, 1, 1)], shape)
    b.node("Relu", [b.cur], shape)
    b.node("Add", [b.cur, start], shape)


def _concat(b: Builder):
    if len(b.shape) != 4:
        return
    start, shape = b.cur, list(b.shape)
    b.node("Conv", [b.cur, b.weight(4, shape[1], 1, 1)], [1, 4, *shape[2:]])
    b.node("Concat", [start, b.cur], [1, shape[1] + 4, *shape[2:]], axis=1)


def _nhwc(b: Builder):
    """tf2onnx's layout: Transpose to NHWC, a per-channel Mul on the last axis, back."""
    if len(b.shape) != 4:
        return
    n, c, h, w = b.shape
    b.node("Transpose", [b.cur], [n, h, w, c], perm=[0, 2, 3, 1])
    b.node("Mul", [b.cur, b.weight(c)], [n, h, w, c])
    b.node("Transpose", [b.cur], [n, c, h, w], perm=[0, 3, 1, 2])


def _flatten_gemm(b: Builder):
    if len(b.shape) == 4:
        if b.rng.random() < 0.5:
            b.node("GlobalAveragePool", [b.cur], [1, b.shape[1], 1, 1])
        f = int(np.prod(b.shape[1:]))
        b.node("Flatten", [b.cur], [1, f], axis=1)
    f = b.shape[1]
    out = b.rng.choice([4, 8, 16])
    b.node("Gemm", [b.cur, b.weight(out, f), b.weight(out)], [1, out], transB=1)


def _matmul(b: Builder):
    if len(b.shape) != 2:
        return
    out = b.rng.choice([4, 8])
    b.node("MatMul", [b.cur, b.weight(b.shape[1], out)], [1, out])


def _reshape_heads(b: Builder):
    if len(b.shape) != 2 or b.shape[1] % 2:
        return
    f = b.shape[1]
    sh = b.name("shape")
    b.inits.append(numpy_helper.from_array(np.array([1, 2, f // 2], np.int64), sh))
    b.node("Reshape", [b.cur, sh], [1, 2, f // 2])
    b.node("Softmax", [b.cur], [1, 2, f // 2], axis=-1)
    sh2 = b.name("shape")
    b.inits.append(numpy_helper.from_array(np.array([1, f], np.int64), sh2))
    b.node("Reshape", [b.cur, sh2], [1, f])


def _custom(b: Builder):
    b.node("Mystery", [b.cur], list(b.shape), domain="com.example")


def _if_const(b: Builder):
    shape = list(b.shape)
    then = helper.make_graph([helper.make_node("Relu", [b.cur], ["t_out"])], "then", [],
                             [helper.make_tensor_value_info("t_out", T.FLOAT, shape)])
    other = helper.make_graph([helper.make_node("Neg", [b.cur], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", T.FLOAT, shape)])
    cond = b.name("cond")
    b.inits.append(numpy_helper.from_array(np.array(True), cond))
    b.node("If", [cond], shape, then_branch=then, else_branch=other)


OPS = {"conv": _conv, "relu": _unary("Relu"), "sigmoid": _unary("Sigmoid"), "bn": _bn, "residual": _residual,
       "concat": _concat, "nhwc": _nhwc, "gemm": _flatten_gemm, "matmul": _matmul, "heads": _reshape_heads,
       "custom": _custom, "if": _if_const}
OPS_4D = ["conv", "relu", "bn", "residual", "concat", "nhwc", "sigmoid"]


def build_program(rng: random.Random, ops: list[str], c: int, h: int, opset: int) -> onnx.ModelProto:
    b = Builder(rng, c, h)
    _conv(b)
    for op in ops:
        OPS[op](b)
    if len(b.shape) == 4 and rng.random() < 0.6:
        _flatten_gemm(b)
    g = helper.make_graph(b.nodes, "fuzz", [helper.make_tensor_value_info("x", T.FLOAT, [1, c, h, h])],
                          [helper.make_tensor_value_info(b.cur, T.FLOAT, b.shape)], b.inits)
    imports = [helper.make_opsetid("", opset)]
    if any(n.domain == "com.example" for n in b.nodes):
        imports.append(helper.make_opsetid("com.example", 1))
    m = helper.make_model(g, opset_imports=imports)
    m.ir_version = 8
    return m


# mutations: each takes (model, rng) and changes it in place ------------------------

def _mut_attr(m, rng):
    nodes = [n for n in m.graph.node if n.attribute]
    if nodes:
        a = rng.choice(rng.choice(nodes).attribute)
        if a.type == onnx.AttributeProto.INT:
            a.i = rng.choice(HUGE + [0, 1, 2, 3])
        elif a.type == onnx.AttributeProto.INTS and a.ints:
            a.ints[rng.randrange(len(a.ints))] = rng.choice(HUGE + [0, 2])


def _mut_input_shape(m, rng):
    dims = m.graph.input[0].type.tensor_type.shape.dim
    d = dims[rng.randrange(len(dims))]
    if rng.random() < 0.3:
        d.dim_param = rng.choice(["batch", "N", "", "unk__1"])
    else:
        d.dim_value = rng.choice(HUGE[:5] + [1, 2**20])


def _mut_output_shape(m, rng):
    dims = m.graph.output[0].type.tensor_type.shape.dim
    if dims:
        dims[rng.randrange(len(dims))].dim_value = rng.choice([0, 3, 2**40])


def _mut_dtype(m, rng):
    floats = [t for t in m.graph.initializer if t.data_type == T.FLOAT]
    if floats:
        t = rng.choice(floats)
        a = numpy_helper.to_array(t)
        dt = rng.choice([np.float16, np.float64, np.int64, np.int8, np.bool_])
        t.CopyFrom(numpy_helper.from_array(a.astype(dt), t.name))


def _mut_string_weight(m, rng):
    if m.graph.initializer:
        t = rng.choice(list(m.graph.initializer))
        n = int(np.prod(t.dims)) if t.dims else 1
        t.CopyFrom(helper.make_tensor(t.name, T.STRING, list(t.dims), [b"s"] * min(n, 10**6)))


def _mut_nonfinite(m, rng):
    floats = [t for t in m.graph.initializer if t.data_type == T.FLOAT]
    if floats:
        t = rng.choice(floats)
        a = numpy_helper.to_array(t).copy()
        a.flat[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        t.CopyFrom(numpy_helper.from_array(a, t.name))


def _mut_drop_init(m, rng):
    if m.graph.initializer:
        del m.graph.initializer[rng.randrange(len(m.graph.initializer))]


def _mut_dup_output(m, rng):
    if len(m.graph.node) >= 2:
        a, b = rng.sample(range(len(m.graph.node)), 2)
        m.graph.node[b].output[0] = m.graph.node[a].output[0]


def _mut_names(m, rng):
    bad = rng.choice(["", "a\nb", "\x1b[2J", "[red]x[/]", "ünï", "a" * 5000, "x"])
    if m.graph.node:
        n = rng.choice(list(m.graph.node))
        old = n.output[0]
        n.output[0] = bad
        for other in m.graph.node:
            other.input[:] = [bad if i == old else i for i in other.input]
        for o in m.graph.output:
            if o.name == old:
                o.name = bad


def _mut_opset(m, rng):
    m.opset_import[0].version = rng.choice([1, 6, 9, 11, 13, 17, 21, 99])


def _mut_ir_version(m, rng):
    m.ir_version = rng.choice([0, 1, 3, 99])


def _mut_cycle(m, rng):
    if len(m.graph.node) >= 2:
        m.graph.node[0].input[0] = m.graph.node[-1].output[0]


def _mut_reorder(m, rng):
    nodes = list(m.graph.node)
    rng.shuffle(nodes)
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def _mut_remove_node(m, rng):
    if len(m.graph.node) > 1:
        del m.graph.node[rng.randrange(len(m.graph.node))]


MUTATIONS = {f.__name__[5:]: f for f in (
    _mut_attr, _mut_input_shape, _mut_output_shape, _mut_dtype, _mut_string_weight, _mut_nonfinite,
    _mut_drop_init, _mut_dup_output, _mut_names, _mut_opset, _mut_ir_version, _mut_cycle, _mut_reorder,
    _mut_remove_node)}

LAYOUTS = ["inline", "external", "external_collides", "external_absolute", "external_escapes", "external_missing",
           "external_truncated", "external_per_tensor"]


def _save(m: onnx.ModelProto, d: Path, layout: str) -> None:
    path = d / "m.onnx"
    if layout == "inline":
        path.write_bytes(m.SerializeToString())
        return
    loc = {"external_collides": "o.onnx.data", "external_per_tensor": None}.get(layout, "m.data")
    try:
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=loc is not None,
                  location=loc, size_threshold=0, convert_attribute=True)
    except Exception:  # noqa: BLE001 - a mutated proto onnx cannot save: write it inline
        path.write_bytes(m.SerializeToString())
        return
    data = d / "m.data"
    if layout == "external_missing" and data.exists():
        data.unlink()
    elif layout == "external_truncated" and data.exists():
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif layout in ("external_absolute", "external_escapes"):
        new = b"/etc/passwd" if layout == "external_absolute" else b"../../m.data"
        path.write_bytes(path.read_bytes().replace(b"m.data", new))


@st.composite
def graph_cases(draw, folder: Path) -> Case:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    c, h = draw(st.sampled_from([1, 3, 4, 8])), draw(st.sampled_from([1, 2, 5, 8]))
    ops = draw(st.lists(st.sampled_from(sorted(OPS)), max_size=6))
    opset = draw(st.sampled_from([11, 13, 17, 21]))
    m = build_program(rng, ops, c, h, opset)
    hostile = draw(st.booleans())  # half the cases are well-formed, so pruning itself is fuzzed too
    muts = draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3)) if hostile else []
    for name in muts:
        MUTATIONS[name](m, rng)
    layout = draw(st.sampled_from(LAYOUTS if hostile else ["inline", "external", "external_per_tensor"]))
    _save(m, folder, layout)
    ratio = draw(st.sampled_from(["0", "0.3", "0.5", "0.9"]))
    extra = draw(st.sampled_from([[], ["--global"], ["--round-to", "4"], ["-c", "l1"], ["-c", "fpgm"],
                                  ["--no-verify"], ["--target-params", "0.5"]]))
    args = ["prune", str(folder / "m.onnx"), "-o", str(folder / "o.onnx"), "--ratio", ratio, "-q", *extra]
    note = f"seed={seed} ops={ops} muts={muts} layout={layout} c={c} h={h} opset={opset} {' '.join(args[5:])}"
    return Case("graphs", args, folder / "o.onnx", note)


# --------------------------------------------------------------------------- bytes

@st.composite
def mutated_cases(draw, folder: Path) -> Case:
    src = draw(st.sampled_from(SHIPPED))
    data = bytearray(src.read_bytes())
    edits = draw(st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "dup"]),
                                    st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=4))
    for kind, pos, val in edits:
        pos = min(pos, len(data) - 1)
        if kind == "flip":
            data[pos] ^= 1 << (val % 8)
        elif kind == "set":
            data[pos] = val
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = bytes([val]) * (1 + val % 7)
        else:
            data[pos:pos] = data[pos:pos + 64]
        if not data:
            break
    (folder / "m.onnx").write_bytes(bytes(data))
    args = ["prune", str(folder / "m.onnx"), "-o", str(folder / "o.onnx"), "-q"]
    return Case("mutated", args, folder / "o.onnx", f"{src.name} {edits}")


# --------------------------------------------------------------------------- argv

_OPTION_VALUES = {
    "--ratio": ["nan", "inf", "-0.1", "1", "1e308", "0.5", "", "0x10"],
    "--round-to": ["0", "-3", "99999999999999999999", "2"],
    "--seed": ["-1", "2**64", "18446744073709551616", "3"],
    "--input-shape": ["x:1x3x32x32", "x:" + "9" * 40, "x:", ":1x2", "x:1x3x-32x32", "y:1", "x:1x3x0x0", "x\n:1"],
    "--keep": ["", "nope", "\x01", "[bold]"],  # (no NUL: no argv can hold one)
    "--criterion": ["nope", "wanda", "l1", ""],
    "--target-params": ["0", "2", "nan", "0.5"],
    "--gqa": ["kv", "nope"],
    "--calib": ["/dev/zero", "missing.npz", "m.onnx"],
    "--head-ratio": ["1.5", "0.2"],
    "--report": ["{d}", "{d}/m.onnx", "{d}/r.json", "/proc/version"],
    "--plan": ["{d}/o.onnx", "{d}/p.json"],
}


@st.composite
def argv_cases(draw, folder: Path) -> Case:
    import shutil

    shutil.copy(SHIPPED[1], folder / "m.onnx")
    opts = draw(st.lists(st.sampled_from(sorted(_OPTION_VALUES)), min_size=1, max_size=3, unique=True))
    args = ["prune", str(folder / "m.onnx"), "-o", str(folder / "o.onnx"), "-q"]
    for o in opts:
        args += [o, draw(st.sampled_from(_OPTION_VALUES[o])).replace("{d}", str(folder))]
    return Case("argv", args, folder / "o.onnx", " ".join(args[5:]))


# --------------------------------------------------------------------------- plans

@st.composite
def plan_cases(draw, folder: Path) -> Case:
    import shutil

    shutil.copy(SHIPPED[1], folder / "m.onnx")
    kind = draw(st.sampled_from(["deep", "huge_index", "negative", "wrong_type", "empty", "garbage", "dup"]))
    if kind == "deep":
        text = "[" * 100_000 + "]" * 100_000
    elif kind == "garbage":
        text = draw(st.text(max_size=200))
    else:
        groups = {"huge_index": [{"name": "x", "tensors": [{"tensor": "a", "axis": 0, "removed": [2**70]}]}],
                  "negative": [{"name": "x", "tensors": [{"tensor": "a", "axis": -9, "removed": [-1]}]}],
                  "wrong_type": [{"name": 3, "tensors": "no"}],
                  "empty": [],
                  "dup": [{"name": "a"}, {"name": "a"}]}[kind]
        text = json.dumps({"groups": groups})
    (folder / "p.json").write_text(text)
    args = ["apply", str(folder / "m.onnx"), str(folder / "p.json"), "-o", str(folder / "o.onnx"), "-q"]
    return Case("plans", args, folder / "o.onnx", kind)


FAMILIES = {"graphs": graph_cases, "mutated": mutated_cases, "argv": argv_cases, "plans": plan_cases}


def fresh_folder(root: Path, n: int) -> Path:
    """A new empty folder for case ``n`` (unique even when hypothesis replays a draw)."""
    d = Path(tempfile.mkdtemp(prefix=f"case{n:05d}-", dir=root))
    os.chmod(d, 0o755)
    return d
