"""PruneOptions: one validated value for every entry point (API, CLI, sequential)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import surgery
from surgery.options import PruneOptions

RESNET = Path(__file__).resolve().parents[1] / "models" / "resnet_tiny.onnx"


@pytest.mark.parametrize("field,value,words", [
    ("ratio", 1.0, "--ratio must be in [0, 1)"),
    ("head_ratio", -0.1, "--head-ratio must be in [0, 1)"),
    ("ratio", True, "--ratio must be in [0, 1)"),
    ("gqa", "both", "--gqa must be 'kv' or 'query'"),
    ("round_to", 0, "--round-to must be a whole number >= 1"),
    ("seed", -1, "--seed must be a whole number >= 0"),
    ("seed", 1.5, "--seed must be a whole number >= 0"),
    ("calib_batch", 0, "--calib-batch must be a whole number >= 1"),
    ("calib_samples", 0, "--calib-samples must be a whole number >= 1"),
    ("compensate", "magic", "--compensate must be 'bias' or 'lstsq'"),
])
def test_bad_values_are_one_line_errors(field, value, words):
    with pytest.raises(surgery.SurgeryError) as e:
        PruneOptions(**{field: value})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_every_entry_point_validates_the_same_way():
    for call in (lambda: surgery.prune(str(RESNET), seed=-1),
                 lambda: surgery.prune(str(RESNET), seed=-1, sequential=True)):
        with pytest.raises(surgery.SurgeryError, match="--seed must be a whole number >= 0"):
            call()


def test_frozen_and_keep_normalized():
    o = PruneOptions(keep=["conv1", "conv2"])
    assert o.keep == ("conv1", "conv2") and PruneOptions(keep="conv1").keep == ("conv1",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.ratio = 0.3
    assert o.replace(ratio=0.3).ratio == 0.3 and o.ratio is None


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'ratoi'"):
        PruneOptions.from_kwargs("prune", ratoi=0.5)


def test_api_signature_and_options_agree():
    """surgery.prune's keyword options are exactly PruneOptions' fields (plus the dispatch)."""
    import inspect

    from surgery import api

    kw = [p for p, v in inspect.signature(api.prune).parameters.items() if v.kind is v.KEYWORD_ONLY]
    assert sorted(set(kw) - {"sequential"}) == sorted(PruneOptions.names())
