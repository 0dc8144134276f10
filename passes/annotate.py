"""annotate: write each edge's compile-time quantization facts into ``node.meta['quant']`` (a ``QMeta``).

Activation quantizers give scale / zero point / bit width / sign; invariant ops pass them on; conv/linear,
add and truncating average-pool outputs carry their accumulator (or truncated) width and scale. Scales are
None until the producing quantizer is calibrated; ``quantfx.calibrate`` runs this pass again. Quantizers are
named after their module path (or their shared group) so errors can name them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from quantfx.errors import CalibrationError
from quantfx.graph import (
    FLOAT, META_KEY, QMeta, data_input, group_of, is_act_quant, is_add, is_cat, is_compute, is_invariant,
    is_product, is_trunc_pool, module_of, qmeta, tensor_inputs,
)
from quantfx.quant import functional as qf
from quantfx.pass_infra import Pass, PassResult


def _qparams(q, x=None):
    try:
        with torch.no_grad():
            s, z = q.qparams(x)
        return s.detach(), z.detach()
    except CalibrationError:
        return None, None


def _mul(a, b):
    if a is None or b is None:
        return None
    out = a.reshape(-1) * b.reshape(-1)
    return out.reshape(()) if out.numel() == 1 else out


@dataclass(frozen=True)
class Annotate(Pass):
    name = "annotate"
    runs_code = False  # reads and edits the graph only

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in gm.graph.nodes:
            node.meta[META_KEY] = self.meta_for(gm, node)
        return PassResult(gm, False)  # metadata only: no recompile needed

    def meta_for(self, gm, node: fx.Node) -> QMeta:
        if is_act_quant(gm, node):
            m = module_of(gm, node)
            q = m.act_quant
            if not q.is_quant_enabled:
                return FLOAT
            group = group_of(node, q)
            if not getattr(q, "group", None):
                q.qname = f"{node.target}.act_quant"
            s, z = _qparams(q)
            return QMeta("act", q.bit_width, q.signed, q.narrow_range, s, z, q.qname, group)
        if is_invariant(gm, node):
            src = data_input(node)
            return qmeta(src) if src is not None else FLOAT
        if is_compute(gm, node):
            return self._compute(gm, node)
        if is_trunc_pool(gm, node):
            return self._pool(gm, node)
        if is_product(gm, node):
            return self._product(gm, node)
        if is_add(node):
            ins = [qmeta(a) for a in tensor_inputs(node)]
            if all(m.kind == "act" for m in ins) and len({m.group for m in ins}) == 1 and ins[0].group:
                zp = None if any(m.zero_point is None for m in ins) else sum(m.zero_point for m in ins)
                # the sum of the inputs' integers (members of a scale group may differ in sign and width)
                ranges = [qf.int_range(m.bit_width, m.signed, m.narrow) for m in ins]
                lo, hi = sum(r[0] for r in ranges), sum(r[1] for r in ranges)
                signed = lo < 0
                bits = max(hi.bit_length(), (-lo - 1).bit_length()) + 1 if signed else hi.bit_length()
                return QMeta("acc", bits, signed, False, ins[0].scale, zp, None, ins[0].group)
            return FLOAT
        if is_cat(node):
            ins = [qmeta(a) for a in tensor_inputs(node)]
            if ins and all(m.kind == "act" for m in ins) and len({m.group for m in ins}) == 1:
                return ins[0]
            return FLOAT
        return FLOAT

    @staticmethod
    def _compute(gm, node) -> QMeta:
        layer = module_of(gm, node)
        inp = qmeta(node.args[0])
        wq = layer.weight_quant
        if inp.kind not in ("act", "trunc") or not wq.is_quant_enabled:
            return FLOAT
        w_scale, _ = _qparams(wq, layer.weight)
        bits = qf.accumulator_bit_width(inp.bit_width, wq.bit_width, wq.narrow_range, layer.fan_in())
        bq = layer.bias_quant
        external = layer.bias is not None and bq.is_quant_enabled and bq.bias_scaling == "external"
        if external:
            bits = max(bits, bq.bit_width) + 1
        return QMeta("acc", bits, True, False, _mul(inp.scale, w_scale),
                     None if inp.scale is None else torch.zeros(()), None, None)

    @staticmethod
    def _product(gm, node) -> QMeta:
        """A product of two quantized tensors: an accumulator of scale s_a x s_b, zero point 0, as wide as the
        product of the operands' integers (times the reduced length of a matmul)."""
        ins = [qmeta(a) for a in node.args[:2]]
        if any(m.kind != "act" for m in ins):
            return FLOAT
        ranges = [qf.int_range(m.bit_width, m.signed, m.narrow) for m in ins]
        # operands as (q - zp): unsigned grids with a zero point span as much as signed ones of their width
        mags = [max(abs(lo), abs(hi)) for lo, hi in ranges]
        k = 1
        if module_of(gm, node).op == "matmul":
            tm = node.args[1].meta.get("tensor_meta")
            k = int(tm.shape[-2]) if hasattr(tm, "shape") and len(tm.shape) >= 2 else 1
        bits = (mags[0] * mags[1] * k).bit_length() + 1
        scale = None if any(m.scale is None for m in ins) else \
            ins[0].scale.float().reshape(()) * ins[1].scale.float().reshape(())
        return QMeta("acc", bits, True, False, scale, None if scale is None else torch.zeros(()), None, None)

    @staticmethod
    def _pool(gm, node) -> QMeta:
        pool = module_of(gm, node)
        inp = qmeta(node.args[0])
        if inp.kind != "act" or inp.scale is None and inp.bit_width is None:
            return FLOAT
        tm = node.args[0].meta.get("tensor_meta")
        try:
            kernel = pool._kernel(torch.empty(tuple(tm.shape), device="meta")) if tm is not None else None
        except Exception:
            kernel = None
        if kernel is None:
            kernel = pool._kernel(torch.empty(1, 1, 1, 1)) if hasattr(pool, "kernel_size") else None
        if kernel is None:
            return QMeta("trunc", pool.bit_width, inp.signed, False, None, None, None, None)
        k = math.prod(kernel)
        _, shift = pool.shift_for(inp.bit_width, k)
        scale = None if inp.scale is None else inp.scale * (2.0 ** shift) / k
        return QMeta("trunc", pool.bit_width, inp.signed, False, scale,
                     None if scale is None else torch.zeros(()), None, None)
