"""choose_bias_scaling: external / internal / float biases per target, input-quantizer links, exact scales."""
import math

import pytest
import torch
from torch import nn

import quantfx
from quantfx.graph import is_compute, module_of
from quantfx.zoo import LeNet, example_input

DATA = [example_input("lenet", batch=4, seed=i) for i in range(3)]


def layers(q):
    return [(n, module_of(q, n)) for n in q.graph.nodes if is_compute(q, n)]


@pytest.mark.parametrize("target", ["finn", "onnx", "torch"])
def test_external_32_bit_bias(target):
    q = quantfx.quantize(LeNet().eval(), target, calibration_data=DATA, progress=False)
    for node, m in layers(q):
        assert m.bias_quant.bias_scaling == "external" and m.bias_quant.bit_width == 32
        src = m.__dict__["input_quantizer"]
        assert src is not None
        in_scale, w_scale = src.scale(), m.quant_weight_scale()
        m(torch.zeros(1, *([m.in_channels, 8, 8] if hasattr(m, "in_channels") else [m.in_features])))
        assert torch.equal(m.quant_bias().scale.reshape(-1), (in_scale.reshape(-1) * w_scale.reshape(-1)))


def test_sixteen_bit_option():
    q = quantfx.quantize(LeNet().eval(), "finn", calibration_data=DATA, bias_bit_width=16, progress=False)
    assert {m.bias_quant.bit_width for _, m in layers(q)} == {16}


def test_dpu_internal_power_of_two_8_bit():
    q = quantfx.quantize(LeNet().eval(), "dpu", calibration_data=DATA, progress=False)
    for _, m in layers(q):
        qb = m.quant_bias()
        assert m.bias_quant.bias_scaling == "internal" and qb.bit_width == 8
        log = math.log2(float(qb.scale))
        assert log == int(log)


def test_float_bias_mode():
    q = quantfx.quantize(LeNet().eval(), "finn", calibration_data=DATA, bias_scaling="float", progress=False)
    assert not any(m.bias_quant.is_quant_enabled for _, m in layers(q))


def test_float_region_before_a_conv_gets_a_quantizer():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3)).eval()
    q = quantfx.quantize(model, "finn", overrides={"0": None}, calibration_data=DATA, progress=False)
    conv = q.get_submodule("2")
    assert conv.__dict__["input_quantizer"] is not None
    q.eval()
    y = q(DATA[0])  # never an "input scale required"
    assert y.shape == (4, 4, 24, 24)
