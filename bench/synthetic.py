"""Synthetic ONNX graphs of growing depth for the speed benchmark.

Thin wrappers over the torch-free builders in ``models/build.py``: every entry
of :func:`graphs` is ``(name, build)``, where ``build()`` returns a fresh
``onnx.ModelProto`` with seeded random weights (the same model every call).
Run as a script to print each graph's node and parameter counts and build time:

    python bench/synthetic.py [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import onnx

_BUILD_PY = Path(__file__).resolve().parent.parent / "models" / "build.py"
_MODULE_NAME = "_surgery_models_build"


def _load_build() -> ModuleType:
    """Import ``models/build.py`` by path (``models/`` is not a package)."""
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, _BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


build = _load_build()
resnet = build.resnet
densenet = build.densenet
mobilenet_v2 = build.mobilenet_v2
grouped_cnn = build.grouped_cnn

_p = functools.partial

#: torchvision depth configurations
RESNETS = {
    "resnet-18": dict(blocks=(2, 2, 2, 2), bottleneck=False),
    "resnet-34": dict(blocks=(3, 4, 6, 3), bottleneck=False),
    "resnet-50": dict(blocks=(3, 4, 6, 3), bottleneck=True),
    "resnet-101": dict(blocks=(3, 4, 23, 3), bottleneck=True),
    "resnet-152": dict(blocks=(3, 8, 36, 3), bottleneck=True),
}
DENSENETS = {
    "densenet-121": (6, 12, 24, 16),
    "densenet-169": (6, 12, 32, 32),
    "densenet-201": (6, 12, 48, 32),
}


def graphs() -> list[tuple[str, Callable[[], onnx.ModelProto]]]:
    """Benchmark graphs, tiny ones first, then ResNets and DenseNets by depth."""
    tiny: list[tuple[str, Callable[[], onnx.ModelProto]]] = [
        ("resnet-tiny", build.resnet_tiny),
        ("mobilenet-tiny", build.mobilenet_tiny),
        ("grouped-cnn", _p(grouped_cnn)),
        ("densenet-tiny", _p(densenet, blocks=(2, 2, 2), growth=8, init_features=16,
                             num_classes=10, image=32)),
    ]
    return [
        *tiny,
        ("mobilenet-v2", _p(mobilenet_v2, width=1.0, num_classes=1000, image=224)),
        *[(name, _p(resnet, **cfg, num_classes=1000, image=224)) for name, cfg in RESNETS.items()],
        *[(name, _p(densenet, blocks=b, num_classes=1000, image=224)) for name, b in DENSENETS.items()],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="only graphs whose name contains this")
    args = parser.parse_args(argv)
    print(f"{'graph':<16}{'nodes':>7}{'params':>14}{'build s':>9}")
    for name, make in graphs():
        if args.only not in name:
            continue
        t0 = time.perf_counter()
        model = make()
        dt = time.perf_counter() - t0
        n_params = sum(math.prod(t.dims) for t in model.graph.initializer)
        print(f"{name:<16}{len(model.graph.node):>7}{n_params:>14,}{dt:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
