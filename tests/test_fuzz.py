"""Fuzzing the command line's contract (tests/contract.py) with hypothesis.

Each family (tests/fuzz_cases.py) draws whole cases: generated and mutated graphs
in several external-data layouts, byte-mutated shipped models, odd command lines
and hand-edited plans. CI runs a small, derandomized budget per family (about a
minute in all); ``SURGERY_FUZZ_EXAMPLES=N`` runs N random cases per family,
and ``bench/fuzz.py`` runs thousands and prints the outcomes per family.
``SURGERY_FUZZ_LOG=file.jsonl`` appends one line per case.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from contract import run_cli
from fuzz_cases import FAMILIES, fresh_folder

CI_BUDGET = {"graphs": 16, "mutated": 8, "argv": 8, "plans": 6}
EXAMPLES = int(os.environ.get("SURGERY_FUZZ_EXAMPLES", "0"))
LOG = os.environ.get("SURGERY_FUZZ_LOG")


def _log(family: str, case, out, seconds: float) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps({"family": family, "code": out.code, "broken": out.broken, "note": case.note,
                                "seconds": round(seconds, 2), "stderr": out.stderr[-400:]}) + "\n")


def draw_cases(family: str, root, n: int, randomize: bool) -> list:
    """``n`` cases of ``family``, drawn by hypothesis (derandomized unless ``randomize``):
    generating is cheap, so the cases are drawn first and run afterwards, two at a time."""
    cases = []

    @settings(max_examples=n, deadline=None, derandomize=not randomize, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(st.data())
    def draw(data):
        cases.append(data.draw(FAMILIES[family](fresh_folder(root, len(cases)))))

    draw()
    return cases


def run_cases(family: str, cases: list, workers: int = 2) -> list:
    def one(case):
        t0 = time.perf_counter()
        out = run_cli(case.args, case.folder, [case.out] if case.out else [], timeout=120)
        _log(family, case, out, time.perf_counter() - t0)
        return case, out

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, cases))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_contract_holds(family, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"fuzz-{family}")
    results = run_cases(family, draw_cases(family, root, EXAMPLES or CI_BUDGET[family], bool(EXAMPLES)))
    bad = [f"{case.note}: {out}" for case, out in results if out.broken]
    assert not bad, f"{len(bad)} of {len(results)} cases broke the contract:\n" + "\n".join(bad)
