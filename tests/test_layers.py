"""Quantized layers: float equivalence when disabled, float state_dict loading, quantizer state round trips,
activation grids, truncating average pools, and QuantTensor propagation through invariant ops."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantfx import QuantTensor
from quantfx.quant import Int8ActPerTensorFloat, Int8Bias, Int8WeightPerChannelFloat, Quantizer
from quantfx.nn import (
    QuantAdaptiveAvgPool2d, QuantAvgPool2d, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d,
    QuantConvTranspose2d, QuantHardTanh, QuantIdentity, QuantLinear, QuantReLU, QuantSigmoid,
)
import quantfx

# float(t) of a tensor that requires grad (a learned scale) warns once per process; the value is what we assert
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

PAIRS = [
    (QuantConv1d, nn.Conv1d, (4, 6, 3), (2, 4, 10)),
    (QuantConv2d, nn.Conv2d, (4, 6, 3), (2, 4, 8, 8)),
    (QuantConv3d, nn.Conv3d, (4, 6, 3), (2, 4, 5, 5, 5)),
    (QuantConvTranspose1d, nn.ConvTranspose1d, (4, 6, 3), (2, 4, 10)),
    (QuantConvTranspose2d, nn.ConvTranspose2d, (4, 6, 3), (2, 4, 8, 8)),
    (QuantLinear, nn.Linear, (12, 5), (3, 12)),
]


@pytest.mark.parametrize("qcls, fcls, args, shape", PAIRS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("bias", [True, False])
def test_disabled_equals_float_twin_bit_for_bit(qcls, fcls, args, shape, bias):
    torch.manual_seed(0)
    q = qcls(*args, bias=bias, weight_quant=None, bias_quant=None, input_quant=None, output_quant=None,
             return_quant_tensor=True)
    torch.manual_seed(0)
    f = fcls(*args, bias=bias)
    assert all(not getattr(q, f"{s}_quant").is_quant_enabled for s in ("weight", "bias", "input", "output"))
    assert torch.equal(q.weight, f.weight)
    x = torch.randn(shape)
    out = q(x)
    assert type(out) is torch.Tensor and torch.equal(out, f(x))
    # a QuantTensor input is used by value
    qx = QuantTensor(x, 1.0, 0.0, 32, True)
    assert torch.equal(q(qx), f(x))


@pytest.mark.parametrize("qcls, fcls, kwargs, shape", [
    (QuantConv2d, nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=1,
                                  groups=2, padding_mode="reflect"), (2, 4, 9, 9)),
    (QuantConv1d, nn.Conv1d, dict(in_channels=4, out_channels=4, kernel_size=3, dilation=2, groups=4), (2, 4, 12)),
    (QuantConvTranspose2d, nn.ConvTranspose2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2,
                                                    padding=1, output_padding=1, groups=2), (2, 4, 5, 5)),
], ids=["conv2d", "conv1d", "deconv2d"])
def test_disabled_equals_float_twin_with_conv_options(qcls, fcls, kwargs, shape):
    torch.manual_seed(0)
    q = qcls(**kwargs, weight_quant=None)
    torch.manual_seed(0)
    f = fcls(**kwargs)
    x = torch.randn(shape)
    assert torch.equal(q(x), f(x))


@pytest.mark.parametrize("qcls, fcls, args, shape", PAIRS, ids=lambda v: getattr(v, "__name__", ""))
def test_loads_a_float_state_dict(qcls, fcls, args, shape):
    f = fcls(*args)
    q = qcls(*args, input_quant=Int8ActPerTensorFloat, input_learned_scale=True, output_quant=Int8ActPerTensorFloat)
    # strict=True: a float layer's state dict has no quantizer state, and the quantizers keep their own
    missing, unexpected = q.load_state_dict(f.state_dict())
    assert (missing, unexpected) == ([], [])
    assert torch.equal(q.weight, f.weight) and torch.equal(q.bias, f.bias)
    x = torch.randn(shape)
    assert torch.equal(q.quant_weight().value, q.weight_quant(f.weight)) and q(x).shape == f(x).shape
    step = float(q.quant_weight_scale())
    # quantized weights are within half a step of the float ones
    assert float((q.quant_weight().value - f.weight).detach().abs().max()) <= step / 2 + 1e-7


def test_float_state_dict_keeps_the_quantizer_state_and_partial_quantizer_state_is_an_error():
    torch.manual_seed(0)
    q = QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat)
    q(torch.randn(2, 3, 6, 6) * 3)  # calibrates the input quantizer in training mode
    stat = q.input_quant.stat.clone()
    f = nn.Conv2d(3, 4, 3)
    q.load_state_dict(f.state_dict())
    assert torch.equal(q.input_quant.stat, stat) and q.input_quant.is_calibrated
    assert torch.equal(q.weight, f.weight)
    # a quantized state dict missing part of a quantizer's state, or the weight, is refused under strict=True
    state = q.state_dict()
    del state["input_quant.calibrated"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "input_quant.calibrated"'):
        QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat).load_state_dict(state)
    state = q.state_dict()
    del state["weight"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "weight"'):
        QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat).load_state_dict(state)
    # a float state dict into a sequence of quantized layers
    fseq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    qseq = nn.Sequential(QuantConv2d(3, 4, 3), QuantReLU(), nn.Flatten(), QuantLinear(16, 2))
    assert qseq.load_state_dict(fseq.state_dict()) is not None
    assert torch.equal(qseq[3].weight, fseq[3].weight)


def test_quantizer_state_round_trips():
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, input_quant=quantfx.quant.Int8ActPerTensorFloat, input_learned_scale=True)
    act = QuantReLU()
    for _ in range(3):
        act(conv(torch.randn(2, 3, 8, 8)))  # training mode: statistics and learned scale initialised
    conv.eval(), act.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = act(conv(x))
    state = {**{f"conv.{k}": v for k, v in conv.state_dict().items()},
             **{f"act.{k}": v for k, v in act.state_dict().items()}}
    assert "conv.input_quant.scale_param" in state and "act.act_quant.stat" in state
    conv2, act2 = QuantConv2d(3, 4, 3, input_quant=quantfx.quant.Int8ActPerTensorFloat,
                              input_learned_scale=True), QuantReLU()
    conv2.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("conv.")})
    act2.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("act.")})
    conv2.eval(), act2.eval()
    assert torch.equal(act2(conv2(x)), expected)
    buffer = io.BytesIO()
    torch.save(nn.Sequential(conv, act), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), expected)
    assert torch.equal(loaded[0].input_quant.scale_param, conv.input_quant.scale_param)
    assert torch.equal(loaded[1].act_quant.stat, act.act_quant.stat)


def test_calibrated_state_round_trips():
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat, output_quant=Int8ActPerTensorFloat,
                       input_scale_stat="percentile", bias_quant=Int8Bias)
    conv.eval()
    for q in (conv.input_quant, conv.output_quant):
        q.begin_calibration()
    for _ in range(3):
        conv(torch.randn(2, 3, 8, 8))
    for q in (conv.input_quant, conv.output_quant):
        q.end_calibration()
    assert conv.input_quant.is_calibrated and conv.output_quant.is_calibrated
    x = torch.randn(2, 3, 8, 8)
    expected = conv(x)
    fresh = QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat, output_quant=Int8ActPerTensorFloat,
                        input_scale_stat="percentile", bias_quant=Int8Bias).eval()
    assert not fresh.input_quant.is_calibrated
    fresh.load_state_dict(conv.state_dict())
    assert fresh.input_quant.is_calibrated and torch.equal(fresh(x), expected)
    assert torch.equal(fresh.input_quant.scale(), conv.input_quant.scale())
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)


def test_eager_calibration_with_an_external_bias():
    # while the input quantizer observes, values (and the input-scaled bias) stay float
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat, bias_quant=Int8Bias, return_quant_tensor=True)
    conv.eval()
    conv.input_quant.begin_calibration()
    x = torch.randn(2, 3, 6, 6)
    observed = conv(x)
    conv.input_quant.end_calibration()
    assert torch.equal(observed, F.conv2d(x, conv.quant_weight().value, conv.bias))
    out = conv(x)
    assert out.is_valid and out.bit_width == 22
    assert float(conv.input_quant.scale()) == pytest.approx(float(x.abs().max()) / 127)


@pytest.mark.parametrize("cls, signed, check", [
    (QuantReLU, False, lambda x, y: bool((y >= 0).all())),
    (QuantSigmoid, False, lambda x, y: bool((y >= 0).all() and (y <= 1).all())),
    (QuantHardTanh, True, lambda x, y: bool((y >= -1).all() and (y <= 1).all())),
    (QuantIdentity, True, lambda x, y: True),
])
def test_activation_outputs_lie_on_their_grid(cls, signed, check):
    torch.manual_seed(0)
    layer = cls(return_quant_tensor=True)
    x = torch.randn(4, 8) * 3
    qt = layer(x)
    assert qt.signed is signed and qt.bit_width == 8 and qt.is_valid and check(x, qt.value)
    assert float(qt.zero_point) == 0.0
    ints = qt.int()
    qmin, qmax = (-128, 127) if signed else (0, 255)
    assert qmin <= int(ints.min()) and int(ints.max()) <= qmax
    assert int(ints.abs().max()) == (127 if signed else 255)  # the max statistic maps to the top integer
    assert torch.equal(qt.value, ints.float() * qt.scale)  # exactly on the grid
    # the float function, then the quantizer: within half a step of the float activation
    act = {QuantReLU: torch.relu, QuantSigmoid: torch.sigmoid, QuantHardTanh: lambda t: t.clamp(-1, 1),
           QuantIdentity: lambda t: t}[cls]
    assert float((qt.value - act(x)).abs().max()) <= float(qt.scale) / 2 + 1e-6
    assert float(qt.scale) == pytest.approx(float(act(x).abs().max()) / qmax)


def test_relu6_clamps_at_six():
    layer = QuantReLU(max_val=6.0, return_quant_tensor=True)
    y = layer(torch.tensor([-1.0, 3.0, 9.0, 100.0]))
    assert float(y.scale) == pytest.approx(6.0 / 255)
    assert y.int().tolist() == [0, 128, 255, 255]  # 3.0 / (6 / 255) = 127.5 -> 128 (half to even)
    assert float(y.value[2]) == pytest.approx(6.0) and float(y.value[3]) == float(y.value[2])
    assert float(y.value[1]) == pytest.approx(128 * 6.0 / 255)


def _quantized_input(shape, bits=8, signed=False, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2 ** bits)
    ints = torch.randint(lo, hi, shape, generator=g).float()
    return QuantTensor(ints * scale, scale, 0.0, bits, signed, False)


def test_avg_pool_truncates_the_accumulator():
    pool = QuantAvgPool2d(3, stride=3, bit_width=8, return_quant_tensor=True)
    x = _quantized_input((1, 2, 9, 9))
    out = pool(x)
    acc, shift = pool.shift_for(8, 9)
    assert (acc, shift) == (12, 4)  # 8-bit inputs, 3x3 window: 8 + ceil(log2 9) bits, 4 LSBs dropped
    assert out.bit_width == 8 and out.is_valid
    assert torch.allclose(out.scale, x.scale * 16 / 9)
    sums = F.avg_pool2d(x.value, 3) / x.scale * 9
    assert torch.equal(out.int().float(), torch.floor(torch.round(sums) / 16))
    # within one output step of the float average
    assert float((out.value - F.avg_pool2d(x.value, 3)).abs().max()) <= float(out.scale) + 1e-7


def test_adaptive_avg_pool():
    pool = QuantAdaptiveAvgPool2d(1, return_quant_tensor=True)
    x = _quantized_input((2, 3, 4, 4), signed=True)
    out = pool(x)
    assert out.shape == (2, 3, 1, 1) and out.bit_width == 8 and out.is_valid
    assert pool.shift_for(8, 16) == (12, 4)
    assert float((out.value - x.value.mean((2, 3), keepdim=True)).abs().max()) <= float(out.scale) + 1e-7
    sums = (x.value / x.scale).round().sum((2, 3), keepdim=True)
    assert torch.equal(out.int().float(), torch.floor(sums / 16))  # the sum of 16 integers, 4 LSBs dropped
    assert torch.allclose(out.scale, x.scale * 16 / 16)
    assert torch.equal(out.value, QuantAvgPool2d(4, return_quant_tensor=True)(x).value)
    with pytest.raises(quantfx.QuantArgumentError, match="not a multiple of output"):
        QuantAdaptiveAvgPool2d(3)(_quantized_input((1, 1, 4, 4)))


def test_float_input_pools_in_float():
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(QuantAvgPool2d(2)(x), F.avg_pool2d(x, 2))


@pytest.mark.parametrize("op", [
    lambda t: torch.flatten(t, 1), lambda t: t.flatten(1), lambda t: t.view(t.size(0), -1),
    lambda t: t.reshape(2, -1), lambda t: t.transpose(1, 2), lambda t: t.permute(0, 2, 3, 1),
    lambda t: t.chunk(2, dim=1)[0], lambda t: torch.split(t, 2, dim=1)[1], lambda t: t[:, :2],
    lambda t: F.max_pool2d(t, 2), lambda t: F.pad(t, (1, 1, 1, 1)), lambda t: t.contiguous(),
])
def test_invariant_ops_keep_the_quant_tensor(op):
    x = _quantized_input((2, 4, 4, 4), signed=True)
    y = op(x)
    assert isinstance(y, QuantTensor), "flatten once broke QuantTensor propagation (seed notes)"
    assert torch.equal(y.scale, x.scale) and y.bit_width == 8 and y.is_valid


def test_cat_keeps_equal_scales_and_decays_otherwise():
    a, b = _quantized_input((1, 2, 3, 3), seed=1), _quantized_input((1, 2, 3, 3), seed=2)
    for cat in (torch.cat([a, b], 1), torch.cat((a, b), dim=0), torch.cat(tensors=[a, b], dim=1)):
        assert isinstance(cat, QuantTensor) and cat.is_valid and torch.equal(cat.scale, a.scale)
    assert torch.equal(torch.cat([a, b], 1).value, torch.cat([a.value, b.value], 1))
    c = _quantized_input((1, 2, 3, 3), scale=0.07)
    assert type(torch.cat([a, c], 1)) is torch.Tensor
    assert type(torch.cat([a, a.value], 1)) is torch.Tensor  # a float input decays it too
    d = _quantized_input((1, 2, 3, 3), bits=4, seed=3)
    assert type(torch.cat([a, d], 1)) is torch.Tensor  # same scale, other bit width


def test_layout_ops_decay_a_per_channel_quant_tensor():
    x = _quantized_input((2, 3, 4, 4), signed=True)
    pc = QuantTensor(x.value, torch.full((1, 3, 1, 1), 0.05), torch.zeros(1, 3, 1, 1), 8, True)
    assert type(torch.flatten(pc, 1)) is torch.Tensor  # a per-channel scale no longer broadcasts
    assert isinstance(F.max_pool2d(pc, 2), QuantTensor)  # max pool keeps channels


def test_is_valid_catches_off_grid_values_at_every_magnitude():
    assert QuantTensor(torch.tensor([3.0, -100000.0]), 1.0, 0.0, 21, True).is_valid
    assert not QuantTensor(torch.tensor([100000.5]), 1.0, 0.0, 21, True).is_valid  # a half integer
    assert not QuantTensor(torch.tensor([3.1]), 1.0, 0.0, 8, True).is_valid
    assert not QuantTensor(torch.tensor([128.0]), 1.0, 0.0, 8, True).is_valid  # out of range
    assert QuantTensor(torch.tensor([255.0]), 1.0, 0.0, 8, False).is_valid
    assert not QuantTensor(torch.tensor([-1.0]), 1.0, 0.0, 8, False).is_valid


def test_non_invariant_ops_decay():
    x = _quantized_input((1, 2, 3, 3))
    for y in (torch.tanh(x), x * 2, torch.exp(x), F.pad(x, (1, 1), value=1.0)):
        assert type(y) is torch.Tensor


def test_accumulator_bit_widths_follow_fan_in():
    x = _quantized_input((1, 16, 6, 6), bits=4, signed=False)
    out = QuantConv2d(16, 4, 3, bias=False, weight_bit_width=4, return_quant_tensor=True)(x)
    # max_in 15 * max_w 14 (narrow 4-bit) * fan-in 144 -> ceil(log2(30240)) = 15
    assert out.bit_width == math.ceil(math.log2(15 * 14 * 144)) == 15 and out.is_valid
    lin = QuantLinear(32, 3, bias=False, return_quant_tensor=True)(_quantized_input((2, 32)))
    assert lin.bit_width == math.ceil(math.log2(255 * 254 * 32)) and lin.is_valid


def test_per_channel_input_scale_gives_no_accumulator_quant_tensor():
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat, input_scaling_per_output_channel=True,
                       return_quant_tensor=True)
    x = torch.randn(1, 3, 5, 5)
    conv(x)  # statistics
    conv.eval()
    out = conv(x)
    # each input channel has its own grid, so the sum is on none: a plain tensor, the conv of the quantized input
    assert type(out) is torch.Tensor
    assert torch.equal(out, F.conv2d(conv.input_quant(x), conv.quant_weight().value, conv.bias))
    with pytest.raises(quantfx.InputScaleRequiredError, match="per-tensor input scale"):
        QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat, input_scaling_per_output_channel=True,
                    bias_quant=Int8Bias)(x)


def test_grouped_transposed_conv_per_channel_accumulator():
    torch.manual_seed(0)
    deconv = QuantConvTranspose2d(4, 6, 3, groups=2, weight_quant=Int8WeightPerChannelFloat,
                                  input_quant=Int8ActPerTensorFloat, bias_quant=Int8Bias, return_quant_tensor=True)
    w_scale = deconv.quant_weight_scale()
    assert w_scale.shape == (3,)  # weight [4, 3, 3, 3]: channel j serves output channel j of each group
    out = deconv(torch.randn(1, 4, 5, 5))
    in_scale = deconv.input_quant.scale()
    assert out.scale.shape == (1, 6, 1, 1)
    assert torch.equal(out.scale.reshape(-1), in_scale * w_scale.repeat(2))
    assert out.is_valid and out.bit_width == math.ceil(math.log2(255 * 254 * 2 * 9)) + 1
    assert torch.equal(deconv.quant_bias_scale(), in_scale * w_scale.repeat(2))


def test_transposed_conv_takes_a_shared_quantizer_or_a_spec_axis_as_given():
    shared = Quantizer(Int8WeightPerChannelFloat, channel_axis=1)
    a, b = QuantConvTranspose2d(3, 4, 3, weight_quant=shared), QuantConvTranspose2d(3, 4, 3, weight_quant=shared)
    assert a.weight_quant is shared and b.weight_quant is shared

    class Axis0(Int8WeightPerChannelFloat):
        channel_axis = 0

    assert QuantConvTranspose2d(3, 4, 3, weight_quant=Axis0).quant_weight_scale().shape == (3,)
    assert QuantConvTranspose2d(3, 4, 3, weight_quant=Int8WeightPerChannelFloat).weight_quant.channel_axis == 1
    assert QuantConvTranspose2d(3, 4, 3, weight_channel_axis=0).weight_quant.channel_axis == 0
