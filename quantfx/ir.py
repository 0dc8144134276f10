"""The IR's quantization metadata: ``QMeta`` (what ``node.meta['quant']`` holds for one graph edge), how to read
it and a node's shared group off a node, and how a scale reads for people."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

META_KEY = "quant"
GROUP_KEY = "quant_group"  # node.meta key of the shared group share_quantizers puts a node in


@dataclass
class QMeta:
    """Compile-time quantization facts of one graph edge (a node's output): the graph's QuantTensor.

    ``kind`` is 'act' (quantized by a quantizer), 'acc' (an integer accumulator: conv/linear/add output),
    'trunc' (a truncated average-pool output) or 'float'. ``scale``/``zero_point`` are None until the
    quantizer producing them is calibrated."""

    kind: str = "float"
    bit_width: Optional[int] = None
    signed: Optional[bool] = None
    narrow: bool = False
    scale: Optional[torch.Tensor] = None
    zero_point: Optional[torch.Tensor] = None
    quantizer: Optional[str] = None
    group: Optional[str] = None

    @property
    def is_quantized(self) -> bool:
        return self.kind != "float"

    def describe(self) -> str:
        if not self.is_quantized:
            return "float"
        sign = "int" if self.signed else "uint"
        return f"{sign}{self.bit_width}" + ("" if self.kind == "act" else f" ({self.kind})")


FLOAT = QMeta()


def qmeta(node: fx.Node) -> QMeta:
    return node.meta.get(META_KEY, FLOAT)


def group_of(node: fx.Node, quantizer) -> str | None:
    """The shared group an activation-quantizer node belongs to: from the node (set by share_quantizers), else
    from its quantizer (a shared quantizer's or a ScaleGroup's name; node metadata does not survive pickling)."""
    group = node.meta.get(GROUP_KEY) or getattr(quantizer, "group", None)
    if group is None and getattr(quantizer, "scale_group", None) is not None:
        group = quantizer.scale_group.name
    return group


def fmt_scale(scale, digits: int = 4) -> str:
    """A scale for people: ``2^-n`` for powers of two, ``digits`` significant digits otherwise, ``[C] lo..hi``
    (3 digits) per channel."""
    if scale is None:
        return "uncalibrated"
    flat = scale.reshape(-1)
    if flat.numel() > 1:
        return f"[{flat.numel()}] {float(flat.min()):.3g}..{float(flat.max()):.3g}"
    v = float(flat)
    if v > 0 and math.log2(v) == int(math.log2(v)):
        return f"2^{int(math.log2(v))}"
    return f"{v:.{digits}g}"
