"""swap_modules: quantized twins per target profile, input quantizers, overrides by name and type."""
import pytest
import torch
from torch import nn

import quantfx
from quantfx.graph import is_act_quant
from quantfx.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU, QuantWBIOL
from quantfx.targets import get_profile
from quantfx.zoo import LeNet, ResNetSmall, TEST_MODELS, example_input


def q_of(model, target="finn", **kw):
    return quantfx.quantize(model, target, example_inputs=(example_input("lenet", 1),), **kw)


def test_layers_swapped_with_profile_quantizers():
    q = q_of(LeNet().eval())
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.fc3, QuantLinear)
    assert isinstance(q.relu1, QuantReLU) and not q.relu1.act_quant.signed  # unsigned after ReLU (finn)
    assert {m.weight_quant.bit_width for m in q.modules() if hasattr(m, "weight_quant")} == {8}
    first = next(n for n in q.graph.nodes if n.op == "placeholder")
    user = next(iter(first.users))
    assert isinstance(q.get_submodule(user.target), QuantIdentity) and user.target == "x_quant"


@pytest.mark.parametrize("target", ["finn", "onnx", "torch", "dpu"])
def test_quantizers_follow_the_target_profile(target):
    q = quantfx.quantize(ResNetSmall().eval(), target, example_inputs=(example_input("resnet", 1),))
    p = get_profile(target)
    compute = [m for m in q.modules() if isinstance(m, QuantWBIOL)]
    assert len(compute) == 10  # stem, 2 convs in each of 3 blocks, 2 downsample convs, fc
    assert len(compute) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in ResNetSmall().modules())
    for m in compute:
        assert m.weight_quant.spec is p.weight_quant and m.weight_quant.bit_width == p.weight_bit_width
    relus = [m for m in q.modules() if isinstance(m, QuantReLU)]
    assert relus and all(m.act_quant.spec is p.act_quant_unsigned for m in relus)
    assert all(m.act_quant.bit_width == p.act_bit_width for m in relus)
    assert q.x_quant.act_quant.spec is p.act_quant and q.x_quant.act_quant.bit_width == p.input_bit_width


def test_bit_width_options():
    q = q_of(LeNet().eval(), weight_bit_width=4, act_bit_width=5)
    assert {m.weight_quant.bit_width for m in q.modules() if hasattr(m, "weight_quant")} == {4}
    acts = {q.get_submodule(n.target).act_quant.bit_width for n in q.graph.nodes
            if is_act_quant(q, n) and n.target != "x_quant"}
    assert acts == {5}
    assert q.x_quant.act_quant.bit_width == 8  # the input keeps the profile's input width


def test_profile_ranges_are_enforced():
    with pytest.raises(quantfx.QuantArgumentError, match="weight_bit_width=4 is outside what the target accepts"):
        q_of(LeNet().eval(), target="dpu", weight_bit_width=4)


def test_overrides_by_name_and_type():
    q = q_of(LeNet().eval(), weight_bit_width=4, overrides={"conv1": dict(weight_bit_width=8), nn.Linear: None})
    assert q.conv1.weight_quant.bit_width == 8 and q.conv2.weight_quant.bit_width == 4
    assert type(q.fc1) is nn.Linear and type(q.fc3) is nn.Linear  # kept float
    out = next(n for n in q.graph.nodes if n.op == "output").args[0]
    assert out.target == "fc3"  # no requantization after a layer the user kept float


def test_unknown_override_name_has_a_hint():
    with pytest.raises(quantfx.QuantArgumentError, match=r"'conv_1' \(did you mean 'conv1'"):
        q_of(LeNet().eval(), overrides={"conv_1": dict(weight_bit_width=4)})


def test_unknown_override_key():
    with pytest.raises(quantfx.QuantArgumentError, match="unknown key 'colour'"):
        q_of(LeNet().eval(), overrides={"conv1": dict(colour=1)})


def test_activation_keys_on_a_layer_are_refused():
    """A conv/linear has no activation quantizer: act_ keys (or bare fields, which mean act_ ones) on it would
    change nothing, so they are an error that says where they belong."""
    with pytest.raises(quantfx.QuantArgumentError, match=r"overrides\['fc1'\]: act_bit_width set an activation "
                                                         r"quantizer, but a Linear layer has none.*weight_<field>"):
        q_of(LeNet().eval(), overrides={"fc1": dict(act_bit_width=6)})
    with pytest.raises(quantfx.QuantArgumentError,
                       match=r"act_bit_width set an activation quantizer, but a Conv2d layer"):
        q_of(LeNet().eval(), overrides={nn.Conv2d: dict(bit_width=4)})
    assert q_of(LeNet().eval(), overrides={"relu3": dict(act_bit_width=6)}).get_submodule(
        "relu3").act_quant.bit_width == 6


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_every_compute_layer_is_swapped(name):
    ctor, _ = TEST_MODELS[name]
    q = quantfx.quantize(ctor().eval(), "onnx", example_inputs=(example_input(name, 1),))
    floats = [type(m).__name__ for m in q.modules() if type(m) in (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)]
    assert floats == []


@pytest.mark.parametrize("pool, quantized", [
    (nn.AvgPool2d(3, 1, 1), True), (nn.AvgPool2d(3, 1, 1, count_include_pad=False), False),
    (nn.AvgPool2d(2, count_include_pad=False), True),
])
def test_avg_pool_swapped_only_when_integer_sums_match(pool, quantized):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), pool).eval()
    x = example_input("lenet", 2)
    q = quantfx.quantize(model, "finn", calibration_data=[x], progress=False)
    assert (type(q.get_submodule("2")).__name__ == "QuantAvgPool2d") is quantized
    with torch.no_grad():
        y, yq = model(x), q(x)
    assert float((y - yq).abs().max()) < 0.05 * float(y.abs().max())
