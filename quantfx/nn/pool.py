"""Quantized average pooling: an integer sum truncated to the output bit width (max-pool needs no quantizer)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantArgumentError
from ..quant import functional as qf
from ..quant_tensor import QuantTensor
from .base import InputQuantMixin


class _TruncAvgPool(InputQuantMixin, nn.Module):
    """Average pooling of a quantized input computed as integers: the ``K``-term sum needs
    ``in_bits + ceil(log2 K)`` bits; it is truncated (``rounding``, floor by default) to ``bit_width`` bits by
    dropping ``shift`` LSBs. The output is ``floor(sum / 2^shift) * scale * 2^shift / K`` (an average), with
    scale ``in_scale * 2^shift / K``. A float input is average-pooled in float."""

    def __init__(self, bit_width: int = 8, rounding: str = "floor", return_quant_tensor: bool = False):
        super().__init__()
        if isinstance(bit_width, bool) or not isinstance(bit_width, int) or not 1 <= bit_width <= 32:
            raise QuantArgumentError(f"{type(self).__name__}: bit_width={bit_width!r}; use an integer 1..32")
        if rounding not in ("floor", "half_even", "half_up"):
            raise QuantArgumentError(f"{type(self).__name__}: rounding={rounding!r}; use 'floor', "
                                     "'half_even' or 'half_up'")
        self.bit_width, self.rounding = bit_width, rounding
        self.return_quant_tensor = return_quant_tensor
        self.input_quant = _DISABLED

    def _kernel(self, x) -> tuple[int, ...]:
        raise NotImplementedError

    def _pool(self, x):
        raise NotImplementedError

    def shift_for(self, in_bits: int, k: int) -> tuple[int, int]:
        """(accumulator bit width, LSBs dropped)."""
        acc = in_bits + (math.ceil(math.log2(k)) if k > 1 else 0)
        return acc, max(acc - self.bit_width, 0)

    def forward(self, x, input_quantizer=None):
        xv, qx = self._quant_input(x, input_quantizer)
        avg = self._pool(xv)
        if qx is None or qx.scale.numel() != 1 or not bool((qx.zero_point == 0).all()):
            return avg
        k = math.prod(self._kernel(xv))
        acc, shift = self.shift_for(qx.bit_width, k)
        total = qf.round_ste(avg / qx.scale * k, "half_even")  # the integer sum (exact up to float error)
        step = 2.0 ** shift
        truncated = qf.round_ste(total / step, self.rounding)
        scale = qx.scale * step / k
        # (truncated * in_scale) * (2^shift / K): the order QONNX's Trunc -> Mul computes it in, so the
        # float32 results (and any later rounding ties) agree bit for bit.
        value = (truncated * qx.scale) * (step / k)
        out = QuantTensor(value, scale, torch.zeros_like(scale), self.bit_width, qx.signed, self.training)
        return out if self.return_quant_tensor else out.value


class QuantAvgPool2d(_TruncAvgPool):
    """AvgPool2d over a quantized input with accumulator truncation to ``bit_width`` bits."""

    def __init__(self, kernel_size, stride=None, padding=0, bit_width: int = 8, rounding: str = "floor",
                 return_quant_tensor: bool = False):
        super().__init__(bit_width, rounding, return_quant_tensor)
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding

    def _kernel(self, x):
        k = self.kernel_size
        return (k, k) if isinstance(k, int) else tuple(k)

    def _pool(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, bit_width={self.bit_width}"


def adaptive_window(in_hw, output_size):
    """The (kernel, = stride) of a 2-d adaptive pool from input size ``in_hw`` to ``output_size`` (an int, a pair,
    None entries keeping the input's size) when every window has that one size (the input a multiple of the
    output), else None."""
    o = (output_size, output_size) if isinstance(output_size, int) or output_size is None else tuple(output_size)
    out = tuple(int(h) if v is None else int(v) for h, v in zip(in_hw, o))
    if any(int(h) % v for h, v in zip(in_hw, out)):
        return None
    return tuple(int(h) // v for h, v in zip(in_hw, out))


class QuantAdaptiveAvgPool2d(_TruncAvgPool):
    """AdaptiveAvgPool2d over a quantized input; the input size must be a multiple of the output size."""

    def __init__(self, output_size, bit_width: int = 8, rounding: str = "floor",
                 return_quant_tensor: bool = False):
        super().__init__(bit_width, rounding, return_quant_tensor)
        self.output_size = output_size

    def _kernel(self, x):
        k = adaptive_window(x.shape[-2:], self.output_size)
        if k is None:
            raise QuantArgumentError(
                f"QuantAdaptiveAvgPool2d: input {tuple(x.shape[-2:])} is not a multiple of output "
                f"{self.output_size}; uneven windows have no single integer divisor (use a float AdaptiveAvgPool2d)")
        return k

    def _pool(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}, bit_width={self.bit_width}"


class _Disabled:
    is_quant_enabled = False
    calibrating = False


_DISABLED = _Disabled()
