"""The steps an ONNX backend composes its lowering of: what differs per target, each named, listed in order in the
backend's file (``steps = (...)`` on its lowering class), so reading that list tells what its file is.

A step is a frozen dataclass with the stages it takes part in (:class:`Step`); every stage's default changes
nothing. Two kinds of stage:

- **build stages**, run while the fx graph is walked, for forms that need what the fx graph knows and the ONNX
  graph no longer says (which values only moved, which quantizer reads a layer, a stem's input grid):
  ``form`` (the whole ONNX form of one node, or None), ``layer`` (the op of a conv/linear layer), ``bias``
  (a layer's bias), ``grid`` (the integer type of a Q/DQ pair), ``before_quantize`` (the value a
  QuantizeLinear reads), ``emitted`` (a node's value after it is built);
- the **rewrite** stage, ``rewrite(lowering, model)``, run on the built ``onnx_ir.Model`` before it is
  serialized: clean-ups and metadata.

The requantization of moved values was also written as an onnxscript rewrite of the built model (DESIGN.md):
every onnx file's bytes changed and two test models gained or lost a Q/DQ pair where the fx graph knows more than
the ONNX pattern, so the forms that read the fx graph stay build stages.

This file holds the steps of the QDQ files onnxruntime runs (:mod:`targets.onnx_qdq`; dpu lists
:class:`RequantizeMoves` too); the dpu and finn steps are in their backends' files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from quantfx.graph import is_act_quant, is_cat, is_invariant, module_of, qmeta
from quantfx.quant import functional as qf


@dataclass(frozen=True)
class Step:
    """One named step of an ONNX lowering (``lw``: the lowering, an ``OnnxLowering``). Per-lowering state lives
    in ``lw.memo(self, factory)``, never on the (frozen, shared) step."""

    name: ClassVar[str] = "step"

    def form(self, lw, node, kind: str):
        """The value(s) of ``node`` (of ``Lowering.node_kind`` ``kind``) in this step's form, or None: the next
        step's form, else the lowering's ``emit_<kind>``."""
        return None

    def layer(self, lw, node, layer, x, w, b, name):
        """The op of conv/linear ``layer`` on values ``x``, ``w``, ``b`` (output called ``name``), or None."""
        return None

    def bias(self, lw, layer, in_scale, base):
        """The bias value of a quantized ``layer``, or None (QDQ lowerings)."""
        return None

    def grid(self, lw, signed: bool, int_range: tuple) -> tuple:
        """(signed, int_range) of the Q/DQ pair about to be written (QDQ lowerings)."""
        return signed, int_range

    def before_quantize(self, lw, x, grid: tuple, base: str):
        """The value the QuantizeLinear onto ``grid`` (scale, zero point) reads (QDQ lowerings)."""
        return x

    def emitted(self, lw, node, out):
        """``node``'s value(s) ``out`` as the file keeps them."""
        return out

    def rewrite(self, lw, model) -> None:
        """Change the built ``onnx_ir.Model`` in place."""


# -- the QDQ steps of files onnxruntime runs -------------------------------------------------------------------


@dataclass(frozen=True)
class GuardDoubleQDQ(Step):
    """A Clip to the first grid's range between two Q/DQ pairs of different grids (a requantizer reading a
    quantizer: Q1 -> DQ1 -> Q2 -> DQ2). onnxruntime's DoubleQDQPairsRemover replaces such pairs by one Q/DQ of a
    third scale spanning both ranges, which rounds otherwise (2 LSB found by the property tests). The Clip is the
    identity on DQ1's values (they are that grid's, in float32) and leaves no pattern to rewrite. The rewrite
    stage drops the Clips where DQ1 has other readers too: the remover rewrites only a DequantizeLinear read by
    one QuantizeLinear, so there they guard nothing."""

    name: ClassVar[str] = "guard_double_qdq"

    def before_quantize(self, lw, x, grid, base):
        up = lw.grids.get(x)
        if up is None or up[:2] == grid:
            return x
        (s1, z1), (lo, hi) = up[:2], up[2]
        x = lw.op("Clip", [x, lw.const(base + "_grid_min", np.float32(np.float32(lo - z1) * np.float32(s1))),
                           lw.const(base + "_grid_max", np.float32(np.float32(hi - z1) * np.float32(s1)))],
                  base + "_grid")
        lw.memo(self, list).append(x)
        return x

    def rewrite(self, lw, model):
        for clip in lw.memo(self, list):
            node = clip.producer()
            src = node.inputs[0]
            if len(src.uses()) > 1:
                bounds = list(node.inputs[1:])
                clip.replace_all_uses_with(src)
                model.graph.remove(node, safe=True)
                for v in bounds:
                    if not v.uses():
                        del model.graph.initializers[v.name]


@dataclass(frozen=True)
class RequantizeMoves(Step):
    """Values that only moved (reshape, pool of max, slice, concat...) are still on their grid: a Q/DQ pair with
    the same parameters is exact and gives onnxruntime a complete QDQ unit to run in int8."""

    name: ClassVar[str] = "requantize_moves"

    def emitted(self, lw, node, out):
        meta = qmeta(node)
        if not ((is_invariant(lw.gm, node) or is_cat(node)) and meta.kind == "act" and meta.scale is not None
                and meta.scale.numel() == 1):
            return out
        rng = qf.int_range(meta.bit_width, meta.signed, meta.narrow)
        if isinstance(out, tuple):
            return tuple(lw.qdq(o, meta.scale, meta.zero_point, rng, meta.signed, f"{o.name}_requant") for o in out)
        done = lw.memo(self, set)
        if out != lw.env.get(node.args[0]) and out not in done:
            out = lw.qdq(out, meta.scale, meta.zero_point, rng, meta.signed, node.name + "_requant")
            done.add(out)
        return out


@dataclass(frozen=True)
class GemmOverTokens(Step):
    """A quantized Linear over tokens (rank > 2 input) as Reshape -> Gemm -> Reshape, so onnxruntime runs QGemm
    with the bias in the accumulator (requantized as the model does); MatMul -> Add runs MatMulIntegerToFloat
    and adds the bias in float, which rounded 1 of 4352 values of a ViT block's MLP 1 LSB otherwise."""

    name: ClassVar[str] = "gemm_over_tokens"

    def layer(self, lw, node, layer, x, w, b, name):
        rank = len(lw.shape(node.args[0]))
        if not (isinstance(layer, nn.Linear) and rank > 2 and layer.weight_quant.is_quant_enabled):
            return None
        n = name or node.name
        rows = lw.op("Reshape", [x, lw.const(n + "_rows", np.array([-1, layer.in_features], np.int64))], n + "_2d")
        y = lw.op("Gemm", [rows, w] + ([b] if b is not None else []), n + "_gemm", transB=1)
        lead = lw.op("Slice", [lw.op("Shape", [x], n + "_in_shape"), lw.const(n + "_s0", np.array([0], np.int64)),
                               lw.const(n + "_s1", np.array([rank - 1], np.int64))], n + "_lead")
        shape = lw.op("Concat", [lead, lw.const(n + "_out", np.array([layer.out_features], np.int64))],
                      n + "_shape", axis=0)
        return lw.op("Reshape", [y, shape], n)


@dataclass(frozen=True)
class SpaceToDepthStem(Step):
    """A strided convolution over few channels (a network's stem: 7x7/2 or 3x3/2 over RGB) as Pad (with the
    input's zero point) -> SpaceToDepth(s) -> Conv(ceil(k/s), stride 1) on the quantized input: onnxruntime's
    im2col of a 3-channel NHWC input is slow. Tap (a*s + i, b*s + j) of input channel c becomes tap (a, b) of
    channel (i*s + j)*C + c, taps past k are zero: the same products and sums, so the same integers, with s*s*C
    channels for the im2col instead of C."""

    name: ClassVar[str] = "space_to_depth_stem"
    max_channels: int = 16  # input channels x stride^2 at most

    def applies(self, lw, node, layer) -> bool:
        """A Conv2d with a square stride s >= 2 over so few input channels that ``C * s * s <= max_channels``,
        with zero padding, no dilation or groups, on a per-tensor quantized input."""
        if not isinstance(layer, nn.Conv2d) or not layer.weight_quant.is_quant_enabled or layer.groups != 1:
            return False
        s = tuple(layer.stride)
        meta = qmeta(node.args[0])
        if len(set(s)) != 1 or s[0] < 2 or layer.in_channels * s[0] * s[0] > self.max_channels or \
                any(d != 1 for d in layer.dilation) or isinstance(layer.padding, str) or \
                getattr(layer, "padding_mode", "zeros") != "zeros" or max(layer.kernel_size) <= 1 or \
                meta.kind != "act" or meta.scale is None or meta.scale.numel() != 1 or meta.bit_width > 8:
            return False
        shape, out = lw.shape(node.args[0]), lw.shape(node)
        if len(shape) != 4 or len(out) != 4 or not all(isinstance(d, int) for d in tuple(shape[2:]) + tuple(out[2:])):
            return False
        s = s[0]
        # the padded input must reach the last block the output reads (no cropping)
        return all((o - 1 + -(-k // s)) * s >= size + p for o, k, size, p in
                   zip(out[2:], layer.kernel_size, shape[2:], layer.padding))

    def form(self, lw, node, kind):
        if kind != "compute":
            return None
        layer = module_of(lw.gm, node)
        if not self.applies(lw, node, layer):
            return None
        s = layer.stride[0]
        meta = qmeta(node.args[0])
        n, c, h, w = lw.shape(node.args[0])
        kh, kw = layer.kernel_size
        ph, pw = layer.padding
        oh, ow = tuple(lw.shape(node)[2:])
        kh2, kw2 = -(-kh // s), -(-kw // s)  # kernel in blocks
        # padded extent: what the output needs, (o - 1) * s + k rounded up to whole blocks
        hp, wp = (oh - 1 + kh2) * s, (ow - 1 + kw2) * s
        bottom, right = hp - h - ph, wp - w - pw  # >= 0 (checked): whole blocks of padding at the end
        sc, zp = lw.q_consts(node.name + "_in", meta.scale, meta.zero_point, meta.signed)
        xq = lw.op("QuantizeLinear", [lw.env[node.args[0]], sc, zp], node.name + "_in_q")
        pads = lw.const(node.name + "_pads", np.asarray([0, 0, ph, pw, 0, 0, bottom, right], np.int64))
        xq = lw.op("Pad", [xq, pads, zp], node.name + "_pad")
        xq = lw.op("SpaceToDepth", [xq], node.name + "_blocks", blocksize=s)
        x = lw.op("DequantizeLinear", [xq, sc, zp], node.name + "_in")
        ints, w_scale = lw.weight_ints(layer)  # [O, C, kh, kw]
        o = ints.shape[0]
        ints = torch.nn.functional.pad(ints, (0, kw2 * s - kw, 0, kh2 * s - kh))
        ints = ints.reshape(o, c, kh2, s, kw2, s).permute(0, 3, 5, 1, 2, 4).reshape(o, s * s * c, kh2, kw2)
        ins = [x, lw.dq_const(node.target + ".weight", ints, w_scale, np.int8, 0)]
        if layer.bias is not None:
            ins.append(lw.emit_bias(layer, lw.input_scale(node), node.target))
        return lw.op("Conv", ins, node.name, kernel_shape=[kh2, kw2], strides=[1, 1], pads=[0, 0, 0, 0])


@dataclass(frozen=True)
class PixelShuffleTaps(Step):
    """A ConvTranspose2d with square kernel == stride (no padding, dilation, groups or output padding: every
    output pixel is one input pixel times one kernel tap), read by one per-tensor activation quantizer, as an
    integer 1x1 Conv -> Q/DQ -> DepthToSpace, which onnxruntime runs as QLinearConv. W [Cin, Cout, k, k] ->
    W' [Cout*k*k, Cin, 1, 1], channel c*k*k + i*k + j = tap (i, j) of output c: DepthToSpace (mode CRD) puts it
    at pixel (h*k + i, w*k + j). The Q/DQ pair before DepthToSpace is the following activation quantizer's (a
    move does not change the grid); the arithmetic is the transposed conv's."""

    name: ClassVar[str] = "pixel_shuffle_taps"

    @staticmethod
    def reader(lw, node, layer):
        """The activation quantizer that reads ``node`` when the form applies, else None."""
        if not isinstance(layer, nn.ConvTranspose2d) or not layer.weight_quant.is_quant_enabled:
            return None
        k = layer.kernel_size
        if k[0] != k[1] or tuple(layer.stride) != tuple(k) or any(layer.padding) or any(layer.output_padding) \
                or any(d != 1 for d in layer.dilation) or layer.groups != 1 or \
                getattr(layer, "padding_mode", "zeros") != "zeros" or len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if not is_act_quant(lw.gm, user):
            return None
        q = module_of(lw.gm, user).act_quant
        return q if q.is_quant_enabled and not q.scaling_per_output_channel else None

    def form(self, lw, node, kind):
        if kind != "compute":
            return None
        layer = module_of(lw.gm, node)
        q = self.reader(lw, node, layer)
        if q is None:
            return None
        k = layer.kernel_size[0]
        ints, w_scale = lw.weight_ints(layer)  # [Cin, Cout, k, k]
        cin, cout = ints.shape[:2]
        ints = ints.permute(1, 2, 3, 0).reshape(cout * k * k, cin, 1, 1)
        w_scale = w_scale.reshape(-1).repeat_interleave(k * k) if w_scale.numel() > 1 else w_scale
        ins = [lw.env[node.args[0]], lw.dq_const(node.target + ".weight", ints, w_scale, np.int8, 0)]
        if layer.bias is not None:
            b_ints, b_scale = lw.bias_ints(layer, lw.input_scale(node))
            b_scale = b_scale.repeat_interleave(k * k) if b_scale.numel() > 1 else b_scale.reshape(())
            ins.append(lw.dq_const(node.target + ".bias", b_ints.repeat_interleave(k * k), b_scale, np.int32, 0))
        y = lw.op("Conv", ins, node.name + "_taps", kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0])
        scale, zp = q.qparams(None)
        y = lw.qdq(y, scale, zp, q.int_range(), q.signed, node.name + "_taps_quant")
        return lw.op("DepthToSpace", [y], node.name, blocksize=k, mode="CRD")


__all__ = ["Step", "GuardDoubleQDQ", "RequantizeMoves", "GemmOverTokens", "SpaceToDepthStem", "PixelShuffleTaps"]
