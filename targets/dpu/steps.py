"""The dpu backend's lowering steps (:mod:`targets.onnx_steps`): the DPU's forms of the fixed-point activations
and biases, the fast form's steps for onnxruntime's integer kernels, and the metadata a dpu file carries."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantfx.graph import is_cat, is_invariant, module_of, tensor_inputs
from quantfx.nn import QuantLeakyReLU, QuantReLU

from ..onnx_steps import Step
from .arch import DpuReport, legality
from .positions import REFINE_NOTE, fix_pos

FIX_POSITIONS_KEY = "quantfx.dpu.fix_positions"
REPORT_KEY = "quantfx.dpu.report"
FORM_KEY = "quantfx.dpu.form"


@dataclass(frozen=True)
class FixedPointActivations(Step):
    """The float ops passes/approximate_activations.py leaves, as the DPU computes them in the layer or pool
    before them: LeakyReLU as LeakyRelu, ReLU6 as Clip(0, 6), an average pool's window sum
    (``divisor_override=1``) as a depthwise Conv with weights 1 (exact in float32 on grid values)."""

    name: ClassVar[str] = "fixed_point_activations"

    def form(self, lw, node, kind):
        if kind == "module" and isinstance(module_of(lw.gm, node), nn.LeakyReLU):
            return lw.op("LeakyRelu", [lw.env[node.args[0]]], node.name,
                         alpha=float(module_of(lw.gm, node).negative_slope))
        if kind != "function":
            return None
        if node.target is F.relu6:
            return lw.op("Clip", [lw.env[node.args[0]], lw.const(node.name + "_min", np.float32(0)),
                                  lw.const(node.name + "_max", np.float32(6))], node.name)
        if node.target is F.avg_pool2d and node.kwargs.get("divisor_override") == 1:
            _, k, stride, pad = node.args
            c = lw.shape(node.args[0])[1]
            ones = lw.const(node.name + "_ones", np.ones((c, 1) + tuple(k), np.float32))
            return lw.op("Conv", [lw.env[node.args[0]], ones], node.name, kernel_shape=list(k),
                         strides=list(stride), pads=list(pad) * 2, group=c)
        return None


@dataclass(frozen=True)
class InternalBiases(Step):
    """Biases as the DPU stores them: int8 with the bias quantizer's own power-of-two scale ("internal"), not the
    int32 input x weight scale of standard QDQ."""

    name: ClassVar[str] = "internal_biases"

    def bias(self, lw, layer, in_scale, base):
        ints, scale = lw.bias_ints(layer, in_scale)
        return lw.dq_const(base + ".bias", ints, scale.reshape(()), np.int8, 0)


# -- the fast form: onnxruntime's integer kernels -----------------------------------------------------------------


@dataclass(frozen=True)
class AccumulatorBiases(Step):
    """Fast form: a bias as int32 on the accumulator's scale where its shift is >= 0 (exact in int32), so
    onnxruntime fuses QLinearConv/QGemm."""

    name: ClassVar[str] = "accumulator_biases"

    def bias(self, lw, layer, in_scale, base):
        ints, scale = lw.bias_ints(layer, in_scale)
        _, w_scale = lw.weight_ints(layer)
        shift = fix_pos(in_scale) + fix_pos(w_scale) - fix_pos(scale.reshape(()))  # shift_bias >= 0
        if shift < 0:
            return None
        acc = layer.acc_scale(in_scale, w_scale).reshape(())
        return lw.dq_const(base + ".bias", ints.to(torch.int64) * (1 << shift), acc, np.int32, 0)


@dataclass(frozen=True)
class RequantizeBeforeLeaky(Step):
    """Fast form: onnxruntime runs DQ -> Conv -> LeakyRelu -> Q in float, so the layer's output is requantized on
    the LeakyReLU's grid first (QLinearConv, then QLinearLeakyRelu): a second rounding (<= 1 LSB)."""

    name: ClassVar[str] = "requantize_before_leaky"

    def form(self, lw, node, kind):
        m = module_of(lw.gm, node) if kind == "act" else None
        if not isinstance(m, QuantLeakyReLU) or not m.act_quant.is_quant_enabled:
            return None
        x = lw.emit_act_quant(lw.env[node.args[0]], m.act_quant, node.name + "_pre")
        x = lw.op("LeakyRelu", [x], node.name + "_leaky", alpha=float(m.negative_slope))
        return lw.emit_act_quant(x, m.act_quant, node.name)


@dataclass(frozen=True)
class UnsignedReluCodes(Step):
    """Fast form: a ReLU output lies in [0, 127]; written as uint8 (zero point 0, Clip at 127) it is the same
    integer, and onnxruntime then fuses Relu into QLinearConv and runs the next layer with u8 x s8 kernels whose
    pair sums cannot saturate (127 x (127 + 127) = 32258 <= 32767). Values that only move keep their input's
    type: their requantization (:class:`RequantizeMoves`, listed before this step) is onto the same uint8 grid."""

    name: ClassVar[str] = "unsigned_relu_codes"

    def form(self, lw, node, kind):
        m = module_of(lw.gm, node) if kind == "act" else None
        q = getattr(m, "act_quant", None)
        if not isinstance(m, QuantReLU) or not q.is_quant_enabled or not q.signed or \
                q.zero_point_type != "symmetric" or q.scaling_per_output_channel:
            return None
        x = lw.env[node.args[0]]
        x = lw.op("Relu", [x], node.name + "_relu") if m.max_val is None else \
            lw.op("Clip", [x, lw.const(node.name + "_min", np.float32(0)),
                           lw.const(node.name + "_max", np.float32(m.max_val))], node.name + "_relu6")
        scale, zp = q.qparams(None)
        out = lw.qdq(x, scale, zp, (0, q.int_range()[1]), False, node.name)
        lw.memo(self, set).add(out.name)
        return out

    def _moves_codes(self, lw, node) -> bool:
        ins = tensor_inputs(node) if node.op in ("call_function", "call_method", "call_module") else []
        unsigned = lw.memo(self, set)
        return bool(ins) and (is_invariant(lw.gm, node) or is_cat(node)) and \
            all(getattr(lw.env.get(i), "name", None) in unsigned for i in ins)

    def grid(self, lw, signed, int_range):
        if self._moves_codes(lw, lw.current_node):
            return False, (0, int_range[1])
        return signed, int_range

    def emitted(self, lw, node, out):
        if self._moves_codes(lw, node):
            lw.memo(self, set).update(o.name for o in (out if isinstance(out, tuple) else (out,)))
        return out


# -- the file's metadata ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StampFixPositions(Step):
    """``quantfx.dpu.fix_positions``: int8 tensor name -> fix position, read from the DequantizeLinear scales."""

    name: ClassVar[str] = "stamp_fix_positions"

    def rewrite(self, lw, model):
        positions = {}
        for n in model.graph:
            if n.op_type == "DequantizeLinear" and n.inputs[1].const_value is not None:
                positions[n.inputs[0].name] = fix_pos(n.inputs[1].const_value.numpy())
        model.metadata_props[FIX_POSITIONS_KEY] = json.dumps(positions)


@dataclass(frozen=True)
class StampDpuReport(Step):
    """``quantfx.dpu.report``: each node on the DPU or the CPU for the lowering's ``arch`` (rule and limit), and the
    position changes calibration's ``refine_fix_positions`` pass made (the model's notes)."""

    name: ClassVar[str] = "stamp_dpu_report"

    def rewrite(self, lw, model):
        shapes = {n: tuple(tm.shape) for n, tm in lw.tensor_meta.items() if hasattr(tm, "shape")}
        changes = list(getattr(lw.gm, "notes", {}).get(REFINE_NOTE, []))
        model.metadata_props[REPORT_KEY] = DpuReport(lw.arch.name, legality(lw.gm, shapes, lw.arch), changes).to_json()


@dataclass(frozen=True)
class StampForm(Step):
    """``quantfx.dpu.form``: 'dpu' or 'fast', which tells ``dpu_session`` how to run the file."""

    name: ClassVar[str] = "stamp_form"

    def rewrite(self, lw, model):
        model.metadata_props[FORM_KEY] = lw.form


__all__ = ["FixedPointActivations", "InternalBiases", "AccumulatorBiases", "RequantizeBeforeLeaky",
           "UnsignedReluCodes", "StampFixPositions", "StampDpuReport", "StampForm", "FIX_POSITIONS_KEY",
           "REPORT_KEY", "FORM_KEY"]
