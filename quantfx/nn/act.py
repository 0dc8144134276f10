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
        # how an exact accumulator (a QuantTensor with exact=True, from the conv/linear before) becomes this
        # activation's integers in eval mode: "float" quantizes its value; "multiplier" requantizes its integers
        # with one float32 multiplier, as onnxruntime does (set by the compiler on requant='multiplier' targets);
        # "inverse_multiplier" computes the multiplier with the reciprocal of the output scale, as qnnpack does;
        # "float_bias" scales the accumulator without its bias, adds the bias in float32, then multiplies by the
        # reciprocal of the output scale, as oneDNN does (quantfx.quant.functional.requantize_bias_after);
        # "multiplier_float_bias": one multiplier, the bias added as the float32 quotient fbgemm adds
        # (quantfx.quant.functional.requantize_multiplier with acc_bias)
        self.requant = "float"

    def act_fn(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x):
        if not self.act_quant.is_quant_enabled and isinstance(x, QuantTensor) and type(self) is QuantIdentity:
            return x if self.return_quant_tensor else x.value
        xv = value_of(x)
        if self.input_quant.is_quant_enabled:
            xv = self.input_quant(xv)
        y = self.act_fn(xv)
        if self.requant != "float" and isinstance(x, QuantTensor) and x.exact and not self.training and \
                not self.act_quant.calibrating and self.runtime_requant_ok():
            qt = self._requantize_like_runtime(x.scale, xv, y, x.acc_bias)
        else:
            qt = self.act_quant.quant_tensor(y, training=self.training)
        if self.return_quant_tensor and isinstance(qt, QuantTensor):
            return qt
        return value_of(qt)

    def _requantize_like_runtime(self, acc_scale, xv, y, acc_bias=None) -> QuantTensor:
        """Eval mode, on an accumulator a layer computed exactly (``requant='multiplier'``, set by the compiler on
        targets that requantize so): the integers the runtime's requantization gives
        (:func:`quantfx.quant.functional.requantize_multiplier`), not a rounded float quotient. The values
        differ from the plain fake quantization only where the two roundings part, at ties; gradients, when
        needed, are the plain path's."""
        q = self.act_quant
        plain = q.quant_tensor(y, training=False) if torch.is_grad_enabled() and y.requires_grad else None
        if plain is not None:
            scale, zp = plain.scale, plain.zero_point
        else:
            s0, z0 = q.qparams(y)
            q._last = (s0.detach(), z0.detach())
            scale, zp = q.broadcast(s0, z0, y)
        qmin, qmax = q.int_range()
        with torch.no_grad():
            # the layer output is float32(acc x acc_scale), |acc| < 2^22 (else the layer leaves no acc_scale):
            # its float32 quotient rounds back to acc
            acc = torch.round(xv.detach().float() / acc_scale)
            cap = self.code_cap(scale, zp) if isinstance(self, QuantReLU) else None
            if cap is False:
                return plain if plain is not None else q.quant_tensor(y, training=False)
            if self.requant == "float_bias":
                ints = qf.requantize_bias_after(acc, acc_scale, acc_bias, scale.detach(), zp.detach(), qmin, qmax,
                                                relu=isinstance(self, QuantReLU))
            else:
                ints = qf.requantize_multiplier(acc, acc_scale, scale.detach(), zp.detach(), qmin, qmax,
                                                inverse=self.requant == "inverse_multiplier",
                                                acc_bias=acc_bias if self.requant == "multiplier_float_bias" else None,
                                                relu=isinstance(self, QuantReLU))
            if cap is not None:
                ints = torch.minimum(ints, cap)
            value = (ints - zp.detach()) * scale.detach()
        if plain is not None:
            value = plain.value + (value - plain.value).detach()
        return QuantTensor(value, scale, zp, q.bit_width, q.signed, False, narrow=q.narrow_range)

    def runtime_requant_ok(self) -> bool:
        """Whether this activation can be requantized from an integer accumulator by one multiplier: identity
        or ReLU (ReLU6 too, when at run time its quantizer's range ends inside 6), half-even rounding,
        per-tensor."""
        q = self.act_quant
        return type(self) in (QuantIdentity, QuantReLU) and q.is_quant_enabled and q.rounding == "half_even" \
            and not q.scaling_per_output_channel and not self.input_quant.is_quant_enabled and q.bit_width >= 2


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

    def code_cap(self, scale, zp):
        """How a ReLU6 requantized from an exact accumulator (``_requantize_like_runtime``) meets its 6: None when
        the grid ends inside it (the requantization's saturation is the cap), the code ``zp + 6 / scale`` when
        the grid passes 6 on a code (a power-of-two grid: the torch target's quantized ``clamp`` after the layer,
        on the fbgemm family's ``requant='multiplier_float_bias'``), else False (requantized as plain values)."""
        if self.max_val is None:
            return None
        qmax = self.act_quant.int_range()[1]
        if bool(torch.all((qmax - zp) * scale <= self.max_val)):
            return None
        k = self.max_val / scale
        if self.requant != "multiplier_float_bias" or not bool(torch.all(k == torch.round(k))):
            return False
        return zp + k

    def extra_repr(self):
        return "" if self.max_val is None else f"max_val={self.max_val}"


class QuantLeakyReLU(QuantAct):
    """LeakyReLU followed by a signed 8-bit quantizer by default. The dpu profile swaps nn.LeakyReLU for it, so
    the conv or add before it is not requantized: one rounding, at the LeakyReLU's output, as the DPU computes a
    LeakyReLU fused into the layer (targets/dpu/lowering.py, "LeakyReLU")."""

    def __init__(self, act_quant=_DEFAULT, negative_slope: float = 0.01, **kwargs):
        super().__init__(act_quant, **kwargs)
        self.negative_slope = negative_slope

    def act_fn(self, x):
        return F.leaky_relu(x, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


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
