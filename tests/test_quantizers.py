"""Quantizers: ready-made specs, overrides, integer ranges, rounding, power-of-two and per-channel scales,
statistics, calibration, straight-through gradients and argument errors."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantfx
from quantfx.nn import QuantConv2d, QuantConvTranspose2d, QuantIdentity, QuantLinear, QuantReLU
from quantfx.quant import (
    Int8ActPerTensorFixedPoint, Int8ActPerTensorFloat, Int8Bias, Int8BiasPerTensorFixedPointInternalScaling,
    Int8BiasPerTensorFloatInternalScaling, Int8WeightPerChannelFloat, Int8WeightPerTensorFixedPoint,
    Int8WeightPerTensorFloat, Int16Bias, Int32Bias, QuantSpec, Quantizer, Uint8ActPerTensorFixedPoint,
    Uint8ActPerTensorFloat, Uint8ActPerTensorFloatAsym,
)

SPECS = {
    Int8WeightPerTensorFloat: dict(kind="weight", bit_width=8, signed=True, scale_type="float",
                                   scaling_per_output_channel=False),
    Int8WeightPerChannelFloat: dict(kind="weight", bit_width=8, scaling_per_output_channel=True),
    Int8WeightPerTensorFixedPoint: dict(kind="weight", bit_width=8, scale_type="po2"),
    Int8ActPerTensorFloat: dict(kind="act", bit_width=8, signed=True, scale_type="float"),
    Uint8ActPerTensorFloat: dict(kind="act", bit_width=8, signed=False),
    Int8ActPerTensorFixedPoint: dict(kind="act", signed=True, scale_type="po2"),
    Uint8ActPerTensorFixedPoint: dict(kind="act", signed=False, scale_type="po2"),
    Int8Bias: dict(kind="bias", bit_width=8, bias_scaling="external"),
    Int16Bias: dict(kind="bias", bit_width=16, bias_scaling="external"),
    Int32Bias: dict(kind="bias", bit_width=32, bias_scaling="external"),
    Int8BiasPerTensorFloatInternalScaling: dict(kind="bias", bit_width=8, bias_scaling="internal",
                                                scale_type="float"),
    Int8BiasPerTensorFixedPointInternalScaling: dict(kind="bias", bias_scaling="internal", scale_type="po2"),
}


@pytest.mark.parametrize("spec", list(SPECS), ids=lambda s: s.__name__)
def test_ready_made_specs(spec):
    q = Quantizer(spec)
    for field, value in SPECS[spec].items():
        assert getattr(q, field) == value, field


def test_spec_subclass_and_keyword_overrides():
    class MyWeightQuant(Int8WeightPerTensorFloat):
        bit_width = 4

    conv = QuantConv2d(2, 3, 3, weight_quant=MyWeightQuant)
    assert conv.weight_quant.bit_width == 4 and conv.int_weight().abs().max() == 7
    conv = QuantConv2d(2, 3, 3, weight_quant=MyWeightQuant, weight_bit_width=6)  # the keyword wins
    assert conv.weight_quant.bit_width == 6 and conv.int_weight().abs().max() == 31
    conv = QuantConv2d(2, 5, 3, weight_scaling_per_output_channel=True)
    assert conv.quant_weight_scale().shape == (5,)
    assert QuantReLU(bit_width=4).act_quant.bit_width == 4
    assert QuantIdentity(bit_width=3).act_quant.bit_width == 3


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 16), signed=st.booleans(), narrow=st.booleans(), seed=st.integers(0, 10_000),
       spread=st.floats(0.01, 100.0))
def test_ints_in_range_and_affine_invariant(bits, signed, narrow, seed, spread):
    q = Quantizer(Int8ActPerTensorFloat, bit_width=bits, signed=signed, narrow_range=narrow)
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * spread
    q(x)  # training mode: statistics from x
    q.eval()  # then fixed
    qt = q.quant_tensor(x)
    ints = q.int_repr(x)
    qmin, qmax = q.int_range()
    assert int(ints.min()) >= qmin and int(ints.max()) <= qmax
    assert qmin == (-(2 ** (bits - 1)) + int(narrow) if signed else 0)
    assert qmax == (2 ** (bits - 1) - 1 if signed else 2 ** bits - 1 - int(narrow))
    assert torch.equal(qt.value, (ints.float() - qt.zero_point) * qt.scale)  # bit for bit
    assert qt.is_valid


def test_one_bit_is_bipolar():
    q = Quantizer(Int8WeightPerTensorFloat, bit_width=1)
    w = torch.randn(4, 3, 3, 3)
    y = q(w)
    values = torch.unique(y)
    assert values.numel() == 2 and torch.allclose(values[0], -values[1])
    assert torch.equal(torch.sign(y), torch.where(w >= 0, 1.0, -1.0))
    assert float(values[1]) == pytest.approx(float(w.abs().mean()))


@pytest.mark.parametrize("rounding, expected", [
    ("half_even", [0, 2, -0, 2, -2]), ("half_up", [1, 2, 0, 3, -1]), ("floor", [0, 1, -1, 2, -2]),
])
def test_rounding_modes(rounding, expected):
    q = Quantizer(Int8ActPerTensorFloat, fixed_scale=1.0, rounding=rounding)
    x = torch.tensor([0.5, 1.5, -0.5, 2.5, -1.5])
    assert q.int_repr(x).tolist() == expected


@pytest.mark.parametrize("spec", [Int8WeightPerTensorFixedPoint, Int8ActPerTensorFixedPoint,
                                  Uint8ActPerTensorFixedPoint, Int8BiasPerTensorFixedPointInternalScaling])
def test_power_of_two_scales_are_exact(spec):
    q = Quantizer(spec)
    x = torch.randn(8, 4) * 3.7 + (0.5 if not q.signed else 0)
    q.train()
    scale = q.scale(x)
    log = math.log2(float(scale))
    assert log == int(log)
    # rounded up: the largest value is not clipped by more than one step
    qmax = q.int_range()[1]
    assert float(scale) * qmax >= float(x.abs().max() if q.signed else x.max()) - 1e-6


def test_per_channel_scale_shapes():
    conv = QuantConv2d(3, 6, 3, weight_quant=Int8WeightPerChannelFloat)
    scale = conv.quant_weight_scale()
    assert scale.shape == (6,)
    assert torch.allclose(scale, conv.weight.detach().abs().amax((1, 2, 3)) / 127)
    assert conv.quant_weight().scale.shape == (6, 1, 1, 1)
    deconv = QuantConvTranspose2d(3, 5, 2, weight_quant=Int8WeightPerChannelFloat)
    assert deconv.quant_weight_scale().shape == (5,)  # output channels live on weight axis 1
    assert torch.allclose(deconv.quant_weight_scale(), deconv.weight.detach().abs().amax((0, 2, 3)) / 127)
    lin = QuantLinear(7, 4, weight_quant=Int8WeightPerChannelFloat)
    assert lin.quant_weight_scale().shape == (4,)


def test_asymmetric_unsigned_zero_point():
    q = Quantizer(Uint8ActPerTensorFloatAsym)
    x = torch.linspace(-1.0, 3.0, 101)
    q.train()
    scale, zp = q.qparams(x)
    assert float(scale) == pytest.approx(4.0 / 255)
    assert float(zp) == round(1.0 / (4.0 / 255)) and float(zp) == int(float(zp))
    ints = q.int_repr(x)
    assert int(ints.min()) == 0 and int(ints.max()) == 255


def test_percentile_and_mse_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g)
    x[0] = 50.0  # an outlier
    scales = {}
    for stat in ("max", "percentile", "mse"):
        q = Quantizer(Int8ActPerTensorFloat, scale_stat=stat, bit_width=4)
        q.train()
        scales[stat] = float(q.scale(x))
    assert scales["percentile"] < scales["max"] and scales["mse"] < scales["max"]
    errors = {}
    for stat in ("max", "mse"):
        q = Quantizer(Int8ActPerTensorFloat, scale_stat=stat, bit_width=4)
        q.train()
        errors[stat] = float((q(x) - x).pow(2).mean())
    assert errors["mse"] < errors["max"] / 4  # measured: 0.236 vs 1.000


def test_calibration_uses_every_batch():
    q = Quantizer(Int8ActPerTensorFloat)
    q.eval()
    batches = [torch.randn(32) * s for s in (1.0, 3.0, 2.0)]
    q.begin_calibration("max")
    for b in batches:
        assert torch.equal(q(b), b)  # observing passes values through
    q.end_calibration()
    assert q.is_calibrated
    peak = max(float(b.abs().max()) for b in batches)
    assert float(q.scale()) == pytest.approx(peak / 127)


def test_uncalibrated_act_quantizer_names_itself():
    q = Quantizer(Int8ActPerTensorFloat, name="relu7.act_quant")
    q.eval()
    assert not q.is_calibrated
    with pytest.raises(quantfx.CalibrationError, match="relu7.act_quant never saw data"):
        q.scale()


def test_ste_gradients_reach_weights_inputs_and_learned_scale():
    conv = QuantConv2d(2, 3, 3, input_quant=Int8ActPerTensorFloat, input_learned_scale=True)
    x = torch.randn(4, 2, 6, 6, requires_grad=True)
    conv(x).pow(2).sum().backward()
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    param = conv.input_quant.scale_param
    assert param.grad is not None and float(param.grad.abs()) > 0
    before = float(param)
    opt = torch.optim.SGD([param], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        conv(x).pow(2).sum().backward()
        opt.step()
    assert float(param) != before


@pytest.mark.parametrize("kwargs, message", [
    (dict(bit_width=0), "bit_width=0 is not allowed; use an integer from 1 to 32"),
    (dict(bit_width=33), "bit_width=33 is not allowed; use an integer from 1 to 32"),
    (dict(rounding="stochastic"), "rounding='stochastic' is not allowed; use one of 'half_even', 'half_up', 'floor'"),
    (dict(fixed_scale=0.0), "fixed_scale=0.0 is not allowed; a fixed scale must be a positive number"),
    (dict(fixed_scale=-1.0), "fixed_scale=-1.0 is not allowed"),
    (dict(scale_type="log"), "scale_type='log' is not allowed; use one of 'float', 'po2'"),
    (dict(colour="red"), "unknown quantizer argument"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        Quantizer(Int8ActPerTensorFloat, **kwargs)
    assert isinstance(e.value, quantfx.QuantFXError)


def test_per_channel_on_a_0d_tensor_is_an_error():
    q = Quantizer(Int8WeightPerChannelFloat)
    with pytest.raises(quantfx.QuantArgumentError, match="scaling_per_output_channel=True needs a tensor"):
        q(torch.tensor(1.0))


def test_bad_layer_keyword():
    with pytest.raises(quantfx.QuantArgumentError, match="unknown argument 'weight_colour'"):
        QuantConv2d(2, 3, 3, weight_colour=1)


def test_quant_spec_defaults_are_a_plain_class():
    assert QuantSpec.bit_width == 8 and not hasattr(QuantSpec, "__dataclass_fields__")
