"""Exact integer accumulators and the runtimes' requantization in the fake-quant model (eval mode)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quantfx
from quantfx.graph import input_quantizer_of, is_act_quant, is_compute, module_of
from quantfx.quant import functional as qf
from quantfx.quant_tensor import QuantTensor, value_of
from quantfx.zoo import TEST_MODELS, example_input


def quantized(name, target):
    torch.manual_seed(0)
    data = [example_input(name, batch=2, seed=i) for i in range(3)]
    return quantfx.quantize(TEST_MODELS[name][0]().eval(), target, calibration_data=data, progress=False)


def test_requantize_multiplier_is_the_float32_multiplier_not_the_quotient():
    """rne(float32(acc) * float32(s_acc / s_y)) + zp, clamped: the runtime's formula, checked against numpy
    float32 arithmetic. On accumulators placed at rounding ties (acc x s_acc / s_y = n + 1/2 up to float32
    rounding of s_acc) it parts from rounding the exact quotient, one step either way, and only there."""
    gen = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (5000,), generator=gen) * 2 - 1
    acc = torch.randint(100, 2000, (5000,), generator=gen).double() * sign
    n = torch.randint(-100, 100, (5000,), generator=gen).double()
    scale, zp = torch.tensor(0.0123), torch.tensor(128.0)
    acc_scale = ((n + 0.5) * scale.double() / acc).abs().float()  # float32, so only near the tie
    got = qf.requantize_multiplier(acc, acc_scale, scale, zp, 0, 255)
    m = acc_scale.numpy() / np.float32(scale.item())
    v = np.clip(acc.numpy().astype(np.float32) * m, np.float32(-128), np.float32(127))
    assert np.array_equal(got.numpy(), np.round(v) + np.float32(128))
    exact = acc * acc_scale.double() / scale.double()
    quotient = torch.clamp(torch.round(exact) + 128, 0, 255)
    parted = got.double() != quotient
    assert 100 < int(parted.sum()) < 5000
    assert float((got.double() - quotient).abs().max()) == 1.0
    assert float((exact[parted].abs() % 1 - 0.5).abs().max()) < 1e-4  # every parting is at a tie


def outputs_of(layer, q, x):
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    q(x)
    handle.remove()
    return seen


def test_links_follow_the_profile():
    onnx_q, finn_q = quantized("resnet", "onnx"), quantized("resnet", "finn")
    for q, mode in ((onnx_q, "multiplier"), (finn_q, "float")):
        acts = [module_of(q, n) for n in q.graph.nodes if is_act_quant(q, n) and is_compute(q, n.args[0])]
        assert acts and all(a.requant == mode for a in acts)
        layers = [module_of(q, n) for n in q.graph.nodes if is_compute(q, n)]
        assert all(m.exact_accumulator for m in layers)  # every target: exact accumulators
        # the accumulator travels on the edge only where it is requantized
        assert all(m.return_quant_tensor == (mode == "multiplier") for m in layers)
        # no module holds another: the links are arguments of the graph's nodes
        assert not any(isinstance(v, torch.nn.Module) for m in q.modules() for v in vars(m).values()
                       if not isinstance(v, dict))
        assert "input_quantizer = " in q.code


@pytest.mark.parametrize("target", ["onnx", "finn"])
def test_conv_output_is_the_exact_integer_accumulator(target):
    """In eval mode a compiled conv's output is acc x acc_scale rounded once, with acc the int64 result of
    (input integers - zero point) x weight integers + bias integers."""
    q = quantized("lenet", target)
    node = next(n for n in q.graph.nodes if is_compute(q, n))
    layer = module_of(q, node)
    src = input_quantizer_of(q, node)
    assert node.kwargs["input_quantizer"].op == "get_attr"  # an edge of the graph
    x = example_input("lenet", batch=2, seed=9)
    with torch.no_grad():
        seen = outputs_of(layer, q, x)
    assert isinstance(seen["y"], QuantTensor) == (target == "onnx")
    if target == "onnx":
        assert seen["y"].exact and seen["y"].zero_point.abs().max() == 0
    seen["y"] = value_of(seen["y"])
    s_x, z_x = src.qparams(None)
    x_int = torch.round(seen["x"].double() / s_x.double()).long()  # integers minus zero point
    w_int = layer.int_weight()
    acc_scale = layer.acc_scale(s_x, layer.quant_weight_scale()).reshape(1, -1, 1, 1)
    b_int = layer.int_bias() if layer.bias is not None else torch.zeros(layer.out_channels, dtype=torch.long)
    cols = F.unfold(x_int.double(), layer.kernel_size, padding=layer.padding, stride=layer.stride).long()
    acc = torch.einsum("ok,bkl->bol", w_int.reshape(layer.out_channels, -1), cols) + b_int.reshape(1, -1, 1)
    acc = acc.reshape(seen["y"].shape)
    assert torch.equal(seen["y"], (acc.double() * acc_scale.double()).float())


def test_eval_values_do_not_depend_on_grad_mode_and_gradients_flow():
    q = quantized("resnet", "onnx").eval()
    x = example_input("resnet", batch=2, seed=3)
    with torch.no_grad():
        y0 = q(x)
    xg = x.clone().requires_grad_(True)
    y1 = q(xg)
    assert torch.equal(y0, y1.detach())
    y1.sum().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in q.parameters())


def test_training_mode_keeps_the_plain_fake_quant_path():
    q = quantized("lenet", "onnx")
    layer = next(module_of(q, n) for n in q.graph.nodes if is_compute(q, n))
    q.train()
    assert not outputs_of(layer, q, example_input("lenet", batch=2, seed=1))["y"].exact  # not while training
    q.eval()
    with torch.no_grad():
        assert outputs_of(layer, q, example_input("lenet", batch=2, seed=1))["y"].exact


@pytest.mark.parametrize("fan_in, digits", [(200, 1), (600, 2), (5000, 3), (70000, 0)])
def test_exact_integer_op_splits_weights_until_float32_is_exact(fan_in, digits):
    """One float32 matmul while fan_in x 255 x 127 < 2^24; base-2^b weight digits beyond; float64 operands when
    even one-bit digits would overflow float32. Always equal to the int64 result."""
    from quantfx.nn.wbiol import ExactIntegerOp
    gen = torch.Generator().manual_seed(fan_in)
    x = torch.randint(-255, 256, (3, fan_in), generator=gen)
    w = torch.randint(-127, 128, (5, fan_in), generator=gen)
    w[0, 0] = -127  # the bound is reached
    op = ExactIntegerOp(w.float(), fan_in, 255.0)
    assert len(op.digits) == digits and (op.double_w is not None) == (digits == 0)
    got = op(F.linear, x.float())
    assert torch.equal(got.double(), (x @ w.T).double())


def test_exact_arithmetic_can_be_switched_off_for_a_block():
    q = quantized("resnet", "onnx")
    layer = next(module_of(q, n) for n in q.graph.nodes if is_compute(q, n))
    x = example_input("resnet", batch=2, seed=4)
    with torch.no_grad():
        exact = q(x)
        assert outputs_of(layer, q, x)["y"].exact
        with quantfx.nn.exact_arithmetic(False):
            plain = q(x)
            assert not outputs_of(layer, q, x)["y"].exact
        again = q(x)
    assert torch.equal(exact, again)
    step = float(next(n for n in q.graph.nodes if n.op == "output").args[0].meta["quant"].scale)
    assert float((exact - plain).abs().max()) <= 2 * step + 1e-6  # ties apart, the same values
