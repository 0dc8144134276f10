"""Node classification: the op tables (which layer types, functions and methods quantfx treats how) and the
predicates over graph nodes built on them."""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn import (
    QuantAct, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d, QuantIdentity,
    QuantLinear, QuantProduct, QuantSoftmax, QuantWBIOL,
)
from .nn.pool import _TruncAvgPool

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
    torch.channel_shuffle, F.channel_shuffle, torch.t, torch.unbind,
}
INVARIANT_METHODS = {
    "view", "reshape", "flatten", "transpose", "permute", "contiguous", "chunk", "split", "squeeze",
    "unsqueeze", "expand", "t", "clone", "detach", "reshape_as", "view_as",
}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.stack}
ADD_FUNCTIONS = {operator.add}
SHAPE_METHODS = {"size", "dim"}
# products of two tensors: passes/quantize_products.py makes those whose operands are quantized a QuantProduct
PRODUCT_FUNCTIONS = {operator.mul: "mul", torch.mul: "mul", operator.matmul: "matmul", torch.matmul: "matmul",
                     torch.bmm: "matmul"}
PRODUCT_METHODS = {"mul": "mul", "__mul__": "mul", "matmul": "matmul", "__matmul__": "matmul", "bmm": "matmul"}

# Float islands: ops no target computes on integers here. They run in float on dequantized values and the
# activation quantizer after them requantizes (name -> why, as inspect and the lowering reports say it).
_NONLINEAR = "a non-monotonic activation: no integer kernel, and no threshold form"
_MEAN = "a mean over non-spatial axes (tokens, channels): run in float"
FLOAT_ISLAND_MODULES = {
    nn.SiLU: _NONLINEAR, nn.GELU: _NONLINEAR, nn.Mish: _NONLINEAR, nn.Hardswish: _NONLINEAR,
    nn.Hardsigmoid: "hard-sigmoid: no integer kernel", nn.PReLU: "PReLU: a learned slope, no integer kernel",
    nn.LeakyReLU: "LeakyReLU: no integer kernel", nn.ELU: "ELU: no integer kernel", nn.Tanh: "tanh: no integer kernel",
    QuantSoftmax: "softmax of a quantized input: exp from a table over code distances, exact sums, one reciprocal "
                  "(the same float32 result in every runtime)",
    nn.Softmax: "softmax: a reduction with exp, no integer kernel",
    nn.LayerNorm: "normalization over the data (mean, variance, division): no integer kernel",
    nn.GroupNorm: "normalization over the data (mean, variance, division): no integer kernel",
    nn.Embedding: "a table lookup by integer ids: the rows stay float, quantized after it",
}
FLOAT_ISLAND_FUNCTIONS = {
    F.silu: _NONLINEAR, F.gelu: _NONLINEAR, F.mish: _NONLINEAR, F.hardswish: _NONLINEAR,
    F.hardsigmoid: "hard-sigmoid: no integer kernel", F.leaky_relu: "LeakyReLU: no integer kernel",
    F.prelu: "PReLU: a learned slope, no integer kernel", torch.tanh: "tanh: no integer kernel",
    F.softmax: "softmax: a reduction with exp, no integer kernel",
    torch.softmax: "softmax: a reduction with exp, no integer kernel",
    F.layer_norm: "normalization over the data (mean, variance, division): no integer kernel",
    F.group_norm: "normalization over the data (mean, variance, division): no integer kernel",
    F.scaled_dot_product_attention: "scaled-dot-product attention: matmul, softmax, matmul in one op, run in float",
    torch.mean: _MEAN,
    torch.pow: "a power: no integer kernel", torch.exp: "exp: no integer kernel",
    torch.sqrt: "a square root: no integer kernel", torch.rsqrt: "a square root: no integer kernel",
}
FLOAT_ISLAND_METHODS = {"softmax": "softmax: a reduction with exp, no integer kernel", "mean": _MEAN,
                        "tanh": "tanh: no integer kernel"}


def module_of(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """What a node computes, for tables and reports: its module's class, function's or method's name."""
    if node.op == "call_module":
        return type(module_of(gm, node)).__name__
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


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


def layer_read_by_add(gm, node: fx.Node) -> Optional[fx.Node]:
    """The conv/linear whose float output a residual add ``node`` reads directly on profiles with
    ``add_reads_layer_output`` (oneDNN's conv + sum post-op): its first input that is a layer read by this add
    alone; None if neither is."""
    if not is_add(node):
        return None
    return next((a for a in node.args[:2] if is_compute(gm, a) and len(a.users) == 1), None)


def is_product(gm, node: fx.Node) -> bool:
    """A product of two quantized tensors on the accumulator grid (a QuantProduct)."""
    return node.op == "call_module" and isinstance(module_of(gm, node), QuantProduct)


def tensor_product_op(node: fx.Node) -> Optional[str]:
    """'mul' or 'matmul' for a product of two tensor nodes (either operand may be anything a product takes)."""
    table = PRODUCT_FUNCTIONS if node.op == "call_function" else PRODUCT_METHODS if node.op == "call_method" else {}
    op = table.get(node.target) if node.op in ("call_function", "call_method") else None
    if op is None or len(node.args) < 2 or node.kwargs:
        return None
    a, b = node.args[:2]
    return op if all(isinstance(v, fx.Node) and is_tensor_node(v) for v in (a, b)) else None


# float islands a dataflow target can still build as thresholds: monotonic activations read by a quantizer
MONOTONIC_ISLANDS = (nn.Hardsigmoid, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Tanh, F.hardsigmoid, F.leaky_relu, F.prelu,
                     torch.tanh, "tanh")


def is_monotonic_island(gm, node: fx.Node) -> bool:
    """A float island that is a monotonic activation (a quantizer after it is a threshold step)."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), tuple(c for c in MONOTONIC_ISLANDS if isinstance(c, type)))
    return node.op in ("call_function", "call_method") and node.target in MONOTONIC_ISLANDS


def float_island(gm, node: fx.Node) -> Optional[str]:
    """Why ``node`` runs in float between quantized regions (a float island), or None: activations without an
    integer kernel, normalizations, softmax, attention, and products of two tensors left float."""
    if node.op == "call_module":
        m = module_of(gm, node)
        for cls in type(m).__mro__:
            if cls in FLOAT_ISLAND_MODULES:
                return FLOAT_ISLAND_MODULES[cls]
        if isinstance(m, nn.MultiheadAttention):
            return "multi-head attention: run in float"
        return None
    if node.op == "call_function" and node.target in FLOAT_ISLAND_FUNCTIONS:
        return FLOAT_ISLAND_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in FLOAT_ISLAND_METHODS:
        return FLOAT_ISLAND_METHODS[node.target]
    if tensor_product_op(node) is not None and not scales_by_constant(gm, node):
        return "a product of two tensors whose operands are not both quantized per tensor"
    return None


def scales_by_constant(gm, node: fx.Node) -> bool:
    """A product one of whose operands is a parameter or buffer (through moves such as ``view``): a scaling by a
    constant (ConvNeXt's layer scale), kept as the float op it is, like a product with a Python number."""
    for operand in node.args[:2]:
        while isinstance(operand, fx.Node) and is_invariant(gm, operand):
            operand = operand.args[0] if operand.args else None
        if isinstance(operand, fx.Node) and operand.op == "get_attr" and not is_link(gm, operand):
            return True
    return False


def is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CAT_FUNCTIONS


def attr_value(gm, target: str):
    """What ``gm.<target>`` (a dotted get_attr target) is: a parameter, buffer or module; None if missing."""
    owner, _, name = target.rpartition(".")
    try:
        return getattr(gm.get_submodule(owner), name, None)
    except AttributeError:
        return None


def is_link(gm, node: fx.Node) -> bool:
    """A get_attr node of a module: a link of the program (the quantizer a layer's ``input_quantizer``
    argument passes), not a value."""
    return node.op == "get_attr" and isinstance(attr_value(gm, node.target), nn.Module)


USER_FLOAT_KEY = "float"  # node.meta: the user kept this node float (overrides={name: None}; passes/swap_modules)
TENSOR_KEY = "quantfx.tensor"  # node.meta: whether shape propagation saw the node compute a tensor


def is_tensor_node(node: fx.Node) -> bool:
    """Whether ``node`` computes a tensor: as shape propagation saw it (``node.meta[TENSOR_KEY]``), else best
    effort: False for shape arithmetic (x.size(), getattr shape, python scalars) and links."""
    if TENSOR_KEY in node.meta:
        return node.meta[TENSOR_KEY]
    if node.op == "get_attr" and node.graph.owning_module is not None and is_link(node.graph.owning_module, node):
        return False
    if node.op == "placeholder" and node.args and not isinstance(node.args[0], torch.Tensor):
        return False  # an input fixed at its non-tensor default (passes/trace.py: unfilled_defaults)
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


# -- the fixed-point activation forms (passes/approximate_activations.py writes them, targets read them) ------

HARD_SIGMOID_SCALE = 2731 / 16384  # 1/6 as 2731 / 2^14
HARD_SWISH_SIGMOID_POS = 7  # the fix position of the hard-sigmoid inside a hard-swish


def hard_swish_parts(gm, node) -> Optional[tuple]:
    """``(x, q)`` when ``node`` is the product approximate_activations writes for a hard-swish, ``x * q(relu6(x + 3) *
    HARD_SIGMOID_SCALE)`` in either order with ``q`` the hard-sigmoid's int8 grid (its quantizer node), not any
    product of two tensors; else None."""
    if node.target is not operator.mul or len(node.args) != 2:
        return None
    for x, q in (node.args, node.args[::-1]):
        m = module_of(gm, q) if isinstance(q, fx.Node) else None
        y = q.args[0] if isinstance(m, QuantIdentity) else None
        if isinstance(y, fx.Node) and y.target is operator.mul and list(y.args[1:]) == [HARD_SIGMOID_SCALE]:
            r = y.args[0]
            if isinstance(r, fx.Node) and r.target is F.relu6 and isinstance(r.args[0], fx.Node) and \
                    r.args[0].target is operator.add and list(r.args[0].args) == [x, 3.0]:
                return x, q
    return None
