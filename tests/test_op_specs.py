"""The op-spec registries of passes/rules/: one family file owns an op, and every role an
op plays elsewhere belongs to an op with a channel rule."""

from __future__ import annotations

import pkgutil
import sys

import pytest

from surgery.passes import rules
from surgery.passes.rules import CONSUMERS, FLOPS, NORM_SCALE, REWRITES, RULES, flops, rewrite, rule


def test_every_module_in_the_rules_folder_is_imported():
    names = {m.name for m in pkgutil.iter_modules(rules.__path__)}
    assert {"conv", "linear", "norm", "lrn", "shape"} <= names
    assert all(f"{rules.__name__}.{n}" in sys.modules for n in names)


@pytest.mark.parametrize("table,name", [(REWRITES, "rewrites"), (FLOPS, "flops"), (CONSUMERS, "consumers"),
                                        (NORM_SCALE, "norm_scale")])
def test_every_role_belongs_to_an_op_with_a_channel_rule(table, name):
    assert set(table) <= set(RULES), f"{name} without a rule: {sorted(set(table) - set(RULES))}"


def test_consumers_have_a_flop_formula():
    assert set(CONSUMERS) <= set(FLOPS)


@pytest.mark.parametrize("deco,table", [(rule, RULES), (rewrite, REWRITES), (flops, FLOPS)])
def test_a_second_family_cannot_take_an_op(deco, table):
    before = table[("", "Conv")]
    with pytest.raises(ValueError, match="two .* registered for Conv"):
        deco("Conv")(lambda *a: None)
    assert table[("", "Conv")] is before
    try:
        fn = deco("Conv", domain="test.op_specs")(lambda *a: None)
        deco("Conv", domain="test.op_specs")(fn)  # the same function again is no conflict
    finally:
        table.pop(("test.op_specs", "Conv"), None)
