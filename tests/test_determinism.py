"""The same model, data and seed give byte-identical artefacts, in one process and across processes (every
target with a backend)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def digests() -> list[str]:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "artefact_digests.py"), "lenet"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    return out.splitlines()


def test_artefacts_are_byte_identical_across_processes():
    first, second = digests(), digests()
    targets = {line.split()[1] for line in first}
    # 2 onnx + 3 finn variants + torch (.pt2 and TorchScript) + dpu
    assert targets == {"onnx", "finn", "torch", "dpu"} and len(first) == 8
    assert first == second
