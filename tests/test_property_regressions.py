"""Failures the property tests (tests/test_properties.py) found, shrunk to named models and kept as tests."""
import warnings

import pytest
import torch
from torch import nn

import quantfx
from quantfx.targets import torch_profile
from quantfx.lowering import BACKENDS

from property_harness import BATCH, CALIB_BATCHES, compile_export_verify
from property_models import ModelSpec, Step, build, inputs


def verified(model, target, shape, tmp_path, **kwargs):
    """quantize -> export (file) -> verify on fresh inputs; the report."""
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(shape, generator=g) for _ in range(2)]
    x = torch.randn(shape, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantfx.quantize(model, target, calibration_data=calib, progress=False, **kwargs)
        path = tmp_path / f"model{BACKENDS[target].suffix}"
        quantfx.export(q, path, example_inputs=(calib[0][:1],))
        return quantfx.verify(q, path, (x,))


# Shrunk by hypothesis (seed 0 weights; calibration and test inputs from property_harness): conv, add back;
# that sum added to itself; a conv + ReLU6 added back. The ReLU6 shares its scale with the signed sum (a scale
# group), so its clip at 6 stays on the grid and conv2 runs in float on the integers of the signed, zero-pointed
# input. The torch lowering subtracted the zero point from ``int_repr()`` in uint8, so codes below the zero point
# wrapped around (90 LSB off at the output).
SIGNED_INPUT_TO_FLOAT_CONV = ModelSpec(
    input_shape=(1, 3),
    steps=(Step("residual", (0,), (("k", 1), ("act", None), ("bias", False))),
           Step("add", (1, 1), (("how", "op"),)),
           Step("residual", (2,), (("k", 1), ("act", "relu6"), ("bias", False)))),
    outputs=(3,), seed=0)


@pytest.mark.parametrize("target", ["torch", "onnx", "finn"])
def test_float_conv_on_signed_integers_subtracts_the_zero_point_without_wrapping(target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, report = compile_export_verify(SIGNED_INPUT_TO_FLOAT_CONV, target)
    assert outcome == "ok" and report.max_error_lsb == 0.0, str(report)
    if target == "torch":  # the path under test: the conv in float on the input's integers (the fbgemm
        # profile's float grid, where the ReLU6's 6 is no code; the x86 profile's power-of-two grid fuses it)
        spec = SIGNED_INPUT_TO_FLOAT_CONV
        q = quantfx.quantize(build(spec), torch_profile("fbgemm"), progress=False,
                             calibration_data=[inputs(spec, 2, seed=10 + i) for i in range(2)])
        program = quantfx.lower(q, (inputs(spec, 1, seed=10),))
        assert [r["runs_as"] for r in program.report if r["node"] == "residual_2_0"] == ["float Conv1d on integers"]
        assert quantfx.verify(q, program, inputs(spec, 4, seed=99)).max_error_lsb == 0.0


class AddToItself(nn.Module):
    """Shrunk: ``x + x``. The finn file's Add read one tensor twice; qonnx's cleanup_model (and FINN's frontend)
    renames only the first use, and execute_onnx stopped with a bare ``Exception: Found unspecified tensor
    shapes``."""

    def forward(self, x):
        return x + x


class CatWithItself(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return torch.cat([y, y], 1)


@pytest.mark.parametrize("target", ["finn", "onnx", "torch"])
@pytest.mark.parametrize("model", [AddToItself, CatWithItself])
def test_a_node_reading_one_tensor_twice(model, target, tmp_path):
    torch.manual_seed(0)
    report = verified(model().eval(), target, (2, 2, 3, 3), tmp_path)
    assert report.ok and report.max_error_lsb <= 1.0, str(report)


def padded_conv(dim: int, act: nn.Module) -> nn.Module:
    """Shrunk: conv, activation, a ZeroPad module, conv. onnx and finn had no lowering for ZeroPad1d/2d modules
    (only for F.pad), though zero padding is quantization-invariant; the torch lowering runs the pad in float, and
    the conv after it then failed with ``KeyError`` inside export (its accumulator was never built)."""
    conv, pad = ((nn.Conv1d, nn.ZeroPad1d((0, 2))), (nn.Conv2d, nn.ZeroPad2d((1, 0, 0, 1))))[dim - 1]
    torch.manual_seed(0)
    return nn.Sequential(conv(2, 3, 1), act, pad, conv(3, 2, 1)).eval()


@pytest.mark.parametrize("target", ["onnx", "finn", "torch"])
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Identity])
def test_zero_pad_module_before_a_conv(target, dim, act, tmp_path):
    report = verified(padded_conv(dim, act()), target, (2, 2, 5) if dim == 1 else (2, 2, 3, 3), tmp_path)
    assert report.ok and report.max_error_lsb == 0.0, str(report)


def grouped_transposed(groups: int, cout: int) -> nn.Module:
    """Shrunk: a grouped ConvTranspose2d with more than one output channel per group. Its weight is
    (in, out / groups, k, k): onnx and torch quantized it per index of axis 1, a scale shared by ``groups`` output
    channels, and export crashed building the per-output-channel accumulator scale (``RuntimeError: The size of
    tensor a (4) must match the size of tensor b (2)``, wrapped in an ExportError). Such a layer is now quantized
    per tensor."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 1), nn.ConvTranspose2d(4, cout, 2, 2, groups=groups), nn.ReLU(),
                         nn.Conv2d(cout, 2, 1)).eval()


@pytest.mark.parametrize("target", ["onnx", "finn", "torch"])
@pytest.mark.parametrize("groups, cout", [(2, 4), (4, 8), (2, 2), (1, 4)])
def test_grouped_transposed_conv(target, groups, cout, tmp_path):
    model = grouped_transposed(groups, cout)
    report = verified(model, target, (2, 2, 3, 3), tmp_path)
    assert report.ok and report.max_error_lsb == 0.0, str(report)
    q = quantfx.quantize(model, target, calibration_data=[torch.randn(2, 2, 3, 3)], progress=False)
    per_channel = q.get_submodule("1").weight_quant.scaling_per_output_channel
    # per channel where axis 1 enumerates the output channels (or the target's weights are per tensor anyway)
    assert per_channel == (q.profile.weight_quant.scaling_per_output_channel and (groups == 1 or cout == groups))


class UnevenAdaptivePool(nn.Module):
    """Shrunk: an adaptive average pool 6x3 -> 2x2 (windows of two sizes) on finn, whose profile pools in
    integers. It was swapped for a truncating QuantAdaptiveAvgPool2d that refuses uneven windows only when it
    runs with a scale, so the calibrated fake-quant model raised in eval and export leaked torch.fx's bare
    ``RuntimeError: ShapeProp error``. It now stays a float pool: the fake-quant model runs, and a target that has
    no float lowering for it refuses it naming the node."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(x))


@pytest.mark.parametrize("target", ["finn", "onnx", "torch"])
def test_uneven_adaptive_average_pool(target, tmp_path):
    torch.manual_seed(0)
    model = UnevenAdaptivePool().eval()
    x = torch.randn(2, 2, 6, 3)
    q = quantfx.quantize(model, target, calibration_data=[x], progress=False)
    with torch.no_grad():
        assert q(x).shape == (2, 2, 2, 2)  # the fake-quant model runs
    if target == "torch":  # average pooling runs in float there
        report = verified(model, target, (2, 2, 6, 3), tmp_path)
        assert report.ok and report.max_error_lsb == 0.0, str(report)
        return
    with pytest.raises(quantfx.QuantFXError, match=r"\bpool\b.*uneven windows"):
        verified(model, target, (2, 2, 6, 3), tmp_path)


def test_an_error_a_node_raises_while_shapes_propagate_names_the_node():
    """A QuantFXError raised by a module while export propagates shapes comes out naming the
    node (torch.fx's ShapeProp wraps it in a bare RuntimeError). An even adaptive pool, quantized in integers,
    handed inputs of another size at export."""
    torch.manual_seed(0)
    model = UnevenAdaptivePool().eval()
    q = quantfx.quantize(model, "finn", calibration_data=[torch.randn(2, 2, 4, 4)], progress=False)
    with pytest.raises(quantfx.QuantFXError, match=r"node pool: .*not a multiple"):
        quantfx.lower(q, (torch.randn(1, 2, 6, 3),))


# Shrunk by hypothesis (seed 3 inputs from property_harness): t = x + x; u = t + t; cat([t, u]). The cat puts t's
# and u's requantizers on one grid, sized for u: its scale is exactly 4x x's, so t = 2x lands on rounding ties
# (x = 49 steps -> 24.5 output steps). The fake-quant model rounds them half to even; PyTorch's quantized::add
# dequantizes with a fused multiply-add and multiplies by float32(1 / scale) before rounding, so some ties go the
# other way: 1 LSB at t, 2 LSB after u = t + t. The torch lowering now runs quantized::add on every pair of input
# codes first and keeps an add that would round otherwise in float (tests/test_torch_backend.py).
TIED_ADDS = ModelSpec(
    input_shape=(1, 3),
    steps=(Step("add", (0, 0), (("how", "torch"),)), Step("add", (1, 1), (("how", "torch"),)),
           Step("cat", (1, 2))),
    outputs=(3,), seed=3)


@pytest.mark.parametrize("target", [
    "torch",  # was 2 LSB: the torch lowering now checks quantized::add on every pair of codes, runs this one in float
    "onnx", "finn"])
def test_adds_whose_output_grid_is_a_power_of_two_times_the_input_grid(target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, report = compile_export_verify(TIED_ADDS, target)
    assert outcome == "ok" and report.max_error_lsb <= 1.0, str(report)


# Found by the long run (QUANTFX_LONG_PROPERTIES=1), seed 0 inputs from property_harness: t = relu(x + x);
# r = conv1x1(x) + x; relu(cat(...)). 2 LSB at the output. On onnx every activation agreed to the bit when the
# file ran with its intermediate values exposed (run_onnx_intermediates): the difference came from onnxruntime's
# DoubleQDQPairsRemover, which rewrites Q1 -> DQ1 -> Q2 -> DQ2 (the ReLU's grid, then the cat's) as one pair of
# a third scale (targets/onnx_steps.py, GuardDoubleQDQ). On torch the first node off is the final ReLU quantizer (act_4, 2 LSB),
# which requantizes the cat's grid (scale 0.0512, zero point 51) in float while every input of it agrees; the
# ReLU before the cat (act_1) has exactly the same scale, 0.030644554644823074. Not isolated either.
_RELU = (("act", "relu"), ("functional", False))


def _relu_add_cat(shape, cat):
    return ModelSpec(input_shape=shape, steps=(
        Step("add", (0, 0), (("how", "op"),)), Step("act", (1,), _RELU),
        Step("residual", (0,), (("k", 1), ("act", None), ("bias", False))), Step("cat", cat), Step("act", (4,), _RELU)),
        outputs=(5,), seed=0)


@pytest.mark.parametrize("target, spec", [
    # was 2 LSB in onnxruntime's optimised session: its DoubleQDQPairsRemover merged the ReLU's Q/DQ and the
    # cat grid's requantizing Q/DQ into one pair of a third scale; the lowering now puts a Clip between them
    ("onnx", _relu_add_cat((2, 4), (3, 2))),
    ("torch", _relu_add_cat((1, 3), (1, 3))),  # was 2 LSB: a tied quantized::add, now run in float
    ("finn", _relu_add_cat((2, 4), (3, 2))), ("finn", _relu_add_cat((1, 3), (1, 3))),
    ("torch", _relu_add_cat((2, 4), (3, 2))), ("onnx", _relu_add_cat((1, 3), (1, 3)))])
def test_relu_of_a_cat_of_a_residual_add_and_a_doubled_input(target, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, report = compile_export_verify(spec, target)
    assert outcome == "ok" and report.max_error_lsb <= 1.0, str(report)


def test_requantizer_of_a_quantizer_keeps_its_two_roundings_in_onnxruntime(monkeypatch):
    """The ReLU's grid requantized onto the cat's: the file holds a Clip to the first grid's range between the
    two Q/DQ pairs, and verifies at 0 LSB in onnxruntime's optimised session; without that Clip onnxruntime's
    DoubleQDQPairsRemover merges the pairs into one of a third scale and the output moves."""
    from quantfx.targets.onnx_qdq import QDQLowering
    from quantfx.targets.onnx_steps import GuardDoubleQDQ
    spec = _relu_add_cat((2, 4), (3, 2))
    model = build(spec)
    calib = [inputs(spec, BATCH, seed=spec.seed + 10 + i) for i in range(CALIB_BATCHES)]
    x = inputs(spec, BATCH, seed=spec.seed + 99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantfx.quantize(model, "onnx", calibration_data=calib, progress=False)
        guarded = quantfx.lower(q, (calib[0][:1],))
        assert [n.op_type for n in guarded.graph.node if n.name.endswith("_grid_Clip")] == ["Clip"]
        assert quantfx.verify(q, guarded, (x,)).max_error_lsb == 0.0
        monkeypatch.setattr(QDQLowering, "steps", tuple(s for s in QDQLowering.steps
                                                        if not isinstance(s, GuardDoubleQDQ)))
        bare = quantfx.lower(q, (calib[0][:1],))
        assert quantfx.verify(q, bare, (x,)).max_error_lsb >= 1.0
