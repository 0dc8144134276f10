"""The product of two quantized tensors (an elementwise ``mul`` or a ``matmul``), computed on the accumulator grid.

Both operands come from activation quantizers (passed by the graph as ``a_quantizer`` / ``b_quantizer``, links
like a layer's ``input_quantizer``). In eval mode the product is exact integer arithmetic: the operands'
integers ``(q - zp)``, their product (or matrix product, in float64: exact below 2^53), and one float32 scale
``s_a x s_b``, so the output is ``float32(acc) x float32(s_a x s_b)``, the accumulator of the product as an integer
runtime computes it (the activation quantizer after it then requantizes that value). Training, calibration, a
per-channel operand or ``exact_arithmetic(False)`` use the plain float product.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import exact_enabled

PRODUCT_OPS = ("mul", "matmul")


def _per_tensor(q) -> bool:
    return q is not None and q.is_quant_enabled and not q.calibrating and q.is_calibrated and \
        not q.scaling_per_output_channel


class QuantProduct(nn.Module):
    """``a * b`` (op='mul') or ``a @ b`` (op='matmul') of two quantized tensors on the accumulator grid."""

    def __init__(self, op: str = "mul"):
        super().__init__()
        if op not in PRODUCT_OPS:
            raise ValueError(f"QuantProduct: op={op!r}; use one of {PRODUCT_OPS}")
        self.op = op

    def extra_repr(self):
        return f"op={self.op!r}"

    def plain(self, a, b):
        return a * b if self.op == "mul" else torch.matmul(a, b)

    @staticmethod
    def acc_scale(sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
        """The accumulator's scale: the float32 product of the operands' scales."""
        return (sa.float().reshape(()) * sb.float().reshape(()))

    def exact(self, a_quantizer, b_quantizer) -> bool:
        """Whether this call computes on integers (eval, both operands per-tensor quantized and calibrated)."""
        return not self.training and exact_enabled() and _per_tensor(a_quantizer) and _per_tensor(b_quantizer)

    def forward(self, a, b, a_quantizer=None, b_quantizer=None):
        plain = self.plain(a, b)
        if not self.exact(a_quantizer, b_quantizer):
            return plain
        sa, _ = a_quantizer.qparams(None)
        sb, _ = b_quantizer.qparams(None)
        with torch.no_grad():
            ia = torch.round(a.detach() / sa.reshape(())).double()  # the operand's value is (q - zp) x s
            ib = torch.round(b.detach() / sb.reshape(())).double()
            acc = ia * ib if self.op == "mul" else torch.matmul(ia, ib)
            out = acc.float() * self.acc_scale(sa.detach(), sb.detach())
        if torch.is_grad_enabled() and plain.requires_grad:
            return plain + (out - plain).detach()
        return out
