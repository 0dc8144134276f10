"""Softmax over a quantized input, computed so that every runtime gets the same float32 result.

A float softmax (``exp(x - max) / sum``) is computed by each runtime with its own ``exp`` and its own summation
order; the results differ by a few float32 ulps, and where one lands just below a rounding boundary of the
quantizer after it and the other just above, the artefact is 1 LSB off the fake-quant model (torchvision's
vit_b_16 on onnx: 5 LSB at the logits). When the softmax reads a per-tensor quantized input, its argument takes
only ``2^bits`` values per row: ``x - max(x) = -d x s`` with ``d`` an integer code distance in ``[0, 2^bits)``.
So the softmax is computed as

    d = round((max(x) - x) / s)          exact: x is on the grid of step s
    e = table[d]                         table[d] = round(2^F x exp(-d x s)), integers, F = floor(log2(2^24 / n))
    y = e x (1 / sum(e))                 n integers <= 2^F: every partial sum is exact in float32, in any order

Every step is an exact or a correctly rounded IEEE operation on the same operands, so torch, onnxruntime and
inductor compute the same float32 ``y`` by construction, not by luck; the table, written into the artefact as
it is, is the only approximation (``2^-F`` of the largest term: 2^-16 over ViT-B/16's 197 tokens, far below an
8-bit output step). Training, calibration, a per-channel or 16-bit input, or ``exact_arithmetic(False)`` use the
plain float softmax.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import exact_enabled

MAX_TABLE_BITS = 12  # inputs of up to 12 bits: a table of at most 4096 entries
MIN_FRACTION_BITS = 8  # a row of up to 2^16 values keeps 8 fraction bits for the smallest sum


def fraction_bits(n: int) -> int:
    """F such that ``n`` table entries of at most ``2^F`` sum exactly in float32 (``n x 2^F <= 2^24``)."""
    return 24 - math.ceil(math.log2(max(int(n), 1)))


def softmax_table(scale, levels: int, n: int) -> torch.Tensor:
    """``round(2^F x exp(-d x scale))`` for ``d`` in ``[0, levels)``, float32 integers (F from ``n``, the row
    length). ``scale``: the input's float32 step (a tensor or float)."""
    s = float(torch.as_tensor(scale, dtype=torch.float32).reshape(()))
    d = torch.arange(levels, dtype=torch.float64)
    return torch.round(torch.exp(-d * s) * 2.0 ** fraction_bits(n)).float()


@torch.fx.wrap
def table_softmax(x: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """The softmax of ``x`` (values on a grid of step ``scale``) along ``dim`` from ``table`` (see module doc)."""
    d = torch.round((x.amax(dim, keepdim=True) - x) / scale)
    e = table[d.long()]
    return e * torch.reciprocal(e.sum(dim, keepdim=True))


def tabulable(quantizer, n) -> bool:
    """Whether a softmax over rows of ``n`` values read from ``quantizer`` can be computed from a table."""
    return quantizer is not None and quantizer.is_quant_enabled and not quantizer.scaling_per_output_channel \
        and quantizer.bit_width <= MAX_TABLE_BITS and n is not None and fraction_bits(n) >= MIN_FRACTION_BITS


class QuantSoftmax(nn.Softmax):
    """``softmax(x, dim)`` of a per-tensor quantized ``x`` (the graph passes its quantizer as
    ``input_quantizer``), from a table of ``exp`` over code distances: the same float32 result in every
    runtime (module doc)."""

    def __init__(self, dim: int):
        super().__init__(dim=dim)

    def table_for(self, input_quantizer, n: int):
        """(table, float32 scale) the softmax of rows of ``n`` values read from ``input_quantizer`` uses, or None
        where it runs as a plain float softmax. The lowerings write these same tensors."""
        q = input_quantizer
        if self.training or not exact_enabled() or q is None or not tabulable(q, n) or q.calibrating \
                or not q.is_calibrated:
            return None
        lo, hi = q.int_range()
        scale = q.qparams(None)[0].detach().float().reshape(())
        return softmax_table(scale, int(hi) - int(lo) + 1, n), scale

    def forward(self, x, input_quantizer=None):
        tabled = self.table_for(input_quantizer, x.shape[self.dim])
        if tabled is None:
            return torch.softmax(x, self.dim)
        table, scale = tabled
        with torch.no_grad():
            out = table_softmax(x.detach(), table.to(x.device), scale.to(x.device), self.dim)
        if torch.is_grad_enabled() and x.requires_grad:
            plain = torch.softmax(x, self.dim)
            return plain + (out - plain).detach()
        return out
