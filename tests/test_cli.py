"""The quantfx command line: subcommands, exit codes 0/1/2, messages instead of tracebacks."""
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch

from quantfx.cli import main

MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def untraceable():
        class M(nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x
                return -x
        return M()

    def shape_checked():
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)

            def forward(self, x):
                if x.shape[-1] != x.shape[-2]:  # torch.fx cannot trace this; torch.export can
                    raise ValueError("square images only")
                return self.conv(x)
        torch.manual_seed(0)
        return M()
""")


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return path


def test_quantize_exports_verifies_and_saves(model_file, tmp_path, capsys):
    out, saved = tmp_path / "m.onnx", tmp_path / "q.pt"
    rc = main(["quantize", f"{model_file}:build", "--target", "onnx", "--input-shape", "2,3,8,8",
               "-o", str(out), "--save", str(saved), "--quiet"])
    assert rc == 0
    model = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) >= 3
    assert main(["verify", str(saved), str(out), "--input-shape", "2,3,8,8"]) == 0
    assert "max error" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "QuantizeLinear" in table and "DequantizeLinear" in table
    assert main(["inspect", str(saved)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "QuantConv2d" in line or "QuantLinear" in line]
    assert len(rows) == 2


def test_weight_bit_width_and_calib_npz(model_file, tmp_path):
    import numpy as np
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype("float32"))
    saved = tmp_path / "q.pt"
    rc = main(["quantize", f"{model_file}:build", "--target", "finn", "--input-shape", "2,3,8,8",
               "--weight-bit-width", "4", "--calib", str(tmp_path / "calib.npz"), "--save", str(saved), "--quiet"])
    assert rc == 0
    q = torch.load(saved, weights_only=False)
    bits = {m.weight_quant.bit_width for m in q.modules() if hasattr(m, "weight_quant")}
    assert bits == {4}


def test_cpu_option_picks_the_onnx_weight_width(model_file, tmp_path):
    widths = {}
    for cpu in ("any", "vnni"):
        saved = tmp_path / f"q_{cpu}.pt"
        assert main(["quantize", f"{model_file}:build", "--target", "onnx", "--input-shape", "2,3,8,8",
                     "--cpu", cpu, "--save", str(saved), "--quiet"]) == 0
        q = torch.load(saved, weights_only=False)
        widths[cpu] = {m.weight_quant.bit_width for m in q.modules() if hasattr(m, "weight_quant")}
    assert widths == {"any": {7}, "vnni": {8}}


@pytest.mark.parametrize("args, code, message", [
    (["quantize", "MODEL:nope", "--input-shape", "1,3,8,8"], 2, "has no function 'nope'"),
    (["quantize", "MODEL:build", "--input-shape", "1,x,8"], 2, "comma-separated integers"),
    (["quantize", "MODEL:build", "--input-shape", "1,3,8,8", "--target", "bogus"], 1, "valid targets"),
    (["quantize", "MODEL:untraceable", "--input-shape", "1,3,8,8"], 1, "TraceError"),
    (["quantize", "MODEL:build", "--input-shape", "1,3,8,8", "--calib", "missing.npz"], 2, "--calib"),
    (["verify", "missing.pt", "a.onnx", "--input-shape", "1,3,8,8"], 2, "no such file"),
])
def test_user_errors_have_exit_codes_and_messages(model_file, capsys, args, code, message):
    args = [a.replace("MODEL", str(model_file)) for a in args]
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_capture_flag(model_file, tmp_path, capsys):
    spec = f"{model_file}:shape_checked"
    assert main(["quantize", spec, "--target", "onnx", "--input-shape", "2,3,8,8", "--capture", "fx"]) == 1
    assert "capture='export'" in capsys.readouterr().err
    out = tmp_path / "m.onnx"
    assert main(["quantize", spec, "--target", "onnx", "--input-shape", "2,3,8,8", "-o", str(out)]) == 0
    assert "capture: export (torch.fx could not trace it" in capsys.readouterr().out
    assert out.exists()


def test_bad_flag_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["quantize"])
    assert e.value.code == 2


def test_passes_lists_pipelines(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("trace", "canonicalize", "fuse_conv_bn", "swap_modules", "share_quantizers",
                 "choose_bias_scaling", "annotate"):
        assert name in out
    assert out.count("trace,propagate_shapes,canonicalize") == 4  # one default pipeline per target


def test_python_dash_m_entry_point(model_file):
    r = subprocess.run([sys.executable, "-m", "quantfx", "quantize", f"{model_file}:build", "--input-shape",
                        "1,3,8,8", "--target", "bogus"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "unknown target 'bogus'" in r.stderr and "Traceback" not in r.stderr
