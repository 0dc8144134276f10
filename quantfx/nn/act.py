"""Quantized activations: a float function followed by an activation quantizer (``act_quant``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat, make_quantizer
from ..quant import functional as qf
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
        src = self.__dict__.get("requant_from")
        if src is not None and not self.training and isinstance(qt, QuantTensor):
            qt = self._requantize_like_runtime(src, xv, qt)
        if self.return_quant_tensor and isinstance(qt, QuantTensor):
            return qt
        return value_of(qt)


    def _requantize_like_runtime(self, layer, xv, qt: QuantTensor) -> QuantTensor:
        """Eval mode, after a layer that computed its accumulator exactly (``requant_from``, linked by the
        compiler on ``requant='multiplier'`` targets): the integers the runtime's requantization gives
        (:func:`quantfx.quant.functional.requantize_multiplier`), instead of rounding a float quotient. The
        values differ from the plain fake-quant only where the two roundings part, at ties; gradients are the
        plain fake-quant's."""
        acc_scale = layer.__dict__.get("_acc_scale")
        if acc_scale is None or not self.runtime_requant_ok(qt):
            return qt
        with torch.no_grad():
            acc = torch.round(xv.detach().double() / acc_scale.double())
            if acc.numel() and float(acc.abs().max()) >= 2.0 ** 22:
                return qt  # beyond what a float32 layer output carries exactly
            if isinstance(self, QuantReLU):
                acc = torch.clamp(acc, min=0.0)
            qmin, qmax = self.act_quant.int_range()
            ints = qf.requantize_multiplier(acc, acc_scale, qt.scale, qt.zero_point, qmin, qmax)
            value = (ints - qt.zero_point) * qt.scale
        return QuantTensor(qt.value + (value - qt.value).detach(), qt.scale, qt.zero_point, qt.bit_width,
                           qt.signed, qt.training, narrow=qt.narrow)

    def runtime_requant_ok(self, qt=None) -> bool:
        """Whether this activation can be requantized from an integer accumulator by one multiplier: identity
        or ReLU (ReLU6 when its quantizer's range ends inside 6), half-even rounding, per-tensor."""
        q = self.act_quant
        if type(self) not in (QuantIdentity, QuantReLU) or not q.is_quant_enabled or q.rounding != "half_even" \
                or q.scaling_per_output_channel or self.input_quant.is_quant_enabled or q.bit_width < 2:
            return False
        if isinstance(self, QuantReLU) and self.max_val is not None:
            if qt is None:
                return True
            top = (q.int_range()[1] - qt.zero_point) * qt.scale
            return bool(torch.all(top <= self.max_val))
        return True


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
