"""Quantized activations: a float function followed by an activation quantizer (``act_quant``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat, make_quantizer
from ..quant_tensor import QuantTensor, value_of
from .base import split_overrides

_DEFAULT = object()


class QuantAct(nn.Module):
    """Base of quantized activations. Bare quantizer keywords (``bit_width=4``) and ``act_``-prefixed ones go
    to ``act_quant``; ``input_``-prefixed ones to ``input_quant``."""

    default_act_quant = Int8ActPerTensorFloat

    def __init__(self, act_quant=_DEFAULT, input_quant=None, return_quant_tensor: bool = False, **kwargs):
        super().__init__()
        over = split_overrides(kwargs, ("act", "input"), type(self).__name__, bare="act")
        spec = self.default_act_quant if act_quant is _DEFAULT else act_quant
        self.input_quant = make_quantizer(input_quant, "act", **over["input"])
        self.act_quant = make_quantizer(spec, "act", **over["act"])
        self.return_quant_tensor = return_quant_tensor

    def act_fn(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x):
        if not self.act_quant.is_quant_enabled and isinstance(x, QuantTensor) and type(self) is QuantIdentity:
            return x if self.return_quant_tensor else x.value
        xv = value_of(x)
        if self.input_quant.is_quant_enabled:
            xv = self.input_quant(xv)
        y = self.act_fn(xv)
        qt = self.act_quant.quant_tensor(y, training=self.training)
        if self.return_quant_tensor and isinstance(qt, QuantTensor):
            return qt
        return value_of(qt)


class QuantIdentity(QuantAct):
    """Quantizes its input (8-bit signed by default); the compiler's requantization point."""


class QuantReLU(QuantAct):
    """ReLU (or ReLU6 with ``max_val=6.0``) followed by an unsigned 8-bit quantizer by default."""

    default_act_quant = Uint8ActPerTensorFloat

    def __init__(self, act_quant=_DEFAULT, max_val: float | None = None, **kwargs):
        super().__init__(act_quant, **kwargs)
        self.max_val = max_val

    def act_fn(self, x):
        return F.relu(x) if self.max_val is None else torch.clamp(x, 0.0, self.max_val)

    def extra_repr(self):
        return "" if self.max_val is None else f"max_val={self.max_val}"


class QuantHardTanh(QuantAct):
    """HardTanh (clamp to [min_val, max_val]) followed by a signed 8-bit quantizer by default."""

    def __init__(self, act_quant=_DEFAULT, min_val: float = -1.0, max_val: float = 1.0, **kwargs):
        super().__init__(act_quant, **kwargs)
        self.min_val, self.max_val = min_val, max_val

    def act_fn(self, x):
        return torch.clamp(x, self.min_val, self.max_val)

    def extra_repr(self):
        return f"min_val={self.min_val}, max_val={self.max_val}"


class QuantSigmoid(QuantAct):
    """Sigmoid followed by an unsigned 8-bit quantizer by default."""

    default_act_quant = Uint8ActPerTensorFloat

    def act_fn(self, x):
        return torch.sigmoid(x)
