"""Integer quantization arithmetic with straight-through-estimator gradients."""
from __future__ import annotations

import math

import torch

# the smallest normal float32: scales go down to it, so a tensor of any magnitude float32 holds keeps its grid
# (a fixed floor such as 2^-40 flattened activations around 1e-12 to zero)
TINY = float(torch.finfo(torch.float32).tiny)


def scale_of_range(scale: torch.Tensor) -> torch.Tensor:
    """A scale computed from an observed range, made usable: a zero range (an all-zero tensor or channel, which
    any scale holds) gets 1, so products with it (the accumulator scale) stay normal; a range below float32's
    normal numbers gets the smallest normal scale."""
    return torch.clamp(torch.where(scale > 0, scale, torch.ones_like(scale)), min=TINY)


def int_range(bit_width: int, signed: bool, narrow_range: bool) -> tuple[int, int]:
    """Smallest and largest integer of a quantizer. 1-bit is bipolar: (-1, 1)."""
    if bit_width == 1:
        return -1, 1
    if signed:
        return -(2 ** (bit_width - 1)) + int(narrow_range), 2 ** (bit_width - 1) - 1
    return 0, 2 ** bit_width - 1 - int(narrow_range)


def max_uint(bit_width: int, narrow_range: bool = False) -> int:
    """Largest magnitude an integer of this width can contribute to an accumulator (worst case, unsigned)."""
    if bit_width == 1:
        return 1
    return 2 ** bit_width - 1 - int(narrow_range)


def round_int(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """Round to integers: 'half_even' (torch.round), 'half_up' or 'floor'."""
    if rounding == "half_even":
        return torch.round(x)
    if rounding == "half_up":
        return torch.floor(x + 0.5)
    return torch.floor(x)


def round_ste(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """Rounding whose gradient is the identity (straight-through estimator)."""
    return x + (round_int(x, rounding) - x).detach()


def is_power_of_two(v: float) -> bool:
    """Whether ``v`` is a positive power of two (exact: its float mantissa is 1/2)."""
    return v > 0 and math.frexp(float(v))[0] == 0.5


def po2_ste(scale: torch.Tensor) -> torch.Tensor:
    """Round a scale up to a power of two (never clips more than the float scale), STE gradient."""
    log = torch.log2(scale)
    return torch.exp2(log + (torch.ceil(log) - log).detach())


def broadcast_shape(param: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel parameter of shape [C] to broadcast over a tensor of ``ndim`` dims on ``axis``."""
    if param.dim() == 0 or ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = param.numel()
    return param.reshape(shape)


def clamp_ste(x: torch.Tensor, lo, hi) -> torch.Tensor:
    """``torch.clamp(x, lo, hi)`` whose gradient passes where ``lo <= x <= hi``, bounds included, on every
    PyTorch. torch.clamp's own gradient at a value equal to a bound changed in torch 2.14 (1 before, 0 since),
    which moved LSQ scale gradients (a value rounded onto the top code is in range) and learned rounding."""
    return torch.where((x >= lo) & (x <= hi), x, torch.clamp(x.detach(), lo, hi))


def fake_quant(x, scale, zero_point, qmin: int, qmax: int, rounding: str) -> torch.Tensor:
    """(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale, with STE through round.

    Values clamped at the range edges get no gradient w.r.t. x, but pass one to the scale (LSQ)."""
    q = round_ste(x / scale, rounding) + zero_point
    q = clamp_ste(q, qmin, qmax)
    return (q - zero_point) * scale


def float32_bias(ints, acc_scale, ulps: int = 4):
    """(b, q): for bias integers ``ints`` on the float32 accumulator scale ``acc_scale`` (broadcastable), the float32
    bias ``b`` (``ints x acc_scale`` or up to ``ulps`` float32 steps from it) whose float32 quotient
    ``q = fl(b / acc_scale)`` is nearest the integer, and that quotient. fbgemm takes a float bias and adds
    ``fl(b / acc_scale)`` to the float32 accumulator: for most scales ``q`` is the integer itself, for some no
    float32 ``b`` gives it back and ``q`` is about an ulp of the integer off (PyTorch's fbgemm engine)."""
    want = ints.float()
    s = acc_scale.float().expand_as(want) if acc_scale.numel() > 1 else acc_scale.float()
    best = want * s
    quotient = best / s
    err = (quotient - want).abs()
    up, down = best, best
    for _ in range(ulps):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.full_like(down, -math.inf))
        for cand in (up, down):
            q = cand / s
            e = (q - want).abs()
            better = e < err
            best, quotient, err = torch.where(better, cand, best), torch.where(better, q, quotient), \
                torch.where(better, e, err)
    return best, quotient


def requantize_multiplier(acc, acc_scale, scale, zero_point, qmin: int, qmax: int,
                          inverse: bool = False, acc_bias=None, relu: bool = False) -> torch.Tensor:
    """Integers of an integer accumulator ``acc`` (exact, any float dtype) requantized the way onnxruntime's
    QLinearConv/QGemm do it: one float32 multiplier ``m = (acc_scale / scale)`` in float32
    (``acc_scale`` = input scale x weight scale, itself a float32 product), ``rne(float32(acc) * m)`` clamped
    to the range, plus the zero point. ``inverse``: ``m = acc_scale x float32(1 / scale)`` (PyTorch's qnnpack).
    ``acc_bias`` (the bias integers ``acc`` includes): the bias added as fbgemm adds its float bias,
    ``rne(fl(fl(acc - b_int) + q) x m)`` with ``q`` of :func:`float32_bias` (PyTorch's fbgemm engine).
    ``relu``: the sum clamped at 0 first. No gradient (an exact model of the runtime, used in eval mode)."""
    m = acc_scale.float() * (1.0 / scale.float()) if inverse else acc_scale.float() / scale.float()
    if acc_bias is None:
        t = acc.float()
    else:
        t = (acc - acc_bias).float() + float32_bias(acc_bias, acc_scale)[1]
    if relu:
        t = torch.clamp(t, min=0.0)
    v = t * m
    v = torch.minimum(torch.maximum(v, qmin - zero_point.float()), qmax - zero_point.float())
    return torch.round(v) + zero_point.float()


def requantize_bias_after(acc, acc_scale, acc_bias, scale, zero_point, qmin: int, qmax: int,
                          relu: bool = False) -> torch.Tensor:
    """Integers of an exact integer accumulator ``acc`` (which includes the bias integers ``acc_bias``, or None)
    requantized the way oneDNN's int8 convolutions and inner products do it (PyTorch's 'onednn' engine): the
    accumulator without bias scaled in float32, the float32 bias ``b = float32(acc_bias x acc_scale)`` added,
    ReLU, times ``float32(1 / scale)``, plus the zero point in float32, rounded half to even and clamped:
    ``rne(fl(fl(fl(fl(acc - acc_bias) x s_acc) + b) x fl(1 / scale)) + zp)``. Checked against the engine on
    2 million accumulators (tests/test_torch_backend.py). No gradient (an exact model of the runtime)."""
    s = acc_scale.float()
    if acc_bias is None:
        t = acc.float() * s
    else:
        t = (acc - acc_bias).float() * s + acc_bias.float() * s
    if relu:
        t = torch.clamp(t, min=0.0)
    v = t * (1.0 / scale.float()) + zero_point.float()
    return torch.clamp(torch.round(v), qmin, qmax)


def bipolar_quant(x, scale) -> torch.Tensor:
    """1-bit: +scale where x >= 0, -scale elsewhere; identity gradient inside [-1, 1] * scale."""
    sign = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    xs = x / scale
    ste = clamp_ste(xs, -1, 1)
    return (ste + (sign - ste).detach()) * scale


def accumulator_bit_width(in_bits: int, w_bits: int, w_narrow: bool, fan_in: int) -> int:
    """Worst-case bit width of a dot product of ``fan_in`` terms (the Brevitas convention)."""
    worst = max_uint(in_bits, False) * max_uint(w_bits, w_narrow) * fan_in
    return int(math.ceil(math.log2(worst))) if worst > 1 else 1
