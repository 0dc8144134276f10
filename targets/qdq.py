"""Plain QDQ: the quantizers, weights, biases and products of a standard ONNX file, shared by the onnx and dpu
backends, each of which lists its steps (:mod:`targets.onnx_steps`) on top.

Activations: ``QuantizeLinear -> [Clip for < 8 bits] -> DequantizeLinear`` (uint8 with zero point or int8);
weights: int8 initializers feeding ``DequantizeLinear`` (per channel on the output-channel axis); biases: int32
initializers with the accumulator's scale (external scaling: input scale x weight scale, zero point 0) unless a
step writes them; products of two quantized tensors on int32 codes.
"""
from __future__ import annotations

import numpy as np
import onnx

from quantfx.errors import ExportError, TargetError
from quantfx.graph import module_of, qmeta

from .onnx_base import OnnxLowering, np32


def _int_dtype(bits: int, signed: bool):
    return np.int8 if signed else np.uint8


class PlainQDQLowering(OnnxLowering):
    """The QDQ form every QDQ backend starts from; ``self.grids`` maps each DequantizeLinear output to its grid
    (scale, zero point, int range)."""

    opset = 13

    def begin(self):
        super().begin()
        self.grids: dict = {}

    def emit_act_quant(self, x, q, base):
        scale, zp = q.qparams(None)
        return self.qdq(x, scale, zp, q.int_range(), q.signed, base)

    def q_consts(self, base, scale, zp, signed):
        """Initializers of a per-tensor QuantizeLinear/DequantizeLinear pair: (scale, zero point) values."""
        s = self.const(base + "_scale", np32(scale.reshape(())))
        z = self.const(base + "_zero_point", np.asarray(zp.reshape(()).round().item(), _int_dtype(8, signed)))
        return s, z

    def qdq(self, x, scale, zp, int_range, signed, base):
        """``x`` quantized onto the grid (scale, zero point, int range) and dequantized; the steps' ``grid`` may
        change its integer type and their ``before_quantize`` what the QuantizeLinear reads."""
        for step in self.steps:
            signed, int_range = step.grid(self, signed, int_range)
        dtype = _int_dtype(8, signed)
        grid = (float(scale.reshape(())), float(zp.reshape(()).round()))
        for step in self.steps:
            x = step.before_quantize(self, x, grid, base)
        x = self._unfusable_clip(x, grid, dtype)
        s, z = self.q_consts(base, scale, zp, signed)
        y = self.op("QuantizeLinear", [x, s, z], base + "_q")
        info = np.iinfo(dtype)
        if tuple(int_range) != (info.min, info.max):
            y = self.op("Clip", [y, self.const(base + "_qmin", np.asarray(int_range[0], dtype)),
                                 self.const(base + "_qmax", np.asarray(int_range[1], dtype))], base + "_clip")
        out = self.op("DequantizeLinear", [y, s, z], base)
        self.grids[out] = grid + (tuple(int_range),)
        return out

    def _unfusable_clip(self, x, grid, dtype):
        """``x`` or, where ``x`` is a ``Clip(0, max)`` that onnxruntime's ClipQuantFusion would wrongly drop
        before the QuantizeLinear of ``grid``, a ``Relu`` computing the same codes.

        ClipQuantFusion (``onnxruntime/core/optimizer/qdq_transformer/clip_quantizelinear.cc``, on at
        ORT_ENABLE_EXTENDED, so in a default session) removes a Clip whose only reader is a QuantizeLinear when
        ``min - lower <= FLT_EPSILON`` and ``upper - max <= FLT_EPSILON``, ``[lower, upper]`` the grid's float
        range: an absolute epsilon (2^-23), so on an int8 grid of zero point 0 and scale 2^-30 or less
        (``128 * scale <= 2^-23``) it takes ``Clip(0, 6)`` for a no-op and the negative values pass. Where the
        Clip's max lies at or above the grid's top (the grid saturates first), ``Relu`` gives the same codes,
        and ReluQuantFusion drops a Relu only before a grid that starts at 0 (exact)."""
        clip = x.producer()
        if clip is None or clip.op_type != "Clip" or x.uses() or len(clip.inputs) != 3 or \
                any(v is None or v.const_value is None for v in clip.inputs[1:]):
            return x
        lo, hi = (float(v.const_value.numpy().reshape(())) for v in clip.inputs[1:])
        info = np.iinfo(dtype)
        s, z = np.float32(grid[0]), np.float32(grid[1])
        lower, upper = float(s * np.float32(info.min - z)), float(s * np.float32(info.max - z))
        eps = float(np.finfo(np.float32).eps)
        if not (lo - lower <= eps and upper - hi <= eps) or (lo <= lower and hi >= upper):
            return x  # onnxruntime keeps it, or dropping it is exact
        if lo != 0 or hi < upper:
            raise ExportError(f"{self.target}: {clip.name} (Clip {lo}, {hi}) before a QuantizeLinear of scale "
                              f"{grid[0]:g}: onnxruntime's ClipQuantFusion would drop it (it compares with an "
                              "absolute epsilon of 2^-23); rescale the layer so its output scale is above 2^-30")
        bounds = list(clip.inputs[1:])
        relu = self.op("Relu", [clip.inputs[0]], x.name + "_relu")
        self.graph.remove(clip, safe=True)
        for v in bounds:
            if not v.uses():
                del self.graph.initializers[v.name]
        return relu

    def emit_product(self, node):
        """A QuantProduct on integers: each operand's codes (those its DequantizeLinear reads, else a
        ``QuantizeLinear`` on its own grid, exact on its values), ``Cast`` to int32 minus the zero point, an int32
        ``Mul`` / ``MatMul`` (exact below 2^31), then ``Cast`` to float and ``Mul(s_a x s_b)``: ``float32(acc) x
        float32(s_a s_b)``, as the fake-quant model computes it. The activation quantizer after it is its
        requantization (Q/DQ)."""
        if qmeta(node).bit_width > 32:
            raise TargetError(f"{self.target}: {node.target} ({module_of(self.gm, node).op}) can reach a "
                              f"{qmeta(node).bit_width}-bit accumulator; the file multiplies in int32 (reduce the "
                              "operands' bit widths, or keep it float with overrides={" + repr(node.target) + ": None})")
        codes = []
        for i, operand in enumerate(node.args[:2]):
            meta = qmeta(operand)
            base = f"{node.name}_in{i}"
            value = self.env[operand]
            grid = (float(meta.scale.reshape(())), float(meta.zero_point.reshape(()).round()))
            dq = value.producer()
            if dq is not None and dq.op_type == "DequantizeLinear" and self.grids.get(value, (None,))[:2] == grid:
                q = dq.inputs[0]  # the codes the operand was dequantized from
            else:
                s, z = self.q_consts(base, meta.scale, meta.zero_point, meta.signed)
                q = self.op("QuantizeLinear", [value, s, z], base + "_q")
            ints = self.op("Cast", [q], base + "_int32", to=int(onnx.TensorProto.INT32))
            zp = int(meta.zero_point.reshape(()).round().item())
            codes.append(self.op("Sub", [ints, self.const(base + "_zp32", np.asarray(zp, np.int32))], base + "_int")
                         if zp else ints)
        op = module_of(self.gm, node).op
        acc = self.op("Mul" if op == "mul" else "MatMul", codes, node.name + "_acc")
        acc = self.op("Cast", [acc], node.name + "_acc_float", to=int(onnx.TensorProto.FLOAT))
        _, _, acc_scale = self.product_scales(node)
        return self.op("Mul", [acc, self.const(node.name + "_acc_scale", np32(acc_scale.reshape(())))], node.name)

    def dq_const(self, base, ints, scale, dtype, axis):
        """``DequantizeLinear`` of integer initializer ``ints`` (zero point 0; per channel on ``axis`` for a
        vector ``scale``)."""
        w = self.const(base + "_int", ints.numpy().astype(dtype))
        s = self.const(base + "_scale", np32(scale))
        z = self.const(base + "_zero_point", np.zeros(tuple(scale.shape), dtype))
        attrs = {"axis": axis} if scale.dim() == 1 else {}
        return self.op("DequantizeLinear", [w, s, z], base, **attrs)

    def emit_weight(self, layer, base):
        ints, scale = self.weight_ints(layer)
        return self.dq_const(base + ".weight", ints, scale, np.int8, layer.weight_quant.channel_axis)

    def emit_bias(self, layer, in_scale, base):
        for step in self.steps:
            b = step.bias(self, layer, in_scale, base)
            if b is not None:
                return b
        ints, scale = self.bias_ints(layer, in_scale)
        return self.dq_const(base + ".bias", ints, scale.reshape(()) if scale.numel() == 1 else scale,
                             np.int32, 0)


__all__ = ["PlainQDQLowering"]
