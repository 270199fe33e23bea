"""Tests for surgery.frontends.onnx_loader and surgery.backends.onnx_writer."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from surgery.backends import onnx_writer
from surgery.backends.onnx_writer import save_onnx, uses_external_data
from surgery.errors import SurgeryError
from surgery.frontends.onnx_loader import (
    META_INPUT_SHAPES,
    concrete_input_shapes,
    infer_shapes,
    load_onnx,
)

OPSET = 17
IR_VERSION = 8
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- #
# tiny models
# --------------------------------------------------------------------------- #


def _model(nodes, inputs, outputs, initializers=(), opset=OPSET, ir_version=IR_VERSION):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def _x(shape=("N", 3, 8, 8)):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def _y(shape=("N", 16, 8, 8)):
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))


def conv_model(opset=OPSET, out_channels=16):
    """x[N,3,8,8] -> Conv(W, B) -> Relu -> y; W is an initializer (1728 bytes)."""
    w = numpy_helper.from_array(RNG.standard_normal((out_channels, 3, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(RNG.standard_normal(out_channels).astype(np.float32), "B")
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    return _model(nodes, [_x()], [_y((("N", out_channels, 8, 8)))], [w, b], opset=opset)


def write(tmp_path, proto, name="model.onnx", **kwargs):
    path = tmp_path / name
    onnx.save(proto, str(path), **kwargs)
    return path


def write_external(tmp_path, proto, name="model.onnx", location="model.data"):
    return write(
        tmp_path,
        proto,
        name,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )


def run(model_or_path, x):
    if isinstance(model_or_path, onnx.ModelProto):
        source = model_or_path.SerializeToString()
    else:
        source = str(model_or_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def x_input(shape=(2, 3, 8, 8)):
    return RNG.standard_normal(shape).astype(np.float32)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --------------------------------------------------------------------------- #
# path and file errors
# --------------------------------------------------------------------------- #


def test_missing_path(tmp_path):
    path = tmp_path / "nope.onnx"
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "does not exist")


def test_directory_path(tmp_path):
    with pytest.raises(SurgeryError) as e:
        load_onnx(tmp_path)
    assert_error(e, str(tmp_path), "is a directory")


def test_text_file_is_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\nreally\n")
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "not an ONNX file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "empty")


def test_truncated_file(tmp_path):
    data = conv_model().SerializeToString()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "truncated")


def test_protobuf_without_graph(tmp_path):
    path = tmp_path / "nograph.onnx"
    path.write_bytes(onnx.ModelProto(ir_version=8, producer_name="x").SerializeToString())
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "no graph")


# --------------------------------------------------------------------------- #
# external data errors
# --------------------------------------------------------------------------- #


def test_missing_external_data_file(tmp_path):
    path = write_external(tmp_path, conv_model())
    os.remove(tmp_path / "model.data")
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "'model.data'", "missing")


def test_external_data_shorter_than_offset_plus_length(tmp_path):
    path = write_external(tmp_path, conv_model())
    data = tmp_path / "model.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "beyond the end", "file size 100")


def _set_location(path, location):
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(path))


def test_external_data_escaping_folder_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = write_external(folder, conv_model())
    os.replace(folder / "model.data", tmp_path / "evil.bin")  # exists, still refused
    _set_location(path, "../evil.bin")
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "'../evil.bin'", "escapes the model's folder", "refused for safety")


def test_external_data_absolute_location_is_refused(tmp_path):
    path = write_external(tmp_path, conv_model())
    _set_location(path, "/etc/passwd")
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "'/etc/passwd'", "absolute", "refused for safety")


def test_external_data_symlink_out_of_folder_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = write_external(folder, conv_model())
    os.replace(folder / "model.data", tmp_path / "real.data")
    os.symlink(tmp_path / "real.data", folder / "model.data")
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "symbolic link", "refused for safety")


def test_external_data_with_hard_links_is_refused(tmp_path):
    path = write_external(tmp_path, conv_model())
    os.link(tmp_path / "model.data", tmp_path / "copy.data")
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "hard links")


def test_in_memory_proto_with_external_data_is_refused(tmp_path):
    path = write_external(tmp_path, conv_model())
    proto = onnx.load(str(path), load_external_data=False)
    with pytest.raises(SurgeryError) as e:
        load_onnx(proto)
    assert_error(e, "ModelProto", "'model.data'")


# --------------------------------------------------------------------------- #
# opset and checker
# --------------------------------------------------------------------------- #


def _relu_model(opset):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return _model(nodes, [_x()], [_y(("N", 3, 8, 8))], opset=opset, ir_version=3)


def test_opset_too_old(tmp_path):
    path = write(tmp_path, _relu_model(8))
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "opset 8", "oldest supported (9)")


def test_opset_too_new(tmp_path):
    path = write(tmp_path, _relu_model(99))
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "opset 99", f"({onnx.defs.onnx_opset_version()})")


def test_checker_failure_is_reported_with_its_first_line(tmp_path):
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"])]
    path = write(tmp_path, _model(nodes, [_x()], [_y(("N", 3, 8, 8))]))
    with pytest.raises(onnx.checker.ValidationError) as direct:
        onnx.checker.check_model(str(path))
    first = next(line for line in str(direct.value).splitlines() if line.strip()).strip()
    with pytest.raises(SurgeryError) as e:
        load_onnx(path)
    assert_error(e, str(path), "onnx.checker", first)


# --------------------------------------------------------------------------- #
# normalization
# --------------------------------------------------------------------------- #


def test_input_file_is_not_modified(tmp_path):
    path = write_external(tmp_path, conv_model())
    before = (digest(path), digest(tmp_path / "model.data"), os.stat(path).st_mtime_ns)
    model = load_onnx(path)
    model.graph.initializers["W"].const_value.numpy()  # touch the lazy data too
    after = (digest(path), digest(tmp_path / "model.data"), os.stat(path).st_mtime_ns)
    assert before == after
    assert sorted(os.listdir(tmp_path)) == ["model.data", "model.onnx"]


def test_external_data_stays_lazy(tmp_path):
    path = write_external(tmp_path, conv_model())
    model = load_onnx(path)
    tensor = model.graph.initializers["W"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    assert os.path.isabs(tensor.base_dir)


def test_constant_node_weights_become_initializers(tmp_path):
    weight = RNG.standard_normal((16, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight)),
        helper.make_node("Constant", [], ["B"], value_floats=[0.5] * 16),
        helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1]),
    ]
    proto = _model(nodes, [_x()], [_y()])
    model = load_onnx(write(tmp_path, proto))
    assert [n.op_type for n in model.graph] == ["Conv"]
    conv = next(iter(model.graph))
    assert conv.inputs[1].is_initializer() and conv.inputs[1].name == "W"
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), weight)
    assert model.graph.initializers["B"].const_value.numpy().tolist() == [0.5] * 16


def test_constant_transpose_subgraph_keeps_the_stored_weight(tmp_path):
    """Weight arithmetic a channel rule understands is not folded, so the cut (and the
    plan) name the tensor the file stores."""
    weight_t = RNG.standard_normal((3, 16, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["Wt"], value=numpy_helper.from_array(weight_t)),
        helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0, 2, 3]),
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["c"], ["y"]),
    ]
    proto = _model(nodes, [_x()], [_y()])
    path = write(tmp_path, proto)
    model = load_onnx(path)
    assert [n.op_type for n in model.graph] == ["Transpose", "Conv", "Identity"]
    assert list(model.graph.initializers) == ["Wt"]  # the Constant, lifted under its own name
    np.testing.assert_array_equal(model.graph.initializers["Wt"].const_value.numpy(), weight_t)
    out = tmp_path / "folded.onnx"
    save_onnx(model, out)
    x = x_input()
    np.testing.assert_array_equal(run(out, x)[0], run(path, x)[0])


def test_folding_leaves_non_constant_nodes_alone(tmp_path):
    # onnxscript's fold_constants would bypass the Identity and rewrite Dropout.
    w = numpy_helper.from_array(RNG.standard_normal((16, 3, 3, 3)).astype(np.float32), "W")
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("Conv", ["xi", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Dropout", ["c"], ["y"]),
    ]
    model = load_onnx(write(tmp_path, _model(nodes, [_x()], [_y()], [w])))
    assert [n.op_type for n in model.graph] == ["Identity", "Conv", "Dropout"]
    assert [v.name for n in model.graph for v in n.outputs] == ["xi", "c", "y"]


def test_shared_large_weight_is_not_duplicated_by_folding(tmp_path):
    # A tied weight (read directly and through a Transpose) must stay one tensor.
    emb = numpy_helper.from_array(RNG.standard_normal((64, 512)).astype(np.float32), "E")
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"]),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Et"], ["logits"]),
    ]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 64])],
        [emb],
    )
    model = load_onnx(write(tmp_path, proto))
    assert [n.op_type for n in model.graph] == ["Gather", "Transpose", "MatMul"]
    assert list(model.graph.initializers) == ["E"]


def test_big_lazy_weight_is_not_pulled_into_memory_by_folding(tmp_path, monkeypatch):
    from surgery.frontends import onnx_loader

    # Trilu has no channel rule, so a constant Trilu of a weight is folded unless too big
    weight_t = numpy_helper.from_array(RNG.standard_normal((16, 3, 3, 3)).astype(np.float32), "Wt")
    nodes = [
        helper.make_node("Trilu", ["Wt"], ["W"]),
        helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1]),
    ]
    path = write_external(tmp_path, _model(nodes, [_x()], [_y()], [weight_t]))
    monkeypatch.setattr(onnx_loader, "_FOLD_MAX_LAZY_INPUT_BYTES", 1000)
    model = load_onnx(path)
    assert [n.op_type for n in model.graph] == ["Trilu", "Conv"]
    assert isinstance(model.graph.initializers["Wt"].const_value, ir.ExternalTensor)
    monkeypatch.undo()
    assert [n.op_type for n in load_onnx(path).graph] == ["Conv"]


def test_huge_generated_constant_is_not_materialized(tmp_path):
    shape = numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["x", "total"], ["y"]),
    ]
    model = load_onnx(write(tmp_path, _model(nodes, [_x()], [_y(("N", 3, 8, 8))], [shape])))
    assert [n.op_type for n in model.graph] == ["ConstantOfShape", "ReduceSum", "Add"]


def test_initializer_listed_as_input_is_removed_from_inputs(tmp_path):
    proto = conv_model()
    w = proto.graph.initializer[0]
    proto.graph.input.append(helper.make_tensor_value_info("W", w.data_type, list(w.dims)))
    path = write(tmp_path, proto)
    model = load_onnx(path)
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert model.graph.initializers["W"].is_initializer()
    out = tmp_path / "clean.onnx"
    save_onnx(model, out)
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["x"]
    x = x_input()
    # Not bit-identical: onnxruntime does not pre-pack a weight that is an input.
    np.testing.assert_allclose(run(out, x)[0], run(path, x)[0], rtol=1e-5, atol=1e-5)


def test_initializer_as_input_in_ir3_model_bumps_ir_version(tmp_path):
    proto = conv_model(opset=9)
    proto.ir_version = 3
    w, b = proto.graph.initializer
    for t in (w, b):
        proto.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model = load_onnx(write(tmp_path, proto))
    assert model.ir_version == 4
    assert [v.name for v in model.graph.inputs] == ["x"]


def test_in_memory_proto_is_copied(tmp_path):
    proto = conv_model()
    before = proto.SerializeToString()
    model = load_onnx(proto)
    model.graph.initializers["W"].const_value = ir.tensor(np.zeros((16, 3, 3, 3), np.float32))
    assert proto.SerializeToString() == before


# --------------------------------------------------------------------------- #
# shapes
# --------------------------------------------------------------------------- #


def _shapes(model):
    return {v.name: v.shape for n in model.graph for v in n.outputs}


def test_shapes_are_inferred_and_declared_io_kept(tmp_path):
    model = load_onnx(write(tmp_path, conv_model()))
    shape = _shapes(model)["c"]
    assert shape[1:] == (16, 8, 8) and shape[0].value == "N"
    assert model.graph.inputs[0].shape[0].value == "N"


def test_reshape_minus_one_with_symbolic_batch_is_resolved(tmp_path):
    pytest.importorskip("sympy")
    proto = conv_model()
    proto.graph.node.extend(
        [
            helper.make_node("Shape", ["y"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
            helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
            helper.make_node("Reshape", ["y", "target"], ["flat"]),
            helper.make_node("Relu", ["flat"], ["out"]),
        ]
    )
    proto.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
        ]
    )
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "F"]))
    # onnx alone leaves the -1 unknown (N is symbolic)
    plain = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    info = next(v for v in plain.graph.value_info if v.name == "flat")
    assert not info.type.tensor_type.shape.dim[1].HasField("dim_value")
    model = load_onnx(write(tmp_path, proto))
    flat = _shapes(model)["flat"]
    assert flat[0].value == "N" and flat[1] == 16 * 8 * 8
    declared = model.graph.outputs[0].shape
    assert [d.value for d in declared] == ["N", "F"]  # declared output shape untouched


def test_infer_shapes_clears_stale_intermediate_shapes(tmp_path):
    model = load_onnx(write(tmp_path, conv_model()))
    conv = next(iter(model.graph))
    conv.outputs[0].shape = ir.Shape(["N", 99, 8, 8])  # stale, e.g. after a cut
    declared_out = model.graph.outputs[0].shape
    infer_shapes(model)
    assert conv.outputs[0].shape[1] == 16
    assert model.graph.outputs[0].shape == declared_out


def test_input_shapes_validation_and_concrete_shapes(tmp_path):
    path = write(tmp_path, conv_model())
    with pytest.raises(SurgeryError) as e:
        load_onnx(path, input_shapes={"image": (1, 3, 8, 8)})
    assert_error(e, str(path), "'image'", "valid inputs: 'x'")
    with pytest.raises(SurgeryError) as e:
        load_onnx(path, input_shapes={"x": (1, 3, 8)})
    assert_error(e, str(path), "rank 3", "rank 4")
    with pytest.raises(SurgeryError) as e:
        load_onnx(path, input_shapes={"x": (1, 4, 8, 8)})
    assert_error(e, str(path), "fixes it at 3")

    model = load_onnx(path)
    assert concrete_input_shapes(model) == {"x": (1, 3, 8, 8)}
    assert model.graph.inputs[0].shape[0].value == "N"
    model = load_onnx(path, input_shapes={"x": (4, 3, 8, 8)})
    assert model.meta[META_INPUT_SHAPES] == {"x": (4, 3, 8, 8)}
    assert model.graph.inputs[0].shape[0].value == "N"  # declared axes stay dynamic
    assert concrete_input_shapes(model) == {"x": (4, 3, 8, 8)}


def test_concrete_shapes_share_symbol_bindings(tmp_path):
    nodes = [helper.make_node("Add", ["x", "z"], ["y"])]
    proto = _model(
        nodes,
        [_x(("batch", 3)), helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])],
        [_y(("batch", 3))],
    )
    model = load_onnx(write(tmp_path, proto), input_shapes={"x": (5, 3)})
    assert concrete_input_shapes(model) == {"x": (5, 3), "z": (5, 3)}
    with pytest.raises(SurgeryError) as e:
        concrete_input_shapes(model, {"x": (5, 3), "z": (2, 3)})
    assert_error(e, "'batch'", "5", "2")


# --------------------------------------------------------------------------- #
# writer
# --------------------------------------------------------------------------- #


def test_save_round_trip_inline(tmp_path):
    src = write(tmp_path, conv_model())
    out = tmp_path / "out" / "inline.onnx"
    out.parent.mkdir()
    save_onnx(load_onnx(src), out, external_data=False)
    assert os.listdir(out.parent) == ["inline.onnx"]
    assert not uses_external_data(out)
    x = x_input()
    np.testing.assert_array_equal(run(out, x)[0], run(src, x)[0])


def test_save_round_trip_external(tmp_path):
    src = write(tmp_path, conv_model(out_channels=256))  # 27 KiB of weights
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "ext.onnx"
    save_onnx(load_onnx(src), out, external_data=True)
    assert sorted(os.listdir(out_dir)) == ["ext.onnx", "ext.onnx.data"]
    assert uses_external_data(out)
    assert os.path.getsize(out) < 2048 < os.path.getsize(out_dir / "ext.onnx.data")
    proto = onnx.load(str(out), load_external_data=False)
    locations = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"ext.onnx.data"}
    x = x_input()
    np.testing.assert_array_equal(run(out, x)[0], run(src, x)[0])
    # and it loads back through the loader, lazily
    again = load_onnx(out)
    assert isinstance(again.graph.initializers["W"].const_value, ir.ExternalTensor)


def test_external_model_saved_inline_elsewhere_is_self_contained(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = write_external(src_dir, conv_model())
    out = tmp_path / "inline.onnx"
    save_onnx(load_onnx(src), out, external_data=False)
    assert not uses_external_data(out)
    x = x_input()
    np.testing.assert_array_equal(run(out, x)[0], run(src, x)[0])


def test_auto_mode_switches_to_external_above_threshold(tmp_path, monkeypatch):
    model = load_onnx(write(tmp_path, conv_model(out_channels=256)))
    save_onnx(model, tmp_path / "small.onnx")
    assert not uses_external_data(tmp_path / "small.onnx")
    monkeypatch.setattr(onnx_writer, "AUTO_EXTERNAL_BYTES", 1000)
    save_onnx(model, tmp_path / "big.onnx")
    assert uses_external_data(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()


@pytest.mark.parametrize("external", [False, True])
def test_failed_save_leaves_no_temporaries_and_keeps_old_file(tmp_path, monkeypatch, external):
    model = load_onnx(write(tmp_path, conv_model(out_channels=256)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.onnx"
    out.write_bytes(b"previous contents")

    def boom(*args, **kwargs):
        raise RuntimeError("serialization exploded")

    monkeypatch.setattr(ir.serde, "serialize_model", boom)
    with pytest.raises(SurgeryError) as e:
        save_onnx(model, out, external_data=external)
    assert_error(e, str(out), "serialization exploded")
    assert os.listdir(out_dir) == ["model.onnx"]
    assert out.read_bytes() == b"previous contents"


def test_save_into_missing_folder(tmp_path):
    model = load_onnx(write(tmp_path, conv_model()))
    target = tmp_path / "missing" / "m.onnx"
    with pytest.raises(SurgeryError) as e:
        save_onnx(model, target)
    assert_error(e, str(target), "does not exist")


def test_save_does_not_modify_the_model(tmp_path):
    src = write_external(tmp_path, conv_model(out_channels=256))
    model = load_onnx(src)
    before = model.graph.initializers["W"].const_value
    save_onnx(model, tmp_path / "a.onnx", external_data=True)
    save_onnx(model, tmp_path / "b.onnx", external_data=False)
    assert model.graph.initializers["W"].const_value is before
    x = x_input()
    np.testing.assert_array_equal(run(tmp_path / "a.onnx", x)[0], run(tmp_path / "b.onnx", x)[0])
