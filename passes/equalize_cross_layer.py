"""equalize_cross_layer: rescale the channels between consecutive float layers so that each channel's weight
range is the same in both (cross-layer equalization, Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, section 4.1).

For a layer A whose output reaches a layer B only through a positively homogeneous activation (ReLU,
LeakyReLU, PReLU, or none), ``B(f(A(x))) = B'(f(A'(x)))`` with ``A' = S^-1 A`` (rows and bias of A divided by
s) and ``B' = B S`` (B's input channels multiplied by s), for any positive s. With r1 the range of A's
output channel and r2 that of B's input channel, ``s = sqrt(r1 / r2)`` gives both the range sqrt(r1 r2): one
scale per tensor then fits all channels of both layers. Chains (A -> B -> C) are swept until the scales settle.

Runs on float layers after fuse_conv_bn (a folded BatchNorm is part of A), before swap_modules. It changes
the compiled copy only; float outputs stay equal up to float32 rounding. Layers whose output has another
reader, transposed convolutions, and B's read through a flatten are left as they are (the channel mapping
breaks there).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from quantfx.graph import module_of
from quantfx.pass_infra import Pass, PassResult

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)  # f(s x) = s f(x) for s > 0 (PReLU: per channel or shared)


def _single_reader(node: fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def out_ranges(layer: nn.Module) -> torch.Tensor:
    """max |w| of each output channel of ``layer``."""
    w = layer.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1)


def in_ranges(layer: nn.Module) -> torch.Tensor:
    """max |w| over each input channel of ``layer`` (grouped convolutions: within the channel's group)."""
    w = layer.weight.detach()
    groups = getattr(layer, "groups", 1)
    per_group = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)  # [g, out/g, in/g, k]
    return per_group.abs().amax(dim=(1, 3)).reshape(-1)


def _scale_inputs(layer: nn.Module, s: torch.Tensor) -> None:
    w = layer.weight.data
    groups = getattr(layer, "groups", 1)
    view = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)
    view.mul_(s.reshape(groups, 1, w.shape[1], 1))


def _divide_outputs(layer: nn.Module, s: torch.Tensor) -> None:
    layer.weight.data.div_(s.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    if layer.bias is not None:
        layer.bias.data.div_(s)


def equalize_pair(a: nn.Module, b: nn.Module) -> float:
    """Equalize one pair in place; returns the largest relative change of a scale from 1 (0 when settled). (A
    PReLU between them keeps its slopes: prelu(s x) = s prelu(x) for s > 0, per channel too.)"""
    r1, r2 = out_ranges(a), in_ranges(b)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
    _divide_outputs(a, s)
    _scale_inputs(b, s)
    return float((s - 1).abs().max()) if s.numel() else 0.0


def pairs(gm: fx.GraphModule) -> list[tuple[nn.Module, nn.Module]]:
    """(A, B) of every equalizable pair, in graph order: B reads A's output directly or through one
    homogeneous activation, each the only reader, and no module is called twice (shared weights)."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def module(n):
        return module_of(gm, n) if n is not None and n.op == "call_module" and calls[n.target] == 1 else None

    out = []
    for node in gm.graph.nodes:
        a = module(node)
        if not isinstance(a, _LAYERS):
            continue
        src, reader = node, _single_reader(node)
        if isinstance(module(reader), _HOMOGENEOUS):
            src, reader = reader, _single_reader(reader)
        b = module(reader)
        if isinstance(b, _LAYERS) and type(b) is type(a) and reader.args and reader.args[0] is src and \
                b.weight.shape[1] * getattr(b, "groups", 1) == a.weight.shape[0]:
            out.append((a, b))
    return out


@dataclass(frozen=True)
class EqualizeCrossLayer(Pass):
    """Cross-layer equalization of conv -> [ReLU] -> conv and linear -> [ReLU] -> linear pairs."""

    name = "equalize_cross_layer"
    runs_code = False  # reads and edits the graph only
    sweeps: int = 20  # passes over the chain at most
    tolerance: float = 1e-4  # stop when no scale moves more than this (relative)

    def call(self, gm: fx.GraphModule) -> PassResult:
        found = pairs(gm)
        with torch.no_grad():
            for _ in range(self.sweeps):
                if max((equalize_pair(a, b) for a, b in found), default=0.0) < self.tolerance:
                    break
        return PassResult(gm, bool(found))
