"""The demo models shipped in models/ and the torch-free builders that made them."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

MODELS = Path(__file__).resolve().parent.parent / "models"
SHIPPED = ["resnet_tiny.onnx", "mobilenet_tiny.onnx"]


def _load_build():
    name = "_surgery_models_build"  # the same name bench/synthetic.py uses
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MODELS / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


build = _load_build()


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    data = model.read_bytes() if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _image(model: onnx.ModelProto) -> int:
    return model.graph.input[0].type.tensor_type.shape.dim[2].dim_value


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _trainable(model: onnx.ModelProto) -> int:
    """Parameters as torch counts them: no BN running statistics, no Clip bounds."""
    return sum(
        math.prod(t.dims)
        for t in model.graph.initializer
        if not t.name.endswith((".running_mean", ".running_var")) and not t.name.startswith("relu6.")
    )


# --------------------------------------------------------------------------
# the shipped files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fname", SHIPPED)
def test_shipped_file_exists_and_is_small(fname):
    path = MODELS / fname
    assert path.is_file(), f"{path} missing: run `python models/build.py`"
    assert path.stat().st_size < 1_000_000


@pytest.mark.parametrize("fname", SHIPPED)
def test_shipped_model_checks(fname):
    path = MODELS / fname
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert _dims(model.graph.input[0]) == ["batch", 3, 32, 32]
    assert _dims(model.graph.output[0]) == ["batch", 10]
    assert {o.domain: o.version for o in model.opset_import} == {"": 17}
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)


@pytest.mark.parametrize("fname", SHIPPED)
def test_shipped_model_runs_with_dynamic_batch(fname):
    sess = _session(MODELS / fname)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    (y3,) = sess.run(None, {"input": x})
    assert y3.shape == (3, 10) and y3.dtype == np.float32
    assert np.isfinite(y3).all()
    for i in range(3):
        (y1,) = sess.run(None, {"input": x[i : i + 1]})
        assert y1.shape == (1, 10)
        np.testing.assert_allclose(y1[0], y3[i], rtol=1e-5, atol=1e-5)
    # the rows depend on the input
    assert not np.allclose(y3[0], y3[1], rtol=0, atol=1e-6)


def test_mobilenet_tiny_has_depthwise_convs_and_residuals():
    model = onnx.load(MODELS / "mobilenet_tiny.onnx")
    groups = [
        next(a.i for a in n.attribute if a.name == "group")
        for n in model.graph.node
        if n.op_type == "Conv"
    ]
    assert sum(g > 1 for g in groups) >= 4
    assert any(n.op_type == "Add" for n in model.graph.node)
    assert any(n.op_type == "Clip" for n in model.graph.node)


def _split(model: onnx.ModelProto) -> tuple[bytes, dict[str, np.ndarray]]:
    """(everything but the weights, serialized; the weights by name)."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    del rest.graph.initializer[:]
    return rest.SerializeToString(deterministic=True), weights


def test_build_reproduces_shipped_models(tmp_path):
    written = build.write_demo_models(tmp_path)
    assert sorted(p.name for p in written) == sorted(SHIPPED)
    for fname in SHIPPED:
        shipped_graph, shipped_w = _split(onnx.load(MODELS / fname))
        fresh_graph, fresh_w = _split(onnx.load(tmp_path / fname))
        assert fresh_graph == shipped_graph, f"{fname}: graph differs from a rebuild"
        assert list(fresh_w) == list(shipped_w)
        for name, arr in shipped_w.items():
            assert arr.dtype == fresh_w[name].dtype and np.array_equal(arr, fresh_w[name]), name


def test_build_main_writes_to_out_dir(tmp_path, capsys):
    assert build.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SHIPPED)
    assert "nodes" in capsys.readouterr().out


# --------------------------------------------------------------------------
# the builders
# --------------------------------------------------------------------------

SMALL = {
    "resnet-basic": lambda: build.resnet((1, 1), False, (8, 16), num_classes=5, image=32),
    "resnet-bottleneck": lambda: build.resnet((1, 2), True, (8, 16), num_classes=5, image=64),
    "densenet": lambda: build.densenet((2, 3), growth=4, bn_size=2, init_features=8,
                                       num_classes=5, image=32),
    "mobilenet_v2": lambda: build.mobilenet_v2(0.25, num_classes=5, image=32),
    "grouped_cnn": lambda: build.grouped_cnn(),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_small_builders_check_and_run(name):
    model = SMALL[name]()
    onnx.checker.check_model(model, full_check=True)
    classes = _dims(model.graph.output[0])[1]
    image = _image(model)
    sess = _session(model)
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 3, image, image), dtype=np.float32)
        (y,) = sess.run(None, {"input": x})
        assert y.shape == (n, classes) and np.isfinite(y).all()


def test_grouped_cnn_has_grouped_and_depthwise_convs():
    model = build.grouped_cnn()
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    weights = {t.name: t.dims for t in model.graph.initializer}
    group = {k: next(a.i for a in n.attribute if a.name == "group") for k, n in convs.items()}
    assert {g for g in group.values() if g > 1} >= {4}
    depthwise = [k for k, g in group.items() if g > 1 and weights[f"{k}.weight"][1] == 1]
    assert depthwise == ["dw.conv"]


def test_builders_are_deterministic_and_seeded():
    a, b, c = build.grouped_cnn(seed=0), build.grouped_cnn(seed=0), build.grouped_cnn(seed=1)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    ga, gc = onnx.GraphProto(), onnx.GraphProto()
    ga.CopyFrom(a.graph), gc.CopyFrom(c.graph)
    del ga.initializer[:], gc.initializer[:]
    assert ga == gc  # same graph, other weights
    assert [t.name for t in a.graph.initializer] == [t.name for t in c.graph.initializer]
    assert a.graph.initializer[0].raw_data != c.graph.initializer[0].raw_data


@pytest.mark.parametrize(
    "make, expected",
    [
        # torchvision's parameter counts (sum of p.numel() over model.parameters())
        (lambda: build.resnet((2, 2, 2, 2), False), 11_689_512),  # resnet18
        (lambda: build.resnet((3, 4, 6, 3), True), 25_557_032),  # resnet50
        (lambda: build.densenet((6, 12, 24, 16)), 7_978_856),  # densenet121
        (lambda: build.densenet((6, 12, 48, 32)), 20_013_928),  # densenet201
        (lambda: build.mobilenet_v2(1.0), 3_504_872),  # mobilenet_v2
    ],
    ids=["resnet18", "resnet50", "densenet121", "densenet201", "mobilenet_v2"],
)
def test_parameter_counts_match_torchvision(make, expected):
    assert _trainable(make()) == expected


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError):
        build.resnet((1, 1), True, (8,))
    with pytest.raises(ValueError):
        build.grouped_cnn(bottleneck_width=30, groups=4)
    with pytest.raises(ValueError):
        build.densenet(image=8)
