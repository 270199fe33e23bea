"""Registry plumbing shared by the test corpora: look cases up by name or tag, build
each once per process, and hand out fresh copies."""

from __future__ import annotations

import functools

import onnx


class Registry:
    def __init__(self, cases, what: str) -> None:
        self.by_name = {c.name: c for c in cases}
        assert len(self.by_name) == len(cases), "duplicate case names"
        self.cases = cases
        self.what = what
        self._bytes = functools.lru_cache(maxsize=None)(lambda name: self.by_name[name].build().SerializeToString())

    def names(self, tag: str | None = None) -> list[str]:
        """Case names, optionally only those carrying `tag`."""
        return [c.name for c in self.cases if tag is None or tag in c.tags]

    def case(self, name: str):
        return self.by_name[name]

    def build(self, name: str) -> onnx.ModelProto:
        """Build (once per process, cached) and return a fresh copy of the named model."""
        if name not in self.by_name:
            raise KeyError(f"unknown {self.what} case {name!r}; known: {sorted(self.by_name)}")
        proto = onnx.ModelProto()
        proto.ParseFromString(self._bytes(name))
        return proto
