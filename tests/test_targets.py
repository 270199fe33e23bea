"""Targets: `--target-params F` / `--target-flops F` keep the fraction F of the model's
parameters or FLOPs, removing units in the global ranking until the count falls to F.

Checked on the outcome: the counts of the pruned model (surgery.metrics), the plan, and
the cut still exact. "One unit's worth" is the largest first-order saving of a unit the
search removed (`report["target"]["unit_max"]`, recomputed here from the weights'
shapes): the search stops at the first unit that brings the count at or under F.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from typer.testing import CliRunner

import surgery
from surgery.analysis import Analysis
from surgery.api import load
from surgery.cli import app
from surgery.passes import targets
from surgery.passes.criteria import CriterionContext, get_criterion
from surgery.passes.policy import select
from surgery.metrics import count_flops, count_params

REPO = Path(__file__).resolve().parents[1]
RESNET = REPO / "models" / "resnet_tiny.onnx"
MOBILENET = REPO / "models" / "mobilenet_tiny.onnx"


@functools.lru_cache(maxsize=None)
def _bert_bytes() -> bytes:
    from corpus_transformers import build

    return build("bert-dynamo").SerializeToString()


def _bert() -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.ParseFromString(_bert_bytes())
    return m


def _src(name: str):
    return {"resnet_tiny": lambda: str(RESNET), "mobilenet_tiny": lambda: str(MOBILENET), "bert-dynamo": _bert}[name]()


# bert: heads and MLP units (the hidden size is inexact under LayerNorm; head_dim is off by default)
KW = {"resnet_tiny": {}, "mobilenet_tiny": {}, "bert-dynamo": {"hidden_ratio": 0.0}}


def _unit_costs(name: str, kind: str) -> tuple[Analysis, np.ndarray]:
    a = Analysis(load(_src(name)))
    return a, targets.terms(a, kind).unit_costs(a)


def _check_reached(name: str, kind: str, wanted: float, res) -> dict:
    rep = res.report
    tgt = rep["target"]
    before, after = rep[f"{kind}_before"], rep[f"{kind}_after"]
    counted = count_params(res.model) if kind == "params" else count_flops(res.model)
    assert counted == after
    assert tgt["kind"] == kind and tgt["wanted"] == wanted
    assert tgt["reached"] == pytest.approx(after / before)
    assert tgt["reachable"] is True
    # the exact count the search used is the pruned model's, and the check agrees
    assert tgt["exact"] == pytest.approx(tgt["reached"]) and tgt["checked"] == pytest.approx(tgt["reached"])
    # at or under the target, by less than one unit's worth
    a, costs = _unit_costs(name, kind)
    removed_atoms = np.concatenate([a.groups[pg.id].atoms[pg.removed_units] for pg in res.plan.groups])
    unit = costs[removed_atoms].max()
    assert tgt["reached"] <= wanted + 1e-12
    assert (wanted - tgt["reached"]) * before <= unit + 1e-6
    assert tgt["unit_max"] * before == pytest.approx(unit)
    # the first-order estimate only over-states savings: it never says more is kept than is
    assert tgt["estimated"] <= tgt["exact"] + 1e-12
    assert tgt["units_removed"] == sum(len(g.removed_units) for g in res.plan.groups)
    assert res.report["verify"]["exact"] is True
    return tgt


@pytest.mark.parametrize("kind", ["params", "flops"])
@pytest.mark.parametrize("name", ["resnet_tiny", "bert-dynamo"])
def test_target_reached_and_exact(name, kind):
    res = surgery.prune(_src(name), **{f"target_{kind}": 0.5}, **KW[name])
    tgt = _check_reached(name, kind, 0.5, res)
    if name == "bert-dynamo":
        # heads and MLP units own their weights: no entry is shared, the estimate is exact
        assert tgt["estimated"] == pytest.approx(tgt["exact"])
        assert not any(g.name for g in res.plan.groups if res.analysis.groups[g.id].kind in ("hidden", "head_dim"))


def test_target_is_a_prefix_of_the_global_ranking():
    """The target's removal is exactly `--global` with the same number of units."""
    res = surgery.prune(str(RESNET), target_params=0.6)
    tgt = res.report["target"]
    m, n = tgt["units_removed"], tgt["units_available"]
    a = Analysis(load(str(RESNET)))
    crit = get_criterion("l2")
    ctx = CriterionContext(rng=np.random.default_rng(0))
    scores = {g.id: crit(g, ctx) for g in a.groups if g.prunable}
    pool = sum(len(g.atoms) for g in a.groups if g.prunable)  # --global's budget counts every unit
    assert n == pool - sum(g.prunable for g in a.groups)  # ... of which each group keeps one
    glob = select(a.groups, scores, (m + 0.5) / pool, global_rank=True)
    got = {g.id: sorted(g.removed_units) for g in res.plan.groups}
    want = {gid: sorted(np.searchsorted(a.groups[gid].atoms, atoms).tolist()) for gid, atoms in glob.items()}
    assert got == want


def test_target_flops_with_round_to():
    res = surgery.prune(str(RESNET), target_flops=0.4, round_to=4)
    tgt = res.report["target"]
    assert tgt["reached"] <= 0.4 + 1e-12 and res.report["verify"]["exact"] is True
    for g in res.plan.groups:
        assert ((g.units - len(g.removed_units)) * g.unit) % 4 == 0


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_unreachable_target_removes_all_it_can(kind):
    res = surgery.prune(str(RESNET), **{f"target_{kind}": 0.0001})
    tgt = res.report["target"]
    assert tgt["reachable"] is False and "not reachable" in tgt["note"]
    assert tgt["reached"] > 0.0001
    assert tgt["units_removed"] == tgt["units_available"]
    a = Analysis(load(str(RESNET)))
    plan = {g.id: g for g in res.plan.groups}
    for g in a.groups:
        if not g.prunable:
            continue
        left = len(g.atoms) + len(g.blocked_atoms) - len(plan[g.id].removed_units)
        assert left >= 1
        assert len(plan[g.id].removed_units) == len(g.atoms) - (0 if len(g.blocked_atoms) else 1)
    assert res.report["verify"]["exact"] is True


def test_protected_units_stay():
    a = Analysis(load(str(RESNET)))
    name = next(g.name for g in a.groups if g.prunable)
    res = surgery.prune(str(RESNET), target_params=0.3, keep=[name])
    assert name not in {g.name for g in res.plan.groups}
    assert res.report["target"]["reached"] <= 0.3 + 1e-12


def test_target_one_keeps_everything():
    res = surgery.prune(str(RESNET), target_flops=1.0)
    assert res.report["target"]["units_removed"] == 0 and not res.plan.groups
    assert res.report["target"]["reached"] == 1.0


@pytest.mark.parametrize("kw, msg", [
    ({"ratio": 0.3, "target_params": 0.5}, "mutually exclusive"),
    ({"ratio": 0.3, "target_flops": 0.5}, "mutually exclusive"),
    ({"target_params": 0.5, "target_flops": 0.5}, "mutually exclusive"),
    ({"target_params": 0.0}, r"\(0, 1\]"),
    ({"target_flops": 1.5}, r"\(0, 1\]"),
    ({"target_params": -0.2}, r"\(0, 1\]"),
])
def test_bad_targets(kw, msg):
    with pytest.raises(surgery.SurgeryError, match=msg):
        surgery.prune(str(RESNET), **kw)


def test_ratio_zero_with_target_and_default_ratio():
    a = surgery.prune(str(RESNET), ratio=0, target_params=0.7)
    assert a.report["target"]["reached"] <= 0.7
    b = surgery.prune(str(RESNET))  # no target: the ratio still defaults to 0.5
    assert "target" not in b.report
    assert all(len(g.removed_units) == g.units // 2 for g in b.plan.groups)


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_tiny", "bert-dynamo"])
def test_exact_counts_match_the_cut(name):
    """Terms count what surgery.metrics counts, before and after any cut (uniform 0.5 here:
    coupled layers and depthwise convs both lose entries)."""
    a = Analysis(load(_src(name)))
    crit = get_criterion("l2")
    ctx = CriterionContext(rng=np.random.default_rng(0))
    scores = {g.id: crit(g, ctx) for g in a.groups if g.prunable}
    removed = select(a.groups, scores, {g.id: 0.0 if g.kind == "hidden" else 0.5 for g in a.groups})
    before = ir.to_proto(a.model).SerializeToString()
    pruned = targets.cut_copy(a, removed)
    assert ir.to_proto(a.model).SerializeToString() == before  # the copy is cut, not the model
    for kind, fn in (("params", count_params), ("flops", count_flops)):
        T = targets.terms(a, kind)
        assert T.total == fn(a.model)
        assert T.kept_after(a, removed) == fn(pruned)


def test_cli_target(tmp_path):
    runner = CliRunner()
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = runner.invoke(app, ["prune", str(RESNET), "--target-flops", "0.5", "-o", str(out), "--report", str(rep), "-q"])
    assert r.exit_code == 0, r.output
    tgt = json.loads(rep.read_text())["target"]
    assert tgt["kind"] == "flops" and tgt["wanted"] == 0.5 and tgt["reached"] <= 0.5
    r = runner.invoke(app, ["prune", str(RESNET), "--target-params", "0.5", "--ratio", "0.2", "-o", str(out)])
    assert r.exit_code == 2
    assert "mutually exclusive" in r.output


def test_final_check_corrects_a_wrong_exact_count(monkeypatch):
    """If the count from removed indices were wrong, the cut-and-counted copy decides."""
    real = targets.Terms.kept_after

    def off(self, analysis, removed):  # claims 10% of the model fewer than there are
        return real(self, analysis, removed) - self.total // 10

    monkeypatch.setattr(targets.Terms, "kept_after", off)
    res = surgery.prune(str(RESNET), target_params=0.5)
    tgt = res.report["target"]
    assert "re-searched on cut copies" in tgt["note"]
    assert tgt["checked"] == pytest.approx(tgt["reached"])
    assert tgt["reached"] <= 0.5
    assert 0.5 - tgt["reached"] <= tgt["unit_max"] + 1e-12
