"""Numbers to compare a quantized model with its float original."""
from __future__ import annotations

import math

import torch

from .errors import QuantArgumentError


def sqnr(ref, got) -> float:
    """Signal-to-quantization-noise ratio of ``got`` against ``ref`` in dB, ``10 log10(sum ref^2 / sum (ref -
    got)^2)``, in float64; ``inf`` when they are equal. Tensors or arrays of one shape."""
    ref, got = torch.as_tensor(ref).detach().double(), torch.as_tensor(got).detach().double()
    if ref.shape != got.shape:
        raise QuantArgumentError(f"sqnr: shapes differ, {tuple(ref.shape)} and {tuple(got.shape)}")
    noise = float((ref - got).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.pow(2).sum()) / noise)


__all__ = ["sqnr"]
