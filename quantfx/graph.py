"""Graph helpers shared by passes and targets: operand access and walks, and graph mutation (naming,
inserting a module).

It is also the one import for the rest of the graph vocabulary, re-exported here: the IR's quantization
metadata (:mod:`quantfx.ir`: ``QMeta``, ``qmeta``, ``group_of``, ``fmt_scale``) and node classification
(:mod:`quantfx.classify`: the op tables, ``module_of``, ``is_*``)."""
from __future__ import annotations

from typing import Optional

from torch import fx, nn

from .classify import (  # noqa: F401  (re-exported)
    ADD_FUNCTIONS, BN_TYPES, CAT_FUNCTIONS, COMPUTE_TYPES, FLOAT_COMPUTE_TYPES, INVARIANT_FUNCTIONS, INVARIANT_METHODS,
    INVARIANT_MODULES, SHAPE_METHODS, USER_FLOAT_KEY, attr_value, float_island, is_act_quant, is_add, is_cat,
    is_compute, is_invariant, is_link, is_monotonic_island, is_product, is_tensor_node, is_trunc_pool, module_of,
    op_name, scales_by_constant, tensor_product_op,
)
from .ir import FLOAT, GROUP_KEY, META_KEY, QMeta, fmt_scale, group_of, qmeta

# --- operands and walks --------------------------------------------------------------------------------


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


def input_quantizer_of(gm, node: fx.Node):
    """The quantizer a layer or truncating pool node takes as its ``input_quantizer`` argument (the
    activation quantizer upstream, passed by the graph), or None."""
    link = node.kwargs.get("input_quantizer")
    return gm.get_submodule(link.target) if isinstance(link, fx.Node) else None


def producer(gm, node: fx.Node) -> fx.Node:
    """Walk back from ``node`` through quantization-invariant ops (and concatenations, whose inputs share one
    quantizer once share_quantizers ran) to the node that produced its values."""
    while is_invariant(gm, node) or is_cat(node):
        src = tensor_inputs(node)[0] if is_cat(node) and tensor_inputs(node) else data_input(node)
        if src is None:
            break
        node = src
    return node


# --- mutation ------------------------------------------------------------------------------------------


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


def replace_module(gm: fx.GraphModule, path: str, module: Optional[nn.Module]) -> None:
    """Put ``module`` at ``path`` (None: remove what is there), keeping the children of the module it replaces
    (and, when it is replaced by another, the parameters and buffers the graph still reads): a module the graph
    traced through (timm's ``BatchNormAct2d``, whose batch norm becomes an ``nn.BatchNorm2d`` at its path) keeps
    ``bn1.act`` and the like reachable."""
    try:
        old = gm.get_submodule(path)
    except AttributeError:
        old = None
    if old is not None:
        keep_state = module is not None
        if module is None and any(True for _ in old.children()):
            module = nn.Module()
        if module is not None:
            for name, child in old.named_children():
                if not hasattr(module, name):
                    module.add_module(name, child)
        if keep_state:
            read = {n.target[len(path) + 1:] for n in gm.graph.nodes if n.op == "get_attr" and
                    n.target.startswith(path + ".")}
            for name, p in old._parameters.items():
                if p is not None and name in read and not hasattr(module, name):
                    module.register_parameter(name, p)
            for name, b in old._buffers.items():
                if b is not None and name in read and not hasattr(module, name):
                    module.register_buffer(name, b)
    if module is None:
        if old is not None:
            gm.delete_submodule(path)
        return
    gm.add_submodule(path, module)


__all__ = [
    "ADD_FUNCTIONS", "BN_TYPES", "CAT_FUNCTIONS", "COMPUTE_TYPES", "FLOAT", "FLOAT_COMPUTE_TYPES", "GROUP_KEY",
    "INVARIANT_FUNCTIONS", "INVARIANT_METHODS", "INVARIANT_MODULES", "META_KEY", "QMeta", "SHAPE_METHODS",
    "USER_FLOAT_KEY",
    "attr_value", "data_input", "float_island", "fmt_scale", "group_of", "input_quantizer_of", "insert_module_after",
    "is_act_quant", "is_add", "is_cat", "is_compute", "is_invariant", "is_link", "is_monotonic_island", "is_product",
    "is_tensor_node", "is_trunc_pool",
    "module_of", "producer", "qmeta", "replace_module", "scales_by_constant", "tensor_inputs", "tensor_product_op", "unique_name",
]
