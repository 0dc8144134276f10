"""finn target: QONNX (``Quant`` / ``BipolarQuant`` / ``Trunc`` in domain ``qonnx.custom_op.general``) that
qonnx executes and FINN's frontend accepts.

Activations: ``Div(x, scale) -> Quant(1, 0, bits; signed, narrow, rounding_mode)`` (after the ``Relu``/``Clip``
of the activation, which commutes with the division), so each activation is held as its integers;
``Mul(scale)`` turns them back into values where a float op needs them. Convolutions and linear layers whose
fake-quant accumulator is integer-exact run on integers: integer weight initializers with ``Quant(1)``, an
integer bias with ``Quant(1)`` (on the accumulator grid), then ``Mul(input scale x weight scale)``, per output
channel. A float32 convolution of integers is exact (every partial sum below 2^24), so qonnx computes what the
integer hardware and the fake-quant model compute, to the bit; the scales are the ``Mul`` nodes FINN's
streamlining absorbs into thresholds. Other layers: float weights followed by ``Quant`` (per-channel scales
shaped to broadcast); biases float or ``Quant`` with scale = input scale x weight scale. Integer tensors carry
their FINN datatype annotation. Truncating average pools: ``AveragePool -> Mul(K) -> Trunc (v1, FLOOR) ->
Mul(2^shift / K)``, which is exactly quantfx's integer sum with ``shift`` LSBs dropped. FINN's rules are checked
before anything is written. ``run_qonnx`` executes the file with qonnx (after ``cleanup_model``); ``to_qcdq``
turns it into standard QuantizeLinear/Clip/DequantizeLinear ONNX for onnxruntime.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import torch

from quantfx.errors import ExportError
from quantfx.graph import module_of, qmeta
from quantfx.lowering import Backend
from quantfx.nn import QuantHardTanh, QuantReLU, QuantSigmoid
from quantfx.quant import functional as qf

from .onnx_base import OnnxLowering, feed, load_onnx, node_values, not_quantfx, np32, save_onnx
from .onnx_steps import Step

try:  # qonnx is the finn extra: the lowering needs none of it, running and converting the file do
    from qonnx.transformation.base import Transformation
except ImportError:  # pragma: no cover - exercised only without the extra
    Transformation = object
from .finn_profile import FINN

DOMAIN = "qonnx.custom_op.general"
# ops that only move values: on integers of one grid they give the integers of the result
_GRID_OPS = {"MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose", "Slice", "Split", "Squeeze",
             "Unsqueeze", "DepthToSpace", "Pad", "Concat"}
# qonnx's ROUND is np.round (half to even); its HALF_UP rounds ties away from zero, which equals quantfx's
# floor(x + 0.5) only on non-negative values, so the finn profile accepts 'half_up' on unsigned grids only.
ROUNDING = {"half_even": "ROUND", "floor": "FLOOR", "half_up": "HALF_UP"}


@dataclass(frozen=True)
class DropUnreadDequants(Step):
    """Remove the dequantizing Mul nodes (and their scales) whose values no op reads: the activations that only
    integer ops consume. An fx node whose value was such a Mul maps to its integers and scale."""

    name: ClassVar[str] = "drop_unread_dequants"

    def rewrite(self, lw, model):
        graph = model.graph
        gone = {v.name: v for v in lw.grid_of if not v.uses() and not v.is_graph_output()}
        graph.remove([v.producer() for v in gone.values()], safe=True)  # safe: detaches their inputs
        for name, value in list(graph.initializers.items()):
            if not value.uses():
                del graph.initializers[name]
        for fx_name, name in list(lw.value_of_node.items()):
            if name in gone:
                ints, scale, _ = lw.grid_of[gone[name]]
                lw.value_of_node[fx_name] = {"ints": ints.name, "scale": scale.tolist()}


@dataclass(frozen=True)
class StampDatatypes(Step):
    """The integer tensors' FINN datatypes, as qonnx's ModelWrapper.set_tensor_datatype writes them: FINN reads
    them where its own inference stops (the input of a Trunc reached through a Reshape, for one)."""

    name: ClassVar[str] = "stamp_datatypes"

    def rewrite(self, lw, model):
        for ints, _, dtype in lw.grid_of.values():
            ints.meta["quant_parameter_tensor_names"] = {"finn_datatype": dtype}


class QONNXLowering(OnnxLowering):
    target = "finn"
    opset = 13
    # qonnx domain version 1: Trunc v1 (x, scale, zeropt, in_bits, out_bits), the form FINN's frontend
    # recognises after AveragePool -> Mul(K). The import is also what lets
    # onnx.checker.check_model(full_check=True) pass: without it the checker stops at "No opset import for
    # domain 'qonnx.custom_op.general'"; with it, nodes of a domain with no registered schemas are skipped by
    # the schema check and by strict shape inference (every graph output is given its static shape, which
    # full_check requires). IR 10 (the base's cap) loads in qonnx and FINN's onnx 1.17; onnxruntime 1.31 has no
    # kernels for the qonnx ops but loads the to_qcdq form.
    extra_opsets = {DOMAIN: 1}
    dynamic_batch = False
    steps = (
        DropUnreadDequants(),  # the Mul nodes only integer ops would have read
        StampDatatypes(),      # FINN datatypes of the integer tensors
    )

    def begin(self):
        super().begin()
        # value on an activation grid -> (its integers' value name, scale as float32, FINN datatype name)
        self.grid_of: dict = {}

    def op(self, op_type, inputs, base, n_out=1, domain="", **attrs):
        """A node reading one value twice (``x + x``, ``cat([x, x])``) reads it the second time through an
        ``Identity``: qonnx's ``rename_tensor`` (cleanup_model, FINN's frontend) renames only the first use of a
        tensor among a node's inputs, so the second would name a tensor that no longer exists."""
        seen, fixed = set(), []
        for v in inputs:
            if v is not None and not v.is_initializer() and id(v) in seen:
                v = super().op("Identity", [v], base + "_again")
            elif v is not None:
                seen.add(id(v))
            fixed.append(v)
        return super().op(op_type, fixed, base, n_out, domain, **attrs)

    # -- integer activations --------------------------------------------------------------------------

    def dequant(self, ints, scale, base, dtype=None):
        """``Mul(ints, scale)``: the values of integers ``ints``. With their FINN datatype ``dtype`` they are
        recorded as an activation grid that value-moving ops and integer layers may work on."""
        y = self.op("Mul", [ints, self.const(base + "_scale", scale)], base)
        if dtype is not None:
            self.grid_of[y] = (ints, scale, dtype)
        return y

    def move(self, op_type, inputs, base, n_out=1, **attrs):
        """Ops that only move values (pools of max, reshapes, concatenation of one grid, zero padding) run on
        the integers of their grid input and are dequantized after, which gives the same float32 numbers (the
        rounding of ``int x scale`` is monotonic); the Mul nodes nobody reads are dropped at the end."""
        grid = self._grid_inputs(op_type, inputs)
        if grid is None:
            return self.op(op_type, inputs, base, n_out, **attrs)
        ints, scale, dtype = grid
        outs = self.op(op_type, ints, base + "_int", n_out, **attrs)
        if n_out == 1:
            return self.dequant(outs, scale, base, dtype)
        return [self.dequant(o, scale, f"{base}_{i}", dtype) for i, o in enumerate(outs)]

    def _grid_inputs(self, op_type, inputs):
        if op_type not in _GRID_OPS:
            return None
        data = list(inputs) if op_type == "Concat" else list(inputs[:1])
        grids = [self.grid_of.get(v) for v in data]
        if any(g is None or g[2] != grids[0][2] or not np.array_equal(g[1], grids[0][1]) for g in grids):
            return None
        if op_type == "Pad" and len(inputs) > 2 and np.any(inputs[2].const_value.numpy() != 0):
            return None  # a pad value off the grid
        return [g[0] for g in grids] + list(inputs[len(data):]), grids[0][1], grids[0][2]

    def emit_act(self, node):
        """An activation and its quantizer as integers (the base class's ``emit_act_quant`` hook is not used:
        the division by the scale goes before the activation op)."""
        m = module_of(self.gm, node)
        q = m.act_quant
        if not q.is_quant_enabled or m.input_quant.is_quant_enabled:
            return super().emit_act(node)
        x = self.env[node.args[0]]
        scale = np32(q.qparams(None)[0].reshape(()))
        if isinstance(m, QuantSigmoid):
            x = self.op("Sigmoid", [x], node.name + "_sigmoid")
        if q.bit_width > 1:  # BipolarQuant takes the sign, which the division keeps
            x = self.op("Div", [x, self.const(node.name + "_act_scale", scale)], node.name + "_scaled")

        def bound(v):  # the clip bound on the divided values: monotonic rounding makes clip and divide commute
            return self.const(node.name + "_bound", np.float32(np.float32(v) / scale) if q.bit_width > 1
                              else np.float32(v))
        if isinstance(m, QuantReLU):
            x = self.op("Relu", [x], node.name + "_relu") if self._clip_is_rounded_off(m) else \
                self.op("Clip", [x, bound(0.0), bound(m.max_val)], node.name + "_relu6")
        elif isinstance(m, QuantSigmoid) and not q.signed:
            # a Relu of the (non-negative) sigmoid changes nothing, and FINN's frontend takes an unsigned Quant
            # only right after a Relu
            x = self.op("Relu", [x], node.name + "_relu")
        elif isinstance(m, QuantHardTanh) and not self._clip_is_rounded_off(m):
            x = self.op("Clip", [x, bound(m.min_val), bound(m.max_val)], node.name + "_hardtanh")
        ints = self._quant(x, np.float32(1), q.bit_width, q.signed, q.narrow_range, q.rounding, node.name + "_int")
        dtype = "BIPOLAR" if q.bit_width == 1 else f"{'INT' if q.signed else 'UINT'}{q.bit_width}"
        return self.dequant(ints, scale, node.name, dtype)

    @staticmethod
    def _clip_is_rounded_off(m) -> bool:
        """Whether an activation's clip bounds (ReLU6's 6, HardTanh's min and max) change no output: each
        quantizes to the end of the integer range, so the quantizer's own clamp does the clipping (a 1-bit sign
        quantizer: any bounds around 0). Then the file has no Clip: ``Relu -> Quant``, the pattern FINN's
        frontend turns into thresholds (it takes no Clip before an unsigned Quant), or just the Quant (a Clip
        before a 1-bit Quant keeps FINN's streamlining from absorbing the bias add before it)."""
        q = m.act_quant
        lo, hi = qf.int_range(q.bit_width, q.signed, q.narrow_range)
        ends = [(m.max_val, hi)] if isinstance(m, QuantReLU) else [(m.min_val, lo), (m.max_val, hi)]
        with torch.no_grad():
            for bound, end in ends:
                if bound is not None and int(q.int_repr(torch.tensor([float(bound)])).reshape(-1)[0]) != end:
                    return False
        return True

    def emit_compute(self, node):
        layer = module_of(self.gm, node)
        grid = self.grid_of.get(self.env[node.args[0]])
        if grid is None or not layer.exact_integer_form() or \
                not np.array_equal(grid[1], np32(self.input_scale(node).reshape(-1)[0])):
            return super().emit_compute(node)
        in_scale = self.input_scale(node)
        w_ints, w_scale = self.weight_ints(layer)
        wq = layer.weight_quant
        w = self._quant(self.const(node.target + ".weight_int", np32(w_ints)), np.float32(1), wq.bit_width,
                        wq.signed, wq.narrow_range, wq.rounding, node.target + ".weight")
        b = None
        if layer.bias is not None:
            bq = layer.bias_quant
            b_ints, _ = self.bias_ints(layer, in_scale)
            b = self._quant(self.const(node.target + ".bias_int", np32(b_ints)), np.float32(1), bq.bit_width,
                            bq.signed, bq.narrow_range, bq.rounding, node.target + ".bias", vector=True)
        acc = self.emit_layer(node, layer, grid[0], w, b, name=node.name + "_acc")
        with torch.no_grad():
            scale = np32(layer.acc_scale(in_scale, w_scale))
        rank = len(self.shape(node))
        if scale.size > 1:  # output channels on axis 1 (FINN's layout), a linear layer's on the last
            scale = scale.reshape([1] * (rank - 1) + [-1] if isinstance(layer, torch.nn.Linear)
                                  else [1, -1] + [1] * (rank - 2))
        return self.dequant(acc, scale, node.name)  # an accumulator: no activation grid

    # -- quantizers -----------------------------------------------------------------------------------

    def _quant(self, x, scale, bits, signed, narrow, rounding, base, shape=None, vector=False):
        """A Quant (BipolarQuant for 1 bit) of ``x``; ``shape`` reshapes the scale. ``vector`` gives scale and
        zero point one dimension at least: FINN's ExtractBiasFromConv reshapes a bias Quant's parameters onto
        the channel axis and fails on 0-d ones."""
        s = np32(scale if shape is None else scale.reshape(shape))
        scale_name = self.const(base + "_scale", s.reshape(-1) if vector else s)
        if bits == 1:
            return self.op("BipolarQuant", [x, scale_name], base, domain=DOMAIN)
        # otherwise a 0-d zero point, even for per-channel scales: QuantToQCDQ cannot read a vector zero point
        # (bias Quants, 16 or 32 bits, are folded to constants before that conversion)
        zp = self.const(base + "_zeropt", np.zeros(1, np.float32) if vector else np.float32(0))
        b = self.const(base + "_bitwidth", np.float32(bits))
        return self.op("Quant", [x, scale_name, zp, b], base, domain=DOMAIN, signed=int(signed),
                       narrow=int(narrow), rounding_mode=ROUNDING[rounding])

    def emit_weight(self, layer, base):
        wq = layer.weight_quant
        with torch.no_grad():
            scale = wq.scale(layer.weight)
        w = self.const(base + ".weight_float", np32(layer.weight))
        shape = None
        if scale.dim() == 1:
            shape = [1] * layer.weight.dim()
            shape[wq.channel_axis] = scale.numel()
        return self._quant(w, scale, wq.bit_width, wq.signed, wq.narrow_range, wq.rounding, base + ".weight",
                           shape)

    def emit_bias(self, layer, in_scale, base):
        bq = layer.bias_quant
        with torch.no_grad():
            scale = layer.acc_scale(in_scale, layer.weight_quant.scale(layer.weight))
        b = self.const(base + ".bias_float", np32(layer.bias))
        return self._quant(b, scale, bq.bit_width, bq.signed, bq.narrow_range, bq.rounding, base + ".bias",
                           vector=True)

    def emit_trunc_pool(self, node):
        x = self.env[node.args[0]]
        pool = module_of(self.gm, node)
        inp = qmeta(node.args[0])
        in_shape = self.shape(node.args[0])
        kernel = pool._kernel(torch.empty(in_shape, device="meta"))
        k = math.prod(kernel)
        acc, shift = pool.shift_for(inp.bit_width, k)
        if inp.kind != "act" or inp.scale is None or inp.scale.numel() != 1:
            raise ExportError(f"finn: {node.target}: the pool input needs one calibrated per-tensor scale")
        stride = list(kernel) if not hasattr(pool, "stride") or pool.stride is None else \
            ([pool.stride] * 2 if isinstance(pool.stride, int) else list(pool.stride))
        pad = getattr(pool, "padding", 0)
        pads = [pad] * 4 if isinstance(pad, int) else list(pad) * 2
        # quantfx's sum counts padded zeros (torch's default), ONNX's AveragePool does not unless told; no
        # attribute without padding, the plain form FINN's frontend matches
        extra = {"count_include_pad": 1} if any(pads) else {}
        avg = self.op("AveragePool", [x], node.name + "_avg", kernel_shape=list(kernel), strides=stride,
                      pads=pads, **extra)
        total = self.op("Mul", [avg, self.const(node.name + "_k", np.float32(k))], node.name + "_sum")
        scale = inp.scale.reshape(())
        # Trunc v1: floor(round(x / scale) / 2^(in_bits - out_bits)) * scale
        trunc = self.op("Trunc", [
            total, self.const(node.name + "_scale", np32(scale)),
            self.const(node.name + "_zeropt", np.float32(0)),
            self.const(node.name + "_in_bitwidth", np.float32(acc)),
            self.const(node.name + "_out_bitwidth", np.float32(acc - shift))],
            node.name + "_trunc", domain=DOMAIN, rounding_mode=ROUNDING[pool.rounding])
        return self.op("Mul", [trunc, self.const(node.name + "_rescale", np.float32(2.0 ** shift / k))], node.name)



# -- runtime -----------------------------------------------------------------------------------------------


def _qonnx():
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx
        from qonnx.transformation.change_batchsize import ChangeBatchSize
        from qonnx.transformation.infer_shapes import InferShapes
        from qonnx.util.cleanup import cleanup_model
    except ImportError as e:
        raise ExportError("finn: running QONNX needs qonnx; pip install 'quantfx[finn]'") from e
    return ModelWrapper, execute_onnx, ChangeBatchSize, InferShapes, cleanup_model


def _prepared(model: onnx.ModelProto, batch: int, clean: bool):
    ModelWrapper, _, ChangeBatchSize, InferShapes, cleanup_model = _qonnx()
    wrapper = ModelWrapper(onnx.ModelProto.FromString(model.SerializeToString()))
    if wrapper.get_tensor_shape(wrapper.graph.input[0].name)[0] != batch:
        wrapper = wrapper.transform(ChangeBatchSize(batch))
    return cleanup_model(wrapper) if clean else wrapper.transform(InferShapes())


def run_qonnx(model: onnx.ModelProto, inputs) -> list:
    """Outputs of qonnx's execute_onnx on the cleaned-up model (cleanup_model must accept the file)."""
    _, execute_onnx, *_ = _qonnx()
    wrapper = _prepared(model, int(inputs[0].shape[0]), clean=True)
    out = execute_onnx(wrapper, feed(wrapper.graph.input, inputs))
    return [out[o.name] for o in wrapper.graph.output]


def run_qonnx_intermediates(model, inputs, fx_names) -> dict:
    _, execute_onnx, *_ = _qonnx()
    wrapper = _prepared(model, int(inputs[0].shape[0]), clean=False)  # keeps tensor names
    context = execute_onnx(wrapper, feed(wrapper.graph.input, inputs), return_full_exec_context=True)
    out, wanted = {}, set(fx_names)
    for name, value in node_values(model).items():
        if name not in wanted:
            continue
        if isinstance(value, dict):  # held as integers only: their values, as the Mul would compute them
            if value["ints"] in context:
                out[name] = context[value["ints"]] * np.asarray(value["scale"], np.float32)
        elif value in context:
            out[name] = context[value]
    return out


def to_qcdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The QONNX model as standard ONNX that onnxruntime runs, through qonnx's ``QuantToQCDQ``
    (Quant -> QuantizeLinear [-> Clip] -> DequantizeLinear) where that conversion is exact: 2..8-bit Quant
    nodes with ROUND rounding. Around it, with the same numbers qonnx computes: constant Quant/BipolarQuant
    nodes the converter cannot take (32-bit biases, 1-bit or FLOOR-rounded weights) become float initializers,
    and Trunc v1 becomes ``Div(scale) -> Round -> Div(2^(in-out)) -> Floor -> Mul(scale)``, its definition.

    Raises ExportError naming an activation Quant the converter would change or drop (rounding other than
    ROUND, which it silently treats as ROUND; 1-bit; more than 8 bits; unsigned narrow 8-bit, which it does not
    clip) and anything left in the qonnx domain."""
    from qonnx.transformation.general import RemoveUnusedTensors  # optional: the finn extra
    from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ  # optional: the finn extra
    wrapper = _prepared(model, _static_batch(model), clean=True)
    wrapper = wrapper.transform(FoldConstantQuants()).transform(TruncToStandardOps())
    for node in wrapper.graph.node:
        reason = _qcdq_refusal(wrapper, node) if node.domain == DOMAIN else None
        if reason:
            raise ExportError(f"finn: QCDQ: {node.name} ({node.op_type} of an activation) {reason}")
    out = wrapper.transform(RemoveUnusedTensors()).transform(QuantToQCDQ()).model
    left = [f"{n.name} ({n.op_type})" for n in out.graph.node if n.domain == DOMAIN]
    if left:
        raise ExportError(f"finn: QCDQ: QuantToQCDQ left {', '.join(left)} in the qonnx domain")
    return out


def _qcdq_refusal(wrapper, node):
    """Why QuantToQCDQ would not convert ``node`` exactly, or None."""
    if node.op_type != "Quant":
        return "has no QCDQ form (QuantToQCDQ converts Quant only)"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    rounding = attrs.get("rounding_mode", b"ROUND")
    rounding = rounding.decode() if isinstance(rounding, bytes) else rounding
    bits = float(wrapper.get_initializer(node.input[3]))
    zeropt = wrapper.get_initializer(node.input[2])
    if rounding.upper() not in ("ROUND", "HALF_EVEN"):
        return f"rounds {rounding}; QuantToQCDQ would round it half to even (use rounding='half_even')"
    if not 2 <= bits <= 8:
        return f"is {bits:g}-bit; QuantToQCDQ converts 2..8 bits"
    if zeropt is None or np.any(zeropt != 0):
        return "has a zero point; QuantToQCDQ converts zero point 0 only"
    if bits == 8 and attrs.get("narrow", 1) and not attrs.get("signed", 1):
        return "is unsigned narrow 8-bit; QuantToQCDQ inserts no Clip for it (254 would become 255)"
    return None


class FoldConstantQuants(Transformation):
    """Replace Quant/BipolarQuant nodes of initializers that QuantToQCDQ cannot convert exactly by their value,
    computed by qonnx's own op."""

    def apply(self, model):
        from qonnx.custom_op.registry import getCustomOp  # optional: the finn extra
        graph = model.graph
        for node in list(graph.node):
            if node.domain != DOMAIN or node.op_type not in ("Quant", "BipolarQuant") or \
                    model.get_initializer(node.input[0]) is None or \
                    (node.op_type == "Quant" and _qcdq_refusal(model, node) is None):
                continue
            context = {name: model.get_initializer(name) for name in node.input}
            getCustomOp(node).execute_node(context, graph)
            model.set_initializer(node.output[0], np.asarray(context[node.output[0]], np.float32))
            graph.node.remove(node)
        return model, False  # one sweep folds every constant Quant: nothing to repeat


_TRUNC_ROUNDING = {"FLOOR": "Floor", "ROUND": "Round", "HALF_EVEN": "Round", "CEIL": "Ceil"}


class TruncToStandardOps(Transformation):
    """Trunc v1 (x, scale, zeropt = 0, in_bits, out_bits) -> its formula in standard ops, float op for float op:
    ``floor(round(x / scale) / 2^(in_bits - out_bits)) * scale``."""

    def apply(self, model):
        graph = model.graph
        for index, node in reversed(list(enumerate(graph.node))):
            if node.domain != DOMAIN or node.op_type != "Trunc":
                continue
            x, scale, zeropt, in_bits, out_bits = node.input
            rounding = onnx.helper.get_attribute_value(node.attribute[0]).decode().upper() \
                if node.attribute else "FLOOR"
            if rounding not in _TRUNC_ROUNDING or np.any(model.get_initializer(zeropt) != 0):
                raise ExportError(f"finn: QCDQ: {node.name} (Trunc) rounds {rounding} or has a zero point; only "
                                  f"zero point 0 with {', '.join(_TRUNC_ROUNDING)} has a standard-op form")
            shift = float(model.get_initializer(in_bits)) - float(model.get_initializer(out_bits))
            step = f"{node.name}_step"
            model.set_initializer(step, np.float32(2.0 ** shift))
            names = [f"{node.name}_{s}" for s in ("ints", "round", "shifted", "trunc")]
            new = [onnx.helper.make_node("Div", [x, scale], [names[0]], name=names[0]),
                   onnx.helper.make_node("Round", [names[0]], [names[1]], name=names[1]),
                   onnx.helper.make_node("Div", [names[1], step], [names[2]], name=names[2]),
                   onnx.helper.make_node(_TRUNC_ROUNDING[rounding], [names[2]], [names[3]], name=names[3]),
                   onnx.helper.make_node("Mul", [names[3], scale], [node.output[0]], name=f"{node.name}_rescale")]
            graph.node.remove(node)
            for offset, n in enumerate(new):
                graph.node.insert(index + offset, n)
        return model, False  # one sweep replaces every Trunc


def _static_batch(model) -> int:
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value or 1


def _lower(qmodel, example_inputs):
    return QONNXLowering(qmodel, example_inputs, profile=FINN).lower()


BACKEND = Backend(
    name="finn", lower=_lower, save=save_onnx, load=load_onnx, run=run_qonnx,
    run_with_intermediates=run_qonnx_intermediates, check=not_quantfx)
