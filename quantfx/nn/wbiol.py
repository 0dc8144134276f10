"""Quantized weight/bias/input/output layers: convolutions, transposed convolutions, linear."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import Int8WeightPerTensorFloat, make_quantizer
from ..quant import functional as qf
from ..quant_tensor import QuantTensor, value_of
from .base import InputQuantMixin, exact_enabled, is_calibrating, split_overrides

_SLOTS = ("weight", "bias", "input", "output")


class QuantWBIOL(InputQuantMixin):
    """Mixin for layers with weight, bias, input and output quantizer slots.

    The output of a layer with quantized input and weights is a QuantTensor whose bit width is the worst-case
    accumulator (``ceil(log2(max_in * max_w * fan_in))``, +1 after adding an external-scale bias)."""

    out_channel_axis = 1  # where output channels live in the layer output
    weight_channel_axis = 0  # where output channels live in the weight

    def _init_quant(self, weight_quant, bias_quant, input_quant, output_quant, return_quant_tensor, kwargs):
        over = split_overrides(kwargs, _SLOTS, type(self).__name__)
        if isinstance(weight_quant, type) and getattr(weight_quant, "channel_axis", None) is None \
                and "channel_axis" not in over["weight"] and self.weight_channel_axis:
            # output channels of this layer's weight are not on axis 0; a spec (or keyword) naming an axis wins,
            # and a shared Quantizer instance is taken as it is
            over["weight"]["channel_axis"] = self.weight_channel_axis
        self.weight_quant = make_quantizer(weight_quant, "weight", **over["weight"])
        self.bias_quant = make_quantizer(bias_quant, "bias", **over["bias"])
        self.input_quant = make_quantizer(input_quant, "act", **over["input"])
        self.output_quant = make_quantizer(output_quant, "act", **over["output"])
        for slot in _SLOTS:
            q = getattr(self, slot + "_quant")
            q.qname = q.qname or f"{type(self).__name__}.{slot}_quant"
        self.return_quant_tensor = return_quant_tensor
        # compute the accumulator exactly in eval mode (set by the compiler where an activation quantizer reads
        # this layer's output): see exact_integer_form
        self.exact_accumulator = False
        self.__dict__["_input_scale_cache"] = None

    # -- inspection ------------------------------------------------------------------------------------

    def quant_weight(self):
        """The quantized weight as a QuantTensor (a plain tensor when weight quantization is off)."""
        return self.weight_quant.quant_tensor(self.weight, training=self.training)

    def int_weight(self) -> torch.Tensor:
        return self.weight_quant.int_repr(self.weight)

    def quant_weight_scale(self) -> torch.Tensor:
        return self.weight_quant.scale(self.weight)

    def quant_weight_zero_point(self) -> torch.Tensor:
        return self.weight_quant.zero_point(self.weight)

    def quant_weight_bit_width(self) -> int:
        return self.weight_quant.bit_width

    def _out_weight_scale(self, scale):
        """The weight scale as one entry per output channel (or 0-d per tensor), flattened."""
        return scale if scale is None or scale.numel() == 1 else scale.reshape(-1)

    def _bias_args(self):
        in_scale = self.__dict__.get("_input_scale_cache")
        return in_scale, (self._out_weight_scale(self.quant_weight_scale())
                          if self.weight_quant.is_quant_enabled else None)

    def quant_bias(self):
        """The quantized bias as a QuantTensor; an external scale uses the input scale of the last call."""
        return self.bias_quant.quant_tensor(self.bias, *self._bias_args(), training=self.training)

    def int_bias(self) -> torch.Tensor:
        return self.bias_quant.int_repr(self.bias, *self._bias_args())

    def quant_bias_scale(self) -> torch.Tensor:
        qb = self.quant_bias()
        return qb.scale.reshape(-1).squeeze() if isinstance(qb, QuantTensor) else None

    def quant_bias_bit_width(self) -> int:
        return self.bias_quant.bit_width

    def fan_in(self) -> int:
        return self.weight[0].numel()

    # -- forward ---------------------------------------------------------------------------------------

    def forward(self, x, input_quantizer=None):
        """``input_quantizer``: in compiled graphs, the quantizer of the activation upstream (an argument of this
        node), which gives a plain-tensor input its scale."""
        xv, qx = self._quant_input(x, input_quantizer)
        self.__dict__["_input_scale_cache"] = None if qx is None else qx.scale.detach()
        qw = self.quant_weight()
        wv = value_of(qw)
        qb, bv = None, self.bias
        src = input_quantizer
        observing = qx is None and (is_calibrating(self.input_quant) or (src is not None and is_calibrating(src)))
        external = self.bias_quant.is_quant_enabled and self.bias_quant.bias_scaling == "external"
        if self.bias is not None and self.bias_quant.is_quant_enabled and not (external and observing):
            # (while the input quantizer observes, values are float and so is an input-scaled bias)
            w_scale = self._out_weight_scale(qw.scale) if isinstance(qw, QuantTensor) else None
            qb = self.bias_quant.quant_tensor(self.bias, None if qx is None else qx.scale, w_scale,
                                              training=self.training)
            bv = value_of(qb)
        exact = self._exact_ok(qx, qw, qb)
        small, acc_bias = False, None
        needs_grad = torch.is_grad_enabled() and (xv.requires_grad or any(p.requires_grad for p in self.parameters()))
        if exact and not needs_grad:
            out, small, acc_bias = self._exact_accumulator(xv, qx, qw, qb)
        else:
            out = self.inner_forward(xv, wv, bv)
            if exact:  # exact values, float gradients
                acc, small, acc_bias = self._exact_accumulator(xv, qx, qw, qb)
                out = out + (acc - out).detach()
        result = out
        if qx is not None and isinstance(qw, QuantTensor) and qx.scale.numel() == 1:
            # (a per-channel input scale puts each input channel on its own grid: the sum is on none)
            result = self._accumulator(out, qx, qw, qb, exact=small, acc_bias=acc_bias)
        if self.output_quant.is_quant_enabled:
            result = self.output_quant.quant_tensor(out, training=self.training)
        if self.return_quant_tensor and isinstance(result, QuantTensor):
            return result
        return value_of(result)

    def acc_scale(self, in_scale, w_scale) -> torch.Tensor:
        """input scale x weight scale as the float32 product the runtimes compute: 0-d per tensor, else one
        entry per output channel (flat)."""
        scale = in_scale.reshape(-1).float() * self._out_weight_scale(w_scale).reshape(-1).float()
        return scale if scale.numel() > 1 else scale.reshape(())

    def _acc_scale_of(self, qx, qw, ndim: int) -> torch.Tensor:
        """:meth:`acc_scale` shaped to broadcast over an output of ``ndim`` dims (along the output channels
        per channel)."""
        return qf.broadcast_shape(self.acc_scale(qx.scale, qw.scale), ndim, self.out_channel_axis % ndim)

    def exact_integer_form(self) -> bool:
        """Whether this layer computes its accumulator exactly in eval mode (given a per-tensor quantized
        input): asked for (``exact_accumulator``, set by the compiler on targets that requantize integer
        accumulators), with zero-point-free quantized weights and no bias or an input-scaled one. Backends
        that write integer convolutions read this to know where the fake-quant model is integer-exact."""
        if not self.weight_quant.is_quant_enabled:
            return False
        with torch.no_grad():
            return self._integer_layer(self.quant_weight_zero_point())

    def _integer_layer(self, w_zero_point) -> bool:
        """The configuration part of :meth:`exact_integer_form`, for weights with zero point ``w_zero_point``."""
        return bool(self.exact_accumulator) and not bool(torch.any(w_zero_point != 0)) and \
            (self.bias is None or (self.bias_quant.is_quant_enabled and self.bias_quant.bias_scaling == "external"))

    def _exact_ok(self, qx, qw, qb) -> bool:
        """Whether this call computes its accumulator exactly: :meth:`exact_integer_form`, in eval mode, with a
        per-tensor quantized input (and the bias quantized on the accumulator grid: not while the input's
        quantizer observes)."""
        return not self.training and exact_enabled() and qx is not None and qx.scale.numel() == 1 and \
            isinstance(qw, QuantTensor) and self._integer_layer(qw.zero_point) and \
            (self.bias is None or isinstance(qb, QuantTensor))

    def _exact_accumulator(self, xv, qx, qw, qb) -> tuple[torch.Tensor, bool, Optional[torch.Tensor]]:
        """The layer output as the integer hardware computes it: the integer accumulator (input integers minus
        zero point, times weight integers, plus bias integers; exact, see :class:`ExactIntegerOp`) times the
        accumulator scale, rounded once to float32. The accumulator scale is the float32 product input scale x
        weight scale, as the runtimes compute it. Returns (output, whether it carries the accumulator exactly:
        below 2^22, so the activation after it can recover the integers; the bias integers it includes, shaped to
        broadcast, or None)."""
        with torch.no_grad():
            # float32 quotients of values on the grid round back to their integers (|int| < 2^22)
            x_int = torch.round(xv.detach().float() / qx.scale.detach().float())
            lo, hi = qf.int_range(qx.bit_width, qx.signed, qx.narrow)
            zp = float(qx.zero_point.detach().reshape(-1)[0])
            x_bound = max(abs(lo - zp), abs(hi - zp))  # from the input's integer range, not its data
            key = (self.weight.data_ptr(), self.weight._version, qw.scale.detach().reshape(-1).tolist())
            op = self.__dict__.get("_exact_op")
            if op is None or op.key != key or op.x_bound < x_bound:
                op = ExactIntegerOp(self.int_weight().float(), self.fan_in(), x_bound, key)
                self.__dict__["_exact_op"] = op
            acc = op(lambda a, b: self.inner_forward(a, b, None), x_int)
            acc_scale = self._acc_scale_of(qx, qw, acc.dim()).detach().float()
            acc_bias = None
            if qb is not None:  # the bias integers, on the accumulator grid (external scale), as exported
                acc_bias = qf.broadcast_shape(self.int_bias().double(), acc.dim(), self.out_channel_axis % acc.dim())
                acc = acc.double() + acc_bias
            small = float(acc.abs().max()) < 2 ** 22 if acc.numel() else True
            if small:  # exact integers below 2^22: one float32 product rounds once
                return acc.float() * acc_scale, True, acc_bias
            return (acc.double() * acc_scale.double()).float(), False, acc_bias

    def _accumulator(self, out, qx, qw, qb, exact: bool = False, acc_bias=None) -> QuantTensor:
        scale = self._acc_scale_of(qx, qw, out.dim())
        axis = self.out_channel_axis % out.dim()
        bits = qf.accumulator_bit_width(qx.bit_width, qw.bit_width, self.weight_quant.narrow_range,
                                        self.fan_in())
        zero_point = torch.zeros_like(scale)
        if isinstance(qb, QuantTensor) and self.bias_quant.bias_scaling == "external":
            bits = max(bits, qb.bit_width) + 1
        elif self.bias is not None:
            # float or internally-scaled bias: not on the accumulator grid, so it becomes a zero point.
            bias = value_of(qb) if qb is not None else self.bias
            zero_point = -qf.broadcast_shape(bias, out.dim(), axis) / scale
        return QuantTensor(out, scale, zero_point, bits, True, self.training, exact=exact,
                           acc_bias=acc_bias if exact else None)


F32_EXACT = 2 ** 24  # float32 holds every integer below this


class ExactIntegerOp:
    """``op(x_int, w_int)`` (a convolution or matmul, bilinear in its operands) computed exactly on
    integer-valued float tensors, for inputs with ``|x_int| <= x_bound``.

    The op is passed at each call (the object holds tensors only, so models that carry it still pickle).
    Every partial sum of a float32 dot product of ``fan_in`` terms is an integer no larger than
    ``fan_in * x_bound * max|w|``; below 2^24 one float32 call is exact, in any summation order. Otherwise the
    weights are split into base-2^b digits that each meet the bound, and the float32 results are summed in
    float64; float64 operands are the last resort. The weight digits are computed once (the weights of an eval
    model do not change; ``key`` says which weights these are)."""

    def __init__(self, w_int: torch.Tensor, fan_in: int, x_bound: float, key=None):
        self.key, self.x_bound = key, x_bound
        mw = float(w_int.abs().max()) if w_int.numel() else 0.0
        self.bound = fan_in * x_bound * mw  # largest |result|
        self.digits: list = []  # (weight digits, place value)
        self.double_w = None
        if self.bound < F32_EXACT:
            self.digits = [(w_int, 1.0)]
            return
        digit_max = F32_EXACT / (fan_in * max(x_bound, 1.0))
        bits = int(math.floor(math.log2(digit_max))) if digit_max >= 2 else 0
        if bits < 1:
            self.double_w = w_int.double()
            return
        base, rest, place = float(2 ** bits), w_int, 1.0
        while float(rest.abs().max()) * fan_in * x_bound >= F32_EXACT:
            digit = torch.remainder(rest, base)
            self.digits.append((digit, place))
            rest, place = (rest - digit) / base, place * base
        self.digits.append((rest, place))

    def __call__(self, op, x_int: torch.Tensor) -> torch.Tensor:
        """``op(x_int, w_int)``: float32 when every result is below 2^24, else float64."""
        if self.double_w is not None:
            return op(x_int.double(), self.double_w)
        if len(self.digits) == 1:
            return op(x_int, self.digits[0][0])
        acc = None
        for digit, place in self.digits:
            part = op(x_int, digit).double() * place
            acc = part if acc is None else acc + part
        return acc


class _ConvMixin(QuantWBIOL):
    def inner_forward(self, x, w, b):
        return self._conv_forward(x, w, b)


def _conv_init(self, base, args, kwargs):
    quant = {k: kwargs.pop(k) for k in ("weight_quant", "bias_quant", "input_quant", "output_quant")
             if k in kwargs}
    rqt = kwargs.pop("return_quant_tensor", False)
    base_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _BASE_ARGS}
    base.__init__(self, *args, **base_kwargs)
    self._init_quant(quant.get("weight_quant", Int8WeightPerTensorFloat), quant.get("bias_quant"),
                     quant.get("input_quant"), quant.get("output_quant"), rqt, kwargs)


_BASE_ARGS = {"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
              "padding_mode", "device", "dtype", "output_padding", "in_features", "out_features"}


class QuantConv1d(_ConvMixin, nn.Conv1d):
    """Conv1d with weight (default 8-bit per-tensor float), bias, input and output quantizer slots."""

    def __init__(self, *args, **kwargs):
        _conv_init(self, nn.Conv1d, args, kwargs)


class QuantConv2d(_ConvMixin, nn.Conv2d):
    """Conv2d with weight (default 8-bit per-tensor float), bias, input and output quantizer slots."""

    def __init__(self, *args, **kwargs):
        _conv_init(self, nn.Conv2d, args, kwargs)


class QuantConv3d(_ConvMixin, nn.Conv3d):
    """Conv3d with weight (default 8-bit per-tensor float), bias, input and output quantizer slots."""

    def __init__(self, *args, **kwargs):
        _conv_init(self, nn.Conv3d, args, kwargs)


class _ConvTransposeMixin(QuantWBIOL):
    weight_channel_axis = 1

    def fan_in(self) -> int:
        return (self.in_channels // self.groups) * math.prod(self.kernel_size)

    def _out_weight_scale(self, scale):
        # weight [in, out / groups, k...]: a per-channel scale j serves output channel j of every group
        if scale is None or scale.numel() == 1:
            return scale
        return scale.reshape(-1).repeat(self.groups)

    def inner_forward(self, x, w, b):
        return self._conv_transpose(x, w, b)


class QuantConvTranspose1d(_ConvTransposeMixin, nn.ConvTranspose1d):
    """ConvTranspose1d with quantizer slots (weight channels on axis 1)."""

    def __init__(self, *args, **kwargs):
        _conv_init(self, nn.ConvTranspose1d, args, kwargs)

    def _conv_transpose(self, x, w, b):
        return F.conv_transpose1d(x, w, b, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)


class QuantConvTranspose2d(_ConvTransposeMixin, nn.ConvTranspose2d):
    """ConvTranspose2d with quantizer slots (weight channels on axis 1)."""

    def __init__(self, *args, **kwargs):
        _conv_init(self, nn.ConvTranspose2d, args, kwargs)

    def _conv_transpose(self, x, w, b):
        return F.conv_transpose2d(x, w, b, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)


class QuantLinear(QuantWBIOL, nn.Linear):
    """Linear with weight (default 8-bit per-tensor float), bias, input and output quantizer slots."""

    out_channel_axis = -1

    def __init__(self, *args, **kwargs):
        _conv_init(self, nn.Linear, args, kwargs)

    def inner_forward(self, x, w, b):
        return F.linear(x, w, b)


_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "padding_mode")


def float_layer_kwargs(layer: nn.Module) -> dict:
    """Constructor arguments (without ``bias``) that rebuild ``layer``'s configuration."""
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features}
    kwargs = {a: getattr(layer, a) for a in _CONV_ARGS}
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        kwargs["output_padding"] = layer.output_padding
    return kwargs


def build_from_state(cls, state: dict, device=None, dtype=None, **kwargs) -> nn.Module:
    """``cls(**kwargs)`` whose weight and bias come from ``state`` through ``load_state_dict``.

    The layer is built on the meta device, so no random initialisation is computed for weights that are
    overwritten at once; its parameters are then materialised empty and loaded."""
    layer = cls(**kwargs, device="meta")
    for name, param in list(layer.named_parameters(recurse=False)):
        empty = torch.empty(param.shape, device=device, dtype=dtype or param.dtype)
        setattr(layer, name, nn.Parameter(empty, requires_grad=param.requires_grad))
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if unexpected or any("_quant." not in k for k in missing):
        raise RuntimeError(f"{cls.__name__}: state does not fit (missing {missing}, unexpected {unexpected})")
    return layer


QUANT_LAYER_FOR = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d, nn.ConvTranspose2d: QuantConvTranspose2d, nn.Linear: QuantLinear,
}
