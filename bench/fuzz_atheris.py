"""Coverage-guided fuzzing of load and analysis with atheris (libFuzzer), in process.

    pip install atheris
    python bench/fuzz_atheris.py -atheris_runs=20000 -max_len=200000   # libFuzzer flags
    python bench/fuzz_atheris.py corpus_dir/ -max_total_time=600

The target parses the bytes as an ONNX model, loads it (checks, folding, shape
inference) and analyzes it (channel rules, coupling); a SurgeryError is the refusal
the contract allows, anything else a crash libFuzzer reports and saves. The seed
inputs are the shipped models. Without atheris it says so and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install atheris); nothing to do")
        return 0
    with atheris.instrument_imports():
        import onnx

        from surgery.analysis import Analysis
        from surgery.errors import SurgeryError
        from surgery.frontends.onnx_loader import load_onnx

    def one_input(data: bytes) -> None:
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except Exception:  # noqa: BLE001 - not a protobuf: the loader's first check, not ours to fuzz
            return
        try:
            Analysis(load_onnx(proto))
        except SurgeryError:
            pass

    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):  # no corpus folder given: seed with the shipped models
        seeds = ROOT / "bench" / ".atheris_seeds"
        seeds.mkdir(exist_ok=True)
        for m in (ROOT / "models").glob("*.onnx"):
            (seeds / m.name).write_bytes(m.read_bytes())
        args.append(str(seeds))
    atheris.Setup(args, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
