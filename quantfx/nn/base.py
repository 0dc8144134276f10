"""Shared plumbing of quantized layers: keyword-prefix overrides and input quantization."""
from __future__ import annotations

import contextlib
import contextvars

import torch

from ..errors import QuantArgumentError
from ..quant.functional import broadcast_shape
from ..quant.specs import FIELDS
from ..quant_tensor import QuantTensor, value_of


def split_overrides(kwargs: dict, slots: tuple[str, ...], owner: str, bare: str | None = None) -> dict:
    """Route ``<slot>_<field>=value`` keywords to their slot; bare ``<field>`` keywords go to slot ``bare``."""
    out = {s: {} for s in slots}
    for key, value in kwargs.items():
        for slot in slots:
            field = key[len(slot) + 1:]
            if key.startswith(slot + "_") and field in FIELDS:
                out[slot][field] = value
                break
        else:
            if bare is not None and key in FIELDS:
                out[bare][key] = value
                continue
            raise QuantArgumentError(
                f"{owner}: unknown argument {key!r}; quantizer keywords are '<slot>_<field>' with slot in "
                f"{', '.join(slots)} and field in {', '.join(FIELDS)}")
    return out


class InputQuantMixin:
    """Finds the quantization of a layer's input: its own ``input_quant``, an incoming QuantTensor, or (in
    compiled graphs, whose edges carry plain tensors) the quantizer of the activation upstream, which the graph
    passes as the ``input_quantizer`` argument (``self.conv(x, input_quantizer=self.x_quant.act_quant)``)."""

    def _quant_input(self, x, src=None):
        """(value, QuantTensor-or-None) of the input; ``src`` the upstream quantizer the graph passes."""
        if self.input_quant.is_quant_enabled:
            qx = self.input_quant.quant_tensor(value_of(x))
            return value_of(qx), (qx if isinstance(qx, QuantTensor) else None)
        if isinstance(x, QuantTensor):
            return x.value, x
        if src is not None and src.is_quant_enabled and not src.calibrating:
            scale, zp = src.qparams(None)
            axis = src.channel_axis if x.dim() > src.channel_axis else 0
            qx = QuantTensor(x, broadcast_shape(scale, x.dim(), axis), broadcast_shape(zp, x.dim(), axis),
                             src.bit_width, src.signed, self.training, narrow=src.narrow_range)
            return x, qx
        return x, None


_EXACT = contextvars.ContextVar("quantfx_exact_arithmetic", default=True)


@contextlib.contextmanager
def exact_arithmetic(enabled: bool = True):
    """Within the block, compiled eval-mode layers compute exact integer accumulators and runtime
    requantization (``enabled``, the default everywhere) or the plain float fake quantization (``False``:
    about 2x faster, equal but for rounding ties; for shape propagation, or large evaluations where ties do
    not matter)."""
    token = _EXACT.set(bool(enabled))
    try:
        yield
    finally:
        _EXACT.reset(token)


def exact_enabled() -> bool:
    return _EXACT.get()


def is_calibrating(*quantizers) -> bool:
    return any(q.is_quant_enabled and q.calibrating for q in quantizers)


__all__ = ["split_overrides", "InputQuantMixin", "is_calibrating", "exact_arithmetic", "exact_enabled", "torch"]
