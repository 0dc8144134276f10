"""torch target: lowering to PyTorch's quantized modules and ops, fidelity in LSBs against the fake-quant model
(outputs and every activation quantizer), the TorchScript file loaded without quantfx, engines, fallbacks, errors."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import quantfx
from quantfx.errors import CalibrationError, ExportError, QuantArgumentError
from quantfx.export import _intermediates
from quantfx.graph import is_act_quant, qmeta
from quantfx.quant.functional import is_power_of_two
from quantfx.targets import torch_profile
from quantfx.targets.torch_quantized import TorchProgram, load_program, run_program_intermediates
from quantfx.zoo import TEST_MODELS, example_input


def quantized(name, target="torch", **kwargs):
    ctor, _ = TEST_MODELS[name]
    torch.manual_seed(0)
    data = [example_input(name, batch=4, seed=i) for i in range(4)]
    return quantfx.quantize(ctor().eval(), target, calibration_data=data, progress=False, **kwargs)


@pytest.fixture(scope="module", params=sorted(TEST_MODELS))
def lowered(request):
    name = request.param
    q = quantized(name)
    return name, q, quantfx.lower(q, (example_input(name, batch=1),), format="torchscript")


def test_zoo_verifies_at_zero_lsb(lowered):
    name, q, program = lowered
    for seed in (123, 5):
        report = quantfx.verify(q, program, (example_input(name, batch=4, seed=seed),))
        assert report.ok and report.max_error_lsb == 0.0, str(report)


def test_every_quantizer_node_agrees_to_the_bit(lowered):
    """Every activation quantizer's output in the artefact (quantized modules, quantized::add, the float paths)
    equals the fake-quant model's, not only the outputs."""
    name, q, program = lowered
    x = example_input(name, batch=4, seed=7)
    expected = _intermediates(q, (x,))
    got = run_program_intermediates(program, (x,), list(expected))
    acts = [n.name for n in q.graph.nodes if is_act_quant(q, n)]
    assert len(got) >= len(acts) * 0.9 and len(got) >= 2, (len(got), len(acts))
    for node_name, value in got.items():
        assert np.array_equal(value, expected[node_name]), node_name


def test_integer_layers_run_as_quantized_modules(lowered):
    """Every conv/linear read by an identity/ReLU quantizer is a torch.ao quantized module, every add read by
    one is quantized::add(_relu); what runs in float is in the report with a reason."""
    name, q, program = lowered
    assert any(type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
               for m in program.module.modules())
    quantized_layers = [r for r in program.report if r["runs_as"].startswith(("Conv", "Linear"))]
    assert quantized_layers, program.report
    for row in program.fallbacks():
        assert row["why"], row
    if name == "resnet":
        # its 3 residual adds read their conv's float output (add_reads_layer_output: no requantization before the
        # add), which TorchScript has no quantized op for on every engine: conv and add in float, then quantized
        adds = [n.name for n in q.graph.nodes if n.op == "call_function" and "add" in n.name]
        layers = [a.name for n in q.graph.nodes if n.name in adds for a in n.args[:1]]
        assert len(adds) == 3 and not any(r["runs_as"].startswith("quantized::add") for r in program.report)
        assert sorted(r["node"] for r in program.fallbacks()) == sorted(adds + layers + ["pool"])


def test_saved_file_runs_without_quantfx(tmp_path):
    """The .pt file loads with plain torch.jit.load in a Python that cannot import quantfx, and gives the same
    bytes of output as the program in memory."""
    q = quantized("resnet")
    path = tmp_path / "resnet.pt"
    program = quantfx.export(q, path, (example_input("resnet", batch=1),), format="torchscript")
    x = example_input("resnet", batch=3, seed=11)
    torch.save(x, tmp_path / "x.pt")
    site = str(Path(torch.__file__).parent.parent)  # torch's site-packages, without its .pth files (-S)
    code = f"""
import sys
sys.path.append({site!r})
try:
    import quantfx
    raise SystemExit('quantfx is importable')
except ImportError:
    pass
import torch
torch.backends.quantized.engine = 'x86'  # the engine the file records (weights pack at load)
m = torch.jit.load({str(path)!r})
torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
"""
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout
    y = torch.load(tmp_path / "y.pt")
    expected = program(x)
    assert torch.equal(y, expected)
    with torch.no_grad():
        assert torch.equal(y, q(x))  # and the fake-quant model's, to the bit
    loaded = load_program(path)
    assert loaded.engine == "x86" and loaded.report == program.report
    assert quantfx.verify(q, path, x).max_error_lsb == 0.0


@pytest.mark.parametrize("engine, w_bits, a_bits", [("x86", 7, 8), ("fbgemm", 7, 8), ("qnnpack", 8, 8),
                                                  ("onednn", 7, 8), ("fbgemm", 8, 7), ("x86", 8, 7)])
def test_engine_range_is_honoured(engine, w_bits, a_bits):
    """x86/fbgemm/onednn sum u8 x s8 products in saturating int16 pairs on AVX2: 7-bit weights (|w| <= 64) on
    8-bit activations by default, or 8-bit weights on 7-bit activations (a quantized clamp after each layer);
    qnnpack takes both at 8 bits. Checked in the quantizers, in the packed weights, and in the artefact's
    activation codes even for inputs far past calibration, at 0 LSB (x86 too, whichever library this CPU gets)."""
    default = (8, 8) if engine == "qnnpack" else (7, 8)
    widths = {} if (w_bits, a_bits) == default else \
        dict(weight_bit_width=w_bits, act_bit_width=a_bits, input_bit_width=a_bits)
    q = quantized("resnet", torch_profile(engine), **widths)
    assert {m.act_quant.bit_width for n in q.graph.nodes if is_act_quant(q, n)
            for m in [q.get_submodule(n.target)]} == {a_bits}
    program = quantfx.lower(q, (example_input("resnet", batch=1),), format="torchscript")
    assert program.engine == engine
    x = example_input("resnet", batch=2, seed=3) * 20  # saturates every quantizer
    codes = []
    values = set(program.node_values.values())  # the lowered value of each node of the quantized graph

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in values and torch.is_tensor(out) and out.is_quantized and out.dtype == torch.quint8:
                codes.append(int(out.int_repr().max()))
            return out

    from quantfx.targets.torch_quantized import quantized_engine
    with quantized_engine(engine), torch.no_grad():
        Recorder(program.module).run(x)
        weights = [m.weight().int_repr() for m in program.module.modules()
                   if hasattr(m, "_weight_bias") and callable(getattr(m, "weight", None))]
    assert codes and max(codes) == 2 ** a_bits - 1
    lo, hi = min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)
    assert -2 ** (w_bits - 1) <= lo and hi <= 2 ** (w_bits - 1) - 1 and max(-lo, hi) >= 2 ** (w_bits - 1) - 1
    assert quantfx.verify(q, program, x).max_error_lsb == 0.0


needs_onednn = pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines,
                                  reason="this PyTorch build has no onednn quantized engine")


@needs_onednn
@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_onednn_engine_verifies_at_zero_lsb_on_every_quantizer(name):
    """The onednn profile (requant='float_bias': the bias added in float32 after scaling, as oneDNN does) agrees
    with the engine to the bit at every activation quantizer. With fbgemm's arithmetic in the fake-quant model,
    MobileNetV2 and ShuffleNet each had one activation off by 1 LSB here, and UNet 2 LSB at its output."""
    from quantfx.targets.torch_quantized import quantized_engine
    q = quantized(name, torch_profile("onednn"))
    program = quantfx.lower(q, (example_input(name, batch=1),), format="torchscript")
    assert program.engine == "onednn"
    with quantized_engine("onednn"):
        for seed in (7, 123):
            x = example_input(name, batch=4, seed=seed)
            expected = _intermediates(q, (x,))
            got = run_program_intermediates(program, (x,), list(expected))
            assert len(got) >= 2
            for node_name, value in got.items():
                assert np.array_equal(value, expected[node_name]), (seed, node_name)


@needs_onednn
@pytest.mark.parametrize("layer", ["conv", "conv_relu", "linear"])
def test_onednn_requantization_formula_matches_the_engine(layer):
    """quantfx.quant.functional.requantize_bias_after against oneDNN's int8 kernels on 256 input codes x 1024
    output channels of random scales and float biases (a 1x1 conv or linear with one input: every accumulator
    value (x - zp) x w_int is visited): not one integer differs."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq
    from quantfx.quant import functional as qf
    from quantfx.targets.torch_quantized import quantized_engine
    g = torch.Generator().manual_seed(1)
    channels, differ = 1024, 0
    with quantized_engine("onednn"):
        for trial in range(2):
            s_in = float(torch.rand(1, generator=g) * 0.05 + 0.005)
            s_out = float(torch.rand(1, generator=g) * 0.05 + 0.01)
            zp_in, zp_out = 128, int(torch.randint(0, 128, (1,), generator=g))
            w_scale = (torch.rand(channels, generator=g) * 0.02 + 0.001).double()
            w_int = torch.randint(-127, 128, (channels, 1), generator=g)
            b_int = torch.randint(-3000, 3000, (channels,), generator=g).double()
            shape = (channels, 1, 1, 1) if layer != "linear" else (channels, 1)
            qw = torch._make_per_channel_quantized_tensor(w_int.to(torch.int8).reshape(shape), w_scale,
                                                          torch.zeros(channels, dtype=torch.long), 0)
            acc_scale = (torch.tensor(s_in, dtype=torch.float32) * qw.q_per_channel_scales().float())
            bias = b_int.float() * acc_scale  # the float32 bias the lowering hands the engine
            module = {"conv": lambda: nnq.Conv2d(1, channels, 1), "conv_relu": lambda: nniq.ConvReLU2d(1, channels, 1),
                      "linear": lambda: nnq.Linear(1, channels)}[layer]()
            module.set_weight_bias(qw, bias)
            module.scale, module.zero_point = s_out, zp_out
            codes = torch.arange(256, dtype=torch.uint8)
            x = codes.reshape(1, 1, 16, 16) if layer != "linear" else codes.reshape(256, 1)
            y = module(torch._make_per_tensor_quantized_tensor(x, s_in, zp_in)).int_repr().double()
            y = y.reshape(channels, 256) if layer != "linear" else y.t()
            acc = (codes.double() - zp_in)[None, :] * w_int.double() + b_int[:, None]
            want = qf.requantize_bias_after(acc, acc_scale[:, None], b_int[:, None], torch.tensor(s_out),
                                            torch.tensor(float(zp_out)), 0, 255, relu=layer == "conv_relu")
            differ += int((want != y).sum())
    assert differ == 0


class WithFloatOps(nn.Module):
    """A conv followed by ops with no quantized kernel on the model's grids (tanh, a multiply, sigmoid)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.sig = nn.Sigmoid()
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = self.sig(y) * torch.tanh(y)
        return self.conv2(y)


def test_ops_without_quantized_kernel_fall_back_to_float_and_are_reported():
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    q = quantfx.quantize(WithFloatOps().eval(), "torch", calibration_data=data, progress=False)
    program = quantfx.lower(q, (data[0][:1],), format="torchscript")
    assert isinstance(program, TorchProgram)
    fallbacks = program.fallbacks()
    assert any("tanh" in r["op"] or "mul" in r["op"] for r in fallbacks), program.table()
    assert "float" in program.table()
    assert quantfx.verify(q, program, data[1]).max_error_lsb == 0.0


def test_bad_input_errors(tmp_path):
    q = quantfx.quantize(TEST_MODELS["lenet"][0]().eval(), "torch", progress=False)  # not calibrated
    with pytest.raises(CalibrationError, match="calibrate"):
        quantfx.lower(q, (example_input("lenet", batch=1),), format="torchscript")
    with pytest.raises(QuantArgumentError, match="engine"):
        torch_profile("avx9")
    calibrated = quantized("lenet")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="writable"):
        quantfx.export(calibrated, blocker / "sub" / "m.pt", (example_input("lenet", batch=1),), format="torchscript")
    foreign = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(foreign))
    with pytest.raises(ExportError, match="quantfx"):
        quantfx.verify(calibrated, foreign, example_input("lenet", batch=1))


def test_float_bias_gives_the_bias_integers_back():
    """fbgemm adds float32(b / (s_in x s_w)) to the accumulator: the lowering's b makes that quotient the bias
    integer wherever a float32 b can, and the report counts the channels where none can."""
    q = quantized("mobilenetv2")
    from quantfx.targets.torch_quantized import TorchLowering
    low = TorchLowering(q, (example_input("mobilenetv2", batch=1),))
    low.lower()
    checked = 0
    for node in q.graph.nodes:
        layer = q.get_submodule(node.target) if node.op == "call_module" else None
        if getattr(layer, "bias", None) is None or not hasattr(layer, "bias_quant") or node.name not in \
                {r["node"] for r in low.report if r["runs_as"].startswith("Conv")}:
            continue
        b, inexact, residual = low._float_bias(layer, node)
        ints, scale = low.bias_ints(layer, low.input_scale(node))
        s = scale.reshape(-1).float().expand(b.shape)
        exact = (b / s) == ints.reshape(-1).float()
        # where inexact, off by about an ulp of the integer
        assert int((~exact).sum()) == inexact and residual <= max(float(ints.abs().max()), 1.0) * 2 ** -21
        checked += 1
    assert checked >= 5


def test_file_packs_with_its_engine_whatever_the_process_engine(tmp_path):
    """Weights are packed when a file loads, by the engine in force; load_program sets the engine the file
    records (fbgemm: the same kernels and requantization on every x86 CPU), so a process that runs another
    engine (oneDNN, which PyTorch's 'x86' engine picks for convolutions on AVX512-VNNI CPUs) still gets the
    fake-quant model's integers."""
    q = quantized("unet")
    path = tmp_path / "unet.pt"
    quantfx.export(q, path, (example_input("unet", batch=1),), format="torchscript")
    x = example_input("unet", batch=4, seed=123)
    from quantfx.targets.torch_quantized import quantized_engine
    with quantized_engine("onednn"):
        program = load_program(path)
        assert torch.backends.quantized.engine == "onednn"
        assert quantfx.verify(q, program, x).max_error_lsb == 0.0


class TiedAdds(nn.Module):
    """t = x + x, u = t + t, cat([t, u]): the cat's shared grid is sized for u, exactly 4x x's grid, so t lands
    on rounding ties, which quantized::add rounds otherwise than the fake-quant model (found by the property
    tests: 2 LSB)."""

    def forward(self, x):
        t = x + x
        return torch.cat([t, t + t], 1)


def test_an_add_quantized_add_would_round_otherwise_runs_in_float():
    torch.manual_seed(3)
    data = [torch.randn(64, 3) for _ in range(3)]
    # float activation scales (the fbgemm profile): the 'x86' profile's power-of-two grids make no tie here
    q = quantfx.quantize(TiedAdds(), torch_profile("fbgemm"), calibration_data=data, progress=False)
    program = quantfx.lower(q, (data[0][:1],), format="torchscript")
    rows = {r["node"]: r for r in program.report}
    assert rows["add"]["how"] == "float" and "rounding ties" in rows["add"]["why"], program.table()
    assert rows["add_1"]["runs_as"] == "quantized::add"  # the check passes it: no pair of codes rounds otherwise
    for seed in range(3):
        x = torch.randn(256, 3, generator=torch.Generator().manual_seed(seed))
        assert quantfx.verify(q, program, x).max_error_lsb == 0.0


@pytest.mark.parametrize("signed, zero_point", [(False, 0), (False, 77), (False, 255), (True, 0), (True, -20)])
def test_input_quantization_rounds_as_the_fake_quant_model(signed, zero_point):
    """The lowered quantize (quantize_per_tensor of fl(k x s)) gives round-half-even(x / s) + zp, clamped, on
    rounding ties, their float32 neighbours, values far past the range and infinities, for scales that are and
    are not powers of two; quantize_per_tensor(x, s) itself rounds x * (1 / s) and parts from it at ties."""
    from quantfx.targets.torch_quantized import quantize_as_fake_quant
    lo, hi = (-128, 127) if signed else (0, 255)
    parted = 0
    for scale in (0.0173, 2.0 ** -5, 0.1, 3.7e-4):
        s = float(torch.tensor(scale, dtype=torch.float32))
        ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * s
        x = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1),
                       torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 200 * s,
                       torch.tensor([1e30, -1e30, math.inf, -math.inf])])
        want = torch.clamp(torch.round(x / s) + zero_point, lo, hi)
        got = quantize_as_fake_quant(x, s, zero_point, lo, hi, signed).int_repr().float()
        assert torch.equal(got, want), (scale, int((got != want).sum()))
        plain = torch.quantize_per_tensor(x[:-2], s, zero_point, torch.qint8 if signed else torch.quint8)
        parted += int((plain.int_repr().float() != want[:-2]).sum())
    assert parted > 0  # the plain kernel would not do


# -- the x86 profile: requantizations exact in float32 -----------------------------------------------------


def test_exact_requant_conditions():
    """exact_requant_problems passes a layer on the grid and names each way off it."""
    from quantfx.targets.torch_quantized import exact_requant_problems
    s_w = np.array([3 * 2.0 ** -9, 5 * 2.0 ** -10], dtype=np.float32)   # m = s_in s_w / s_out on 2^-15 multiples
    b, worst = np.array([100.0, -2000.0]), np.array([1e6, 2e6])
    assert exact_requant_problems(2.0 ** -6, s_w, 2.0 ** -3, 128, b, worst) == []
    assert "not a power of two" in exact_requant_problems(0.015, s_w, 2.0 ** -3, 128, b, worst)[0]
    assert "not a power of two" in exact_requant_problems(2.0 ** -6, s_w, 0.1, 128, b, worst)[0]
    assert "odd" in exact_requant_problems(2.0 ** -6, s_w, 2.0 ** -3, 127, b, worst)[0]
    off = np.array([3 * 2.0 ** -9, 0.0012345], dtype=np.float32)  # a float32 scale with 24 significant bits
    assert exact_requant_problems(2.0 ** -6, off, 2.0 ** -3, 128, b, worst)[0].startswith("channel 1: multiplier")
    big = np.array([100.0, 2.0 ** 23])
    assert "bias integer" in exact_requant_problems(2.0 ** -6, s_w, 2.0 ** -3, 128, big, worst)[0]
    assert "worst-case" in exact_requant_problems(2.0 ** -6, s_w, 2.0 ** -3, 128, b, np.array([1e6, 1e12]))[0]


def test_x86_profile_grids_after_calibration():
    """After calibration every fused layer of an x86 model has power-of-two input and output scales, an even
    output zero point and its weight scale on the step that puts the multiplier on the 2^-15 grid: the lowering
    finds no problem on any layer and fuses all of them (no 'requantize in float' in the report)."""
    from quantfx.graph import module_of
    from quantfx.targets.torch_quantized import GRID_EXP
    q = quantized("resnet")
    program = quantfx.lower(q, (example_input("resnet", batch=1),), format="torchscript")
    assert not [r for r in program.report if r["runs_as"] == "requantize in float"], program.table()
    steps = 0
    for node in q.graph.nodes:
        layer = module_of(q, node) if node.op == "call_module" else None
        step = getattr(getattr(layer, "weight_quant", None), "scale_step", None)
        if step is None:
            continue
        steps += 1
        s_w = layer.weight_quant.scale(layer.weight).reshape(-1).double()
        user = next(iter(node.users))
        if user.op == "call_function":  # a residual add reading the layer's float output: its quantizer after
            user = next(iter(user.users))
        act = module_of(q, user).act_quant
        s_in, s_out = float(qmeta(node.args[0]).scale), float(act.scale(None))
        assert is_power_of_two(s_in) and is_power_of_two(s_out) and int(act.zero_point(None)) % 2 == 0
        m = s_w * s_in / s_out
        assert torch.equal(m / 2.0 ** GRID_EXP, torch.round(m / 2.0 ** GRID_EXP)), node.name
    assert steps >= 5


def test_relu6_on_a_power_of_two_grid_is_a_quantized_clamp():
    """A ReLU6 whose power-of-two grid passes 6 (6 / scale a code): the layer runs as ConvReLU2d plus a
    quantized clamp at 6, at 0 LSB, instead of an exact float64 convolution."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.act = nn.ReLU6()

        def forward(self, x):
            return self.act(self.conv(x))

    torch.manual_seed(0)
    data = [4 * torch.randn(2, 3, 8, 8) for _ in range(3)]
    q = quantfx.quantize(Net().eval(), "torch", calibration_data=data, progress=False)
    program = quantfx.lower(q, (data[0][:1],), format="torchscript")
    rows = {r["node"]: r for r in program.report}
    assert rows["conv"]["runs_as"] == "ConvReLU2d", program.table()
    scale = float(next(m for n, m in q.named_modules() if hasattr(m, "max_val")).act_quant.scale(None))
    assert 255 * scale > 6.0, "the grid must pass 6 for this test"
    for seed in range(3):
        x = 4 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        assert quantfx.verify(q, program, x).max_error_lsb == 0.0
        with torch.no_grad():
            assert float(q(x).max()) == 6.0


def test_a_layer_off_the_exact_grid_runs_on_its_exact_accumulator(tmp_path):
    """A weight scale taken off the grid (as a state dict loaded into a model that was never calibrated would
    leave it): the lowering finds the layer's multiplier off the 2^-15 grid, runs it on its exact accumulator
    with the requantization in ATen float ops and says so in the report; the file still gives the fake-quant
    model's integers whether oneDNN or fbgemm packs the rest."""
    from quantfx.graph import module_of
    from quantfx.targets.torch_quantized import quantized_engine
    q = quantized("lenet")
    node = next(n for n in q.graph.nodes if n.op == "call_module" and
                getattr(getattr(module_of(q, n), "weight_quant", None), "scale_step", None) is not None)
    wq = module_of(q, node).weight_quant
    wq.scale_step = wq.spec_fields["scale_step"] = None
    quantfx.annotate(q)
    x = example_input("lenet", batch=4, seed=7)
    path = tmp_path / "lenet.pt"
    program = quantfx.export(q, path, (x[:1],), format="torchscript")
    act = next(iter(node.users)).name
    rows = {r["node"]: r for r in program.report}
    assert rows[act]["runs_as"] == "requantize in float" and "2^-15 multiplier grid" in rows[act]["why"], \
        program.table()
    assert quantfx.verify(q, path, x).max_error_lsb == 0.0
    with torch.no_grad():
        want = q(x)
    for lib in ("fbgemm", "onednn"):
        with quantized_engine(lib), torch.no_grad():
            assert torch.equal(torch.jit.load(str(path))(x), want), lib
