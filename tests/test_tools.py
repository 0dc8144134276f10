"""tools/: every script has --help; dump_passes writes the graph after every pass."""
import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(TOOLS.glob("*.py")), ids=lambda p: p.stem)
def test_help(path, capsys):
    with pytest.raises(SystemExit) as e:
        load(path).main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_dump_passes(tmp_path):
    files = load(TOOLS / "dump_passes.py").main(["zoo:mlp", "-o", str(tmp_path)])
    assert len([f for f in files if f.suffix == ".txt"]) == 9
    assert len([f for f in files if f.suffix == ".svg"]) == 9
    before, after = (tmp_path / "00_trace.txt").read_text(), (tmp_path / "08_annotate.txt").read_text()
    assert "self.x_quant(x)" not in before and "self.x_quant(x)" in after  # swap_modules added the input quantizer


def test_sqnr_is_the_ratio_in_db_and_names_a_shape_mismatch():
    import math
    import torch
    import quantfx
    from quantfx.errors import QuantArgumentError
    ref = torch.tensor([3.0, -4.0])
    assert quantfx.sqnr(ref, ref) == math.inf
    assert abs(quantfx.sqnr(ref, ref + torch.tensor([0.5, 0.0])) - 10 * math.log10(25 / 0.25)) < 1e-12
    with pytest.raises(QuantArgumentError, match="shapes differ"):
        quantfx.sqnr(ref, ref[:1])


def test_bench_says_which_comparisons_it_skips_without_brevitas(monkeypatch):
    """tools/bench.py: with Brevitas not importable, every Brevitas comparison is skipped with the reason (no
    timing here; the benchmark itself is run by hand)."""
    monkeypatch.setitem(sys.modules, "brevitas", None)  # `import brevitas...` raises ImportError
    bench = load(TOOLS / "bench.py")
    avail = bench.available()
    assert avail["brevitas"] and "brevitas" in avail["brevitas"] and avail["torch.ao"] is None
    lines = bench.skip_lines(avail)
    assert len(lines) == 1 and lines[0].startswith("skipped: every Brevitas comparison: brevitas is not installed")
    assert "Brevitas" not in bench.compile_tools(avail) and "torch.ao" in bench.compile_tools(avail)


def test_coverage_records_failures_per_flow_and_resumes(tmp_path, capsys):
    """tools/coverage.py: a model that cannot be built, and a child that times out, each give one failed
    record per flow (the run goes on); a second run skips the pairs already recorded; the report counts them
    by class."""
    cov = load(TOOLS / "coverage.py")
    out = tmp_path / "c.jsonl"
    common = ["--out", str(out), "--targets", "onnx", "torch"]
    cov.main(["--models", "timm:no_such_model", "--timeout", "600"] + common)
    cov.main(["--models", "timm:test_resnet", "--timeout", "1"] + common)
    records = cov.load(out)
    assert [(r["model"], r["flow"], r["status"], r["error_type"]) for r in records] == [
        ("timm:no_such_model", "onnx", "failed", "RuntimeError"), ("timm:no_such_model", "torch", "failed",
                                                                   "RuntimeError"),
        ("timm:test_resnet", "onnx", "failed", "Timeout"), ("timm:test_resnet", "torch", "failed", "Timeout")]
    assert records[0]["stage"] == "build" and "Unknown model" in records[0]["error"]
    capsys.readouterr()
    cov.main(["--models", "timm:no_such_model", "timm:test_resnet"] + common)  # resumes: nothing to run
    assert "0 models to run" in capsys.readouterr().out
    failures = cov.failures(records, ["onnx", "torch"])
    assert "| 2 | failed | RuntimeError: Unknown model (no_such_model) | onnx, torch | no_such_model |" in failures
    assert "| 2 | failed | Timeout: model timed out after N s (all flows) | onnx, torch | test_resnet |" in failures
