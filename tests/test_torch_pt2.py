"""torch target, .pt2 form (targets/torch_pt2*.py): the default torch artefact is a torch.export program in PT2E's
quantized representation that gives the fake-quant model's integers eagerly and under torch.compile, takes any
batch size, loads in a Python without quantfx, and makes quantfx print no PyTorch deprecation warning."""
import json
import subprocess
import sys
import textwrap
import warnings
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch

import quantfx
from quantfx.errors import QuantArgumentError
from quantfx.targets import torch_pt2_runtime, torch_quantized
from quantfx.zoo import TEST_MODELS, example_input


def _quantize(name):
    torch.manual_seed(0)
    data = [example_input(name, batch=2, seed=i) for i in range(2)]
    return quantfx.quantize(TEST_MODELS[name][0]().eval(), "torch", calibration_data=data, progress=False), data


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_every_test_model_gives_the_fake_quant_integers_eagerly_at_any_batch(name, tmp_path):
    """Written from a batch-1 example, the file runs batch 3 (a dynamic batch dimension) at 0 LSB."""
    q, data = _quantize(name)
    quantfx.export(q, tmp_path / name, (data[0][:1],))
    assert (tmp_path / f"{name}.pt2").exists()
    report = quantfx.verify(q, tmp_path / f"{name}.pt2", (example_input(name, batch=3, seed=9),), variants=False)
    assert report.outputs and report.max_error_lsb == 0.0, str(report)


@pytest.mark.parametrize("name", ["resnet", "mlp", "unet"])
def test_compiled_program_gives_the_fake_quant_integers(name, tmp_path):
    """verify runs the file eagerly and under torch.compile (inductor, freezing) and reports both: 0 LSB. unet's
    transposed convs read in float have integer accumulators too wide for one float32 conv: their inputs are
    split in two float32 convs (inductor refuses float64 ones). (In the
    tests inductor has only torch's own passes; with torchao's x86 passes registered the convs become oneDNN int8
    kernels: tools/bench_torch.py measures those, BENCHMARKS.md.)"""
    q, data = _quantize(name)
    quantfx.export(q, tmp_path / "m.pt2", (data[0][:1],))
    report = quantfx.verify(q, tmp_path / "m.pt2", (example_input(name, batch=2, seed=4),))
    assert set(report.variants) == {"compiled"} and report.ok, str(report)
    assert report.max_error_lsb == 0.0 and report.variant_error_lsb("compiled") == 0.0, str(report)
    assert "[compiled]" in str(report)


def test_program_is_pt2e_quantized_form():
    """Plain tensors between quantized_decomposed ops: per-tensor activations, per-channel int8 weight constants,
    one dequantize_per_channel and one aten conv per fused conv; no quantized dtype anywhere."""
    q, data = _quantize("resnet")
    program = quantfx.lower(q, (data[0][:1],))
    assert isinstance(program, torch_pt2_runtime.Pt2Program)
    ops = Counter(str(n.target) for n in program.exported.graph.nodes if n.op == "call_function")
    convs = [r for r in program.report if r["runs_as"].startswith("dq -> conv")]
    linears = [r for r in program.report if r["runs_as"].startswith("dq -> linear")]
    assert len(convs) == 9 and ops["aten.conv2d.default"] == 9 and len(linears) == ops["aten.linear.default"] == 1
    assert ops["quantized_decomposed.dequantize_per_channel.default"] == 10
    # the 3 residual adds read their conv's float output: dq -> conv -> add(dq(other)) -> [relu] -> q, PT2E's
    # pattern for qconv2d_pointwise.binary; the other 7 layers and the adds are each followed by a quantize
    adds = [n for n in program.exported.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) == 3 and all(
        sorted(str(a.target) for a in n.args) == ["aten.conv2d.default",
                                                  "quantized_decomposed.dequantize_per_tensor.default"]
        for n in adds)
    assert ops["quantized_decomposed.quantize_per_tensor.default"] >= 7 + 3
    tensors = list(program.exported.state_dict.values()) + list(program.exported.constants.values())
    dtypes = Counter(t.dtype for t in tensors if torch.is_tensor(t))
    assert dtypes[torch.int8] == 10 and not any(t.is_quantized for t in tensors if torch.is_tensor(t))


@pytest.mark.parametrize("engine, reads", [("x86", True), ("onednn", True), ("fbgemm", False), ("qnnpack", False)])
def test_residual_adds_read_the_conv_output_on_the_exact_engines(engine, reads):
    """x86 / onednn (``add_reads_layer_output``): each residual add of the test ResNet reads its conv's float output,
    no requantizer between them (PT2E's recipe; one rounding, at the add's quantizer), and the conv's multiplier
    ``s_in x s_w / s_out`` against the add's quantizer is on the 2^-15 grid; fbgemm / qnnpack keep requantizing."""
    from quantfx.classify import is_act_quant, layer_read_by_add
    from quantfx.graph import module_of, qmeta
    torch.manual_seed(0)
    data = [example_input("resnet", batch=2, seed=i) for i in range(2)]
    q = quantfx.quantize(TEST_MODELS["resnet"][0]().eval(), quantfx.targets.torch_profile(engine),
                         calibration_data=data, progress=False)
    adds = [n for n in q.graph.nodes if n.op == "call_function" and "add" in n.name]
    layers = [layer_read_by_add(q, n) for n in adds]
    assert len(adds) == 3 and all(layer is not None for layer in layers) == reads
    assert all(is_act_quant(q, a) for n in adds for a in n.args[:2]) != reads
    if reads:
        for add, layer in zip(adds, layers):
            s_w = module_of(q, layer).weight_quant.scale(module_of(q, layer).weight).reshape(-1).double()
            s_out = float(module_of(q, next(iter(add.users))).act_quant.scale(None))
            m = s_w * float(qmeta(layer.args[0]).scale) / s_out / 2.0 ** torch_quantized.GRID_EXP
            assert torch.equal(m, torch.round(m)), layer.name


def test_file_records_what_it_was_built_for(tmp_path):
    q, data = _quantize("lenet")
    quantfx.export(q, tmp_path / "m.pt2", (data[0][:1],))
    with zipfile.ZipFile(tmp_path / "m.pt2") as z:
        meta = json.loads(z.read(next(n for n in z.namelist() if n.endswith("extra/quantfx.json"))))
    assert meta["engine"] == "x86" and meta["format"] == "pt2" and meta["arithmetic"]["exact_requant"] is True
    assert meta["arithmetic"]["requant"] == "multiplier_float_bias" and meta["report"]


LOADER = textwrap.dedent(r"""
    import sys, numpy as np, torch
    import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
    ep = torch.export.load(sys.argv[1])
    x = torch.from_numpy(np.load(sys.argv[2]))
    with torch.no_grad():
        np.save(sys.argv[3], ep.module()(x).numpy())
    assert not [m for m in sys.modules if m.startswith(("quantfx", "targets", "torchao"))]
""")


def test_file_loads_and_runs_in_a_python_without_quantfx(tmp_path):
    q, data = _quantize("mobilenetv2")
    quantfx.export(q, tmp_path / "m.pt2", (data[0][:1],))
    x = example_input("mobilenetv2", batch=5, seed=3)
    np.save(tmp_path / "x.npy", x.numpy())
    run = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "m.pt2"), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        want = q(x).numpy()
    assert np.array_equal(np.load(tmp_path / "y.npy"), want)


def test_default_path_prints_no_pytorch_deprecation_warning(tmp_path):
    """quantize + export + verify (eager and compiled) on the default torch path: no DeprecationWarning or
    FutureWarning from torch, and no warning that calls anything deprecated (the quantized dtypes' UserWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, data = _quantize("lenet")
        quantfx.export(q, tmp_path / "m.pt2", (data[0][:1],))
        quantfx.verify(q, tmp_path / "m.pt2", (data[1],))
    bad = [f"{w.category.__name__}: {w.message}" for w in caught
           if (issubclass(w.category, (DeprecationWarning, FutureWarning)) and "torch" in (w.filename or ""))
           or "deprecated" in str(w.message).lower()]
    assert bad == []
    # the TorchScript form is deprecated PyTorch throughout (quantized tensors, torch.jit) and quantfx says so in
    # its docs, not at every use; the control: the same torch.jit.load outside quantfx warns, and the capture sees it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = quantfx.export(q, tmp_path / "m.pt", (data[0][:1],), format="torchscript")
        quantfx.verify(q, tmp_path / "m.pt", (data[1],))
    assert [f"{w.category.__name__}: {w.message}" for w in caught if "deprecated" in str(w.message).lower()] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch_quantized.quantized_engine(program.engine):
            torch.jit.load(str(tmp_path / "m.pt"))
    assert any(issubclass(w.category, FutureWarning) and "torch.jit" in str(w.message) for w in caught)


def test_torchscript_form_on_request(tmp_path):
    q, data = _quantize("resnet")
    program = quantfx.export(q, tmp_path / "m", (data[0][:1],), format="torchscript")
    assert isinstance(program, torch_quantized.TorchProgram) and (tmp_path / "m.pt").exists()
    report = quantfx.verify(q, tmp_path / "m.pt", (data[1],))
    assert report.max_error_lsb == 0.0 and report.variants == {}, str(report)
    with pytest.raises(QuantArgumentError, match="no format 'onnx'.*pt2, torchscript"):
        quantfx.export(q, tmp_path / "n", (data[0][:1],), format="onnx")


def test_a_compiled_run_that_fails_is_an_export_error_naming_the_cause(monkeypatch):
    """inductor refusing a kernel (seen: a float64 weight reaching mkldnn's weight prepacking) is an ExportError
    that says which run failed and the compiler's own error line, and the eager check stays available."""
    from quantfx.lowering import BACKENDS
    q, data = _quantize("mlp")
    program = quantfx.lower(q, (data[0][:1],))

    def refusing(_program, _inputs):
        raise RuntimeError("backend='inductor' raised:\nRuntimeError: itensor_view_from_dense expects float "
                           "tensor inputDouble\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")
    monkeypatch.setitem(BACKENDS["torch"].variants, "compiled", refusing)
    with pytest.raises(quantfx.QuantFXError, match=r"torch's compiled run .*RuntimeError: itensor_view_from_dense"):
        quantfx.verify(q, program, data[1])
    assert quantfx.verify(q, program, data[1], variants=False).max_error_lsb == 0.0


def test_attention_products_run_in_float32_where_their_sums_fit_and_stay_exact(tmp_path):
    """A ViT block's ``q k^T`` and ``softmax(.) v`` (products of two activation quantizers) run on their codes in
    float32 where every partial sum of integer products is below 2^24 (PT2E's float32 matmuls, not float64), at
    0 LSB eagerly and compiled; one more term than 2^24 allows keeps float64."""
    from tests.modern_models import ViTBlock, calibration
    from quantfx.targets.torch_pt2 import product_in_float32
    torch.manual_seed(0)
    q = quantfx.quantize(ViTBlock().eval(), "torch", calibration_data=calibration(), progress=False)
    x = calibration(n=1, seed=5)[0]
    program = quantfx.export(q, tmp_path / "vit.pt2", (x[:1],))
    products = [r for r in program.report if r["runs_as"].startswith("integer matmul")]
    assert len(products) == 2 and all("in float32" in r["runs_as"] for r in products), products
    matmuls = [n for n in program.exported.graph.nodes if n.target == torch.ops.aten.matmul.default]
    assert len(matmuls) == 2 and all(n.meta["val"].dtype == torch.float32 for n in matmuls)
    assert not [n for n in program.exported.graph.nodes if "val" in n.meta and torch.is_tensor(n.meta["val"])
                and n.meta["val"].dtype == torch.float64]
    report = quantfx.verify(q, tmp_path / "vit.pt2", (x,))
    assert report.max_error_lsb == 0.0 and report.variant_error_lsb("compiled") == 0.0, str(report)
    # uint8 codes around zero point 88 reach 167: 601 x 167 x 167 < 2^24 <= 602 x 167 x 167
    assert product_in_float32((0, 255), (0, 255), 88, 88, 601)
    assert not product_in_float32((0, 255), (0, 255), 88, 88, 602)
    assert product_in_float32((-128, 127), (0, 255), 0, 0, 1) and not product_in_float32((0, 255), (0, 255), 0, 0, 259)


def test_a_product_over_the_batch_dimension_stays_float64(tmp_path):
    """``x^T @ x`` sums over the batch, which the program takes as dynamic: the depth seen at export says nothing of
    a later batch, so the product keeps float64 (exact at any batch); the same product over channels runs in
    float32. Both at 0 LSB at a larger batch than the example's."""
    class Gram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return y.t() @ y, y @ y.t()

    torch.manual_seed(0)
    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q = quantfx.quantize(Gram().eval(), "torch", calibration_data=data, progress=False)
    program = quantfx.export(q, tmp_path / "g.pt2", (data[0][:3],))
    rows = [r for r in program.report if r["runs_as"].startswith("integer matmul")]
    assert len(rows) == 2 and ["in float32" in r["runs_as"] for r in rows] == [False, True], rows
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(9))
    report = quantfx.verify(q, tmp_path / "g.pt2", (x,), variants=False)
    assert report.max_error_lsb == 0.0, str(report)
