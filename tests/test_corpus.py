"""Checks on the test-model corpus itself (tests/corpus.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

try:  # tests/ as a package or as a plain directory on sys.path
    from tests import corpus
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(__file__))
    import corpus

REQUIRED_TAGS = {
    "residual", "bottleneck", "depthwise", "groupconv", "concat", "flatten", "split",
    "shuffle", "se", "convtranspose", "groupnorm", "instancenorm", "resize", "pad",
    "depth_to_space", "gemm", "matmul", "slice", "constant_weights", "dynamic_batch",
}

NAMES = [c.name for c in corpus.CASES]
DYNAMIC_BATCH = 2  # value fed for a symbolic batch dim


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    out = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def test_case_names_unique_and_suffixed():
    assert len(NAMES) == len(set(NAMES))
    for n in NAMES:
        assert n.endswith(("-dynamo", "-legacy", "-ir")), n


def test_tag_coverage():
    covered = set().union(*(c.tags for c in corpus.CASES))
    missing = REQUIRED_TAGS - covered
    assert not missing, f"corpus misses tags: {sorted(missing)}"


def test_both_exporters_present():
    dynamo = {n[: -len("-dynamo")] for n in NAMES if n.endswith("-dynamo")}
    legacy = {n[: -len("-legacy")] for n in NAMES if n.endswith("-legacy")}
    assert len(dynamo) >= 15 and len(legacy) >= 15


@pytest.mark.parametrize("name", NAMES)
def test_case_builds_checks_and_runs(name):
    model = corpus.build(name)
    onnx.checker.check_model(model, full_check=True)

    # float32 only, data embedded
    for t in model.graph.initializer:
        assert t.data_location != onnx.TensorProto.EXTERNAL, t.name
    inputs = _graph_inputs(model)
    assert inputs
    feeds = {}
    rng = np.random.default_rng(0)
    sym: dict[str, int] = {}
    for vi in inputs:
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, vi.name
        dims = _dims(vi)
        assert "?" not in dims, (vi.name, dims)
        shape = []
        for d in dims:
            if isinstance(d, str):
                assert "dynamic_batch" in corpus.case(name).tags, f"{vi.name} has symbolic dim {d}"
                sym[d] = DYNAMIC_BATCH
                shape.append(DYNAMIC_BATCH)
            else:
                shape.append(d)
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    assert len(outs) == len(model.graph.output)
    for vi, out in zip(model.graph.output, outs):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, vi.name
        assert out.dtype == np.float32
        assert np.all(np.isfinite(out)), f"{name}: non-finite output {vi.name}"
        declared = _dims(vi)
        expected = [sym.get(d, d) if isinstance(d, str) else d for d in declared]
        assert list(out.shape) == expected, (vi.name, declared, out.shape)
        assert float(np.abs(out).max()) > 0.0, f"{name}: output {vi.name} is all zero"


def test_build_returns_independent_copies():
    name = "resize-ir"
    a = corpus.build(name)
    a.graph.ClearField("node")
    b = corpus.build(name)
    assert len(b.graph.node) > 0
    assert a is not b


@pytest.mark.parametrize("name", ["slice-ir", "resnet_basic-legacy"])
def test_builders_are_deterministic(name):
    assert corpus.case(name).build().SerializeToString() == corpus.build(name).SerializeToString()


def test_dynamo_keeps_parameter_names():
    model = corpus.build("resnet_basic-dynamo")
    names = {t.name for t in model.graph.initializer}
    assert "fc.weight" in names and "stem.0.weight" in names


def test_batchnorm_stats_are_randomized():
    from onnx import numpy_helper

    model = corpus.build("densenet-dynamo")  # pre-activation BN survives export
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert bns
    for n in bns:
        scale, bias, mean, var = (inits[i] for i in n.input[1:5])
        assert not np.allclose(scale, 1.0) and not np.allclose(bias, 0.0)
        assert not np.allclose(mean, 0.0) and not np.allclose(var, 1.0)
        assert var.min() >= 0.5 and var.max() <= 1.5
