"""Test-model corpus for `surgery`.

Small, deterministic (seeded) float32 ONNX models that cover the channel
coupling patterns the pruner must understand.  Two families:

* torch models (``<name>-dynamo`` and ``<name>-legacy``): small ``nn.Module``s
  exported with ``torch.onnx.export(..., dynamo=True)`` and with the legacy
  TorchScript exporter (``dynamo=False``, opset 17).  Note: with torch 2.13 both
  exporters fold an inference BatchNorm that directly follows a Conv into the
  Conv; BatchNorm only survives where it is not preceded by a Conv (e.g. the
  pre-activation layers of the DenseNet block).
* hand-built graphs (``<name>-ir``) made with ``onnx.helper`` for ops torch
  rarely emits (opset 13 unless stated).

Usage::

    from corpus import CASES, build
    model = build("resnet_basic-dynamo")   # a fresh deep copy every call

Each proto has all tensor data embedded (no external data) and static input
shapes (batch 1), except ``dynamic_batch-ir`` whose batch dim is symbolic "N".
"""

from __future__ import annotations

from corpus_registry import Registry

import contextlib
import functools
import io
import logging
import os
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Case", "CASES", "build", "case", "names"]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], onnx.ModelProto]
    tags: frozenset[str]


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------
# torch models
# ---------------------------------------------------------------------------
# torch is imported lazily so that importing the corpus (e.g. to list names or
# to build only the -ir cases) does not pay for it.


def _torch_modules():
    """Define and return the torch model factories: name -> (factory, input_shapes)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def cbr(cin, cout, k=3, s=1, groups=1, act=True):
        layers = [
            nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    # -- ResNet -------------------------------------------------------------
    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + idt)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin, width, stride=1, groups=1):
            super().__init__()
            cout = width * self.expansion
            self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            y = F.relu(self.bn1(self.conv1(x)))
            y = F.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return F.relu(y + idt)

    class ResNetBasic(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 16)
            self.layer1 = BasicBlock(16, 16)
            self.layer2 = BasicBlock(16, 32, stride=2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.layer2(self.layer1(self.stem(x)))
            return self.fc(torch.flatten(self.pool(x), 1))

    class ResNetBottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 16)
            self.layer1 = Bottleneck(16, 8)  # 16 -> 32, downsample (channels)
            self.layer2 = Bottleneck(32, 8)  # identity shortcut
            self.layer3 = Bottleneck(32, 16, stride=2)  # 32 -> 64, stride 2
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.layer3(self.layer2(self.layer1(self.stem(x))))
            return self.fc(torch.flatten(self.pool(x), 1))

    class ResNeXt(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 32)
            self.block1 = Bottleneck(32, 16, groups=8)  # 32 -> 64, grouped 3x3 g=8
            self.block2 = Bottleneck(64, 16, groups=4)  # identity, grouped 3x3 g=4
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.block2(self.block1(self.stem(x)))
            return self.fc(torch.flatten(self.pool(x), 1))

    # -- MobileNetV2 ----------------------------------------------------------
    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            self.conv = nn.Sequential(
                nn.Conv2d(cin, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(),
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )

        def forward(self, x):
            y = self.conv(x)
            return x + y if self.use_res else y

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
            )
            self.blocks = nn.Sequential(
                InvertedResidual(16, 16, 1, 2),  # residual
                InvertedResidual(16, 24, 2, 2),  # no residual
                InvertedResidual(24, 24, 1, 2),  # residual
            )
            self.head = nn.Sequential(
                nn.Conv2d(24, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.head(self.blocks(self.stem(x)))
            return self.fc(torch.flatten(self.pool(x), 1))

    # -- DenseNet -------------------------------------------------------------
    class DenseLayer(nn.Module):
        def __init__(self, cin, growth):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin)
            self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(2 * growth)
            self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

        def forward(self, x):
            y = self.conv1(F.relu(self.bn1(x)))
            return self.conv2(F.relu(self.bn2(y)))

    class DenseNet(nn.Module):
        def __init__(self, growth=8, n_layers=4):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            c = 16
            self.layers = nn.ModuleList()
            for _ in range(n_layers):
                self.layers.append(DenseLayer(c, growth))
                c += growth
            self.trans_bn = nn.BatchNorm2d(c)
            self.trans_conv = nn.Conv2d(c, c // 2, 1, bias=False)
            self.trans_pool = nn.AvgPool2d(2, 2)
            self.norm = nn.BatchNorm2d(c // 2)
            self.fc = nn.Linear(c // 2, 10)

        def forward(self, x):
            feats = [self.stem(x)]
            for layer in self.layers:
                feats.append(layer(torch.cat(feats, 1)))
            x = torch.cat(feats, 1)
            x = self.trans_pool(self.trans_conv(F.relu(self.trans_bn(x))))
            x = F.relu(self.norm(x))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    # -- SqueezeNet -----------------------------------------------------------
    class Fire(nn.Module):
        def __init__(self, cin, squeeze, e1, e3):
            super().__init__()
            self.squeeze = nn.Conv2d(cin, squeeze, 1)
            self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
            self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)

        def forward(self, x):
            s = F.relu(self.squeeze(x))
            return torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], 1)

    class SqueezeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, 1, 1)
            self.pool = nn.MaxPool2d(2, 2)
            self.fire1 = Fire(16, 8, 16, 16)
            self.fire2 = Fire(32, 8, 16, 16)
            self.fire3 = Fire(32, 12, 24, 24)
            self.classifier = nn.Conv2d(48, 10, 1)

        def forward(self, x):
            x = self.pool(F.relu(self.stem(x)))
            x = self.fire2(self.fire1(x))
            x = self.fire3(self.pool(x))
            x = F.relu(self.classifier(x))
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    # -- Inception ------------------------------------------------------------
    class InceptionBlock(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.b1 = cbr(cin, 8, 1)
            self.b2 = nn.Sequential(cbr(cin, 8, 1), cbr(8, 12, 3))
            self.b3 = nn.Sequential(cbr(cin, 4, 1), cbr(4, 8, 3), cbr(8, 8, 3))
            self.b4_pool = nn.MaxPool2d(3, 1, 1)
            self.b4 = cbr(cin, 8, 1)

        def forward(self, x):
            return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(self.b4_pool(x))], 1)

    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 16)
            self.inc1 = InceptionBlock(16)  # -> 36
            self.inc2 = InceptionBlock(36)  # -> 36
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(36, 10)

        def forward(self, x):
            x = self.inc2(self.inc1(self.stem(x)))
            return self.fc(torch.flatten(self.pool(x), 1))

    # -- ShuffleNetV2 ---------------------------------------------------------
    def channel_shuffle(x, groups):
        b, c, h, w = x.shape
        x = x.view(b, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(b, c, h, w)

    class ShuffleUnit(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.stride = stride
            bf = cout // 2
            if stride > 1:
                self.branch1 = nn.Sequential(
                    nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                    nn.BatchNorm2d(cin),
                    nn.Conv2d(cin, bf, 1, bias=False),
                    nn.BatchNorm2d(bf),
                    nn.ReLU(),
                )
                b2_in = cin
            else:
                assert cin == cout
                self.branch1 = None
                b2_in = bf
            self.branch2 = nn.Sequential(
                nn.Conv2d(b2_in, bf, 1, bias=False),
                nn.BatchNorm2d(bf),
                nn.ReLU(),
                nn.Conv2d(bf, bf, 3, stride, 1, groups=bf, bias=False),
                nn.BatchNorm2d(bf),
                nn.Conv2d(bf, bf, 1, bias=False),
                nn.BatchNorm2d(bf),
                nn.ReLU(),
            )

        def forward(self, x):
            if self.stride == 1:
                x1, x2 = x.chunk(2, dim=1)
                out = torch.cat((x1, self.branch2(x2)), dim=1)
            else:
                out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
            return channel_shuffle(out, 2)

    class ShuffleNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 16)
            self.unit1 = ShuffleUnit(16, 32, 2)  # stride-2 unit
            self.unit2 = ShuffleUnit(32, 32, 1)  # stride-1 unit with split
            self.unit3 = ShuffleUnit(32, 32, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.unit3(self.unit2(self.unit1(self.stem(x))))
            return self.fc(torch.flatten(self.pool(x), 1))

    # -- Squeeze-excite -------------------------------------------------------
    class SEConv(nn.Module):
        """SE with two 1x1 convs and sigmoid."""

        def __init__(self, c, r=4):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Conv2d(c, c // r, 1)
            self.fc2 = nn.Conv2d(c // r, c, 1)

        def forward(self, x):
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
            return x * s

    class SELinear(nn.Module):
        """SE with two Linears and hardsigmoid."""

        def __init__(self, c, r=4):
            super().__init__()
            self.fc1 = nn.Linear(c, c // r)
            self.fc2 = nn.Linear(c // r, c)
            self.gate = nn.Hardsigmoid()

        def forward(self, x):
            b, c = x.shape[0], x.shape[1]
            s = F.adaptive_avg_pool2d(x, 1).flatten(1)
            s = self.gate(self.fc2(F.relu(self.fc1(s))))
            return x * s.view(b, c, 1, 1)

    class SENet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 16)
            self.conv1 = cbr(16, 32)
            self.se1 = SEConv(32)
            self.conv2 = cbr(32, 32, act=False)
            self.se2 = SELinear(32)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.se1(self.conv1(self.stem(x)))
            x = F.relu(x + self.se2(self.conv2(x)))  # residual around SE
            return self.fc(torch.flatten(self.pool(x), 1))

    # -- VGG with spatial flatten --------------------------------------------
    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                cbr(3, 16),
                cbr(16, 16),
                nn.MaxPool2d(2, 2),  # 8x8
                cbr(16, 32),
                nn.MaxPool2d(2, 2),  # 4x4
            )
            self.classifier = nn.Sequential(
                nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10)
            )

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1))

    # -- UNet -----------------------------------------------------------------
    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc1 = nn.Sequential(cbr(3, 8), cbr(8, 8))
            self.down = nn.MaxPool2d(2)
            self.enc2 = nn.Sequential(cbr(8, 16), cbr(16, 16))
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
            self.dec1 = nn.Sequential(cbr(16, 8), cbr(8, 8))
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            e1 = self.enc1(x)
            e2 = self.enc2(self.down(e1))
            d1 = self.dec1(torch.cat([self.up(e2), e1], 1))
            return self.out(d1)

    # -- norms ----------------------------------------------------------------
    class GroupNormNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1)
            self.gn1 = nn.GroupNorm(4, 16)
            self.conv2 = nn.Conv2d(16, 32, 3, 1, 1)
            self.gn2 = nn.GroupNorm(8, 32)
            self.conv3 = nn.Conv2d(32, 8, 1)

        def forward(self, x):
            x = F.relu(self.gn1(self.conv1(x)))
            x = F.relu(self.gn2(self.conv2(x)))
            return self.conv3(x)

    class InstanceNormNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1)
            self.in1 = nn.InstanceNorm2d(16, affine=True)
            self.conv2 = nn.Conv2d(16, 16, 3, 1, 1)
            self.in2 = nn.InstanceNorm2d(16, affine=True)
            self.conv3 = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            x = F.relu(self.in1(self.conv1(x)))
            x = x + F.relu(self.in2(self.conv2(x)))
            return self.conv3(x)

    # -- activations ----------------------------------------------------------
    class ActivationNet(nn.Module):
        def __init__(self):
            super().__init__()
            c = 16
            self.acts = nn.ModuleList(
                [
                    nn.LeakyReLU(0.1),
                    nn.PReLU(c),  # per-channel slope: a channel-coupled parameter
                    nn.ELU(),
                    nn.SELU(),
                    nn.GELU(),
                    nn.Softplus(),
                    nn.Hardswish(),
                    nn.Hardsigmoid(),
                    nn.Tanh(),
                    nn.ReLU6(),  # Clip(0, 6)
                ]
            )
            self.convs = nn.ModuleList(
                [nn.Conv2d(3, c, 3, 1, 1)] + [nn.Conv2d(c, c, 3, 1, 1) for _ in self.acts[1:]]
            )
            self.out = nn.Conv2d(c, 8, 1)

        def forward(self, x):
            for conv, act in zip(self.convs, self.acts):
                x = act(conv(x))
            return self.out(x)

    # -- pad / interpolate ------------------------------------------------------
    class PadInterp(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1)
            self.conv2 = nn.Conv2d(16, 16, 3, 1, 0)  # valid conv after explicit pad
            self.conv3 = nn.Conv2d(16, 8, 3, 1, 1)

        def forward(self, x):
            x = F.relu(self.conv1(x))
            # zero pad then a valid conv (the dynamo exporter fuses this Pad into the Conv)
            x = F.pad(x, (1, 1, 1, 1))
            x = F.relu(self.conv2(x))
            # asymmetric replicate pad: cannot be fused, survives in both exports
            x = F.pad(x, (0, 1, 0, 1), mode="replicate")  # 16x16 -> 17x17
            x = F.interpolate(x, scale_factor=2, mode="nearest")  # -> 34x34
            return self.conv3(x)

    # -- dropout ------------------------------------------------------------------
    class DropoutNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = cbr(3, 16)
            self.drop1 = nn.Dropout2d(0.2)
            self.conv2 = cbr(16, 32)
            self.drop2 = nn.Dropout(0.5)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.drop1(self.conv1(x))
            x = self.conv2(x)
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
            return self.fc(self.drop2(x))

    S16 = [(1, 3, 16, 16)]
    S32 = [(1, 3, 32, 32)]
    return {
        "resnet_basic": (ResNetBasic, S32),
        "resnet_bottleneck": (ResNetBottleneck, S32),
        "mobilenetv2": (MobileNetV2, S32),
        "resnext": (ResNeXt, S16),
        "densenet": (DenseNet, S16),
        "squeezenet": (SqueezeNet, S16),
        "inception": (Inception, S16),
        "shufflenetv2": (ShuffleNetV2, S16),
        "se": (SENet, S16),
        "vgg_flatten": (VGG, S16),
        "unet": (UNet, S16),
        "groupnorm": (GroupNormNet, S16),
        "instancenorm": (InstanceNormNet, S16),
        "activations": (ActivationNet, S16),
        "pad_interp": (PadInterp, S16),
        "dropout": (DropoutNet, S16),
    }


@functools.lru_cache(maxsize=None)
def _torch_registry():
    return _torch_modules()


def _randomize_norms(module, gen) -> None:
    """Give every norm layer non-trivial affine params and running stats."""
    import torch
    import torch.nn as nn

    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
    with torch.no_grad():
        for mod in module.modules():
            if not isinstance(mod, norm_types):
                continue
            if getattr(mod, "weight", None) is not None:
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
            if getattr(mod, "running_mean", None) is not None:
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)


def _export_torch(model_name: str, dynamo: bool) -> onnx.ModelProto:
    import torch

    factory, input_shapes = _torch_registry()[model_name]
    seed = _seed(model_name)  # same weights for both exporters
    torch.manual_seed(seed)
    module = factory()
    gen = torch.Generator().manual_seed(seed + 1)
    _randomize_norms(module, gen)
    module.eval()
    args = tuple(torch.randn(s, generator=gen) for s in input_shapes)

    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    old_levels = [lg.level for lg in loggers]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    torch.onnx.export(module, args, path, dynamo=True, verbose=False)
                else:
                    torch.onnx.export(module, args, path, dynamo=False, opset_version=17, verbose=False)
        finally:
            for lg, lvl in zip(loggers, old_levels):
                lg.setLevel(lvl)
        proto = onnx.load(path, load_external_data=True)
    # The legacy exporter sometimes declares bogus symbolic output dims (e.g. after
    # F.pad); pin every graph output to the static shape torch actually produces.
    with torch.no_grad():
        outs = module(*args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    for vi, out in zip(proto.graph.output, outs):
        shape = vi.type.tensor_type.shape
        shape.ClearField("dim")
        for d in out.shape:
            shape.dim.add().dim_value = int(d)
    proto.graph.name = f"{model_name}-{'dynamo' if dynamo else 'legacy'}"
    return proto


# Export variants that genuinely fail, as (model, "dynamo"|"legacy") -> reason.
# With torch 2.13 / onnxscript 0.7 every model above exports with both exporters.
_SKIPPED_EXPORTS: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------
# hand-built graphs
# ---------------------------------------------------------------------------


class _G:
    """Tiny onnx.helper graph builder with seeded weights."""

    def __init__(self, name: str, opset: int = 13):
        self.name = name
        self.opset = opset
        self.rng = np.random.default_rng(_seed(name))
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def fresh(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    # tensors ----------------------------------------------------------------
    def init(self, arr, prefix: str = "w") -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def const(self, arr, prefix: str = "c") -> str:
        """A tensor produced by a Constant node (not an initializer)."""
        out = self.fresh(prefix)
        t = numpy_helper.from_array(np.asarray(arr), out + "_value")
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.fresh("Constant"), value=t))
        return out

    def ints(self, values, prefix: str = "i") -> str:
        return self.init(np.asarray(values, dtype=np.int64), prefix)

    def weight(self, shape, fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bias(self, n: int) -> np.ndarray:
        return (self.rng.standard_normal(n) * 0.1).astype(np.float32)

    # ops ----------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=3, stride=1, pad=None, groups=1, bias=True, weight_from=None):
        """Conv with seeded weights; weight_from: None (initializer) or "constant"."""
        pad = k // 2 if pad is None else pad
        w = self.weight((cout, cin // groups, k, k), cin // groups * k * k)
        store = self.const if weight_from == "constant" else self.init
        ins = [x, store(w, "conv_w")]
        if bias:
            ins.append(store(self.bias(cout), "conv_b"))
        return self.op(
            "Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=groups
        )

    def bn(self, x, c):
        scale = (self.rng.random(c) + 0.5).astype(np.float32)
        b = self.bias(c)
        mean = (self.rng.standard_normal(c) * 0.1).astype(np.float32)
        var = (self.rng.random(c) + 0.5).astype(np.float32)
        ins = [x] + [self.init(a, p) for a, p in ((scale, "bn_scale"), (b, "bn_bias"), (mean, "bn_mean"), (var, "bn_var"))]
        return self.op("BatchNormalization", ins, epsilon=1e-5)

    def relu(self, x):
        return self.op("Relu", [x])

    def model(self, inputs, outputs) -> onnx.ModelProto:
        """inputs/outputs: list of (tensor name, shape); the graph names are "input"/"output"."""
        g_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
        renamed = []
        for i, (n, s) in enumerate(outputs):
            out_name = "output" if len(outputs) == 1 else f"output{i}"
            self.nodes.append(helper.make_node("Identity", [n], [out_name], name=self.fresh("Identity_out")))
            renamed.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, s))
        graph = helper.make_graph(self.nodes, self.name, g_inputs, renamed, initializer=self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        return helper.make_model(
            graph,
            opset_imports=opsets,
            ir_version=helper.find_min_ir_version_for(opsets),
            producer_name="surgery-tests-corpus",
        )


X16 = ("input", [1, 3, 16, 16])


def _ir_depth_to_space():
    g = _G("depth_to_space-ir")
    x = g.relu(g.conv("input", 3, 16))  # 16x16x16
    x = g.op("DepthToSpace", [x], blocksize=2, mode="DCR")  # 4x32x32
    x = g.relu(g.conv(x, 4, 8))  # 8x32x32
    x = g.op("DepthToSpace", [x], blocksize=2, mode="CRD")  # 2x64x64
    x = g.relu(g.conv(x, 2, 8, stride=2))  # 8x32x32
    x = g.op("SpaceToDepth", [x], blocksize=2)  # 32x16x16
    x = g.relu(g.conv(x, 32, 8))  # 8x16x16
    x = g.op("SpaceToDepth", [x], blocksize=2)  # 32x8x8
    y = g.conv(x, 32, 4, k=1)
    return g.model([X16], [(y, [1, 4, 8, 8])])


def _ir_resize():
    g = _G("resize-ir")
    x = g.relu(g.conv("input", 3, 16))
    scales = g.init(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    x = g.op("Resize", [x, "", scales], mode="nearest")  # opset-13 form: roi omitted
    x = g.relu(g.conv(x, 16, 16))
    sizes = g.ints([1, 16, 16, 16], "sizes")
    x = g.op("Resize", [x, "", "", sizes], mode="linear", coordinate_transformation_mode="half_pixel")
    y = g.conv(x, 16, 8)
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_upsample():
    g = _G("upsample-ir", opset=9)
    x = g.relu(g.conv("input", 3, 16))
    scales = g.init(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    x = g.op("Upsample", [x, scales], mode="nearest")
    y = g.conv(x, 16, 8)
    return g.model([X16], [(y, [1, 8, 32, 32])])


def _ir_binary(op_type: str):
    def make():
        g = _G(f"binary_{op_type.lower()}-ir")
        x = g.relu(g.conv("input", 3, 16))
        a = g.conv(x, 16, 16)
        b = g.conv(x, 16, 16)
        if op_type == "Where":
            cond = g.op("Greater", [a, b])
            z = g.op("Where", [cond, a, g.relu(b)])
        elif op_type == "Div":
            half = g.init(np.array(0.5, dtype=np.float32), "half")
            z = g.op("Div", [a, g.op("Add", [g.op("Sigmoid", [b]), half])])
        elif op_type == "Sum":
            c = g.conv(x, 16, 16)  # Sum is variadic: three branches
            z = g.op("Sum", [a, b, c])
        else:
            z = g.op(op_type, [a, b])
        y = g.conv(g.relu(z), 16, 8)
        return g.model([X16], [(y, [1, 8, 16, 16])])

    return make


def _ir_gemm():
    g = _G("gemm-ir")
    x = g.relu(g.conv("input", 3, 16))
    x = g.op("MaxPool", [x], kernel_shape=[4, 4], strides=[4, 4])  # 16x4x4
    x = g.op("Flatten", [x], axis=1)  # 256
    w1 = g.init(g.weight((32, 256), 256), "fc1_w")  # transB=1: [out, in]
    x = g.relu(g.op("Gemm", [x, w1, g.init(g.bias(32), "fc1_b")], transB=1))
    w2 = g.init(g.weight((10, 32), 32), "fc2_w")
    y = g.op("Gemm", [x, w2, g.init(g.bias(10), "fc2_b")], transB=1, alpha=1.0, beta=1.0)
    return g.model([X16], [(y, [1, 10])])


def _ir_matmul():
    g = _G("matmul-ir")
    x = g.relu(g.conv("input", 3, 16))
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x], axis=1)  # [1, 16]
    x = g.op("MatMul", [x, g.init(g.weight((16, 32), 16), "mm1_w")])
    x = g.relu(g.op("Add", [x, g.init(g.bias(32), "mm1_b")]))
    y = g.op("MatMul", [x, g.init(g.weight((32, 10), 32), "mm2_w")])
    return g.model([X16], [(y, [1, 10])])


def _ir_matmul_nhwc():
    """1x1 conv written as Transpose -> MatMul over the channel (last) axis -> Transpose."""
    g = _G("matmul_nhwc-ir")
    x = g.relu(g.conv("input", 3, 16))
    x = g.op("Transpose", [x], perm=[0, 2, 3, 1])  # [1,16,16,16] NHWC
    x = g.op("MatMul", [x, g.init(g.weight((16, 24), 16), "mm_w")])
    x = g.relu(g.op("Add", [x, g.init(g.bias(24), "mm_b")]))
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])  # [1,24,16,16]
    y = g.conv(x, 24, 8)
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_split():
    g = _G("split-ir")
    x = g.relu(g.conv("input", 3, 16))
    a, b = g.op("Split", [x, g.ints([6, 10], "split")], n_out=2, axis=1)
    ya = g.relu(g.conv(a, 6, 8))
    yb = g.relu(g.conv(b, 10, 8))
    y = g.conv(g.op("Add", [ya, yb]), 8, 8)
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_slice():
    g = _G("slice-ir")
    x = g.relu(g.conv("input", 3, 16))
    axes = g.ints([1], "axes")
    a = g.op("Slice", [x, g.ints([0], "starts"), g.ints([6], "ends"), axes])
    b = g.op("Slice", [x, g.ints([6], "starts"), g.ints([2**62], "ends"), axes])  # open end
    c = g.op("Slice", [x, g.ints([1], "starts"), g.ints([16], "ends"), axes, g.ints([3], "steps")])  # 1,4,..,13
    ya = g.conv(a, 6, 8)
    yb = g.conv(b, 10, 8)
    yc = g.conv(c, 5, 8)
    y = g.conv(g.relu(g.op("Sum", [ya, yb, yc])), 8, 8)
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_squeeze_unsqueeze():
    g = _G("squeeze_unsqueeze-ir")
    x = g.relu(g.conv("input", 3, 16))
    s = g.op("GlobalAveragePool", [x])  # [1,16,1,1]
    s = g.op("Squeeze", [s, g.ints([2, 3], "axes")])  # [1,16]
    s = g.relu(g.op("Gemm", [s, g.init(g.weight((4, 16), 16), "fc1_w"), g.init(g.bias(4), "fc1_b")], transB=1))
    s = g.op("Gemm", [s, g.init(g.weight((16, 4), 4), "fc2_w"), g.init(g.bias(16), "fc2_b")], transB=1)
    s = g.op("Sigmoid", [s])
    s = g.op("Unsqueeze", [s, g.ints([2, 3], "axes")])  # [1,16,1,1]
    x = g.op("Mul", [x, s])
    y = g.conv(x, 16, 8)
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_reducemean_se():
    g = _G("reducemean_se-ir")
    x = g.relu(g.conv("input", 3, 16))
    s = g.op("ReduceMean", [x], axes=[2, 3], keepdims=1)  # opset 13: axes attribute
    s = g.relu(g.conv(s, 16, 4, k=1))
    s = g.op("HardSigmoid", [g.conv(s, 4, 16, k=1)], alpha=1.0 / 6, beta=0.5)
    x = g.op("Mul", [s, x])
    y = g.conv(x, 16, 8)
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_transpose():
    g = _G("transpose-ir")
    x = g.relu(g.conv("input", 3, 16))
    x = g.op("Transpose", [x], perm=[0, 2, 3, 1])  # NHWC
    x = g.op("Mul", [x, g.init((g.rng.random(16) + 0.5).astype(np.float32), "scale_c")])  # per-channel, last axis
    x = g.op("Add", [x, g.init(g.bias(16), "shift_c")])
    x = g.op("Transpose", [g.relu(x)], perm=[0, 3, 1, 2])  # back to NCHW
    y = g.conv(x, 16, 8)
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_pad():
    g = _G("pad-ir", opset=11)
    x = g.relu(g.conv("input", 3, 16))
    pads = g.ints([0, 0, 1, 2, 0, 0, 1, 2], "pads")  # zero pad on N and C axes
    x = g.op("Pad", [x, pads, g.init(np.array(0.0, dtype=np.float32), "pad_value")], mode="constant")
    x = g.relu(g.conv(x, 16, 16, pad=0))  # [1,16,16,18]
    x = g.op("Pad", [x, g.ints([0, 0, 1, 1, 0, 0, 1, 1], "pads")], mode="reflect")
    y = g.conv(x, 16, 8, pad=0)
    return g.model([X16], [(y, [1, 8, 16, 18])])


def _ir_groupnorm():
    """The GroupNormalization op itself (opset 21, per-channel scale/bias); torch
    exporters decompose GroupNorm into Reshape/InstanceNormalization/Mul/Add."""
    g = _G("groupnorm-ir", opset=21)
    x = g.conv("input", 3, 16)
    scale = g.init((g.rng.random(16) + 0.5).astype(np.float32), "gn_scale")
    x = g.op("GroupNormalization", [x, scale, g.init(g.bias(16), "gn_bias")], num_groups=4, epsilon=1e-5)
    x = g.relu(x)
    y = g.conv(x, 16, 8)
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_constant_weights():
    g = _G("constant_weights-ir", opset=9)
    x = g.relu(g.conv("input", 3, 16, weight_from="constant"))
    x = g.relu(g.conv(x, 16, 16, weight_from="constant"))
    y = g.conv(x, 16, 8, weight_from="constant")
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_constant_subgraph():
    g = _G("constant_subgraph-ir")
    x = g.relu(g.conv("input", 3, 16))
    # weight stored HWIO in a Constant, transposed to OIHW by a Transpose node
    w_hwio = g.weight((3, 3, 16, 24), 16 * 9).astype(np.float32)
    w = g.op("Transpose", [g.const(w_hwio, "w_hwio")], perm=[3, 2, 0, 1])
    # bias computed from a constant subgraph too: Constant -> Mul(init) -> Conv bias
    b = g.op("Mul", [g.const(g.bias(24), "b_raw"), g.init(np.array(2.0, dtype=np.float32), "two")])
    x = g.relu(g.op("Conv", [x, w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    y = g.conv(x, 24, 8)
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_cast_identity():
    g = _G("cast_identity-ir")
    x = g.relu(g.conv("input", 3, 16))
    x = g.op("Identity", [x])
    x = g.op("Cast", [x], to=TensorProto.DOUBLE)
    x = g.op("Cast", [x], to=TensorProto.FLOAT)
    x = g.op("Cast", [x], to=TensorProto.FLOAT)  # no-op cast
    x = g.op("Identity", [g.conv(x, 16, 16)])
    y = g.conv(g.relu(x), 16, 8)
    return g.model([X16], [(y, [1, 8, 16, 16])])


def _ir_dynamic_batch():
    g = _G("dynamic_batch-ir")
    x = g.relu(g.bn(g.conv("input", 3, 16, bias=False), 16))
    x = g.relu(g.bn(g.conv(x, 16, 32, stride=2, bias=False), 32))
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x], axis=1)
    y = g.op("Gemm", [x, g.init(g.weight((10, 32), 32), "fc_w"), g.init(g.bias(10), "fc_b")], transB=1)
    return g.model([("input", ["N", 3, 16, 16])], [(y, ["N", 10])])


_IR_CASES: list[tuple[str, Callable[[], onnx.ModelProto], set[str]]] = [
    ("depth_to_space-ir", _ir_depth_to_space, {"depth_to_space", "space_to_depth"}),
    ("resize-ir", _ir_resize, {"resize"}),
    ("upsample-ir", _ir_upsample, {"resize", "upsample", "opset9"}),
    ("binary_sum-ir", _ir_binary("Sum"), {"elementwise", "sum", "residual"}),
    ("binary_max-ir", _ir_binary("Max"), {"elementwise", "max"}),
    ("binary_min-ir", _ir_binary("Min"), {"elementwise", "min"}),
    ("binary_where-ir", _ir_binary("Where"), {"elementwise", "where"}),
    ("binary_sub-ir", _ir_binary("Sub"), {"elementwise", "sub"}),
    ("binary_div-ir", _ir_binary("Div"), {"elementwise", "div"}),
    ("gemm-ir", _ir_gemm, {"gemm", "flatten", "flatten_spatial", "maxpool"}),
    ("matmul-ir", _ir_matmul, {"matmul", "flatten", "gap"}),
    ("matmul_nhwc-ir", _ir_matmul_nhwc, {"matmul", "transpose"}),
    ("split-ir", _ir_split, {"split"}),
    ("slice-ir", _ir_slice, {"slice"}),
    ("squeeze_unsqueeze-ir", _ir_squeeze_unsqueeze, {"squeeze", "unsqueeze", "se", "gemm", "gap"}),
    ("reducemean_se-ir", _ir_reducemean_se, {"reducemean", "se", "hardsigmoid"}),
    ("transpose-ir", _ir_transpose, {"transpose"}),
    ("pad-ir", _ir_pad, {"pad", "opset11"}),
    ("groupnorm-ir", _ir_groupnorm, {"groupnorm", "norm", "opset21"}),
    ("constant_weights-ir", _ir_constant_weights, {"constant_weights", "opset9"}),
    ("constant_subgraph-ir", _ir_constant_subgraph, {"constant_weights", "constant_subgraph", "transpose"}),
    ("cast_identity-ir", _ir_cast_identity, {"cast", "identity"}),
    ("dynamic_batch-ir", _ir_dynamic_batch, {"dynamic_batch", "norm", "batchnorm", "gemm", "gap", "flatten"}),
]


# Tags of the torch models (kept apart from the module definitions so that
# CASES can be listed without importing torch).
_TORCH_TAGS: dict[str, set[str]] = {
    "resnet_basic": {"residual", "downsample", "norm", "batchnorm", "gap", "flatten", "linear"},
    "resnet_bottleneck": {"residual", "bottleneck", "downsample", "norm", "batchnorm", "gap", "flatten", "linear"},
    "mobilenetv2": {"residual", "depthwise", "inverted_residual", "clip", "norm", "batchnorm", "gap", "flatten", "linear"},
    "resnext": {"residual", "bottleneck", "groupconv", "downsample", "norm", "batchnorm", "gap", "flatten", "linear"},
    "densenet": {"concat", "dense", "norm", "batchnorm", "avgpool", "gap", "flatten", "linear"},
    "squeezenet": {"concat", "fire", "maxpool", "gap", "flatten"},
    "inception": {"concat", "inception", "maxpool", "norm", "batchnorm", "gap", "flatten", "linear"},
    "shufflenetv2": {"split", "shuffle", "concat", "depthwise", "reshape", "transpose", "norm", "batchnorm", "gap", "flatten", "linear"},
    "se": {"se", "residual", "sigmoid", "hardsigmoid", "broadcast_mul", "reshape", "norm", "batchnorm", "gap", "flatten", "linear"},
    "vgg_flatten": {"flatten", "flatten_spatial", "maxpool", "dropout", "norm", "batchnorm", "linear"},
    "unet": {"convtranspose", "concat", "skip", "maxpool", "norm", "batchnorm"},
    "groupnorm": {"groupnorm", "norm"},
    "instancenorm": {"instancenorm", "norm", "residual"},
    "activations": {"activations", "prelu", "clip"},
    "pad_interp": {"pad", "resize"},
    "dropout": {"dropout", "norm", "batchnorm", "gap", "flatten", "linear"},
}


def _make_cases() -> list[Case]:
    cases: list[Case] = []
    for model_name, tags in _TORCH_TAGS.items():
        for variant, dynamo in (("dynamo", True), ("legacy", False)):
            if (model_name, variant) in _SKIPPED_EXPORTS:
                continue
            cases.append(
                Case(
                    name=f"{model_name}-{variant}",
                    build=functools.partial(_export_torch, model_name, dynamo),
                    tags=frozenset(tags | {"torch", variant}),
                )
            )
    for name, fn, tags in _IR_CASES:
        cases.append(Case(name=name, build=fn, tags=frozenset(tags | {"ir"})))
    return cases


CASES: list[Case] = _make_cases()
_REGISTRY = Registry(CASES, "corpus")
_BY_NAME = _REGISTRY.by_name
names, case, build = _REGISTRY.names, _REGISTRY.case, _REGISTRY.build
