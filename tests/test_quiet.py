"""The main example and the command line print their results and nothing else: run as a user runs them (a child
process whose stderr is a pipe), stderr stays empty — no progress bars, no Fontconfig warning from Graphviz's
libraries, no notice from torch.compile, no PyTorch deprecation warnings — and the result table is whole."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"\d+\.\d+"


def run(args, cwd):
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr


def test_quick_start_prints_its_table_and_nothing_else(tmp_path):
    # the torch target compiles its .pt2 with inductor, dpu runs onnxruntime with the DPU's rounding, and both draw
    # a diagram: every source of noise the full run had, on a one-epoch model
    out, err = run([str(ROOT / "examples" / "quickstart.py"), "--epochs", "1", "--targets", "dpu", "torch",
                    "--out", str(tmp_path)], cwd=tmp_path)
    assert err == "", err
    lines = out.splitlines()
    assert re.fullmatch(r"trained DigitsNet in \d+\.\d s: float accuracy \d+\.\d\d%", lines[0]), lines[0]
    header = lines.index("target    float %  fake-quant %  runtime %  max err (LSB)  artefact")
    rows = {}
    for line in lines[header + 1:]:
        m = re.fullmatch(rf"(\w+) +({NUMBER}) +({NUMBER}) +({NUMBER}) +({NUMBER})  (\S+)", line)
        if m:
            rows[m.group(1)] = [float(m.group(i)) for i in range(2, 6)] + [m.group(6)]
    assert set(rows) == {"dpu", "torch"}, out
    for target, (float_acc, fq_acc, runtime_acc, lsb, path) in rows.items():
        assert lsb == 0.0 and Path(path).exists(), (target, lsb, path)
        assert abs(runtime_acc - fq_acc) <= 100 / 360 + 1e-6, (target, fq_acc, runtime_acc)
    assert re.search(rf"^ +compiled +{NUMBER}$", out, re.M)  # the torch program under torch.compile
    assert lines[-1].startswith("diagrams: ") and lines[-1].count(".svg") == 2, lines[-1]


MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
""")


def test_cli_prints_its_results_and_nothing_else(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    out, err = run(["-m", "quantfx", "quantize", "model.py:build", "--target", "onnx", "--input-shape", "2,3,8,8",
                    "-o", "m.onnx", "--save", "q.pt", "--draw", "g.svg"], cwd=tmp_path)
    assert err == "", err
    assert "verify[onnx]: ok" in out and "wrote diagram to g.svg" in out
    table = out[out.index("name "):].splitlines()
    assert table[0].split() == ["name", "op", "weight_bits", "act_bits", "bias", "scale", "acc_bits", "group",
                                "method"]
    assert sum(" QuantConv2d " in line or " QuantLinear " in line for line in table) == 2, out
    # the TorchScript form: PyTorch deprecates quantized tensors and TorchScript, and says so at every use
    out, err = run(["-m", "quantfx", "quantize", "model.py:build", "--target", "torch", "--input-shape", "2,3,8,8",
                    "-o", "m.pt", "--format", "torchscript"], cwd=tmp_path)
    assert err == "" and "verify[torch]: ok" in out, err
    out, err = run(["-m", "quantfx", "inspect", "m.pt"], cwd=tmp_path)
    assert err == "", err
    assert out.splitlines()[0].split() == ["node", "op", "runs", "as", "why"], out
    assert "ConvReLU2d" in out and "Linear" in out
