"""finn target: QONNX (``Quant`` / ``BipolarQuant`` / ``Trunc`` in domain ``qonnx.custom_op.general``) that
qonnx executes and FINN's frontend accepts.

Activations: ``Quant(x, scale, 0, bits; signed, narrow, rounding_mode)``; weights: float initializers followed
by ``Quant`` (per-channel scales shaped to broadcast); biases float or ``Quant`` with scale = input scale x
weight scale; truncating average pools: ``AveragePool -> Mul(K) -> Trunc (v1, FLOOR) -> Mul(2^shift / K)``,
which is exactly quantfx's integer sum with ``shift`` LSBs dropped. FINN's rules are checked before anything is written.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import torch

from quantfx.errors import ExportError, TargetError
from quantfx.export import Backend, register_backend
from quantfx.graph import is_act_quant, is_compute, module_of, qmeta
from quantfx.nn import QuantHardTanh, QuantIdentity, QuantReLU, QuantSigmoid

from .onnx_base import OnnxLowering, np32
from .onnx_qdq import NODE_VALUES_KEY, node_values

DOMAIN = "qonnx.custom_op.general"
ROUNDING = {"half_even": "ROUND", "floor": "FLOOR", "half_up": "HALF_UP"}
MAX_ACT_BITS = 8  # FINN turns activation quantizers into thresholds


class QONNXLowering(OnnxLowering):
    target = "finn"
    opset = 13
    # qonnx domain version 1: Trunc v1 (x, scale, zeropt, in_bits, out_bits), the form FINN's frontend
    # recognises after AveragePool -> Mul(K)
    extra_opsets = {DOMAIN: 1}
    dynamic_batch = False

    # -- rules ----------------------------------------------------------------------------------------

    def check_rules(self) -> None:
        weight_users: dict[int, list] = {}
        for node in self.gm.graph.nodes:
            if is_act_quant(self.gm, node):
                self._check_act(node, module_of(self.gm, node))
            elif is_compute(self.gm, node):
                layer = module_of(self.gm, node)
                wq = layer.weight_quant
                if wq.is_quant_enabled:
                    weight_users.setdefault(id(wq), []).append(node.target)
                    self._check_common(f"{node.target} weight quantizer", wq, max_bits=8)
                if layer.bias is not None and layer.bias_quant.is_quant_enabled and \
                        layer.bias_quant.bias_scaling != "external":
                    raise TargetError(f"finn: {node.target} bias has its own scale; FINN takes a float bias or "
                                      "an external-scale one (Int32Bias, scale = input scale x weight scale)")
        for users in weight_users.values():
            if len(users) > 1:
                raise TargetError(f"finn: one weight quantizer feeds {', '.join(users)}; FINN needs a weight "
                                  "quantizer per layer (give each layer its own weight_quant)")

    def _check_common(self, where, q, max_bits):
        if q.zero_point_type != "symmetric":
            raise TargetError(f"finn: {where} has a zero point (asymmetric); FINN needs zero point 0 "
                              "(use a symmetric quantizer such as Int8ActPerTensorFloat)")
        if q.bit_width > max_bits:
            raise TargetError(f"finn: {where} is {q.bit_width}-bit; FINN takes at most {max_bits} bits here "
                              f"(use bit_width <= {max_bits})")
        if q.rounding not in ROUNDING:
            raise TargetError(f"finn: {where} rounds {q.rounding!r}; QONNX Quant rounds "
                              f"{', '.join(ROUNDING)}")

    def _check_act(self, node, m) -> None:
        q = m.act_quant
        if not q.is_quant_enabled:
            return
        where = f"{node.target} output quantizer"
        self._check_common(where, q, MAX_ACT_BITS)
        if q.scaling_per_output_channel:
            raise TargetError(f"finn: {where} is per-channel; FINN activations are per-tensor")
        if isinstance(m, (QuantReLU, QuantSigmoid)):
            if q.signed:
                raise TargetError(f"finn: {where} is signed; FINN needs unsigned activations after "
                                  f"{'ReLU' if isinstance(m, QuantReLU) else 'Sigmoid'} (use "
                                  "Uint8ActPerTensorFloat or signed=False)")
            if q.narrow_range:
                raise TargetError(f"finn: {where} is narrow-range; FINN needs non-narrow activations after ReLU "
                                  "(use narrow_range=False)")
        elif isinstance(m, (QuantIdentity, QuantHardTanh)) and not q.signed:
            raise TargetError(f"finn: {where} is unsigned; FINN needs signed identity activations "
                              "(use Int8ActPerTensorFloat or signed=True)")

    # -- quantizers -----------------------------------------------------------------------------------

    def _quant(self, x, scale, bits, signed, narrow, rounding, base, shape=None):
        s = np32(scale if shape is None else scale.reshape(shape))
        scale_name = self.const(base + "_scale", s)
        if bits == 1:
            return self.op("BipolarQuant", [x, scale_name], base, domain=DOMAIN)
        zp = self.const(base + "_zeropt", np.zeros_like(s))
        b = self.const(base + "_bitwidth", np.float32(bits))
        return self.op("Quant", [x, scale_name, zp, b], base, domain=DOMAIN, signed=int(signed),
                       narrow=int(narrow), rounding_mode=ROUNDING[rounding])

    def emit_act_quant(self, x, q, base):
        scale, _ = q.qparams(None)
        return self._quant(x, scale.reshape(()), q.bit_width, q.signed, q.narrow_range, q.rounding, base)

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
            w_scale = layer.weight_quant.scale(layer.weight)
            scale = (in_scale.reshape(-1).double() * w_scale.reshape(-1).double()).float()
        b = self.const(base + ".bias_float", np32(layer.bias))
        scale = scale.reshape(()) if scale.numel() == 1 else scale
        return self._quant(b, scale, bq.bit_width, bq.signed, bq.narrow_range, bq.rounding, base + ".bias")

    def emit_trunc_pool(self, node, x):
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
        avg = self.op("AveragePool", [x], node.name + "_avg", kernel_shape=list(kernel), strides=stride,
                      pads=pads)
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

    def lower(self):
        model = super().lower()
        onnx.helper.set_model_props(model, {NODE_VALUES_KEY: json.dumps(self.value_of_node)})
        return model


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


def _feed(wrapper, inputs):
    return {i.name: (x.detach().numpy() if torch.is_tensor(x) else np.asarray(x)).astype(np.float32)
            for i, x in zip(wrapper.graph.input, inputs)}


def run_qonnx(model: onnx.ModelProto, inputs) -> list:
    """Outputs of qonnx's execute_onnx on the cleaned-up model (cleanup_model must accept the file)."""
    _, execute_onnx, *_ = _qonnx()
    wrapper = _prepared(model, int(inputs[0].shape[0]), clean=True)
    out = execute_onnx(wrapper, _feed(wrapper, inputs))
    return [out[o.name] for o in wrapper.graph.output]


def run_qonnx_intermediates(model, inputs, fx_names) -> dict:
    _, execute_onnx, *_ = _qonnx()
    wrapper = _prepared(model, int(inputs[0].shape[0]), clean=False)  # keeps tensor names
    context = execute_onnx(wrapper, _feed(wrapper, inputs), return_full_exec_context=True)
    mapping = node_values(model)
    return {n: context[mapping[n]] for n in fx_names if n in mapping and mapping[n] in context}


def to_qcdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """qonnx's QONNX -> QCDQ conversion (QuantizeLinear / Clip / DequantizeLinear), for bit widths 2..8."""
    from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ
    wrapper = _prepared(model, _static_batch(model), clean=True)
    return wrapper.transform(QuantToQCDQ()).model


def _static_batch(model) -> int:
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value or 1


def _lower(qmodel, example_inputs):
    return QONNXLowering(qmodel, example_inputs).lower()


BACKEND = register_backend(Backend(
    name="finn", lower=_lower, save=lambda m, p: onnx.save(m, str(p)), load=lambda p: onnx.load(str(Path(p))),
    run=run_qonnx, run_with_intermediates=run_qonnx_intermediates))

