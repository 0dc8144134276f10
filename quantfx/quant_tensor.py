"""QuantTensor: a dequantized value with its affine quantization metadata, for users and eager layers.

It is what eager quantized layers return with ``return_quant_tensor=True``. Compiled graphs carry plain tensors
and keep the metadata in ``node.meta``, with one exception: on ``requant='multiplier'`` targets a conv/linear
hands its exact accumulator (``exact=True``) to the activations that requantize it.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .errors import QuantFXError
from .quant import functional as qf

# Ops that move or select values without changing them: the result keeps scale, zero point, bit width, sign.
_CHANNEL_PRESERVING = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
    F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices,
    torch.Tensor.contiguous, torch.Tensor.clone, torch.Tensor.detach, torch.clone,
}
# Layout ops: keep metadata when it is per tensor (a per-channel scale would no longer broadcast).
_LAYOUT = {
    torch.flatten, torch.Tensor.flatten, torch.reshape, torch.Tensor.reshape, torch.Tensor.view,
    torch.transpose, torch.Tensor.transpose, torch.permute, torch.Tensor.permute, torch.squeeze,
    torch.Tensor.squeeze, torch.unsqueeze, torch.Tensor.unsqueeze, torch.Tensor.__getitem__,
    torch.chunk, torch.Tensor.chunk, torch.split, torch.Tensor.split, torch.Tensor.expand,
    F.pixel_shuffle, F.pixel_unshuffle, torch.pixel_shuffle, torch.pixel_unshuffle, torch.t, torch.Tensor.t,
}
_PASSTHROUGH_ATTRS = {"shape", "dtype", "device", "ndim", "requires_grad", "grad", "is_cuda", "layout"}


def _is_per_tensor(qt: "QuantTensor") -> bool:
    return qt.scale.numel() == 1 and qt.zero_point.numel() == 1


def _unwrap(x):
    if isinstance(x, QuantTensor):
        return x.value
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


class QuantTensor:
    """``value`` in dequantized form with ``scale``, ``zero_point``, ``bit_width``, ``signed``, ``training``.

    The affine invariant: ``value == (int - zero_point) * scale`` with ``int`` inside the ``bit_width`` range.
    ``exact``: the integers are exact and ``value`` is ``float32(int * scale)`` rounded once (an accumulator a
    layer computed exactly in eval mode, which the activation after it may requantize as the runtime does);
    ``acc_bias``: the bias integers such an accumulator includes.
    """

    __slots__ = ("value", "scale", "zero_point", "bit_width", "signed", "training", "narrow", "exact", "acc_bias")

    def __init__(self, value, scale, zero_point=0.0, bit_width=8, signed=True, training=False, narrow=False,
                 exact=False, acc_bias=None):
        self.value = value
        self.scale = scale if torch.is_tensor(scale) else torch.tensor(float(scale))
        self.zero_point = zero_point if torch.is_tensor(zero_point) else torch.tensor(float(zero_point))
        self.bit_width = int(bit_width.item() if torch.is_tensor(bit_width) else bit_width)
        self.signed = bool(signed)
        self.training = bool(training)
        self.narrow = bool(narrow)
        self.exact = bool(exact)
        # with ``exact``: the bias integers the accumulator includes (broadcastable to value), or None; a
        # runtime that adds its bias in float after scaling (oneDNN) needs the two apart
        self.acc_bias = acc_bias

    # -- the affine view -------------------------------------------------------------------------------

    def _pre_round(self) -> torch.Tensor:
        return self.value.detach().double() / self.scale.detach().double() + self.zero_point.detach().double()

    def int(self) -> torch.Tensor:
        """The integer representation (int64)."""
        return torch.round(self._pre_round()).to(torch.int64)

    @property
    def is_valid(self) -> bool:
        """True when value / scale + zero_point is an integer inside the bit-width range.

        The tolerance depends on the bit width, not on each value: float32 carries 24 significant bits, so a wide
        accumulator (a dot product of many terms, computed in float32) lands a few hundredths off its integers
        even where the sum itself is small. ``2^(bit_width - 20)``, at least 1e-3 (8-bit values), at most 0.2
        (the Brevitas convention, reached from 18 bits), so a half-integer is never valid."""
        pre = self._pre_round()
        rounded = torch.round(pre)
        tol = min(0.2, max(1e-3, 2.0 ** (self.bit_width - 20)))
        if not bool(((pre - rounded).abs() <= tol).all()):
            return False
        qmin, qmax = qf.int_range(self.bit_width, self.signed, False)
        return bool(((rounded >= qmin) & (rounded <= qmax)).all())

    def _with_value(self, value) -> "QuantTensor":
        return QuantTensor(value, self.scale, self.zero_point, self.bit_width, self.signed, self.training,
                           self.narrow)

    def same_quant(self, other: "QuantTensor") -> bool:
        return (self.bit_width == other.bit_width and self.signed == other.signed
                and self.scale.shape == other.scale.shape and torch.equal(self.scale, other.scale)
                and torch.equal(self.zero_point, other.zero_point))

    # -- torch protocol --------------------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, QuantTensor)), None)
        if first is None:
            seq = args[0] if args else kwargs.get("tensors")
            if isinstance(seq, (list, tuple)):
                first = next((a for a in seq if isinstance(a, QuantTensor)), None)
        out = func(*_unwrap(args), **_unwrap(kwargs))
        if func in (torch.cat, torch.concat):
            items = args[0] if args else kwargs.get("tensors")
            if all(isinstance(t, QuantTensor) for t in items) and all(first.same_quant(t) for t in items) \
                    and _is_per_tensor(first):
                return first._with_value(out)
            return out
        if func is F.pad:
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            fill = kwargs.get("value", args[3] if len(args) > 3 else None) or 0.0
            keep = mode == "constant" and fill == 0.0 and bool((first.zero_point == 0).all())
            return first._with_value(out) if keep else out
        keep = func in _CHANNEL_PRESERVING or (func in _LAYOUT and _is_per_tensor(first))
        if not keep or not isinstance(args[0] if args else None, QuantTensor):
            return out
        if torch.is_tensor(out):
            return first._with_value(out)
        if isinstance(out, (tuple, list)) and func not in _CHANNEL_PRESERVING:
            return type(out)(first._with_value(o) if torch.is_tensor(o) else o for o in out)
        if isinstance(out, tuple):  # (values, indices) from max pool with indices
            return (first._with_value(out[0]),) + tuple(out[1:])
        return out

    def __getattr__(self, name):
        if name in _PASSTHROUGH_ATTRS:
            return getattr(self.value, name)
        method = getattr(torch.Tensor, name, None)
        if method is None or not callable(method):
            raise AttributeError(f"QuantTensor has no attribute {name!r}")

        def call(*args, **kwargs):
            return QuantTensor.__torch_function__(method, (QuantTensor,), (self,) + args, kwargs)
        return call

    def size(self, *args):
        return self.value.size(*args)

    def dim(self):
        return self.value.dim()

    def __len__(self):
        return len(self.value)

    def __getitem__(self, idx):
        return QuantTensor.__torch_function__(torch.Tensor.__getitem__, (QuantTensor,), (self, idx))

    # -- arithmetic ------------------------------------------------------------------------------------

    def __add__(self, other):
        if not isinstance(other, QuantTensor):
            return self.value + _unwrap(other)
        bit_width = max(self.bit_width, other.bit_width) + 1
        signed = self.signed or other.signed
        if self.same_quant(other) or (torch.equal(self.scale, other.scale)):
            return QuantTensor(self.value + other.value, self.scale, self.zero_point + other.zero_point,
                               bit_width, signed, self.training or other.training)
        if self.training or other.training:
            # Training only: keep gradients flowing; the result is not a valid QuantTensor.
            scale = (self.scale + other.scale) / 2
            return QuantTensor(self.value + other.value, scale, self.zero_point + other.zero_point,
                               bit_width, signed, True)
        raise QuantFXError(
            "QuantTensor add: the scales differ in eval mode, so the integer sum is not exact; "
            "quantize both inputs with one shared quantizer")

    __radd__ = __add__

    def __sub__(self, other):
        return self.value - _unwrap(other)

    def __rsub__(self, other):
        return _unwrap(other) - self.value

    def __mul__(self, other):
        return self.value * _unwrap(other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self.value / _unwrap(other)

    def __neg__(self):
        return -self.value

    def __repr__(self):
        return (f"QuantTensor(value={self.value!r}, scale={self.scale!r}, zero_point={self.zero_point!r}, "
                f"bit_width={self.bit_width}, signed={self.signed}, training={self.training})")


def value_of(x):
    """The plain tensor of x (a QuantTensor's value, or x itself)."""
    return x.value if isinstance(x, QuantTensor) else x


__all__ = ["QuantTensor", "value_of"]
