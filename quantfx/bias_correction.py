"""Empirical bias correction (``correct_bias``), run by calibration as the pass ``correct_bias``. Apart from
quantfx.calibration because it compares with the float model through quantfx.weight_rounding, which feeds batches
with quantfx.calibration's helpers."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .calibration import StopForward, _progress, _run_batches
from .nn import QuantWBIOL
from .quant_tensor import value_of
from .weight_rounding import float_view


def correct_bias(qmodel: nn.Module, data: Iterable, progress: bool = True,
                 max_batches: Optional[int] = None) -> nn.Module:
    """Empirical bias correction (Nagel et al., "Data-Free Quantization", 2019, section 4.2, its empirical
    form): layer by layer in graph order, add to each quantized layer's bias the mean per-channel difference
    between the float model's output of that layer and the quantized model's, with the layers before it already
    corrected. The reference is the float model (:func:`quantfx.weight_rounding.float_view`), so this composes
    with learned rounding, which writes its integers into the weights."""
    layers = [m for m in qmodel.modules() if isinstance(m, QuantWBIOL) and m.bias is not None
              and m.weight_quant.is_quant_enabled]
    batches = [b for i, b in enumerate(data) if max_batches is None or i < max_batches]
    if not layers or not batches:
        return qmodel
    sums: dict[int, list] = {}  # per layer: [sum of each output channel over the data, values per channel]
    stop_at = None

    def hook(layer, _args, out):
        out = value_of(out).detach()
        axis = layer.out_channel_axis % out.dim()
        rows = out.transpose(0, axis).reshape(out.shape[axis], -1).double()
        acc = sums.setdefault(id(layer), [0, 0])
        acc[0], acc[1] = acc[0] + rows.sum(1), acc[1] + rows.shape[1]
        if layer is stop_at:
            raise StopForward

    def means(selected) -> dict:
        """Per-channel means of each selected layer's output over the data."""
        sums.clear()
        handles = [m.register_forward_hook(hook) for m in selected]
        try:
            _run_batches(qmodel, batches, False, "bias correction", None)
        finally:
            for h in handles:
                h.remove()
        return {k: total / n for k, (total, n) in sums.items()}

    was_training = qmodel.training
    qmodel.eval()
    try:
        with float_view(qmodel):
            reference = means(layers)
        for layer in _progress(layers, progress, "bias correction"):
            stop_at = layer
            got = means([layer])
            if id(layer) in got and id(layer) in reference:
                with torch.no_grad():
                    layer.bias.add_((reference[id(layer)] - got[id(layer)]).to(layer.bias.dtype))
    finally:
        qmodel.train(was_training)
    return qmodel
