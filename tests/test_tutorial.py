"""The QuantTensor / QuantConv2d tutorial (shared/seeds), every code cell ported to quantfx names, with each
documented outcome asserted."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn import Conv2d

import quantfx
from quantfx import QuantTensor
from quantfx.nn import QuantConv2d, QuantIdentity, QuantWBIOL
from quantfx.quant import Int8ActPerTensorFloat, Int8Bias, Int8BiasPerTensorFloatInternalScaling

# float(t) of a tensor that requires grad (a learned scale) warns once per process; the value is what we assert
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def quant_tensor_input():
    scale, bit_width, zero_point = 0.0001, 8, 0.0
    int_value = torch.randint(low=-(2 ** (bit_width - 1)), high=2 ** (bit_width - 1) - 1, size=(1, 2, 5, 5))
    return QuantTensor((int_value - zero_point) * scale, scale=torch.tensor(scale),
                       zero_point=torch.tensor(zero_point), bit_width=torch.tensor(float(bit_width)),
                       signed=True, training=True)


def test_quant_conv2d_is_a_conv2d_with_four_quantizer_slots():
    # cell 1: inspect.getsource(QuantConv2d.__init__)
    source = inspect.getsource(QuantConv2d.__init__)
    assert source.lstrip().startswith("def __init__(")
    assert issubclass(QuantConv2d, Conv2d) and issubclass(QuantConv2d, QuantWBIOL)
    conv = QuantConv2d(2, 3, (3, 3))
    assert [name for name, _ in conv.named_children()] == ["weight_quant", "bias_quant", "input_quant",
                                                           "output_quant"]
    assert conv.return_quant_tensor is False


def test_default_quantizers_enabled_flags():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=False)
    assert conv.weight_quant.is_quant_enabled is True
    assert conv.bias_quant.is_quant_enabled is False
    assert conv.input_quant.is_quant_enabled is False
    assert conv.output_quant.is_quant_enabled is False
    assert conv.weight_quant.bit_width == 8 and conv.weight_quant.signed and conv.weight_quant.scale_type == "float"
    x = torch.randn(1, 2, 5, 5)
    out = conv(x)
    assert type(out) is torch.Tensor and out.shape == (1, 3, 3, 3)
    # the convolution of a float input with the quantized weights (bit for bit)
    assert torch.equal(out, F.conv2d(x, conv.quant_weight().value))
    # float input: the output is in general unquantized, even when a QuantTensor is asked for
    conv.return_quant_tensor = True
    assert type(conv(x)) is torch.Tensor


def test_disabled_quantization_equals_float_conv_bit_for_bit():
    torch.manual_seed(0)
    disabled = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=False, weight_quant=None)
    torch.manual_seed(0)
    float_conv = Conv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=False)
    inp = torch.randn(1, 2, 5, 5)
    assert torch.equal(disabled(inp), float_conv(inp))


def test_quant_weight_affine_invariant_and_valid():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=False)
    qw = conv.quant_weight()
    assert isinstance(qw, QuantTensor) and qw.bit_width == 8 and qw.signed
    int_weight = qw.int()
    zero_point, scale = conv.weight_quant.zero_point(), conv.weight_quant.scale()
    assert int_weight.dtype == torch.int64
    assert torch.equal(qw.value, (int_weight - zero_point) * scale)  # bit for bit
    assert float(scale) == pytest.approx(float(conv.weight.detach().abs().max()) / 127)
    assert qw.is_valid
    assert int(int_weight.abs().max()) == 127  # narrow range, max |w| maps to 127


def test_two_training_mode_outputs_have_different_scales_and_invalid_sum():
    quant_act = QuantIdentity(return_quant_tensor=True)
    out0 = quant_act(torch.randn(1, 2, 5, 5))
    out1 = quant_act(torch.randn(1, 2, 5, 5))
    assert out0.is_valid and out1.is_valid
    assert not torch.equal(out0.scale, out1.scale)
    total = out0 + out1
    assert total.bit_width == 9
    assert not total.is_valid
    assert torch.allclose(total.scale, (out0.scale + out1.scale) / 2)
    assert torch.equal(total.value, out0.value + out1.value)


def test_eval_mode_scales_are_identical():
    quant_act = QuantIdentity(return_quant_tensor=True)
    for _ in range(3):
        quant_act(torch.randn(1, 2, 5, 5))
    quant_act.eval()
    a, b = quant_act(torch.randn(1, 2, 5, 5)), quant_act(torch.randn(1, 2, 5, 5))
    assert torch.equal(a.scale, b.scale)
    # the scale is the running max statistic of the training calls
    assert torch.equal(a.scale, quant_act.act_quant.stat[1] / 127)
    assert a.training is False and b.training is False
    total = a + b
    assert total.is_valid and total.bit_width == 9


def test_max_pool_keeps_and_tanh_decays():
    quant_tensor = QuantIdentity(return_quant_tensor=True)(torch.randn(1, 3, 4, 4))
    pooled = F.max_pool2d(quant_tensor, kernel_size=2, stride=2)
    assert isinstance(pooled, QuantTensor) and pooled.is_valid
    assert torch.equal(pooled.scale, quant_tensor.scale) and pooled.bit_width == 8
    assert pooled.value.shape == (1, 3, 2, 2)
    tanh = torch.tanh(quant_tensor)
    assert type(tanh) is torch.Tensor
    assert torch.equal(tanh, torch.tanh(quant_tensor.value))


def test_input_quantization_gives_valid_21_bit_output():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=False,
                       input_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
    out = conv(torch.randn(1, 2, 5, 5))
    assert isinstance(out, QuantTensor) and out.is_valid
    # worst case accumulator: 255 (8-bit input) * 254 (narrow 8-bit weight) * 18 (fan-in 2 x 3 x 3)
    assert out.bit_width == math.ceil(math.log2(255 * 254 * 18)) == 21 and out.signed
    assert float(out.zero_point.abs().max()) == 0.0
    in_scale = conv.input_quant.scale()
    assert torch.equal(out.scale.reshape(()), in_scale * conv.quant_weight_scale())


def test_quant_tensor_input_is_valid_and_gives_21_bits():
    qt = quant_tensor_input()
    assert qt.is_valid
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=False, return_quant_tensor=True)
    out = conv(qt)
    assert out.is_valid and out.bit_width == 21
    assert torch.allclose(out.scale.reshape(()), qt.scale * conv.quant_weight_scale())


def test_input_quant_requantizes_a_quant_tensor_input():
    qt = quant_tensor_input()
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=False,
                       input_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
    out = conv(qt)
    assert out.is_valid and out.bit_width == 21
    in_scale = out.scale.reshape(()) / conv.quant_weight_scale()
    assert float(in_scale) == pytest.approx(float(qt.value.abs().max()) / 127, rel=1e-5)


def test_output_quantization_gives_8_bits():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=False,
                       output_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
    x = torch.randn(1, 2, 5, 5)
    out = conv(x)
    assert out.is_valid and out.bit_width == 8 and out.signed
    float_out = F.conv2d(x, conv.quant_weight().value)
    assert float(out.scale) == pytest.approx(float(float_out.detach().abs().max()) / 127, rel=1e-6)
    assert int(out.int().abs().max()) == 127


def test_external_bias_without_quantized_input_raises():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=True, bias_quant=Int8Bias,
                       return_quant_tensor=True)
    with pytest.raises(quantfx.InputScaleRequiredError, match="Input scale required") as e:
        conv(torch.randn(1, 2, 5, 5))
    assert isinstance(e.value, quantfx.QuantFXError)


def test_external_bias_with_quant_tensor_or_input_quant_gives_22_bits():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=True, bias_quant=Int8Bias,
                       return_quant_tensor=True)
    out = conv(quant_tensor_input())
    assert out.is_valid and out.bit_width == 22
    assert conv.quant_bias_bit_width() == 8
    assert torch.allclose(conv.quant_bias_scale(), conv.quant_weight_scale() * torch.tensor(0.0001))

    both = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=True,
                       input_quant=Int8ActPerTensorFloat, bias_quant=Int8Bias, return_quant_tensor=True)
    for x in (torch.randn(1, 2, 5, 5), quant_tensor_input()):
        out = both(x)
        assert out.is_valid and out.bit_width == 22
        assert torch.allclose(both.quant_bias_scale(), out.scale.reshape(()))  # bias on the accumulator grid
        ints = both.int_bias()
        assert -128 <= int(ints.min()) and int(ints.max()) <= 127  # (an 8-bit external bias saturates here)


def test_output_quantization_does_not_help_external_bias():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=True,
                       output_quant=Int8ActPerTensorFloat, bias_quant=Int8Bias, return_quant_tensor=True)
    with pytest.raises(quantfx.InputScaleRequiredError, match="Input scale required") as e:
        conv(torch.randn(1, 2, 5, 5))
    assert isinstance(e.value, quantfx.QuantFXError)


def test_internal_scale_bias_needs_no_input_scale():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=True,
                       bias_quant=Int8BiasPerTensorFloatInternalScaling, return_quant_tensor=False)
    out = conv(torch.randn(1, 2, 5, 5))
    assert type(out) is torch.Tensor and out.shape == (1, 3, 3, 3)
    qb = conv.quant_bias()
    assert qb.is_valid and float(qb.scale) == pytest.approx(float(conv.bias.detach().abs().max()) / 127)
    assert int(qb.int().abs().max()) == 127


@pytest.mark.parametrize("bias_quant", [None, Int8BiasPerTensorFloatInternalScaling])
def test_float_or_internal_bias_gives_nonzero_zero_point(bias_quant):
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=True,
                       input_quant=Int8ActPerTensorFloat, bias_quant=bias_quant, return_quant_tensor=True)
    out = conv(torch.randn(1, 2, 5, 5))
    assert out.is_valid and out.bit_width == 21
    assert out.zero_point.shape == (1, 3, 1, 1)
    assert bool((out.zero_point != 0).all())
    bias = conv.bias if bias_quant is None else conv.quant_bias().value
    assert torch.allclose(out.zero_point.reshape(-1), -bias.detach() / out.scale.reshape(()))


def test_return_quant_tensor_false_returns_a_tensor_with_quantized_values():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=True,
                       input_quant=Int8ActPerTensorFloat, bias_quant=Int8Bias)
    out = conv(torch.randn(1, 2, 5, 5))
    assert type(out) is torch.Tensor
    conv.eval()  # fixed statistics, so both calls use one input scale
    conv.return_quant_tensor = True
    torch.manual_seed(1)
    x = torch.randn(1, 2, 5, 5)
    q = conv(x)
    conv.return_quant_tensor = False
    plain = conv(x)
    assert type(plain) is torch.Tensor and torch.equal(plain, q.value)
    # implicitly quantized: on the 22-bit accumulator grid
    assert q.is_valid and q.bit_width == 22
    ints = plain.detach().double() / q.scale.double()
    assert float((ints - ints.round()).abs().max()) < 1e-2
