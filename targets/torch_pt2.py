"""torch target, ``.pt2`` form: a ``torch.export`` ExportedProgram in PT2E's quantized representation.

Quantized values are plain ``uint8`` / ``int8`` tensors between ``torch.ops.quantized_decomposed`` quantize /
dequantize ops (what torchao's ``convert_pt2e`` produces): a fused conv/linear is ``dequantize_per_tensor(x) ->
aten conv / linear(dequantize_per_channel(int8 weight constant), float bias) -> [relu] -> quantize_per_tensor``,
a residual add ``dequantize, dequantize -> add -> [relu] -> quantize_per_tensor``, or, where it reads a conv's float
output (``add_reads_layer_output``), ``dq -> conv -> add(., dequantize(other)) -> [relu] -> quantize_per_tensor``
(PT2E's pattern for ``qconv2d_pointwise.binary``). No quantized tensor
(``quint8``, ``torch.ao.nn.quantized``) is made on the way: those APIs are deprecated.

Which node runs how is decided by the TorchScript lowering (targets/torch_quantized.py), which this one
subclasses: every fallback (float islands, exact accumulators, requantization in float) is the same, on plain
tensors. The arithmetic is in targets/torch_pt2_exactness.py, the file and its runtime (eager, ``torch.compile``)
in targets/torch_pt2_runtime.py.

Why eager float32 gives the fake-quant model's integers: on the 'x86' / 'onednn' profiles (``exact_requant``)
activation scales are powers of two and each layer's multiplier ``s_in x s_w / s_out`` a multiple of ``2^E``
(:func:`targets.torch_quantized.exact_requant_problems`), so ``x_dq x w_dq`` products are exact multiples of
``2^E x s_out``, their float32 sums exact while they stay under ``2^(24+E) x s_out`` (:mod:`.torch_pt2_exactness`
checks each layer's worst case), and ``round(y x (1 / s_out))`` rounds the same value as the model's
``rne(acc x m)``. Layers off that grid, profiles without it (fbgemm, qnnpack), and transposed convolutions keep
the TorchScript lowering's exact integer accumulator (float64 on the integers) and its requantization.
"""
from __future__ import annotations

import operator

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed (torch._inductor imports it too)
import torch.nn.functional as F
from torch import fx

from quantfx.classify import layer_read_by_add
from quantfx.graph import module_of, tensor_inputs
from quantfx.nn import QuantReLU
from quantfx.quant import functional as qf

from . import torch_quantized as tq
from .torch_profile import TORCH
from .torch_pt2_exactness import float32_sum_problems

QD = torch.ops.quantized_decomposed


def code_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


def code_range(signed: bool) -> tuple[int, int]:
    return (-128, 127) if signed else (0, 255)


# -- plain-tensor counterparts of the TorchScript lowering's functions (same arguments, codes instead of quantized
# tensors); torch.export traces them into aten and quantized_decomposed ops ------------------------------------


def quantize_codes(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool) -> torch.Tensor:
    """``clamp(round(x / scale) + zp)`` as codes: ``quantized_decomposed.quantize_per_tensor`` (which rounds
    ``x x (1 / scale)``, the same for a power-of-two scale), else the division itself."""
    if qf.is_power_of_two(scale):
        return QD.quantize_per_tensor.default(x, scale, zero_point, qmin, qmax, code_dtype(signed))
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(code_dtype(signed))


def requantize_codes(acc, acc_bias, bias_quotient, multiplier, scale: float, zero_point: int, qmin: int, qmax: int,
                     relu: bool) -> torch.Tensor:
    """:func:`targets.torch_quantized.requantize_accumulator` on plain tensors: uint8 codes."""
    t = (acc - acc_bias).float() + bias_quotient
    if relu:
        t = torch.clamp(t, min=0.0)
    v = torch.clamp(t * multiplier, qmin - zero_point, qmax - zero_point)
    return (torch.round(v) + zero_point).to(torch.uint8)


def requantize_codes_bias_after(acc, acc_bias, acc_scale, inv_scale, scale: float, zero_point: int, qmin: int,
                                qmax: int, relu: bool) -> torch.Tensor:
    """:func:`targets.torch_quantized.requantize_accumulator_bias_after` on plain tensors: uint8 codes."""
    t = (acc - acc_bias).float() * acc_scale + acc_bias.float() * acc_scale
    if relu:
        t = torch.clamp(t, min=0.0)
    return torch.clamp(torch.round(t * inv_scale + float(zero_point)), qmin, qmax).to(torch.uint8)


def layer_output(acc: torch.Tensor, acc_scale: torch.Tensor) -> torch.Tensor:
    """:func:`targets.torch_quantized.exact_layer_output` without its branch on the data: the float64 product of
    an integer below 2^24 and a float32 scale is exact, so rounding it to float32 is the float32 product (the
    branch's other side) wherever that side is taken."""
    return (acc * acc_scale.double()).float()


def product_codes(a, b, zp_a: int, zp_b: int, acc_scale, matmul: bool, float32: bool = False) -> torch.Tensor:
    """:func:`targets.torch_quantized.exact_product` on codes: ``(a - zp_a) x (b - zp_b)`` exactly, then
    ``float32(acc) x s_a s_b``. Exactly: in float32 (``float32``) where every partial sum of integer products is an
    integer below 2^24 (:func:`product_in_float32`), else in float64."""
    wide = torch.float32 if float32 else torch.float64
    ia, ib = a.to(wide) - float(zp_a), b.to(wide) - float(zp_b)
    acc = torch.matmul(ia, ib) if matmul else ia * ib
    return acc.float() * acc_scale


def product_in_float32(a_range: tuple, b_range: tuple, zp_a: int, zp_b: int, depth: int) -> bool:
    """Whether a product of codes in ``a_range`` and ``b_range`` summed over ``depth`` terms (a matmul's inner
    dimension; 1 elementwise) stays below 2^24 at every partial sum: then float32 computes it exactly in any
    order (every partial sum an integer float32 holds)."""
    reach = lambda r, zp: max(zp - r[0], r[1] - zp)  # noqa: E731
    return depth * reach(a_range, zp_a) * reach(b_range, zp_b) < 2 ** 24


_PLAIN = {tq.quantize_as_fake_quant: quantize_codes, tq.requantize_accumulator: requantize_codes,
          tq.requantize_accumulator_bias_after: requantize_codes_bias_after, tq.exact_layer_output: layer_output}


_INTEGER_LAYER_OPS = (F.conv1d, F.conv2d, F.conv3d, F.linear, F.conv_transpose1d, F.conv_transpose2d)


class Pt2Lowering(tq.TorchLowering):
    """The TorchScript lowering's walk, emitting plain tensors and quantized_decomposed ops; :meth:`finish`
    returns the plain GraphModule (``torch.export`` makes the program of it: :func:`..torch_pt2_runtime.lower`)."""

    def begin(self):
        super().begin()
        self.grids: dict = {}  # lowered node name -> (scale, zero point) of the codes it holds

    def lower_node(self, node):
        out = super().lower_node(node)
        if isinstance(out, tq._Q) and out.quantized:
            self.grids[out.node.name] = (out.scale, out.zero_point)
        return out

    def call(self, fn, *args) -> fx.Node:
        return self.graph.call_function(_PLAIN.get(fn, fn), tuple(args))

    def as_float(self, arg) -> fx.Node:
        v = self.value(arg)
        return self.dequantize(v) if v.quantized else v.node

    def dequantize(self, v: tq._Q) -> fx.Node:
        lo, hi = code_range(v.signed)
        return self.graph.call_function(QD.dequantize_per_tensor.default,
                                        (v.node, v.scale, v.zero_point, lo, hi, code_dtype(v.signed)))

    def clamp_to(self, y: tq._Q, q) -> tq._Q:
        lo, hi = q.int_range()
        if (lo, hi) == code_range(y.signed):
            return y
        return tq._Q(self.graph.call_function(torch.clamp, (y.node, lo, hi)), y.scale, y.zero_point, y.signed)

    def relu6_cap(self, y: tq._Q, m) -> tq._Q:
        cap = m.code_cap(*m.act_quant.qparams(None)) if isinstance(m, QuantReLU) else None
        if cap is None or cap is False:
            return y
        cap = int(torch.as_tensor(cap).reshape(-1)[0])
        return tq._Q(self.graph.call_function(torch.clamp, (y.node, None, cap)), y.scale, y.zero_point, y.signed)

    # -- conv / linear: dq -> aten op on dq'd int8 weights -> q ------------------------------------------

    def _fused_layer(self, node, act_node, m):
        """dequantize -> conv / linear -> [relu] -> quantize_per_tensor, when eager float32 and inductor's oneDNN
        kernels both give the fake-quant model's integers (:mod:`.torch_pt2_exactness`); else None (the exact
        accumulator, requantized as the model does)."""
        layer = module_of(self.gm, node)
        if len(node.users) != 1 or not isinstance(layer, tq._QUANT_LAYERS) or not self._multiplier_requant(node, m):
            return None
        x = self.value(node.args[0])
        if not x.quantized:
            return None
        profile = self.profile or TORCH
        if isinstance(layer, tq._TRANSPOSED) or not profile.exact_requant:
            self._inexact[node] = ("a transposed convolution" if isinstance(layer, tq._TRANSPOSED) else
                                   f"requant={profile.requant!r} is not float32 arithmetic on a power-of-two grid")
            return None
        scale, zp = tq._qparams(m.act_quant)
        problems = self._exact_requant_problems(node, layer, x, scale, zp)
        if problems:
            self._inexact[node] = "; ".join(problems)
            return None
        bias, _, _ = self._float_bias(layer, node)
        b = None if bias is None else self.buffer(node.target + "_bias", bias.float())
        y = self._float_op(layer, self.dequantize(x), self._weight_dq(node, layer), b)
        w_scale = self.weight_ints(layer)[1]
        relu = isinstance(m, QuantReLU)
        if relu:
            y = self.call(F.relu, y)
        lo, hi = code_range(False)
        out = self.graph.call_function(QD.quantize_per_tensor.default, (y, scale, zp, lo, hi, torch.uint8))
        kind = "linear" if isinstance(layer, torch.nn.Linear) else "conv"
        pos, neg = self._channel_sums(layer)
        eager = float32_sum_problems(float(self.input_scale(node)), w_scale, scale,
                                     torch.maximum(pos, neg) * self._x_bound(node, x))
        self.note(node, f"dq -> {kind}{' -> relu' if relu else ''} -> q (int8 weights per channel)",
                  why="; ".join(eager))
        self.note(act_node, f"quantize_per_tensor after {node.name}")
        return self.relu6_cap(self.clamp_to(tq._Q(out, scale, zp, False), m.act_quant), m)

    def _weight_dq(self, node, layer) -> fx.Node:
        """``dequantize_per_channel`` of the layer's int8 weight constant (its scale per output channel)."""
        ints, w_scale = self.weight_ints(layer)
        n_out = ints.shape[layer.weight_quant.channel_axis]
        w = self.buffer(node.target + "_weight_int8", ints.to(torch.int8))
        s_w = self.buffer(node.target + "_weight_scale", w_scale.reshape(-1).float().expand(n_out).contiguous())
        z_w = self.buffer(node.target + "_weight_zero_point", torch.zeros(n_out, dtype=torch.long))
        return self.graph.call_function(QD.dequantize_per_channel.default,
                                        (w, s_w, z_w, layer.weight_quant.channel_axis, -128, 127, torch.int8))

    def _layer_float(self, node) -> tq._Q:
        """A conv/linear whose float output a residual add reads (``add_reads_layer_output``): ``dequantize(x)``
        -> aten conv / linear on ``dequantize_per_channel`` of its int8 weights, plus the model's float bias: the
        values of the fake-quant model's float layer, in the form inductor folds with the add, a ReLU and the
        quantize after into one ``qconv2d_pointwise.binary`` (a sum post-op). Other float layers: the
        TorchScript lowering's."""
        layer = module_of(self.gm, node)
        x = self.value(node.args[0])
        if not (isinstance(layer, tq._QUANT_LAYERS) and not isinstance(layer, tq._TRANSPOSED) and x.quantized
                and layer_read_by_add(self.gm, next(iter(node.users))) is node and not layer.exact_integer_form()
                and layer.weight_quant.is_quant_enabled and not bool(layer.quant_weight_zero_point().ne(0).any())):
            return super()._layer_float(node)
        b = None
        if layer.bias is not None and layer.bias_quant.is_quant_enabled:
            ints, b_scale = self.bias_ints(layer, self.input_scale(node))  # the input scale from the graph
            b = ints.reshape(-1).float() * b_scale.float()
        elif layer.bias is not None:
            b = layer.bias.detach()
        y = self._float_op(layer, self.dequantize(x), self._weight_dq(node, layer),
                           None if b is None else self.buffer(node.target + "_bias", b.float()))
        kind = "linear" if isinstance(layer, torch.nn.Linear) else "conv"
        self.note(node, f"dq -> {kind} (int8 weights per channel), read in float by {next(iter(node.users)).name}",
                  why="the add's quantizer rounds it (add_reads_layer_output)")
        return tq._Q(y)

    # -- add, product --------------------------------------------------------------------------------------

    def _fused_add(self, node, act_node, m):
        """dequantize both inputs -> add -> [relu] -> quantize: the fake-quant model's own float32 add, rounded
        as it rounds (a power-of-two output scale: ``x (1 / scale)`` is ``/ scale``)."""
        a, b = (self.value(i) for i in tensor_inputs(node))
        if not self._add_fusable(node, a, b, m):
            return None
        scale, zp = tq._qparams(m.act_quant)
        if not qf.is_power_of_two(scale):
            return None  # the add in float, quantized by division: quantize_codes
        y = self.call(node.target, self.dequantize(a), self.dequantize(b))
        relu = isinstance(m, QuantReLU)
        if relu:
            y = self.call(F.relu, y)
        out = self.graph.call_function(QD.quantize_per_tensor.default, (y, scale, zp, 0, 255, torch.uint8))
        self.note(node, f"dq, dq -> add{' -> relu' if relu else ''} -> q")
        self.note(act_node, f"quantize_per_tensor after {node.name}")
        return self.clamp_to(tq._Q(out, scale, zp, False), m.act_quant)

    def _add_float(self, node) -> tq._Q:
        """An add reading a layer's float output (``add_reads_layer_output``): the float32 add of that output and
        the other input dequantized, as the fake-quant model adds them; other float adds: the TorchScript
        lowering's."""
        layer = layer_read_by_add(self.gm, node)
        if layer is None or not (self.profile or TORCH).add_reads_layer_output:
            return super()._add_float(node)
        other = next(a for a in tensor_inputs(node) if a is not layer)
        self.note(node, f"add of {layer.name}'s float output and dq({other.name}) (inductor: the conv's sum post-op)")
        return tq._Q(self.call(node.target, *(self.as_float(a) for a in node.args[:2])))

    def _float32_accumulator(self, n: fx.Node) -> None:
        """An exact integer accumulator (a conv/linear on float64 integers, read in float) computed in float32,
        then widened: the same integers, and inductor's freezing cannot take float64 convolutions (mkldnn's weight
        reorder refuses them). Where every partial sum is provably below 2^24 (the sum of all |weight integers| x
        255) the layer runs as it is; where only 16 x that sum is, its input integers x are split into
        ``16 hi + lo`` (lo in 0..15, |hi| <= 16) and the layer, linear in x, runs on each part in float32, the two
        exact results summed in float64. Beyond that it stays float64 (eager only)."""
        w = n.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return
        ints = self.root.get_buffer(w.target)
        if ints.dtype != torch.float64:
            return
        bound = float(ints.abs().sum())
        if bound * 255 < 2 ** 24:
            self.root.register_buffer(w.target, ints.float())
            with self.graph.inserting_before(n):
                n.update_arg(0, self.graph.call_method("float", (n.args[0],)))
            with self.graph.inserting_after(n):
                wide = self.graph.call_method("double", (n,))
            n.replace_all_uses_with(wide, delete_user_cb=lambda user: user is not wide)
        elif bound * 16 < 2 ** 24 and (len(n.args) < 3 or n.args[2] is None):
            self.root.register_buffer(w.target, ints.float())
            x = n.args[0]
            with self.graph.inserting_before(n):
                hi = self.graph.call_function(torch.floor, (self.graph.call_function(operator.truediv, (x, 16.0)),))
                lo = self.graph.call_function(operator.sub, (x, self.graph.call_function(operator.mul, (hi, 16.0))))
                n.update_arg(0, self.graph.call_method("float", (lo,)))
            with self.graph.inserting_before(n.next):  # in order, after n
                low = self.graph.call_method("double", (n,))
                hi32 = self.graph.call_method("float", (hi,))
                part_hi = self.graph.call_function(n.target, (hi32,) + n.args[1:], dict(n.kwargs))
                high = self.graph.call_function(operator.mul, (self.graph.call_method("double", (part_hi,)), 16.0))
                wide = self.graph.call_function(operator.add, (high, low))
            n.replace_all_uses_with(wide, delete_user_cb=lambda user: user is not low)

    def emit_product(self, node):
        """The TorchScript lowering's exact product, on codes: the operands' zero points passed along, in float32
        where its sums cannot pass 2^24 (a ViT's attention: ``q k^T`` over 64 channels, ``softmax v`` over 197
        tokens), as PT2E's float32 matmuls run, else in float64."""
        out = super().emit_product(node)
        a, b = (self.value(x) for x in node.args[:2])
        n = out.node
        matmul = n.args[-1]
        depth = self._product_depth(node) if matmul else 1
        narrow = depth is not None and product_in_float32(code_range(a.signed), code_range(b.signed), a.zero_point,
                                                          b.zero_point, depth)
        n.target = product_codes
        n.args = (n.args[0], n.args[1], a.zero_point, b.zero_point) + tuple(n.args[2:]) + (narrow,)
        if narrow:
            self.report[-1]["runs_as"] += f", in float32 (|partial sums| < 2^24 over {depth} terms)"
        return out

    def _product_depth(self, node) -> "int | None":
        """A matmul's inner dimension for the example inputs; None where it may not be the same at every batch (its
        size is the example's batch size, which the program takes as dynamic: ``x^T @ x`` over the batch)."""
        a = node.args[0]
        if not (isinstance(a, fx.Node) and self.is_tensor(a)):
            return None
        depth = self.shape(a)[-1]
        batches = {t.shape[0] for t in self.example_inputs if torch.is_tensor(t) and t.dim() > 0}
        return None if depth in batches else depth

    def finish(self) -> fx.GraphModule:
        # the TorchScript lowering reads a quantized tensor's integers with int_repr(): here they are the tensor
        for n in list(self.graph.nodes):
            if n.op == "call_method" and n.target == "int_repr":
                n.replace_all_uses_with(n.args[0])
                self.graph.erase_node(n)
        for n in list(self.graph.nodes):
            if n.op == "call_function" and n.target in _INTEGER_LAYER_OPS:
                self._float32_accumulator(n)
        gm = fx.GraphModule(self.root, self.graph, class_name="QuantfxPt2Program")
        gm.eval()
        return gm
