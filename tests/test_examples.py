"""Every example runs and prints the figures it promises (each under a minute here)."""
import importlib.util
import sys
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses in the example look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


def test_quickstart(tmp_path, capsys):
    rows = load("quickstart").main(["--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    targets = [r[0] for r in rows]
    assert {"onnx", "dpu"} <= set(targets)  # the quick start prints a dpu row
    for target, fq_acc, runtime_acc, lsb, ok, path, _ in rows:
        assert ok and lsb <= 1.0 + 1e-3, (target, lsb)
        assert path.exists()
        assert fq_acc > 95.0
        # the runtime computes the same integers: at most one test image (of 360) may flip
        assert abs(runtime_acc - fq_acc) <= 100 / 360 + 1e-6, (target, fq_acc, runtime_acc)
    assert "float accuracy" in out and "runtime %" in out


def test_custom_pass(capsys):
    float_acc, acc_plain, acc_edges, bits = load("custom_pass").main([])
    assert bits[0] == 8 and bits[-1] == 8 and set(bits[1:-1]) == {3}
    assert acc_edges >= acc_plain
    assert "keep_edges_at_8_bits" in capsys.readouterr().out


def test_qat_recovers_accuracy():
    float_acc, ptq_acc, qat_acc = load("qat").main([])
    # measured before the low-bit PTQ recipe (1 and 2 torch threads): float 97.8, PTQ 4-bit 96.1-96.4, QAT 4-bit
    # 98.3-98.6; with it (MSE scales, learned rounding) PTQ 4-bit reaches 97.8 and QAT 98.1, so QAT now keeps
    # float accuracy rather than recovering much over PTQ
    assert qat_acc >= float_acc - 0.5
    assert qat_acc >= ptq_acc - 0.5
    assert qat_acc > 95.0


def test_unet_concat(tmp_path):
    groups = load("unet_concat").main(["--out", str(tmp_path)])
    assert len(groups) >= 2
    assert all(same for _, same in groups)
