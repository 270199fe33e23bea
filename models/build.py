"""Torch-free builders for the ONNX models surgery ships, tests and benchmarks.

Each builder returns an ``onnx.ModelProto`` (opset 17, IR version 8) made with
``onnx.helper`` and numpy only, with seeded random float32 weights:

* convolutions: He (Kaiming) normal, ``std = sqrt(2 / fan_in)``, no bias
  (every conv is followed by a BatchNormalization, as in torchvision);
* BatchNormalization: random gamma, beta, running mean and running variance,
  so no normalization is an identity and no two channels look alike;
* the classifier ``Gemm`` (``transB=1``): uniform in ``+-1/sqrt(in_features)``,
  like ``torch.nn.Linear``.

Every model has one input ``input`` of shape ``[batch, 3, image, image]`` and
one output ``logits`` of shape ``[batch, num_classes]``, where ``batch`` is a
symbolic dimension. Initializer and node names follow torchvision's module
paths (``layer1.0.conv1.weight``, ``features.denseblock1.denselayer1.norm1``,
``features.3.conv.1.0.weight``...), so a torchvision module of the same
configuration has parameters of the same names and shapes.

The same arguments and seed always give the same model. ``python
models/build.py`` (re)writes the demo models shipped beside this file; see
``models/README.md``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; loadable by older runtimes
PRODUCER = "surgery.models.build"
BN_EPS = 1e-5

__all__ = [
    "resnet",
    "densenet",
    "mobilenet_v2",
    "grouped_cnn",
    "resnet_tiny",
    "mobilenet_tiny",
    "demo_models",
    "write_demo_models",
    "main",
]


# --------------------------------------------------------------------------
# graph assembly
# --------------------------------------------------------------------------


class _Net:
    """Collects nodes and initializers; every node's one output has its name."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._relu6: tuple[str, str] | None = None

    # -- bookkeeping -------------------------------------------------------

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r}")
        self._names.add(name)
        return name

    def param(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        self.inits.append(numpy_helper.from_array(array, self._claim(name)))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, **attrs) -> str:
        self.nodes.append(
            helper.make_node(op, list(inputs), [self._claim(name)], name=name, **attrs)
        )
        return name

    # -- layers ------------------------------------------------------------

    def conv(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        pad: int | None = None,
        groups: int = 1,
    ) -> str:
        if cin % groups or cout % groups:
            raise ValueError(f"{name}: channels {cin}->{cout} not divisible by groups={groups}")
        if pad is None:
            pad = k // 2
        fan_in = (cin // groups) * k * k
        w = self.rng.standard_normal((cout, cin // groups, k, k), dtype=np.float32)
        w *= np.float32(math.sqrt(2.0 / fan_in))
        self.param(f"{name}.weight", w)
        return self.node(
            "Conv",
            [x, f"{name}.weight"],
            name,
            dilations=[1, 1],
            group=groups,
            kernel_shape=[k, k],
            pads=[pad, pad, pad, pad],
            strides=[stride, stride],
        )

    def bn(self, x: str, name: str, c: int, gamma: tuple[float, float] = (0.4, 1.4)) -> str:
        rng = self.rng
        self.param(f"{name}.weight", rng.uniform(*gamma, size=c))
        self.param(f"{name}.bias", rng.normal(0.0, 0.1, size=c))
        self.param(f"{name}.running_mean", rng.normal(0.0, 0.1, size=c))
        self.param(f"{name}.running_var", rng.uniform(0.5, 1.5, size=c))
        return self.node(
            "BatchNormalization",
            [x, f"{name}.weight", f"{name}.bias", f"{name}.running_mean", f"{name}.running_var"],
            name,
            epsilon=BN_EPS,
        )

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def relu6(self, x: str, name: str) -> str:
        if self._relu6 is None:  # one shared pair of scalar bounds, as an exporter would fold them
            self._relu6 = (self.param("relu6.min", np.array(0.0)), self.param("relu6.max", np.array(6.0)))
        return self.node("Clip", [x, *self._relu6], name)

    def add(self, a: str, b: str, name: str) -> str:
        return self.node("Add", [a, b], name)

    def concat(self, xs: Sequence[str], name: str) -> str:
        return self.node("Concat", xs, name, axis=1)

    def maxpool(self, x: str, name: str, k: int = 3, stride: int = 2, pad: int = 1) -> str:
        return self.node(
            "MaxPool", [x], name, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride]
        )

    def avgpool(self, x: str, name: str, k: int = 2, stride: int = 2) -> str:
        return self.node(
            "AveragePool", [x], name, kernel_shape=[k, k], pads=[0] * 4, strides=[stride, stride]
        )

    def head(self, x: str, cin: int, num_classes: int, fc: str) -> str:
        """GlobalAveragePool -> Flatten -> Gemm(transB=1) producing ``logits``."""
        x = self.node("GlobalAveragePool", [x], "avgpool")
        x = self.node("Flatten", [x], "flatten", axis=1)
        bound = 1.0 / math.sqrt(cin)
        self.param(f"{fc}.weight", self.rng.uniform(-bound, bound, size=(num_classes, cin)))
        self.param(f"{fc}.bias", self.rng.uniform(-bound, bound, size=num_classes))
        self.nodes.append(
            helper.make_node(
                "Gemm", [x, f"{fc}.weight", f"{fc}.bias"], ["logits"], name=self._claim(fc),
                alpha=1.0, beta=1.0, transB=1,
            )
        )
        return "logits"

    # -- result ------------------------------------------------------------

    def model(self, graph_name: str, image: int, num_classes: int, call: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, image, image])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
            doc_string=f"Built by {PRODUCER}.{call}",
        )
        helper.set_model_props(model, {"surgery.builder": call})
        return model


def _call(fn: str, **kwargs) -> str:
    return f"{fn}(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def _check_image(image: int, min_size: int, what: str) -> None:
    if image < min_size:
        raise ValueError(f"{what}: image={image} is too small (at least {min_size})")


# --------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------


def resnet(
    blocks: Sequence[int] = (3, 4, 6, 3),
    bottleneck: bool = True,
    widths: Sequence[int] = (64, 128, 256, 512),
    num_classes: int = 1000,
    image: int = 224,
    stem: bool = True,
    seed: int = 0,
) -> onnx.ModelProto:
    """A torchvision-style ResNet.

    ``stem=True``: conv7x7/2 + BN + Relu + MaxPool3x3/2 (ImageNet).
    ``stem=False``: conv3x3/1 + BN + Relu (CIFAR-style, for small images).
    Stage ``i`` has ``blocks[i]`` blocks of ``widths[i]`` channels (bottleneck:
    1x1 -> 3x3 -> 1x1 with expansion 4, stride on the 3x3; basic: 3x3 -> 3x3),
    stride 2 from the second stage on, a 1x1 conv + BN shortcut where the shape
    changes, residual Add + Relu. Then GlobalAveragePool + Flatten + Gemm.

    ResNet-18/34: ``(2,2,2,2)``/``(3,4,6,3)`` with ``bottleneck=False``;
    ResNet-50/101/152: ``(3,4,6,3)``/``(3,4,23,3)``/``(3,8,36,3)``.
    """
    blocks, widths = tuple(int(b) for b in blocks), tuple(int(w) for w in widths)
    if len(blocks) != len(widths) or not blocks:
        raise ValueError("resnet: blocks and widths must be non-empty and of the same length")
    call = _call(
        "resnet", blocks=blocks, bottleneck=bottleneck, widths=widths,
        num_classes=num_classes, image=image, stem=stem, seed=seed,
    )
    _check_image(image, (4 if stem else 1) * 2 ** (len(blocks) - 1), "resnet")
    net = _Net(seed)
    expansion = 4 if bottleneck else 1

    inplanes = widths[0]
    if stem:
        x = net.conv("input", "conv1", 3, inplanes, 7, stride=2, pad=3)
    else:
        x = net.conv("input", "conv1", 3, inplanes, 3, stride=1, pad=1)
    x = net.bn(x, "bn1", inplanes)
    x = net.relu(x, "relu")
    if stem:
        x = net.maxpool(x, "maxpool")

    # the last BN of each residual branch starts small so that the variance of
    # the residual stream grows slowly with depth (cf. zero_init_residual)
    last_gamma = (0.05, 0.25)
    for s, (n, planes) in enumerate(zip(blocks, widths)):
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            stride = 2 if (s > 0 and b == 0) else 1
            out = planes * expansion
            identity = x
            if bottleneck:
                y = net.conv(x, f"{p}.conv1", inplanes, planes, 1, pad=0)
                y = net.relu(net.bn(y, f"{p}.bn1", planes), f"{p}.relu1")
                y = net.conv(y, f"{p}.conv2", planes, planes, 3, stride=stride)
                y = net.relu(net.bn(y, f"{p}.bn2", planes), f"{p}.relu2")
                y = net.conv(y, f"{p}.conv3", planes, out, 1, pad=0)
                y = net.bn(y, f"{p}.bn3", out, gamma=last_gamma)
            else:
                y = net.conv(x, f"{p}.conv1", inplanes, planes, 3, stride=stride)
                y = net.relu(net.bn(y, f"{p}.bn1", planes), f"{p}.relu1")
                y = net.conv(y, f"{p}.conv2", planes, out, 3)
                y = net.bn(y, f"{p}.bn2", out, gamma=last_gamma)
            if stride != 1 or inplanes != out:
                identity = net.conv(x, f"{p}.downsample.0", inplanes, out, 1, stride=stride, pad=0)
                identity = net.bn(identity, f"{p}.downsample.1", out)
            x = net.relu(net.add(y, identity, f"{p}.add"), f"{p}.relu")
            inplanes = out

    net.head(x, inplanes, num_classes, "fc")
    return net.model("resnet", image, num_classes, call)


# --------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------


def densenet(
    blocks: Sequence[int] = (6, 12, 48, 32),
    growth: int = 32,
    bn_size: int = 4,
    init_features: int = 64,
    num_classes: int = 1000,
    image: int = 224,
    seed: int = 0,
) -> onnx.ModelProto:
    """A torchvision-style DenseNet-BC.

    Stem conv7x7/2 + BN + Relu + MaxPool3x3/2. Each dense layer is
    BN-Relu-Conv1x1(``bn_size*growth``)-BN-Relu-Conv3x3(``growth``) applied to
    the Concat (axis 1) of the block input and every earlier layer's output;
    the block's output is the Concat of all of them. Transitions:
    BN-Relu-Conv1x1(half the channels)-AveragePool2x2/2. Then BN-Relu-
    GlobalAveragePool-Flatten-Gemm.

    DenseNet-121/169/201: ``(6,12,24,16)``/``(6,12,32,32)``/``(6,12,48,32)``.
    """
    blocks = tuple(int(b) for b in blocks)
    if not blocks:
        raise ValueError("densenet: blocks must be non-empty")
    call = _call(
        "densenet", blocks=blocks, growth=growth, bn_size=bn_size,
        init_features=init_features, num_classes=num_classes, image=image, seed=seed,
    )
    _check_image(image, 4 * 2 ** (len(blocks) - 1), "densenet")
    net = _Net(seed)
    x = net.conv("input", "features.conv0", 3, init_features, 7, stride=2, pad=3)
    x = net.relu(net.bn(x, "features.norm0", init_features), "features.relu0")
    x = net.maxpool(x, "features.pool0")

    c = init_features
    inner = bn_size * growth
    for i, n in enumerate(blocks):
        feats = [x]
        for j in range(n):
            p = f"features.denseblock{i + 1}.denselayer{j + 1}"
            cin = c + j * growth
            h = feats[0] if len(feats) == 1 else net.concat(feats, f"{p}.cat")
            h = net.relu(net.bn(h, f"{p}.norm1", cin), f"{p}.relu1")
            h = net.conv(h, f"{p}.conv1", cin, inner, 1, pad=0)
            h = net.relu(net.bn(h, f"{p}.norm2", inner), f"{p}.relu2")
            h = net.conv(h, f"{p}.conv2", inner, growth, 3)
            feats.append(h)
        x = net.concat(feats, f"features.denseblock{i + 1}.cat")
        c += n * growth
        if i != len(blocks) - 1:
            p = f"features.transition{i + 1}"
            x = net.relu(net.bn(x, f"{p}.norm", c), f"{p}.relu")
            x = net.conv(x, f"{p}.conv", c, c // 2, 1, pad=0)
            x = net.avgpool(x, f"{p}.pool")
            c //= 2

    x = net.relu(net.bn(x, "features.norm5", c), "relu")
    net.head(x, c, num_classes, "classifier")
    return net.model("densenet", image, num_classes, call)


# --------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------

MOBILENET_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    # expand ratio t, channels c, repeats n, first stride s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def mobilenet_v2(
    width: float = 1.0,
    num_classes: int = 1000,
    image: int = 224,
    settings: Sequence[Sequence[int]] = MOBILENET_V2_SETTINGS,
    last_channel: int | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """A torchvision-style MobileNetV2.

    Stem conv3x3/2 + BN + ReLU6, then inverted residual blocks per
    ``settings`` rows ``(t, c, n, s)``: [1x1 expand conv + BN + ReLU6 when
    t != 1] -> depthwise 3x3 conv (group = channels) + BN + ReLU6 -> 1x1
    linear conv + BN, with a residual Add when the stride is 1 and the input
    and output channels are equal. Then 1x1 conv to ``last_channel`` + BN +
    ReLU6, GlobalAveragePool, Flatten, Gemm. ReLU6 is ``Clip(x, 0, 6)`` with
    min/max as inputs (opset 17). Channels are ``width`` times torchvision's,
    rounded to multiples of 8; ``last_channel`` defaults to torchvision's
    ``1280 * max(1, width)``. A shorter ``settings`` gives a truncated net.
    """
    settings = tuple(tuple(int(v) for v in row) for row in settings)
    if not settings or any(len(row) != 4 for row in settings):
        raise ValueError("mobilenet_v2: settings must be non-empty rows of (t, c, n, s)")
    call = _call(
        "mobilenet_v2", width=width, num_classes=num_classes, image=image,
        settings=settings, last_channel=last_channel, seed=seed,
    )
    _check_image(image, 2 * math.prod(s for _, _, _, s in settings), "mobilenet_v2")
    net = _Net(seed)
    cin = _make_divisible(32 * width)
    if last_channel is None:
        last_channel = _make_divisible(1280 * max(1.0, width))

    x = net.conv("input", "features.0.0", 3, cin, 3, stride=2, pad=1)
    x = net.relu6(net.bn(x, "features.0.1", cin), "features.0.2")
    idx = 1
    for t, c, n, s in settings:
        cout = _make_divisible(c * width)
        for r in range(n):
            stride = s if r == 0 else 1
            p = f"features.{idx}.conv"
            hidden = cin * t
            y, j = x, 0
            if t != 1:
                y = net.conv(y, f"{p}.{j}.0", cin, hidden, 1, pad=0)
                y = net.relu6(net.bn(y, f"{p}.{j}.1", hidden), f"{p}.{j}.2")
                j += 1
            y = net.conv(y, f"{p}.{j}.0", hidden, hidden, 3, stride=stride, groups=hidden)
            y = net.relu6(net.bn(y, f"{p}.{j}.1", hidden), f"{p}.{j}.2")
            y = net.conv(y, f"{p}.{j + 1}", hidden, cout, 1, pad=0)
            y = net.bn(y, f"{p}.{j + 2}", cout, gamma=(0.2, 0.6))
            if stride == 1 and cin == cout:
                y = net.add(x, y, f"features.{idx}.add")
            x, cin = y, cout
            idx += 1

    x = net.conv(x, f"features.{idx}.0", cin, last_channel, 1, pad=0)
    x = net.relu6(net.bn(x, f"features.{idx}.1", last_channel), f"features.{idx}.2")
    net.head(x, last_channel, num_classes, "classifier.1")
    return net.model("mobilenet_v2", image, num_classes, call)


# --------------------------------------------------------------------------
# a small ResNeXt-style grouped CNN
# --------------------------------------------------------------------------


def grouped_cnn(
    widths: Sequence[int] = (32, 64),
    blocks: Sequence[int] = (1, 1),
    groups: int = 4,
    bottleneck_width: int = 32,
    stem_width: int = 16,
    num_classes: int = 10,
    image: int = 32,
    seed: int = 0,
) -> onnx.ModelProto:
    """A small ResNeXt-style net: grouped 3x3 convs plus one depthwise conv.

    Stem conv3x3 + BN + Relu. Stage ``i`` has ``blocks[i]`` blocks of output
    width ``widths[i]`` (stride 2 from the second stage on), each
    1x1 conv (``bottleneck_width * 2**i`` channels) + BN + Relu ->
    3x3 conv with ``group=groups`` + BN + Relu -> 1x1 conv + BN, plus the
    identity or a 1x1 conv + BN shortcut, Add, Relu. Then one depthwise 3x3
    conv (group = channels) + BN + Relu, GlobalAveragePool, Flatten, Gemm.
    """
    widths, blocks = tuple(int(w) for w in widths), tuple(int(b) for b in blocks)
    if len(blocks) != len(widths) or not blocks:
        raise ValueError("grouped_cnn: blocks and widths must be non-empty and of the same length")
    call = _call(
        "grouped_cnn", widths=widths, blocks=blocks, groups=groups,
        bottleneck_width=bottleneck_width, stem_width=stem_width,
        num_classes=num_classes, image=image, seed=seed,
    )
    _check_image(image, 2 ** (len(blocks) - 1), "grouped_cnn")
    net = _Net(seed)
    x = net.conv("input", "stem.conv", 3, stem_width, 3)
    x = net.relu(net.bn(x, "stem.bn", stem_width), "stem.relu")
    cin = stem_width
    for s, (n, cout) in enumerate(zip(blocks, widths)):
        mid = bottleneck_width * 2**s
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            stride = 2 if (s > 0 and b == 0) else 1
            y = net.conv(x, f"{p}.conv1", cin, mid, 1, pad=0)
            y = net.relu(net.bn(y, f"{p}.bn1", mid), f"{p}.relu1")
            y = net.conv(y, f"{p}.conv2", mid, mid, 3, stride=stride, groups=groups)
            y = net.relu(net.bn(y, f"{p}.bn2", mid), f"{p}.relu2")
            y = net.conv(y, f"{p}.conv3", mid, cout, 1, pad=0)
            y = net.bn(y, f"{p}.bn3", cout, gamma=(0.1, 0.4))
            identity = x
            if stride != 1 or cin != cout:
                identity = net.conv(x, f"{p}.downsample.0", cin, cout, 1, stride=stride, pad=0)
                identity = net.bn(identity, f"{p}.downsample.1", cout)
            x = net.relu(net.add(y, identity, f"{p}.add"), f"{p}.relu")
            cin = cout
    x = net.conv(x, "dw.conv", cin, cin, 3, groups=cin)
    x = net.relu(net.bn(x, "dw.bn", cin), "dw.relu")
    net.head(x, cin, num_classes, "fc")
    return net.model("grouped_cnn", image, num_classes, call)


# --------------------------------------------------------------------------
# the shipped demo models
# --------------------------------------------------------------------------

#: truncated MobileNetV2 table for 32x32 inputs: four stride-2 stages down to 2x2
MOBILENET_TINY_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2))


def resnet_tiny(seed: int = 0) -> onnx.ModelProto:
    """``models/resnet_tiny.onnx``: a CIFAR-style ResNet-14 (basic blocks, 2-2-2)."""
    return resnet(
        blocks=(2, 2, 2), bottleneck=False, widths=(16, 32, 64),
        num_classes=10, image=32, stem=False, seed=seed,
    )


def mobilenet_tiny(seed: int = 0) -> onnx.ModelProto:
    """``models/mobilenet_tiny.onnx``: MobileNetV2 x0.35, truncated after the 64-channel stage."""
    return mobilenet_v2(
        width=0.35, num_classes=10, image=32,
        settings=MOBILENET_TINY_SETTINGS, last_channel=256, seed=seed,
    )


def demo_models() -> dict[str, onnx.ModelProto]:
    """The models shipped in ``models/``, by file name."""
    return {"resnet_tiny.onnx": resnet_tiny(), "mobilenet_tiny.onnx": mobilenet_tiny()}


def write_demo_models(out_dir: str | Path) -> list[Path]:
    """Build, check and write the demo models into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, model in demo_models().items():
        onnx.checker.check_model(model, full_check=True)
        path = out_dir / fname
        path.write_bytes(model.SerializeToString(deterministic=True))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write surgery's shipped demo ONNX models.")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent,
        help="output directory (default: the models/ directory beside this script)",
    )
    args = parser.parse_args(argv)
    for path in write_demo_models(args.out):
        model = onnx.load(path)
        n_params = sum(math.prod(t.dims) for t in model.graph.initializer)
        print(
            f"{path}: {path.stat().st_size / 1024:.1f} KiB, "
            f"{len(model.graph.node)} nodes, {n_params} parameters"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
