"""One FLOP formula per op family (passes/rules, @flops): the report and the
--target-flops search read the same formulas, so they must agree on every model."""

from __future__ import annotations

import pytest

import corpus
import corpus_transformers
from surgery.analysis import Analysis
from surgery.api import load
from surgery.metrics import count_flops
from surgery.passes import targets
from surgery.passes.rules import FLOPS

# every CNN case, and every third hand-built or TorchScript-exported transformer (dynamo exports analyze slowly)
CASES = [("cnn", n) for n in corpus.names()] + [("transformer", n) for n in corpus_transformers.names() if "dynamo" not in n][::3]


def _model(kind: str, name: str):
    return load(corpus.build(name) if kind == "cnn" else corpus_transformers.build(name))


@pytest.mark.parametrize("kind,name", CASES, ids=[n for _, n in CASES])
def test_target_terms_sum_to_the_report(kind, name):
    analysis = Analysis(_model(kind, name))
    assert targets.terms(analysis, "flops").total == count_flops(analysis.model)


def test_every_flop_formula_is_registered_once_per_family():
    assert {op for _, op in FLOPS} >= {"Conv", "ConvTranspose", "MatMul", "Gemm"}
