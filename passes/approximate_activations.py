"""approximate_activations: activations and average pools computed with the constants a fixed-point accelerator
uses, for profiles whose recipe says ``activation_approx="fixed_point"`` (the dpu profile).

"fixed_point", the DPU's constants as AMD Quark simulates the DPU in ONNX (``quark/onnx/postprocess/simulation/simulate_dpu.py`` and
``quantization/quant_utils.py``, amd-quark 0.13):

- LeakyReLU (nn.LeakyReLU, or the QuantLeakyReLU swap_modules makes of it on the dpu profile): the slope
  rounded to 1/256 (``dpu_leaky_relu_alpha``: 0.1 -> 26/256; the DPU computes 26/256 only, targets/dpu/arch.py);
- Hardsigmoid: ``clip(x + 3, 0, 6) * 2731 / 16384`` (HARD_SIGMOID_SCALE: 1/6 as 2731 / 2^14); Hardswish: ``x``
  times that hard-sigmoid on its own int8 grid of position 7 (HARD_SWISH_SIGMOID_POS), rounded half up: the DPU's
  hard-swish multiplies two int8 tensors, ``shift_swish = i + 7 - o`` (vai_q_pytorch
  ``pytorch_nndct/nn/modules/hardswish.py``: ``fake_quantize_per_tensor(.., scale_inv=128, .., method=2)`` between
  the hard-sigmoid and the product, method 2 half up; Quark's refine ``adjust_shift_swish`` reads that position);
- average pooling over a window whose area is not a power of two: the window's sum times ``k / 2^n``, the
  fraction nearest 1/area with ``n < 7 + ceil(log2(area))`` (``convert_avg_pool_to_dpu_version``, whose fixed
  table 3x3: 7/64, 5x5: 10/256, 6x6: 7/256, 7x7: 21/1024, 14x14: 21/4096 this rule reproduces except where the
  table says otherwise, and the table wins). Power-of-two areas divide exactly and are left alone.

The rewritten nodes are float ops (``operator.add``/``mul``, ``F.relu6``, ``F.avg_pool2d(divisor_override=1)``)
whose results the next activation quantizer rounds, so every runtime that computes them in float32 gets the same
integers: the sums and products of values on power-of-two grids with these short constants are exact.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import fx, nn

# the forms this pass writes, which the targets read, are the core's (quantfx.classify)
from quantfx.classify import HARD_SIGMOID_SCALE, HARD_SWISH_SIGMOID_POS, hard_swish_parts  # noqa: F401
from quantfx.graph import insert_module_after, module_of, unique_name
from quantfx.nn import QuantIdentity, QuantLeakyReLU, adaptive_window
from quantfx.pass_infra import PassResult

from .base import ProfilePass

APPROX_KEY = "quantfx.approx"  # node.meta: a node this pass wrote in the accelerator's arithmetic
_AVGPOOL_TABLE = {(3, 3): (7, 6), (5, 5): (10, 8), (6, 6): (7, 8), (7, 7): (21, 10), (14, 14): (21, 12)}


def leaky_slope(alpha: float) -> float:
    return round(alpha * 256) / 256


def avgpool_factor(kh: int, kw: int) -> tuple[int, int]:
    """(k, n): the DPU multiplies a ``kh x kw`` window's sum by ``k / 2**n`` instead of dividing by its area."""
    if (kh, kw) in _AVGPOOL_TABLE:
        return _AVGPOOL_TABLE[(kh, kw)]
    rec = kh * kw
    best = min(range(7 + math.ceil(math.log2(rec))), key=lambda n: (abs(round(2 ** n / rec) / 2 ** n - 1 / rec), n))
    return round(2 ** best / rec), best


def _window(gm, node, m):
    """(kernel, stride, padding) of an average pool node, or None (uneven adaptive windows, unknown shapes)."""
    if isinstance(m, nn.AvgPool2d):
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
        s = m.stride if isinstance(m.stride, tuple) else (m.stride or k[0],) * 2 if m.stride else k
        p = m.padding if isinstance(m.padding, tuple) else (m.padding,) * 2
        if any(p) or m.ceil_mode:
            return None  # the padded border's divisor differs per position
        return tuple(k), tuple(s), tuple(p)
    tm = node.args[0].meta.get("tensor_meta")
    if tm is None:
        return None
    k = adaptive_window(tm.shape[-2:], m.output_size)
    return None if k is None else (k, k, (0, 0))


@dataclass(frozen=True)
class ApproximateActivations(ProfilePass):
    name = "approximate_activations"
    runs_code = False  # reads and edits the graph only

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.profile.activation_approx == "exact":
            return PassResult(gm, False)
        modified = False
        for node in list(gm.graph.nodes):
            m = module_of(gm, node)
            if isinstance(m, (nn.LeakyReLU, QuantLeakyReLU)) and leaky_slope(m.negative_slope) != m.negative_slope:
                gm.get_submodule(node.target).negative_slope = leaky_slope(m.negative_slope)
                modified = True
            elif isinstance(m, (nn.Hardsigmoid, nn.Hardswish)):
                x = node.args[0]
                with gm.graph.inserting_before(node):
                    y = gm.graph.call_function(operator.add, (x, 3.0))
                    y = gm.graph.call_function(F.relu6, (y,))
                    y = gm.graph.call_function(operator.mul, (y, HARD_SIGMOID_SCALE))
                if isinstance(m, nn.Hardswish):
                    grid = QuantIdentity(act_quant=self.profile.act_quant, bit_width=self.profile.act_bit_width,
                                         fixed_scale=2.0 ** -HARD_SWISH_SIGMOID_POS)
                    y = insert_module_after(gm, y, grid, unique_name(gm, node.name + "_sigmoid_quant"))
                    with gm.graph.inserting_after(y):
                        y = gm.graph.call_function(operator.mul, (x, y))
                    y.meta[APPROX_KEY] = "hard_swish"  # the DPU's own product: quantize_products leaves it
                node.replace_all_uses_with(y)
                gm.graph.erase_node(node)
                modified = True
            elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                win = _window(gm, node, m)
                if win is None or (win[0][0] * win[0][1]) & (win[0][0] * win[0][1] - 1) == 0:
                    continue  # a power-of-two area divides exactly
                (kh, kw), stride, pad = win
                k, n = avgpool_factor(kh, kw)
                with gm.graph.inserting_before(node):
                    total = gm.graph.call_function(F.avg_pool2d, (node.args[0], (kh, kw), stride, pad),
                                                   {"divisor_override": 1})
                    y = gm.graph.call_function(operator.mul, (total, k / 2 ** n))
                y.meta.update({key: v for key, v in node.meta.items() if key == "tensor_meta"})
                node.replace_all_uses_with(y)
                gm.graph.erase_node(node)
                modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
