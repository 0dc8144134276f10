"""Quantized layers: float equivalence when disabled, float state_dict loading, quantizer state round trips,
activation grids, truncating average pools, and QuantTensor propagation through invariant ops."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantfx import QuantTensor
from quantfx.nn import (
    QuantAdaptiveAvgPool2d, QuantAvgPool2d, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d,
    QuantConvTranspose2d, QuantHardTanh, QuantIdentity, QuantLinear, QuantReLU, QuantSigmoid,
)
import quantfx

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
    q = qcls(*args, bias=bias, weight_quant=None)
    torch.manual_seed(0)
    f = fcls(*args, bias=bias)
    x = torch.randn(shape)
    assert torch.equal(q(x), f(x))


@pytest.mark.parametrize("qcls, fcls, args, shape", PAIRS, ids=lambda v: getattr(v, "__name__", ""))
def test_loads_a_float_state_dict(qcls, fcls, args, shape):
    f = fcls(*args)
    q = qcls(*args)
    missing, unexpected = q.load_state_dict(f.state_dict(), strict=False)
    assert not unexpected and all("_quant." in k for k in missing)
    assert torch.equal(q.weight, f.weight) and torch.equal(q.bias, f.bias)
    x = torch.randn(shape)
    assert torch.equal(q.quant_weight().value, q.weight_quant(f.weight)) and q(x).shape == f(x).shape
    step = float(q.quant_weight_scale())
    # quantized weights are within half a step of the float ones
    assert float((q.quant_weight().value - f.weight).abs().max()) <= step / 2 + 1e-7


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


@pytest.mark.parametrize("cls, signed, check", [
    (QuantReLU, False, lambda x, y: bool((y >= 0).all())),
    (QuantSigmoid, False, lambda x, y: bool((y >= 0).all() and (y <= 1).all())),
    (QuantHardTanh, True, lambda x, y: bool((y >= -1).all() and (y <= 1).all())),
    (QuantIdentity, True, lambda x, y: True),
])
def test_activation_outputs_lie_on_their_grid(cls, signed, check):
    layer = cls(return_quant_tensor=True)
    x = torch.randn(4, 8) * 3
    qt = layer(x)
    assert qt.signed is signed and qt.bit_width == 8 and qt.is_valid and check(x, qt.value)
    ints = qt.int()
    assert (int(ints.min()), int(ints.max())) >= ((-128, -128) if signed else (0, 0))


def test_relu6_clamps_at_six():
    layer = QuantReLU(max_val=6.0)
    y = layer(torch.tensor([-1.0, 3.0, 9.0, 100.0]))
    assert float(y.max()) <= 6.0 + 1e-6 and float(y.min()) == 0.0


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
    assert isinstance(torch.cat([a, b], 1), QuantTensor)
    c = _quantized_input((1, 2, 3, 3), scale=0.07)
    assert type(torch.cat([a, c], 1)) is torch.Tensor


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
