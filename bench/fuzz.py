"""The long fuzz run: N random cases per family through the CLI contract, a table out.

    python bench/fuzz.py --cases 120                # per family: 480 cases in about 10 minutes on 2 cores
    python bench/fuzz.py --cases 50 --only graphs --log fuzz.jsonl

Families and the contract: tests/fuzz_cases.py and tests/contract.py. Each row
counts the cases that ended in exit 0 (a model that runs), exit 2 (a one-line
refusal) and those that broke a clause (traceback, hang, memory, output left,
user file changed, more than one error line, output that does not run); the
broken cases are listed after the table with what they were. Exit status 1 if any broke.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import machine  # noqa: E402
from fuzz_cases import FAMILIES  # noqa: E402
from test_fuzz import draw_cases, run_cases  # noqa: E402


#: the clauses of tests/contract.py, by a word of the text it reports them with
CLAUSES = ["traceback", "hang", "memory", "left", "changed", "lines", "output", "exit"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=200, help="cases per family")
    ap.add_argument("--only", default="", help="families whose name contains this")
    ap.add_argument("--log", help="write one JSON line per case here")
    args = ap.parse_args()
    print("machine:", json.dumps(machine()))
    rows, broken, log = [], [], []
    t0 = time.perf_counter()
    for family in sorted(f for f in FAMILIES if args.only in f):
        with tempfile.TemporaryDirectory() as root:
            results = run_cases(family, draw_cases(family, Path(root), args.cases, randomize=True))
        counts = collections.Counter()
        for case, out in results:
            counts["exit 0" if out.code == 0 else "exit 2" if out.code == 2 else "other"] += 1
            for clause in out.broken:
                counts[next((k for k in CLAUSES if k in clause), "exit")] += 1
            if out.broken:
                broken.append((family, case.note, str(out)))
            log.append({"family": family, "code": out.code, "broken": out.broken, "note": case.note})
        rows.append((family, len(results), counts))
    print(f"\n{'family':10s} {'cases':>6s} {'exit 0':>7s} {'exit 2':>7s} " + " ".join(f"{c:>9s}" for c in CLAUSES))
    for family, n, c in rows:
        print(f"{family:10s} {n:6d} {c['exit 0']:7d} {c['exit 2']:7d} " + " ".join(f"{c[k]:9d}" for k in CLAUSES))
    print(f"\n{sum(n for _, n, _ in rows)} cases in {time.perf_counter() - t0:.0f} s; {len(broken)} broke the contract")
    for family, note, out in broken:
        print(f"- [{family}] {note}\n    {out[:600]}")
    if args.log:
        Path(args.log).write_text("".join(json.dumps(e) + "\n" for e in log))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
