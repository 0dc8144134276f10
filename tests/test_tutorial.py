"""The QuantTensor / QuantConv2d tutorial (shared/seeds), every code cell ported to quantfx names, with each
documented outcome asserted."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn import Conv2d

import quantfx
from quantfx import QuantTensor
from quantfx.nn import QuantConv2d, QuantIdentity
from quantfx.quant import Int8ActPerTensorFloat, Int8Bias, Int8BiasPerTensorFloatInternalScaling


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def quant_tensor_input():
    scale, bit_width, zero_point = 0.0001, 8, 0.0
    int_value = torch.randint(low=-(2 ** (bit_width - 1)), high=2 ** (bit_width - 1) - 1, size=(1, 2, 5, 5))
    return QuantTensor((int_value - zero_point) * scale, scale=torch.tensor(scale),
                       zero_point=torch.tensor(zero_point), bit_width=torch.tensor(float(bit_width)),
                       signed=True, training=True)


def test_default_quantizers_enabled_flags():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=False)
    assert conv.weight_quant.is_quant_enabled is True
    assert conv.bias_quant.is_quant_enabled is False
    assert conv.input_quant.is_quant_enabled is False
    assert conv.output_quant.is_quant_enabled is False
    out = conv(torch.randn(1, 2, 5, 5))
    assert type(out) is torch.Tensor and out.shape == (1, 3, 3, 3)


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
    assert torch.allclose(qw.value, (int_weight - zero_point) * scale)
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


def test_eval_mode_scales_are_identical():
    quant_act = QuantIdentity(return_quant_tensor=True)
    for _ in range(3):
        quant_act(torch.randn(1, 2, 5, 5))
    quant_act.eval()
    a, b = quant_act(torch.randn(1, 2, 5, 5)), quant_act(torch.randn(1, 2, 5, 5))
    assert torch.equal(a.scale, b.scale)
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
    assert out.bit_width == 21 and out.signed
    assert float(out.zero_point.abs().max()) == 0.0


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
    out = conv(torch.randn(1, 2, 5, 5))
    assert out.is_valid and out.bit_width == 8


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


def test_output_quantization_does_not_help_external_bias():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=True,
                       output_quant=Int8ActPerTensorFloat, bias_quant=Int8Bias, return_quant_tensor=True)
    with pytest.raises(quantfx.InputScaleRequiredError):
        conv(torch.randn(1, 2, 5, 5))


def test_internal_scale_bias_needs_no_input_scale():
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=True,
                       bias_quant=Int8BiasPerTensorFloatInternalScaling, return_quant_tensor=False)
    out = conv(torch.randn(1, 2, 5, 5))
    assert type(out) is torch.Tensor and out.shape == (1, 3, 3, 3)
    qb = conv.quant_bias()
    assert qb.is_valid and float(qb.scale) == pytest.approx(float(conv.bias.abs().max()) / 127)


@pytest.mark.parametrize("bias_quant", [None, Int8BiasPerTensorFloatInternalScaling])
def test_float_or_internal_bias_gives_nonzero_zero_point(bias_quant):
    conv = QuantConv2d(in_channels=2, out_channels=3, kernel_size=(3, 3), bias=True,
                       input_quant=Int8ActPerTensorFloat, bias_quant=bias_quant, return_quant_tensor=True)
    out = conv(torch.randn(1, 2, 5, 5))
    assert out.is_valid and out.bit_width == 21
    assert out.zero_point.shape == (1, 3, 1, 1)
    assert bool((out.zero_point != 0).all())


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
    assert torch.equal(conv(x), q.value)
