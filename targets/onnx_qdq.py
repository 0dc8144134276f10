"""onnx target: standard ONNX in QDQ form, run by onnxruntime with int8 kernels.

Activations: ``QuantizeLinear -> [Clip for < 8 bits] -> DequantizeLinear`` (uint8 with zero point or int8);
weights: int8 initializers feeding ``DequantizeLinear`` (per channel on the output-channel axis); biases:
int32 initializers with scale = input scale x weight scale and zero point 0. onnxruntime fuses the
DQ -> Conv/Gemm/Add/... -> Q units into QLinear* integer kernels.
"""
from __future__ import annotations


from typing import Optional

import numpy as np
import onnx
import torch
from torch import nn

from quantfx.errors import ExportError, TargetError
from quantfx.graph import is_act_quant, is_cat, is_invariant, module_of, qmeta
from quantfx.lowering import Backend
from quantfx.quant import functional as qf

from .int16_pairs import INT16_MAX, check_layer, cpu_has_int32_dot, integer_layers, pair_risks
from .onnx_base import OnnxLowering, feed, load_onnx, node_values, not_quantfx, np32, save_onnx, with_values
from .onnx_profile import ONNX


def _int_dtype(bits: int, signed: bool):
    return np.int8 if signed else np.uint8


class QDQLowering(OnnxLowering):
    target = "onnx"
    opset = 13

    # put a Clip to the first grid's range between two Q/DQ pairs of different grids (see _qdq)
    guard_double_qdq = True

    def begin(self):
        super().begin()
        self._requantized: set = set()
        self._grids: dict = {}  # DequantizeLinear output -> (scale, zero point, int range) of its grid
        self._guards: list = []  # the Clips _qdq put between two Q/DQ pairs

    def emit_act_quant(self, x, q, base):
        scale, zp = q.qparams(None)
        return self._qdq(x, scale, zp, q.int_range(), q.signed, base)

    def _q_consts(self, base, scale, zp, signed):
        """Initializers of a per-tensor QuantizeLinear/DequantizeLinear pair: (scale, zero point) names."""
        s = self.const(base + "_scale", np32(scale.reshape(())))
        z = self.const(base + "_zero_point", np.asarray(zp.reshape(()).round().item(), _int_dtype(8, signed)))
        return s, z

    def _qdq(self, x, scale, zp, int_range, signed, base):
        dtype = _int_dtype(8, signed)
        grid = (float(scale.reshape(())), float(zp.reshape(()).round()))
        up = self._grids.get(x)
        if self.guard_double_qdq and up is not None and up[:2] != grid:
            # Q1 -> DQ1 -> Q2 -> DQ2 of two grids (a requantizer reading a quantizer): onnxruntime's
            # DoubleQDQPairsRemover replaces the pairs by one Q/DQ of a third scale spanning both ranges, which
            # rounds otherwise (2 LSB found by the property tests). A Clip to DQ1's own range between them is
            # the identity on its values (they are that grid's, in float32) and leaves no pattern to rewrite.
            (s1, z1), (lo, hi) = up[:2], up[2]
            x = self.op("Clip", [x, self.const(base + "_grid_min", np.float32(np.float32(lo - z1) * np.float32(s1))),
                                 self.const(base + "_grid_max", np.float32(np.float32(hi - z1) * np.float32(s1)))],
                        base + "_grid")
            self._guards.append(x)
        x = self._unfusable_clip(x, grid, dtype)
        s, z = self._q_consts(base, scale, zp, signed)
        y = self.op("QuantizeLinear", [x, s, z], base + "_q")
        info = np.iinfo(dtype)
        if tuple(int_range) != (info.min, info.max):
            y = self.op("Clip", [y, self.const(base + "_qmin", np.asarray(int_range[0], dtype)),
                                 self.const(base + "_qmax", np.asarray(int_range[1], dtype))], base + "_clip")
        out = self.op("DequantizeLinear", [y, s, z], base)
        self._grids[out] = grid + (tuple(int_range),)
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

    def postprocess(self, model) -> None:
        """Drop the Clips between Q/DQ pairs where the first DequantizeLinear has other readers too: the
        remover rewrites only a DequantizeLinear read by one QuantizeLinear, so there they guard nothing."""
        super().postprocess(model)
        for clip in self._guards:
            node = clip.producer()
            src = node.inputs[0]
            if len(src.uses()) > 1:
                bounds = list(node.inputs[1:])
                clip.replace_all_uses_with(src)
                model.graph.remove(node, safe=True)
                for v in bounds:
                    if not v.uses():
                        del model.graph.initializers[v.name]

    def emit(self, node):
        out = super().emit(node)
        meta = qmeta(node)
        # Values that only moved (reshape, pool, slice, concat...) are still on their grid: a Q/DQ pair with
        # the same parameters is exact and gives onnxruntime a complete QDQ unit to run in int8.
        if (is_invariant(self.gm, node) or is_cat(node)) and meta.kind == "act" and meta.scale is not None \
                and meta.scale.numel() == 1:
            rng = qf.int_range(meta.bit_width, meta.signed, meta.narrow)
            if isinstance(out, tuple):
                return tuple(self._qdq(o, meta.scale, meta.zero_point, rng, meta.signed, f"{o.name}_requant")
                             for o in out)
            if out != self.env.get(node.args[0]) and out not in self._requantized:
                out = self._qdq(out, meta.scale, meta.zero_point, rng, meta.signed, node.name + "_requant")
                self._requantized.add(out)
        return out

    # a Linear over tokens (rank > 2 input) as Reshape -> Gemm -> Reshape, so onnxruntime runs QGemm with the bias
    # in the accumulator (requantized as the model does); MatMul -> Add runs MatMulIntegerToFloat and adds the
    # bias in float, which rounded 1 of 4352 values of a ViT block's MLP 1 LSB otherwise
    gemm_over_tokens = True

    def emit_layer(self, node, layer, x, w, b, name=None):
        rank = len(self.shape(node.args[0]))
        if not (self.gemm_over_tokens and isinstance(layer, nn.Linear) and rank > 2 and
                layer.weight_quant.is_quant_enabled):
            return super().emit_layer(node, layer, x, w, b, name)
        n = name or node.name
        rows = self.op("Reshape", [x, self.const(n + "_rows", np.array([-1, layer.in_features], np.int64))],
                       n + "_2d")
        y = self.op("Gemm", [rows, w] + ([b] if b is not None else []), n + "_gemm", transB=1)
        lead = self.op("Slice", [self.op("Shape", [x], n + "_in_shape"), self.const(n + "_s0", np.array([0], np.int64)),
                                 self.const(n + "_s1", np.array([rank - 1], np.int64))], n + "_lead")
        shape = self.op("Concat", [lead, self.const(n + "_out", np.array([layer.out_features], np.int64))],
                        n + "_shape", axis=0)
        return self.op("Reshape", [y, shape], n)

    def emit_product(self, node):
        """A QuantProduct on integers: each operand's codes (those its DequantizeLinear reads, else a
        ``QuantizeLinear`` on its own grid, exact on its values), ``Cast`` to int32 minus the zero point, an int32 ``Mul`` / ``MatMul`` (exact below 2^31), then
        ``Cast`` to float and ``Mul(s_a x s_b)``: ``float32(acc) x float32(s_a s_b)``, as the fake-quant model
        computes it. The activation quantizer after it is its requantization (Q/DQ)."""
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
            if dq is not None and dq.op_type == "DequantizeLinear" and self._grids.get(value, (None,))[:2] == grid:
                q = dq.inputs[0]  # the codes the operand was dequantized from
            else:
                s, z = self._q_consts(base, meta.scale, meta.zero_point, meta.signed)
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

    def _dq_const(self, base, ints, scale, dtype, axis):
        w = self.const(base + "_int", ints.numpy().astype(dtype))
        s = self.const(base + "_scale", np32(scale))
        z = self.const(base + "_zero_point", np.zeros(tuple(scale.shape), dtype))
        attrs = {"axis": axis} if scale.dim() == 1 else {}
        return self.op("DequantizeLinear", [w, s, z], base, **attrs)

    def emit_weight(self, layer, base):
        ints, scale = self.weight_ints(layer)
        return self._dq_const(base + ".weight", ints, scale, np.int8, layer.weight_quant.channel_axis)

    def emit_bias(self, layer, in_scale, base):
        ints, scale = self.bias_ints(layer, in_scale)
        return self._dq_const(base + ".bias", ints, scale.reshape(()) if scale.numel() == 1 else scale,
                              np.int32, 0)

    # -- strided convolution over few channels (a stem) ---------------------------------------------------

    S2D_MAX_CHANNELS = 16  # input channels x stride^2 at most: the im2col of a 3-channel NHWC input is slow

    def _space_to_depth_form(self, node, layer) -> bool:
        """A Conv2d with a square stride s >= 2 over so few input channels that ``C * s * s <= 16`` (a
        network's stem: 7x7/2 or 3x3/2 over RGB), with zero padding, no dilation or groups, on a per-tensor
        quantized input."""
        if not isinstance(layer, nn.Conv2d) or not layer.weight_quant.is_quant_enabled or layer.groups != 1:
            return False
        s = tuple(layer.stride)
        meta = qmeta(node.args[0])
        if len(set(s)) != 1 or s[0] < 2 or layer.in_channels * s[0] * s[0] > self.S2D_MAX_CHANNELS or \
                any(d != 1 for d in layer.dilation) or isinstance(layer.padding, str) or \
                getattr(layer, "padding_mode", "zeros") != "zeros" or max(layer.kernel_size) <= 1 or \
                meta.kind != "act" or meta.scale is None or meta.scale.numel() != 1 or meta.bit_width > 8:
            return False
        shape, out = self.shape(node.args[0]), self.shape(node)
        if len(shape) != 4 or len(out) != 4 or not all(isinstance(d, int) for d in tuple(shape[2:]) + tuple(out[2:])):
            return False
        s = s[0]
        # the padded input must reach the last block the output reads (no cropping)
        return all((o - 1 + -(-k // s)) * s >= size + p for o, k, size, p in
                   zip(out[2:], layer.kernel_size, shape[2:], layer.padding))

    def _emit_space_to_depth_conv(self, node, layer):
        """Conv(k, stride s, pad p) as Pad (with the input's zero point) -> SpaceToDepth(s) -> Conv(ceil(k/s),
        stride 1) on the quantized input. Tap (a*s + i, b*s + j) of input channel c becomes tap (a, b) of
        channel (i*s + j)*C + c, taps past k are zero: the same products and sums, so the same integers, with
        s*s*C channels for the im2col instead of C."""
        s = layer.stride[0]
        meta = qmeta(node.args[0])
        n, c, h, w = self.shape(node.args[0])
        kh, kw = layer.kernel_size
        ph, pw = layer.padding
        oh, ow = tuple(self.shape(node)[2:])
        kh2, kw2 = -(-kh // s), -(-kw // s)  # kernel in blocks
        # padded extent: what the output needs, (o - 1) * s + k rounded up to whole blocks
        hp, wp = (oh - 1 + kh2) * s, (ow - 1 + kw2) * s
        bottom, right = hp - h - ph, wp - w - pw  # >= 0 (checked): whole blocks of padding at the end
        sc, zp = self._q_consts(node.name + "_in", meta.scale, meta.zero_point, meta.signed)
        xq = self.op("QuantizeLinear", [self.env[node.args[0]], sc, zp], node.name + "_in_q")
        pads = self.const(node.name + "_pads", np.asarray([0, 0, ph, pw, 0, 0, bottom, right], np.int64))
        xq = self.op("Pad", [xq, pads, zp], node.name + "_pad")
        xq = self.op("SpaceToDepth", [xq], node.name + "_blocks", blocksize=s)
        x = self.op("DequantizeLinear", [xq, sc, zp], node.name + "_in")
        ints, w_scale = self.weight_ints(layer)  # [O, C, kh, kw]
        o = ints.shape[0]
        ints = torch.nn.functional.pad(ints, (0, kw2 * s - kw, 0, kh2 * s - kh))
        ints = ints.reshape(o, c, kh2, s, kw2, s).permute(0, 3, 5, 1, 2, 4).reshape(o, s * s * c, kh2, kw2)
        wname = self._dq_const(node.target + ".weight", ints, w_scale, np.int8, 0)
        ins = [x, wname]
        if layer.bias is not None:
            ins.append(self.emit_bias(layer, self.input_scale(node), node.target))
        return self.op("Conv", ins, node.name, kernel_shape=[kh2, kw2], strides=[1, 1], pads=[0, 0, 0, 0])

    # -- ConvTranspose with kernel == stride -------------------------------------------------------------

    def _pixel_shuffle_form(self, node, layer):
        """The act quantizer after a ConvTranspose2d that onnxruntime can run as an integer 1x1 convolution
        followed by DepthToSpace (square kernel == stride, no padding, dilation, groups or output padding: every
        output pixel is one input pixel times one kernel tap), or None."""
        if not isinstance(layer, nn.ConvTranspose2d) or not layer.weight_quant.is_quant_enabled:
            return None
        k = layer.kernel_size
        if k[0] != k[1] or tuple(layer.stride) != tuple(k) or any(layer.padding) or any(layer.output_padding) \
                or any(d != 1 for d in layer.dilation) or layer.groups != 1 or \
                getattr(layer, "padding_mode", "zeros") != "zeros" or len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if not is_act_quant(self.gm, user):
            return None
        q = module_of(self.gm, user).act_quant
        return q if q.is_quant_enabled and not q.scaling_per_output_channel else None

    def emit_compute(self, node):
        layer = module_of(self.gm, node)
        if self._space_to_depth_form(node, layer):
            return self._emit_space_to_depth_conv(node, layer)
        q = self._pixel_shuffle_form(node, layer)
        if q is None:
            return super().emit_compute(node)
        # W [Cin, Cout, k, k] -> W' [Cout*k*k, Cin, 1, 1], channel c*k*k + i*k + j = tap (i, j) of output c:
        # DepthToSpace (mode CRD) puts it at pixel (h*k + i, w*k + j). The Q/DQ pair between the 1x1 Conv and
        # DepthToSpace is the following activation quantizer's (a move does not change the grid), so
        # onnxruntime fuses DQ -> Conv -> Q into QLinearConv; the arithmetic is the transposed conv's.
        k = layer.kernel_size[0]
        ints, w_scale = self.weight_ints(layer)  # [Cin, Cout, k, k]
        cin, cout = ints.shape[:2]
        ints = ints.permute(1, 2, 3, 0).reshape(cout * k * k, cin, 1, 1)
        w_scale = w_scale.reshape(-1).repeat_interleave(k * k) if w_scale.numel() > 1 else w_scale
        w = self._dq_const(node.target + ".weight", ints, w_scale, np.int8, 0)
        ins = [self.env[node.args[0]], w]
        if layer.bias is not None:
            b_ints, b_scale = self.bias_ints(layer, self.input_scale(node))
            b_scale = b_scale.repeat_interleave(k * k) if b_scale.numel() > 1 else b_scale.reshape(())
            ins.append(self._dq_const(node.target + ".bias", b_ints.repeat_interleave(k * k), b_scale, np.int32, 0))
        y = self.op("Conv", ins, node.name + "_taps", kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0])
        scale, zp = q.qparams(None)
        y = self._qdq(y, scale, zp, q.int_range(), q.signed, node.name + "_taps_quant")
        return self.op("DepthToSpace", [y], node.name, blocksize=k, mode="CRD")


# -- runtime ---------------------------------------------------------------------------------------------


def ort_session(model: onnx.ModelProto, threads: int = 1, optimize: bool = True, optimized_path=None,
                config: Optional[dict] = None):
    """An onnxruntime CPU session; ``config``: session config entries (e.g. {"session.disable_quant_qdq": "1"})."""
    import onnxruntime as ort  # loads slowly; only running an artefact needs it
    opts = ort.SessionOptions()
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_onnx(model: onnx.ModelProto, inputs) -> list:
    return ort_session(model).run(None, feed(model.graph.input, inputs))


def with_outputs(model: onnx.ModelProto, fx_names) -> tuple[onnx.ModelProto, list]:
    """A copy of ``model`` that also outputs the values of the given fx nodes; (model, fx names kept)."""
    mapping = node_values(model)
    kept = [n for n in fx_names if n in mapping]
    return with_values(model, [mapping[n] for n in kept]), kept


def run_onnx_intermediates(model, inputs, fx_names, session=ort_session) -> dict:
    extended, kept = with_outputs(model, fx_names)
    mapping = node_values(model)
    sess = session(extended)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, feed(extended.graph.input, inputs))))
    return {n: values[mapping[n]] for n in kept if mapping[n] in values}


def _lower(qmodel, example_inputs):
    return QDQLowering(qmodel, example_inputs, profile=ONNX).lower()


def layer_checks(model: onnx.ModelProto, inputs) -> list:
    """Each u8 x s8 layer of ``model`` on ``inputs``: its accumulators as CPUs with int32 dot products (VNNI x86,
    ARM) compute them against an emulation of AVX2's saturating int16 pair sums (int16_pairs.check_layer), the
    integer inputs taken from onnxruntime."""
    layers = integer_layers(model)
    extended = with_values(model, [layer.codes for layer in layers])
    sess = ort_session(extended, optimize=False)  # the codes are the Q outputs, whichever kernels run after them
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed(extended.graph.input, inputs))))
    return [check_layer(layer, values[layer.codes]) for layer in layers]


def diagnose(model: onnx.ModelProto, inputs) -> str:
    """Whether a mismatch of ``model`` in onnxruntime on ``inputs`` is consistent with int16 pair saturation."""
    fix = "quantize with cpu='any' (the default: 7-bit weights) for a file that is exact on every CPU"
    risky = [r for r in pair_risks(model) if not r.safe]
    if not risky:
        return (f"no integer layer of the file can pass {INT16_MAX} in an int16 pair sum of onnxruntime's u8 x s8 "
                "kernels, so CPU differences (VNNI or not) are not the cause")
    hit = [c for c in layer_checks(model, inputs) if not c.exact]
    has_dot = cpu_has_int32_dot()
    if not hit:
        return (f"not int16 pair saturation: {len(risky)} integer layer(s) could saturate on x86 CPUs without "
                "VNNI, but none does on these inputs (emulated)")
    names = ", ".join(f"{c.node} ({c.differing} of {c.outputs} accumulators, up to {c.max_diff} off)"
                      for c in hit[:3]) + (", ..." if len(hit) > 3 else "")
    where = {False: "this CPU has no VNNI, so it sums u8 x s8 products in saturating int16 pairs",
             True: "this CPU has VNNI (or is ARM), so the file is exact here but not on x86 CPUs without VNNI",
             None: "this CPU's kernels are unknown"}[has_dot]
    return (f"{'consistent with' if has_dot is not True else 'not the cause here, but note'} int16 pair "
            f"saturation: on these inputs, emulated AVX2 arithmetic changes {len(hit)} layer(s): {names}; "
            f"{where}; {fix}")


BACKEND = Backend(
    name="onnx", lower=_lower, save=save_onnx, load=load_onnx, run=run_onnx,
    run_with_intermediates=run_onnx_intermediates, diagnose=diagnose, check=not_quantfx)
