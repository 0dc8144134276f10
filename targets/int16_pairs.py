"""What x86 CPUs without VNNI do to an 8-bit dot product, and the rule that makes it harmless.

onnxruntime's (MLAS) and fbgemm's u8 x s8 kernels on AVX2 and AVX512BW CPUs without VNNI multiply unsigned 8-bit
activations by signed 8-bit weights with ``vpmaddubsw``: the products of two neighbouring reduction terms are
summed into one *saturating* int16, and only those pair sums are added in int32. On CPUs with AVX512-VNNI or
AVX-VNNI (``vpdpbusd``) and on ARM the products go straight into int32, so the same file gives other integers
there as soon as one pair sum passes 32767: a 3x3 conv over 16 channels with activations 255 and weights 127
gives 72 x 32767 = 2,359,224 instead of 144 x 255 x 127 = 4,663,440.

The rule: a layer is exact on every CPU when ``a_max * (|w|_1st + |w|_2nd) <= 32767`` for each output channel,
``a_max`` being the largest code the kernel can see on its input (255 for any 8-bit activation, whatever its
zero point) and ``|w|_1st``, ``|w|_2nd`` the two largest weight magnitudes of the channel. It holds for any
pairing of the reduction terms, so it does not depend on how a kernel packs them. 7-bit weights (|w| <= 63)
meet it under 8-bit activations: 255 x 126 = 32130.

``pair_risks`` applies the rule to a QDQ ONNX file as onnxruntime will run it; ``emulate_u8s8`` computes
a dot product the way those kernels do, for tests and for ``verify``'s diagnosis.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from quantfx.rules import INT16_MAX, code_max, top2_sum  # noqa: F401  (the rule's arithmetic, re-exported)


def emulate_u8s8(a_codes: np.ndarray, w_codes: np.ndarray, saturate: bool = True,
                 block: int = 1 << 22) -> np.ndarray:
    """``a_codes @ w_codes.T`` as AVX2/AVX512BW u8 x s8 kernels compute it: ``a_codes`` [M, K] in 0..255,
    ``w_codes`` [N, K] in -128..127; terms 2i and 2i+1 of the reduction are summed into a saturating int16,
    the pair sums into int32 (K padded with zeros to even). ``saturate=False`` gives the exact product (VNNI,
    ARM). Rows go ``block`` products at a time, to bound memory. Returns int64 [M, N]."""
    a = np.asarray(a_codes, np.int64)
    w = np.asarray(w_codes, np.int64)
    if not saturate:
        return a @ w.T
    if a.shape[1] % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        w = np.pad(w, ((0, 0), (0, 1)))
    m, k = a.shape
    w = w.reshape(1, w.shape[0], k // 2, 2)
    rows = max(1, block // max(1, w.shape[1] * k))
    out = np.empty((m, w.shape[1]), np.int64)
    for r in range(0, m, rows):
        pairs = (a[r:r + rows].reshape(-1, 1, k // 2, 2) * w).sum(-1)
        out[r:r + rows] = np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(-1)
    return out


def im2col_nhwc(x_codes: np.ndarray, kernel, stride=(1, 1), dilation=(1, 1)) -> tuple[np.ndarray, tuple]:
    """Rows of a 2-d convolution's reduction over an (already padded) input, in the order of an NHWC im2col
    (kh, kw, c), the order onnxruntime's QLinearConv reduces in. Returns ([N*OH*OW, kh*kw*C], (N, OH, OW))."""
    n, c, h, w = x_codes.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    x = np.asarray(x_codes, np.int64)
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    taps = [x[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]  # each [N, C, OH, OW]
    cols = np.stack(taps, axis=1)  # [N, kh*kw, C, OH, OW]
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * oh * ow, kh * kw * c), (n, oh, ow)


def emulate_conv2d(x_codes, zero_point: int, w_int, stride=(1, 1), dilation=(1, 1), groups: int = 1,
                   saturate: bool = True) -> np.ndarray:
    """The integer accumulator of a 2-d convolution, ``sum((x - zp) * w)``, over an input already padded with
    the zero point, as an AVX2 u8 x s8 kernel gives it: the raw codes go through :func:`emulate_u8s8` and the
    zero point is taken off exactly afterwards (``zp * sum(w)``), as the kernels do. ``saturate=False``: the
    exact accumulator. [N, O, OH, OW] int64."""
    w_int = np.asarray(w_int, np.int64)
    o, cg, kh, kw = w_int.shape
    outs = []
    for g in range(groups):
        xg = np.asarray(x_codes)[:, g * cg:(g + 1) * cg]
        wg = w_int[g * (o // groups):(g + 1) * (o // groups)]
        cols, (n, oh, ow) = im2col_nhwc(xg, (kh, kw), stride, dilation)
        wk = wg.transpose(0, 2, 3, 1).reshape(wg.shape[0], -1)  # (kh, kw, c) like the columns
        acc = emulate_u8s8(cols, wk, saturate) - zero_point * wk.sum(1)[None, :]
        outs.append(acc.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2))
    return np.concatenate(outs, axis=1)


# -- the rule on an ONNX file -----------------------------------------------------------------------------


@dataclass
class IntegerLayer:
    """A Conv/Gemm/MatMul of a QDQ file that onnxruntime runs on 8-bit integers (both operands come from
    DequantizeLinear), in the shape its u8 x s8 kernel sees it."""

    node: onnx.NodeProto
    codes: str  # the integer tensor feeding the input's DequantizeLinear
    zero_point: int
    code_range: tuple[int, int]
    weight: np.ndarray  # int8; Conv [O, C/g, kh, kw], Gemm/MatMul [N, K] (output channels first)

    @property
    def name(self) -> str:
        return self.node.name

    def attr(self, key, default):
        a = next((a for a in self.node.attribute if a.name == key), None)
        return default if a is None else onnx.helper.get_attribute_value(a)


@dataclass
class PairRisk:
    """One integer layer of a QDQ file: the worst pair sum its u8 x s8 kernel can form."""

    node: str  # the ONNX node (quantfx names it after the fx node)
    op: str
    in_code_max: int
    weight_top2: int
    worst: int

    @property
    def safe(self) -> bool:
        return self.worst <= INT16_MAX


def _const(inits, producers, name) -> Optional[np.ndarray]:
    if name in inits:
        return inits[name]
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _dq_codes(inits, producers, name):
    """For a value made by DequantizeLinear: (integer tensor name feeding it, its zero point array) or None."""
    node = producers.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    zp = _const(inits, producers, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return node.input[0], zp


# ops that move integer codes without making new ones: the range of their output is that of their (first) input
_LAYOUT_OPS = ("SpaceToDepth", "DepthToSpace", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
               "Identity", "MaxPool", "Pad", "Slice", "Split")


def _requantizes_onto_itself(inits, producers, node) -> bool:
    """A QuantizeLinear of a DequantizeLinear with the same scale and zero point: the codes pass unchanged."""
    if node.op_type != "QuantizeLinear":
        return False
    dq = producers.get(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) != len(node.input):
        return False
    pairs = [(_const(inits, producers, a), _const(inits, producers, b)) for a, b in zip(dq.input[1:], node.input[1:])]
    return all(a is not None and b is not None and np.array_equal(a, b) for a, b in pairs)


def _code_range(inits, producers, name, zp) -> tuple[int, int]:
    """The range of the integer codes in ``name``: a Clip's bounds if one made it (through layout ops such as the
    SpaceToDepth of a strided stem), else its dtype's."""
    node = producers.get(name)
    while node is not None and (node.op_type in _LAYOUT_OPS or _requantizes_onto_itself(inits, producers, node)):
        node = producers.get(node.input[0])
        if node is not None and node.op_type == "DequantizeLinear":
            node = producers.get(node.input[0])
    lo, hi = (-128, 127) if zp is not None and zp.dtype == np.int8 else (0, 255)
    if node is not None and node.op_type == "Clip":
        bounds = [_const(inits, producers, i) if i else None for i in list(node.input[1:3])]
        if bounds and bounds[0] is not None:
            lo = max(lo, int(bounds[0]))
        if len(bounds) > 1 and bounds[1] is not None:
            hi = min(hi, int(bounds[1]))
    return lo, hi


def integer_layers(model: onnx.ModelProto, signed_weights_only: bool = True) -> list[IntegerLayer]:
    """Every layer of a QDQ file that onnxruntime runs with a u8 x s8 kernel: a Conv, Gemm or MatMul whose input
    and constant weight both come from DequantizeLinear, the weight int8 (uint8 weights take u8 x u8 kernels,
    which widen to int16 before multiplying: nothing saturates there)."""
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    out = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        x = _dq_codes(inits, producers, node.input[0])
        w_name, transposed = node.input[1], node.op_type == "Gemm" and any(
            a.name == "transB" and a.i for a in node.attribute)
        t = producers.get(w_name)
        if node.op_type == "MatMul" and t is not None and t.op_type == "Transpose":
            w_name, transposed = t.input[0], True  # x @ W^T with W [N, K]
        w = _dq_codes(inits, producers, w_name)
        if x is None or w is None:
            continue
        w_int = _const(inits, producers, w[0])
        if w_int is None or w_int.dtype not in (np.int8, np.uint8) or (
                signed_weights_only and w_int.dtype != np.int8):
            continue
        if node.op_type != "Conv" and not transposed:
            w_int = w_int.T
        zp = int(np.asarray(x[1]).reshape(-1)[0]) if x[1] is not None else 0
        out.append(IntegerLayer(node, x[0], zp, _code_range(inits, producers, x[0], x[1]), w_int))
    return out


def pair_risks(model: onnx.ModelProto) -> list[PairRisk]:
    """Every u8 x s8 layer of a QDQ file (:func:`integer_layers`), with the worst pair sum its kernel can form."""
    out = []
    for layer in integer_layers(model):
        a_max = code_max(*layer.code_range)
        top = int(top2_sum(layer.weight, 0).max(initial=0))
        out.append(PairRisk(layer.name, layer.node.op_type, a_max, top, a_max * top))
    return out


# -- the arithmetic on real inputs ------------------------------------------------------------------------


@dataclass
class LayerCheck:
    """A layer's accumulators on one batch, exact (int32 products: VNNI x86, ARM) against AVX2's pair sums."""

    node: str
    op: str
    outputs: int
    differing: int  # accumulators the two CPUs would compute differently
    max_diff: int

    @property
    def exact(self) -> bool:
        return self.differing == 0


def _conv_inputs(layer: IntegerLayer, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """``x`` padded with the zero point as onnxruntime pads it (ONNX pads are begin..., end...)."""
    k = layer.weight.shape[2:]
    pads = layer.attr("pads", [0] * (2 * len(k)))
    x = np.pad(np.asarray(x, np.int64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])),
               constant_values=layer.zero_point)
    return x, dict(stride=tuple(layer.attr("strides", [1, 1])), dilation=tuple(layer.attr("dilations", [1, 1])),
                   groups=layer.attr("group", 1))


def check_layer(layer: IntegerLayer, x_codes: np.ndarray) -> LayerCheck:
    """Both accumulators of ``layer`` on the integer input ``x_codes`` (as onnxruntime quantized it)."""
    w = np.asarray(layer.weight, np.int64)
    if layer.node.op_type == "Conv":
        if w.ndim != 4:
            raise ValueError(f"{layer.name}: only 2-d convolutions are emulated, got a {w.ndim - 2}-d one")
        x, kw = _conv_inputs(layer, x_codes)
        avx2 = emulate_conv2d(x, layer.zero_point, w, **kw)
        exact = emulate_conv2d(x, layer.zero_point, w, **kw, saturate=False)
    else:  # the zero-point correction is exact on both CPUs: it cancels in the difference
        x = np.asarray(x_codes, np.int64).reshape(-1, w.shape[1])
        avx2, exact = emulate_u8s8(x, w), emulate_u8s8(x, w, saturate=False)
    diff = np.abs(avx2 - exact)
    return LayerCheck(layer.name, layer.node.op_type, int(diff.size), int((diff > 0).sum()),
                      int(diff.max(initial=0)))


def cpu_has_int32_dot() -> Optional[bool]:
    """Whether this CPU multiplies 8-bit integers straight into int32 (x86 AVX512-VNNI / AVX-VNNI, or ARM);
    None when it cannot be told."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return None
    if not flags:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags
