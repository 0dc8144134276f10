"""FINN's resource estimates of a layer at given widths, as budget keys of mixed precision ('finn_luts',
'finn_brams'; :mod:`quantfx.mixed_precision`).

The formulas are FINN's own (github.com/Xilinx/finn, commit 39f0c9a6, April 2026), which cite FINN-R (Blott et
al., 2018):

- a conv (lowered to im2col + MVAU) or linear layer: ``MVAU_hls.lut_estimation``
  (src/finn/custom_op/fpgadataflow/hls/matrixvectoractivation_hls.py) and ``MVAU.bram_estimation``
  (src/finn/custom_op/fpgadataflow/matrixvectoractivation.py), with MW = in channels x kernel positions,
  MH = out channels, TMEM = MH / PE, WMEM = MW MH / (PE SIMD);
- a depthwise conv (VVAU): ``VVAU_hls.lut_estimation`` (src/finn/custom_op/fpgadataflow/hls/
  vectorvectoractivation_hls.py) and ``VVAU.bram_estimation`` (src/finn/custom_op/fpgadataflow/
  vectorvectoractivation.py), TMEM = channels / PE, WMEM = kernel positions x channels / (PE SIMD).

Assumed node attributes (FINN's for a LUT-based design): ``resType='lut'`` (multipliers in LUTs: a DSP
multiplier costs no LUTs whatever the widths), ``mem_mode='internal_decoupled'`` with ``ram_style='auto'``
(weights in BRAM), ``ram_style_thresholds='distributed'`` (the activation that reads the layer becomes its
thresholds, ``2^B - 1`` per channel, in LUTs), no accumulator datatype set (FINN then takes the bound of
arXiv:2301.13376 from the widths), signed inputs as the quantizer says; a layer no activation quantizer reads
has ``noActivation=1``. Folding: PE = the largest divisor of MH up to :data:`PE`, SIMD = of MW up to
:data:`SIMD` (depthwise: SIMD of the kernel positions).
"""
from __future__ import annotations

import math
from typing import Optional

from quantfx.mixed_precision import LayerShape, register_cost

PE = 8  # output channels computed in parallel at most (FINN's PE)
SIMD = 8  # inputs per channel in parallel at most (FINN's SIMD)


def _fold(n: int, most: int) -> int:
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def _geometry(layer: LayerShape):
    """(P, Q, wmem, tmem, dot-product length for the accumulator bound)."""
    if layer.kind == "depthwise":
        p, q = _fold(layer.cols, PE), _fold(layer.kernel, SIMD)
        return p, q, layer.kernel * layer.cols // p // q, layer.cols // p, layer.kernel
    p, q = _fold(layer.cols, PE), _fold(layer.rows, SIMD)
    return p, q, layer.rows * layer.cols // (p * q), layer.cols // p, layer.rows


def finn_luts(layer: LayerShape, w: int, a: int, b: Optional[int]) -> float:
    """LUTs of the layer's MVAU/VVAU (``lut_estimation``): c0 + c1 P (multipliers + adder tree + accumulator +
    thresholds + comparators); ``b`` the width of the activation that reads it (None: noActivation)."""
    p, q, _wmem, tmem, dot = _geometry(layer)
    c0, c1, c2 = 300, 1.1, 0  # c2: weights in LUTs only with ram_style='distributed'
    mult_luts = q * (2 * math.ceil((w + a) / 6) - 1) * (w + a)
    addertree_luts = (w + a) * (2 * q - 1)
    alpha = math.log(dot, 2) + w + a - 1 - int(layer.act_signed)
    acc_bits = math.ceil(alpha + math.log(1 + 2 ** -alpha, 2) + 1)  # below FINN's INT32 default
    thr_luts = comp_luts = 0
    if b is not None:
        # MVAU rounds the threshold memory up to 64-deep LUTRAMs; VVAU's formula does not
        depth = tmem / 64 if layer.kind == "depthwise" else math.ceil(tmem / 64)
        thr_luts = (2 ** b - 1) * acc_bits * depth
        comp_luts = (2 ** b - 1) * acc_bits
    # acc_luts = acc_bits
    return float(int(c0 + c1 * (p * (mult_luts + addertree_luts + acc_bits + thr_luts + comp_luts)) + c2))


def finn_brams(layer: LayerShape, w: int, a: int, b: Optional[int]) -> float:
    """RAMB18s of the layer's weight memory (``bram_estimation``, SDP mode as UG573 Table 1-10)."""
    p, q, omega, _tmem, _dot = _geometry(layer)
    mem_width = q * w * p
    if layer.kind == "depthwise":
        if omega <= 128:  # ram_style='auto' keeps memories up to 128 deep in LUTs
            return 0.0
        per = [(4, 4), (9, 8), (18, 16)]
        wide = 32
    else:
        per = [(4, 4), (9, 9), (18, 18)]
        wide = 36
    if mem_width == 1:
        return float(math.ceil(omega / 16384))
    if mem_width == 2:
        return float(math.ceil(omega / 8192))
    for (limit, div), depth in zip(per, (4096, 2048, 1024)):
        if mem_width <= limit or (limit == 18 and omega > 512):
            return float(math.ceil(omega / depth) * math.ceil(mem_width / div))
    return float(math.ceil(omega / 512) * math.ceil(mem_width / wide))


register_cost("finn_luts", finn_luts, reads_output=True)
register_cost("finn_brams", finn_brams)
