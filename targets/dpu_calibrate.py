"""Fix positions by minimum squared error, as AMD Quark's power-of-two calibration does.

Quark's ``PowerOfTwoMethod.MinMSE`` (``quark/onnx/quantization/quant_utils.py``, ``quantize_data``, amd-quark 0.13)
starts from the position of the max, ``round(-log2(absmax / 127))``, tries the ``pos_range = 5`` positions
``pos - 1 .. pos + 3`` and keeps the one whose quantize-dequantize error over the calibration data is smallest.
:func:`calibrate_positions` does the same for every weight (on the tensor) and every activation quantizer (on
the float activations of ``data``, all quantizers passing values through, as Quark's calibration collects them
from the float model) of a calibrated compiled graph, and fixes those positions; run :func:`refine` (the
lowering does) afterwards. ``quantize(model, 'dpu', calibration_data=..., calibration_method='mse')`` runs it
(and the refine) as its calibration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantfx.calibration import _run_batches, quantizers
from quantfx.pipelines import annotate
from quantfx.quant import functional as qf

from .dpu_refine import set_pos

POS_RANGE = 5  # Quark's default: positions pos - 1 .. pos + 3


@dataclass
class PositionChoice:
    quantizer: str
    max_position: int  # round(-log2(absmax / qmax))
    chosen: int


def _candidates(absmax: float, qmax: int) -> list[int]:
    p = round(-math.log2(max(absmax, 1e-30) / qmax))
    return [p - 1 + i for i in range(POS_RANGE)]


def _sq_error(x: torch.Tensor, pos: int, q) -> float:
    lo, hi = q.int_range()
    s = torch.tensor(2.0 ** -pos)
    return float((qf.fake_quant(x, s, torch.zeros(()), lo, hi, q.rounding) - x).double().pow(2).sum())


def calibrate_positions(qmodel, data, max_batches: int | None = None) -> list[PositionChoice]:
    """Choose and fix the min-MSE position of every per-tensor power-of-two weight and activation quantizer of
    ``qmodel`` (calibrated first, for each activation's max) on ``data``; returns the choices."""
    choices = []
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            layer_w = getattr(m, "weight_quant", None)
            if layer_w is None or not layer_w.is_quant_enabled or layer_w.scale_type != "po2" or \
                    layer_w.scaling_per_output_channel:
                continue
            w = m.weight.detach()
            cands = _candidates(float(w.abs().max()), layer_w.int_range()[1])
            best = min(cands, key=lambda p: _sq_error(w, p, layer_w))
            set_pos(layer_w, best)
            choices.append(PositionChoice(f"{name}.weight_quant", cands[1], best))
    acts = [q for q in quantizers(qmodel, "act") if q.scale_type == "po2" and not q.scaling_per_output_channel
            and q.fixed_scale is None and bool(q.calibrated)]
    errors = {}
    cands = {}
    for q in acts:
        top = float(q.stat.abs().max())
        cands[id(q)] = _candidates(top, q.int_range()[1])
        errors[id(q)] = [0.0] * POS_RANGE

    def observer(q):
        def observe(x):  # stands in for Quantizer.observe while calibrating: the float activation
            x = x.detach().float()
            for k, p in enumerate(cands[id(q)]):
                errors[id(q)][k] += _sq_error(x, p, q)
        return observe

    every = quantizers(qmodel)
    searched = {id(q) for q in acts}
    for q in every:  # the others (a fixed scale, a pool the refine pinned to its input) pass values through
        if q.kind == "act":
            q.observe = observer(q) if id(q) in searched else (lambda x: None)
    for q in every:
        q.calibrating = True
    try:
        _run_batches(qmodel, data, False, "min-MSE positions", max_batches)
    finally:
        for q in every:
            if q.kind == "act":
                del q.observe
        for q in every:
            q.calibrating = False
    for q in acts:
        k = min(range(POS_RANGE), key=lambda j: errors[id(q)][j])
        pos = cands[id(q)][k]
        if q.scale_group is not None:
            continue  # the members of a scale group keep their shared (max-based) scale
        set_pos(q, pos)
        choices.append(PositionChoice(q.qname or "act", cands[id(q)][1], pos))
    annotate(qmodel)
    return choices


__all__ = ["calibrate_positions", "PositionChoice", "POS_RANGE"]
