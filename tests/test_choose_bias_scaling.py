"""choose_bias_scaling: external / internal / float biases per target, input-quantizer links, exact scales."""
import math

import pytest
import torch
from torch import nn

import quantfx
from quantfx.graph import input_quantizer_of, is_act_quant, is_compute, module_of, producer
from quantfx.nn import QuantConv2d, QuantIdentity
from quantfx.passes import ChooseBiasScaling, Trace
from quantfx.quant import Int32Bias
from quantfx.targets import get_profile
from quantfx.zoo import LeNet, TEST_MODELS, example_input


DATA = [example_input("lenet", batch=4, seed=i) for i in range(3)]


def layers(q):
    return [(n, module_of(q, n)) for n in q.graph.nodes if is_compute(q, n)]


@pytest.mark.parametrize("target", ["finn", "onnx", "torch"])
def test_external_32_bit_bias_scale_is_input_times_weight_scale(target):
    q = quantfx.quantize(LeNet().eval(), target, calibration_data=DATA, progress=False)
    assert len(layers(q)) == 5
    q(DATA[0])  # the layers remember the input scale of their last call
    for node, m in layers(q):
        assert m.bias_quant.bias_scaling == "external" and m.bias_quant.bit_width == 32
        in_scale, w_scale = input_quantizer_of(q, node).scale(), m.quant_weight_scale()
        assert torch.equal(m.quant_bias().scale.reshape(-1), in_scale.reshape(-1) * w_scale.reshape(-1))
        assert m.quant_bias().bit_width == 32


def test_sixteen_bit_option():
    q = quantfx.quantize(LeNet().eval(), "finn", calibration_data=DATA, bias_bit_width=16, progress=False)
    assert [(m.bias_quant.bit_width, m.bias_quant.bias_scaling) for _, m in layers(q)] == [(16, "external")] * 5


def test_dpu_internal_power_of_two_8_bit():
    q = quantfx.quantize(LeNet().eval(), "dpu", calibration_data=DATA, progress=False)
    assert len(layers(q)) == 5
    for _, m in layers(q):
        qb = m.quant_bias()
        assert m.bias_quant.bias_scaling == "internal" and qb.bit_width == 8 and m.bias_quant.bit_width == 8
        log = math.log2(float(qb.scale))
        assert log == int(log), float(qb.scale)  # an exact power of two
        # 8-bit internal: the largest |bias| fits the signed range on that scale
        assert float(m.bias.detach().abs().max() / qb.scale) <= 128


def test_float_bias_mode():
    q = quantfx.quantize(LeNet().eval(), "finn", calibration_data=DATA, bias_scaling="float", progress=False)
    assert [m.bias_quant.is_quant_enabled for _, m in layers(q)] == [False] * 5
    x = DATA[1]
    q(x)
    assert all(torch.equal(m.quant_bias().value if hasattr(m.quant_bias(), "value") else m.quant_bias(), m.bias)
               for _, m in layers(q))


@pytest.mark.parametrize("target", ["finn", "onnx", "torch", "dpu"])
def test_every_compute_layer_is_linked_to_the_quantizer_upstream(target):
    linked, floats = 0, 0
    for name, (ctor, _) in TEST_MODELS.items():
        model = ctor().eval()
        floats += sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) for m in model.modules())
        q = quantfx.quantize(model, target, example_inputs=(example_input(name, 1),))
        for node, m in layers(q):
            src = producer(q, node.args[0])
            assert is_act_quant(q, src), (name, node.name)
            assert input_quantizer_of(q, node) is module_of(q, src).act_quant, (name, node.name)
            linked += 1
    assert linked == floats == 69  # every conv/linear of the 8 test models


def test_the_pass_inserts_a_quantizer_where_an_external_bias_has_none():
    # a quantized conv behind a float op: without the pass, running it is an "input scale required"
    model = nn.Sequential(nn.Tanh(), QuantConv2d(4, 4, 3, bias_quant=Int32Bias)).eval()
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(quantfx.InputScaleRequiredError):
        model(x)
    gm = Trace()(model).graph_module
    gm = ChooseBiasScaling(profile=get_profile("finn"))(gm).graph_module
    gm.recompile()
    conv = next(n for n in gm.graph.nodes if n.target == "1")
    inserted = conv.args[0]
    assert inserted.target == "_1_input_quant" and isinstance(gm.get_submodule(inserted.target), QuantIdentity)
    assert input_quantizer_of(gm, conv) is gm.get_submodule(inserted.target).act_quant
    quantfx.calibrate(gm, [x], progress=False)
    y = gm(x)
    expected = model[1].inner_forward(gm.get_submodule(inserted.target)(torch.tanh(x)),
                                      model[1].quant_weight().value, gm.get_submodule("1").quant_bias().value)
    assert y.shape == (2, 4, 4, 4) and torch.allclose(y, expected, atol=1e-6)


def test_float_region_before_a_conv_is_quantized():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3)).eval()
    q = quantfx.quantize(model, "finn", overrides={"0": None}, calibration_data=DATA, progress=False)
    assert type(q.get_submodule("0")) is nn.Conv2d
    conv = next(n for n in q.graph.nodes if n.target == "2")
    assert is_act_quant(q, conv.args[0])
    assert input_quantizer_of(q, conv) is module_of(q, conv.args[0]).act_quant
    with torch.no_grad():
        y = q(DATA[0])  # never an "input scale required"
        ref = model(DATA[0])
    assert y.shape == (4, 4, 24, 24) and quantfx.sqnr(ref, y) > 25
