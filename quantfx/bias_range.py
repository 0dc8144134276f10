"""Biases that fit their integers: an external-scale bias is stored as integers on the accumulator's grid,
input scale x weight scale, and a bias far larger than what the weights contribute (weights scaled down by
1e-12, bias left as it was; or a layer reading an input of magnitude 1e-14) needs more than int32 holds there.

:func:`fit_bias_ranges` runs after calibration (input scales known): where a channel's bias would need more
steps than its quantizer holds (less the room the accumulator needs for the products, so that the int32 sum
cannot wrap), that channel's weight scale is raised to ``|b_c| / (limit x s_in)``, a coarser weight grid. Nothing
a runtime computes is lost: the weights' part of such a channel is below about ``fan_in x 2^-15`` of its bias,
and the channel's output grid (8 bits over a range at least as large as the bias) is coarser still. Each change
is recorded in ``qmodel.notes['bias_range']``. A bias changed afterwards that no longer fits is an error when
the model runs in eval mode or is lowered (``Quantizer._check_bias_range``), never a silent clip.
"""
from __future__ import annotations

import torch
from torch import fx

from .errors import QuantArgumentError
from .graph import input_quantizer_of, is_compute, module_of
from .quant import functional as qf

NOTE = "bias_range"  # qmodel.notes key: one sentence per layer whose weight grid was coarsened
INT32_MAX = 2 ** 31 - 1


def bias_limit(layer, in_quantizer) -> int:
    """The largest bias integer of ``layer`` that its quantizer holds and that leaves the int32 accumulator
    room for the worst-case sum of products (fan_in x largest input code x largest weight code)."""
    qmin, qmax = layer.bias_quant.int_range()
    lo, hi = in_quantizer.int_range()
    wmin, wmax = layer.weight_quant.int_range()
    products = layer.fan_in() * (hi - lo) * max(abs(wmin), abs(wmax))
    return max(min(qmax, INT32_MAX - products), qmax // 2)


def fit_bias_ranges(qmodel: fx.GraphModule) -> list[str]:
    """Coarsen the weight grid of every conv/linear whose external-scale bias would not fit its integers (see the
    module docstring); returns (and adds to ``qmodel.notes['bias_range']``) one sentence per changed layer.
    Raises QuantArgumentError naming the layer where the weight scale cannot move (a learned or asymmetric weight
    scale, a weight quantizer shared by several layers)."""
    users: dict = {}
    for m in qmodel.modules():
        if hasattr(m, "weight_quant") and getattr(m.weight_quant, "is_quant_enabled", False):
            users.setdefault(id(m.weight_quant), []).append(m)
    notes = []
    for node in qmodel.graph.nodes:
        if not is_compute(qmodel, node):
            continue
        layer = module_of(qmodel, node)
        bq, wq, src = layer.bias_quant, layer.weight_quant, input_quantizer_of(qmodel, node)
        if layer.bias is None or not bq.is_quant_enabled or bq.bias_scaling != "external" or src is None or \
                not wq.is_quant_enabled or not src.is_calibrated:
            continue
        with torch.no_grad():
            s_in = src.scale().reshape(-1).double()
            w_scale = wq.scale(layer.weight).double()
            if s_in.numel() != 1 or bool((s_in < qf.TINY).any()):
                continue  # refused elsewhere (a per-channel input; an accumulator scale below float32)
            limit = bias_limit(layer, src)
            need = layer.bias.detach().double().abs() / (limit * s_in)
            if not wq.scaling_per_output_channel:
                need = need.max()
            elif need.numel() != w_scale.numel() and need.numel() % w_scale.numel() == 0:
                # a grouped transposed conv: output channel g * (C / groups) + j has weight scale j
                need = need.reshape(-1, w_scale.numel()).amax(0)
            short = need > w_scale.reshape(need.shape)
            if not bool(short.any()):
                continue
            if len(users[id(wq)]) > 1:
                raise QuantArgumentError(
                    f"{node.target}: its bias needs a coarser weight grid to fit {bq.bit_width}-bit integers at "
                    "input scale x weight scale, and its weight quantizer is shared with other layers; give the "
                    "layer its own weight quantizer or keep it float: overrides={" + repr(node.target) + ": None}")
            try:
                wq.floor_weight_scale(layer.weight, need.float())
            except QuantArgumentError as e:
                raise QuantArgumentError(f"{node.target}: its bias does not fit {bq.bit_width}-bit integers at "
                                         f"input scale x weight scale, and {e}; keep the layer float: "
                                         "overrides={" + repr(node.target) + ": None}") from e
            new = wq.scale(layer.weight).double()
        c = int((need / w_scale.reshape(need.shape)).reshape(-1).argmax())
        notes.append(
            f"{node.target}: bias up to {float(layer.bias.detach().abs().max()):.3g} at input scale "
            f"{float(s_in):.3g} needs a weight scale of at least {float(need.reshape(-1)[c]):.3g} to fit "
            f"{limit} steps; weight scale of {int(short.sum())} channel(s) raised (channel {c}: "
            f"{float(w_scale.reshape(-1)[c % w_scale.numel()]):.3g} -> {float(new.reshape(-1)[c % new.numel()]):.3g})")
    if notes and hasattr(qmodel, "notes"):
        qmodel.notes[NOTE] = list(qmodel.notes.get(NOTE, [])) + notes
    return notes


__all__ = ["fit_bias_ranges", "bias_limit", "NOTE"]
