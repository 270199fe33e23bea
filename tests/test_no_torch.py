"""torch is an optional extra: ONNX pruning works without it, and asking for the PyTorch
path says how to install it."""

import subprocess
import sys
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "models" / "resnet_tiny.onnx"

SCRIPT = r"""
import builtins, sys
real = builtins.__import__
def blocked(name, *a, **k):
    if name == "torch" or name.startswith("torch."):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")
    return real(name, *a, **k)
builtins.__import__ = blocked
import surgery
res = surgery.prune(sys.argv[1], ratio=0.5)
assert res.report["verify"]["exact"] is True
assert "torch" not in sys.modules
try:
    surgery.prune_module
except surgery.SurgeryError as e:
    print("MESSAGE:", e)
"""


def test_onnx_pruning_needs_no_torch_and_the_torch_path_says_what_to_install():
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(MODEL)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MESSAGE: pruning a PyTorch module needs PyTorch: pip install 'surgery[torch]'" in out.stdout
