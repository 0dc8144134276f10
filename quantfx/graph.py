"""Graph helpers shared by passes and targets: node classification, quantization metadata, naming."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn import (
    QuantAct, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d, QuantLinear,
    QuantWBIOL,
)
from .nn.pool import _TruncAvgPool

META_KEY = "quant"


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

# --- node classification -------------------------------------------------------------------------------

COMPUTE_TYPES = (QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d, QuantLinear)
FLOAT_COMPUTE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

INVARIANT_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten,
    nn.Identity, nn.PixelShuffle, nn.PixelUnshuffle, nn.Unflatten, nn.ZeroPad2d, nn.ZeroPad1d,
    nn.ChannelShuffle,
)
INVARIANT_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.max_pool2d,
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
    torch.chunk, torch.split, operator.getitem, F.pixel_shuffle, F.pixel_unshuffle, torch.pixel_shuffle,
    torch.channel_shuffle, F.channel_shuffle, torch.t,
}
INVARIANT_METHODS = {
    "view", "reshape", "flatten", "transpose", "permute", "contiguous", "chunk", "split", "squeeze",
    "unsqueeze", "expand", "t", "clone", "detach",
}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.stack}
ADD_FUNCTIONS = {operator.add}
SHAPE_METHODS = {"size", "dim"}


def module_of(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_invariant(gm, node: fx.Node) -> bool:
    """True for ops that move or select values without changing them (quantization-invariant)."""
    if node.op == "call_function":
        if node.target is F.pad:
            return True  # zero padding only: canonicalize leaves other pads as float ops
        return node.target in INVARIANT_FUNCTIONS
    if node.op == "call_method":
        return node.target in INVARIANT_METHODS
    if node.op == "call_module":
        m = module_of(gm, node)
        return isinstance(m, INVARIANT_MODULES) or (isinstance(m, nn.Dropout) and not m.training)
    return False


def is_act_quant(gm, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(module_of(gm, node), QuantAct)


def is_compute(gm, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(module_of(gm, node), QuantWBIOL)


def is_trunc_pool(gm, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(module_of(gm, node), _TruncAvgPool)


def is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in ADD_FUNCTIONS and \
        all(isinstance(a, fx.Node) for a in node.args[:2])


def is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CAT_FUNCTIONS


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensor-valued inputs of an add (both operands) or a cat (its list)."""
    if is_cat(node):
        seq = node.args[0] if node.args else node.kwargs["tensors"]
        return [a for a in seq if isinstance(a, fx.Node)]
    return [a for a in node.args[:2] if isinstance(a, fx.Node)]


def data_input(node: fx.Node) -> Optional[fx.Node]:
    """The tensor a unary op reads (first Node argument)."""
    for a in node.args:
        if isinstance(a, fx.Node):
            return a
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, fx.Node):
                    return b
    return None


def producer(gm, node: fx.Node) -> fx.Node:
    """Walk back from ``node`` through quantization-invariant ops (and concatenations, whose inputs share one
    quantizer once share_quantizers ran) to the node that produced its values."""
    while is_invariant(gm, node) or is_cat(node):
        src = tensor_inputs(node)[0] if is_cat(node) and tensor_inputs(node) else data_input(node)
        if src is None:
            break
        node = src
    return node


def is_tensor_node(node: fx.Node) -> bool:
    """Best effort: False for shape arithmetic (x.size(), getattr shape, python scalars)."""
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return False
    if node.op == "call_function" and node.target is getattr:
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        return is_tensor_node(node.args[0])
    if node.op in ("call_function",) and node.target in (operator.floordiv, operator.mul, operator.sub) and \
            not any(isinstance(a, fx.Node) and is_tensor_node(a) for a in node.args):
        return False
    if node.op == "call_function" and node.target is operator.add and \
            not all(isinstance(a, fx.Node) and is_tensor_node(a) for a in node.args[:2]):
        return any(isinstance(a, fx.Node) and is_tensor_node(a) for a in node.args[:2])
    return node.op != "output"


def unique_name(gm: fx.GraphModule, base: str, taken: Optional[set] = None) -> str:
    """A submodule name not used in ``gm`` (dots replaced)."""
    base = base.replace(".", "_")
    taken = taken if taken is not None else set()
    name, i = base, 1
    while hasattr(gm, name) or name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def insert_module_after(gm, node: fx.Node, module: nn.Module, name: str, users=None) -> fx.Node:
    """Add ``module`` as ``name`` and call it on ``node``'s output; rewire ``users`` (default: all)."""
    gm.add_submodule(name, module)
    targets = list(node.users) if users is None else list(users)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    if "tensor_meta" in node.meta:
        new.meta["tensor_meta"] = node.meta["tensor_meta"]
    for user in targets:
        if user is not new:
            user.replace_input_with(node, new)
    return new


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


def qmeta(node: fx.Node) -> QMeta:
    return node.meta.get(META_KEY, FLOAT)


