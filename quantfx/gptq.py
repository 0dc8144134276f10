"""Weight rounding by GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023).

Each layer's weight matrix ``W`` (output rows, input columns: a convolution's columns are its input channels x
kernel positions, per group) is quantized one column at a time on the layer's own grid (the weight quantizer's
scale and zero point: per channel or per tensor, power of two on the dpu): the error the rounding of a column
leaves is spread over the columns not yet rounded through the inverse Hessian ``H = X^T X`` of the layer's
inputs ``X`` on the calibration data, which minimises ``||W X - Q X||^2``. The updates are applied lazily in
blocks of :data:`BLOCK` columns (the paper's section 4, step 2), columns go in the order of decreasing
``diag(H)`` ("act order"), and ``H`` is damped by ``DAMP x mean(diag(H))``.

Only the integers are chosen: the quantizer's scale stays (it is frozen with
:meth:`quantfx.quant.Quantizer.freeze_weight_scale`) and the integers are written into the weights (``s x q``),
as learned rounding does, so every backend exports them unchanged. One forward pass over the calibration data
gives every layer's Hessian (the inputs as the quantized model computes them, with round-to-nearest before);
the rounding then takes a Cholesky factorisation and ``cols / BLOCK`` matrix products per layer.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import _progress, _run_batches
from .errors import QuantArgumentError
from .quant import functional as qf
from .quant.quantizer import _distributed
from .weight_rounding import NOTE, RoundedLayer, _batches, _layers, _store

BLOCK = 128  # columns updated together (lazy batch updates)
DAMP = 0.01  # the Hessian's diagonal is raised by this fraction of its mean (the paper's lambda)


def _columns(layer: nn.Module, x: torch.Tensor) -> Optional[list[torch.Tensor]]:
    """The layer's input as matrices of rows (one per output position) by columns (the weight's input
    dimension), one per group; None for a layer GPTQ does not handle (transposed and 3-d convolutions)."""
    if isinstance(layer, nn.Linear):
        return [x.reshape(-1, x.shape[-1])]
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return None
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, stride, dilation = (1, *layer.kernel_size), (1, *layer.stride), (1, *layer.dilation)
        padding = (0, *layer.padding) if not isinstance(layer.padding, str) else layer.padding
    else:
        kernel, stride, dilation, padding = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    if isinstance(padding, str) or layer.padding_mode != "zeros":  # 'same'/'valid', or reflect/replicate/circular
        pads = layer._reversed_padding_repeated_twice
        if isinstance(layer, nn.Conv1d):
            pads = [*pads, 0, 0]
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x, padding = F.pad(x, pads, mode=mode), 0
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C k, L]
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    per_group = cols.shape[1] // layer.groups
    return [cols[:, g * per_group:(g + 1) * per_group] for g in range(layer.groups)]


def hessians(qmodel: nn.Module, layers: list, batches: list) -> dict:
    """``{layer name: ([X^T X per group], rows)}`` over ``batches``, X the layer's quantized input as
    :func:`_columns` (float64 sums of float32 products); layers GPTQ does not handle are left out."""
    found = {}

    def hook_of(name):
        def hook(mod, args, kwargs):
            x, src = args[0], kwargs.get("input_quantizer", args[1] if len(args) > 1 else None)
            groups = _columns(mod, mod._quant_input(x, src)[0].detach().float())
            if groups is None:
                return
            hs, rows = found.get(name, (None, 0))
            prods = [(g.T @ g).double() for g in groups]
            found[name] = (prods if hs is None else [h + p for h, p in zip(hs, prods)], rows + groups[0].shape[0])
        return hook

    handles = [layer.register_forward_pre_hook(hook_of(name), with_kwargs=True) for name, layer in layers]
    try:
        _run_batches(qmodel, batches, False, "gptq: layer inputs", None)
    finally:
        for h in handles:
            h.remove()
    dist = _distributed()
    if dist is not None:  # every rank's sums (the same on every rank; one process's up to float64 rounding)
        for name, _ in layers:
            if name in found:
                hs, rows = found[name]
                for h in hs:
                    dist.all_reduce(h)
                total = torch.tensor([float(rows)], dtype=torch.float64)
                dist.all_reduce(total)
                found[name] = (hs, int(total.item()))
    return found


def _quantize_columns(w, h, s, z, qmin, qmax, rounding, block):
    """GPTQ on one weight matrix ``w`` [rows, cols] with Hessian ``h`` [cols, cols]; ``s``, ``z`` each
    weight's scale and zero point, shaped as ``w``. Returns the integers [rows, cols]."""
    # float32 as the paper's implementation (the Hessians are summed in float64): the three factorisations of a
    # 4608-column Hessian take 3.6 s of CPU in float64, half that in float32; the 1 % damping keeps them stable
    w, h, s, z = w.float().clone(), h.to(torch.float32, copy=True), s.float(), z.float()
    cols = w.shape[1]
    dead = torch.diag(h) == 0  # inputs that were always zero: nothing to correct, nearest rounding
    h[dead, dead] = 1
    order = torch.argsort(torch.diag(h), descending=True)
    w, h, s, z = w[:, order], h[order][:, order], s[:, order], z[:, order]
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err = w[:, i1:i2].clone(), torch.empty(w.shape[0], i2 - i1, dtype=w.dtype)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, sc, zc = w1[:, i], s[:, i1 + i], z[:, i1 + i]
            qi = torch.clamp(qf.round_int(col / sc, rounding) + zc, qmin, qmax)
            q[:, i1 + i] = qi
            e = (col - (qi - zc) * sc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, order] = q
    return out


def gptq(qmodel: nn.Module, data: Iterable, *, max_bits: int = 8, block: int = BLOCK, progress: bool = True,
         max_batches: Optional[int] = None) -> list[RoundedLayer]:
    """Choose every quantized layer's weight integers of ``qmodel`` (calibrated; weight bit widths 2 to
    ``max_bits``; linear layers and 1-d/2-d convolutions, any groups) by GPTQ on ``data``. A layer keeps
    round-to-nearest where GPTQ's output error on the data is not lower. Deterministic. Returns one
    :class:`quantfx.weight_rounding.RoundedLayer` per layer (its MSEs are of the layer's output before the bias
    and activation, on the calibration inputs), also kept in ``qmodel.notes['weight_rounding']``."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise QuantArgumentError(f"gptq: block={block!r}; give a positive number of columns")
    batches = _batches(data, max_batches, "gptq")
    was_training = qmodel.training
    qmodel.eval()
    layers = list(_layers(qmodel, max_bits))
    try:
        found = hessians(qmodel, layers, batches)
    finally:
        qmodel.train(was_training)
    out = []
    for name, layer in _progress(layers, progress and bool(layers), "gptq"):
        if name in found:
            out.append(_round_layer(name, layer, *found[name], block))
    if hasattr(qmodel, "notes"):
        qmodel.notes[NOTE] = [str(r) for r in out]
    return out


def _round_layer(name, layer, hs, rows, block) -> RoundedLayer:
    wq = layer.weight_quant
    original = getattr(layer, "float_weight", None)  # rounded before: start again from the float weights
    w = (layer.weight if original is None else original).detach().clone()
    with torch.no_grad():
        wq.freeze_weight_scale(w)  # the scale w gives, searched once (an MSE search at low widths), kept by _store
        scale, zp = wq.qparams(w)
        s, z = (t.expand_as(w) for t in wq.broadcast(scale, zp, w))
        qmin, qmax = wq.int_range()
        nearest = torch.clamp(qf.round_int(w / s, wq.rounding) + z, qmin, qmax)
        flat = lambda t: t.reshape(w.shape[0], -1)  # noqa: E731  [out, in / groups x kernel]
        per = w.shape[0] // len(hs)  # output rows of one group
        chosen = torch.empty_like(flat(w))
        errors = torch.zeros(2, dtype=torch.float64)  # sum over rows of d H d^T: nearest, gptq
        for g, h in enumerate(hs):
            sl = slice(g * per, (g + 1) * per)
            wg, sg, zg = flat(w)[sl], flat(s)[sl], flat(z)[sl]
            q = _quantize_columns(wg, h, sg, zg, qmin, qmax, wq.rounding, block).to(w.dtype)
            chosen[sl] = q
            for k, ints in enumerate((flat(nearest)[sl], q)):
                d = ((ints - zg) * sg - wg).double()
                errors[k] += ((d @ h) * d).sum()
        total = rows * w.shape[0]
        before, after = (float(e) / total for e in errors)
        chosen = chosen.reshape(w.shape)
        if not after < before:
            chosen, after = nearest, before
        changed = int((chosen != nearest).sum())
        _store(layer, w, (chosen - z) * s, "gptq")
    return RoundedLayer(name, wq.bit_width, changed, w.numel(), before, after)


__all__ = ["gptq", "hessians"]
