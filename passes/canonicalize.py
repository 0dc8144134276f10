"""canonicalize: rewrite functional and method calls into the forms later passes understand.

- first, functional conv/linear/norm/activation calls on parameters become modules named by the user's module
  paths (passes/raise_modules.py, run here so every pipeline that canonicalizes gets it);
- ``F.relu / torch.relu / x.relu`` -> ``nn.ReLU`` module; ``F.relu6`` -> ``nn.ReLU6``; ``F.hardtanh`` ->
  ``nn.Hardtanh``; ``torch.sigmoid / x.sigmoid`` -> ``nn.Sigmoid``;
- ``operator.iadd / torch.add / x.add`` of two tensors -> ``operator.add``; ``torch.concat`` -> ``torch.cat``;
- ``x.mean((2, 3))`` / ``F.adaptive_avg_pool2d`` / ``F.avg_pool2d`` -> average-pool modules (+ flatten);
- ``F.scaled_dot_product_attention`` without mask or dropout -> ``softmax((q @ k^T) * scale, -1) @ v``;
- dropout, torchvision's ``stochastic_depth`` in eval and ``nn.Identity`` removed (inference graph);
- a shape query (``x.ndim``, ``x.shape``, ``x.size()``) of a value whose one reader is a norm or an activation reads
  the shape of that reader's result instead (the same shape): timm's norm-activation layers assert
  ``x.ndim == 4`` on the conv's output, and as a second reader of the conv the query kept it from fusing its
  activation (a second rounding, on a grid that spans the pre-activation's negative half too: 1.3 dB on timm's
  mobilenetv2_035, onnx). The assertion still runs in the quantized model;
- a stateless module called from several places is duplicated so each call site gets its own quantizer.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from quantfx.graph import module_of, unique_name
from quantfx.pass_infra import Pass, PassResult

from .raise_modules import RaiseModules, _arg

_ACT_FUNCTIONS = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, F.relu_: nn.ReLU, torch.relu_: nn.ReLU, F.relu6: nn.ReLU6,
    torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid,
}
_ACT_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU, "sigmoid": nn.Sigmoid, "sigmoid_": nn.Sigmoid}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


@dataclass(frozen=True)
class Canonicalize(Pass):
    name = "canonicalize"
    runs_code = False  # reads and edits the graph only

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        taken: set = set()
        modified = RaiseModules().call(gm).modified
        seen_modules: dict[int, str] = {}
        for node in list(graph.nodes):
            new_module = None
            if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
                new_module = _ACT_FUNCTIONS[node.target]()
            elif node.op == "call_method" and node.target in _ACT_METHODS:
                new_module = _ACT_METHODS[node.target]()
            elif node.op == "call_function" and node.target in (F.hardtanh, F.hardtanh_):
                new_module = nn.Hardtanh(float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0)))
            elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
                new_module = nn.AdaptiveAvgPool2d(_arg(node, 1, "output_size"))
            elif node.op == "call_function" and node.target is F.avg_pool2d:
                new_module = nn.AvgPool2d(_arg(node, 1, "kernel_size"), _arg(node, 2, "stride"),
                                          _arg(node, 3, "padding", 0))
            if new_module is not None:
                self._to_module(gm, node, new_module, taken)
                modified = True
                continue
            if self._is_tensor_add(node):
                node.target, node.op = operator.add, "call_function"
                node.args, node.kwargs = tuple(self._add_operands(node)), {}
                modified = True
            elif node.op == "call_function" and node.target is torch.concat:
                node.target = torch.cat
                modified = True
            elif self._is_spatial_mean(node):
                self._mean_to_pool(gm, node, taken)
                modified = True
            elif self._spell_attention(gm, node):
                modified = True
            elif self._is_dropout(gm, node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                modified = True
            elif node.op == "call_module":
                modified |= self._dedupe(gm, node, seen_modules, taken)
        if modified:
            graph.eliminate_dead_code()
            _drop_unused_modules(gm)
        modified |= _move_shape_queries(gm)
        return PassResult(gm, modified)

    # -- rewrites --------------------------------------------------------------------------------------

    @staticmethod
    def _to_module(gm, node, module, taken):
        name = unique_name(gm, node.name, taken)
        gm.add_submodule(name, module)
        src = node.args[0] if node.args else node.kwargs.get("input")
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (src,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    @staticmethod
    def _add_operands(node):
        a = node.args[0] if node.args else node.kwargs["input"]
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        return a, b

    def _is_tensor_add(self, node) -> bool:
        is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
                 (node.op == "call_method" and node.target in _ADD_METHODS)
        if not is_add or node.kwargs.get("alpha", 1) != 1:
            return False
        if node.op == "call_function" and node.target is operator.add and not node.kwargs:
            return False  # already canonical
        a, b = self._add_operands(node)
        return isinstance(a, fx.Node) and isinstance(b, fx.Node)

    @staticmethod
    def _is_spatial_mean(node) -> bool:
        if not ((node.op == "call_method" and node.target == "mean") or
                (node.op == "call_function" and node.target is torch.mean)):
            return False
        dims = _arg(node, 1, "dim")
        dims = tuple(dims) if isinstance(dims, (list, tuple)) else None
        return dims in ((2, 3), (-2, -1), (3, 2), (-1, -2))

    @staticmethod
    def _mean_to_pool(gm, node, taken):
        keepdim = bool(_arg(node, 2, "keepdim", False))
        name = unique_name(gm, node.name + "_pool", taken)
        gm.add_submodule(name, nn.AdaptiveAvgPool2d(1))
        with gm.graph.inserting_after(node):
            pool = gm.graph.call_module(name, (node.args[0],))
        out = pool
        if not keepdim:
            with gm.graph.inserting_after(pool):
                out = gm.graph.call_function(torch.flatten, (pool, 1))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)

    @staticmethod
    def _spell_attention(gm, node) -> bool:
        """``F.scaled_dot_product_attention(q, k, v)`` without mask, causality or dropout, spelled
        ``softmax((q @ k.transpose(-2, -1)) * scale, -1) @ v``, so its products run on integers, its softmax
        from a table (passes/tabulate_softmax.py) and each step is quantized: the fused float kernel sums in
        another order than onnxruntime, and a value on a rounding boundary then differs by 1 LSB (torchvision
        vit_b_16 on onnx: 5 LSB at the logits). True if rewritten."""
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            return False
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        args = dict(zip(names, node.args), **node.kwargs)
        if set(args) - set(names) or args.get("attn_mask") is not None or args.get("dropout_p", 0.0) \
                or args.get("is_causal", False):
            return False
        q, k, v = args["query"], args["key"], args["value"]
        if any(_unbound(x) for x in (q, k, v)):
            return False  # timm's qkv.unbind(0): the torch target moves unbind in float, off the operand's grid
        meta = q.meta.get("tensor_meta") if isinstance(q, fx.Node) else None
        scale = args.get("scale")
        if scale is None:
            if not hasattr(meta, "shape"):
                return False
            scale = float(meta.shape[-1]) ** -0.5
        g, n = gm.graph, node.name
        with g.inserting_before(node):  # named after the attention: overrides and reports read these names
            kt = g.create_node("call_method", "transpose", (k, -2, -1), name=n + "_kT")
            scores = g.create_node("call_function", operator.matmul, (q, kt), name=n + "_scores")
            scaled = g.create_node("call_function", operator.mul, (scores, float(scale)), name=n + "_scaled")
            weights = g.create_node("call_method", "softmax", (scaled, -1), name=n + "_weights")
            out = g.create_node("call_function", operator.matmul, (weights, v), name=n + "_attend")
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        return True

    @staticmethod
    def _is_dropout(gm, node) -> bool:
        if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            return True
        if node.op == "call_function" and _is_stochastic_depth(node.target):
            # torchvision.ops.stochastic_depth(x, p, mode, training): x itself in eval (EfficientNet, ConvNeXt)
            return _arg(node, 3, "training", True) is False or _arg(node, 1, "p") == 0
        if node.op == "call_method" and node.target in ("dropout",):
            return True
        return node.op == "call_module" and isinstance(module_of(gm, node), _DROPOUT_MODULES)

    @staticmethod
    def _dedupe(gm, node, seen, taken) -> bool:
        module = module_of(gm, node)
        key = id(module)
        if key not in seen:
            seen[key] = node.target
            return False
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            return False  # a module with weights called twice shares its weights on purpose
        name = unique_name(gm, node.target, taken)
        gm.add_submodule(name, copy.deepcopy(module))
        node.target = name
        return True


_SHAPE_KEEPING = (nn.modules.batchnorm._NormBase, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.SiLU, nn.GELU,
                  nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.Tanh, nn.ELU, nn.Mish)


def _is_shape_query(node) -> bool:
    return (node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim")) or \
        (node.op == "call_method" and node.target in ("size", "dim"))


def _move_shape_queries(gm: fx.GraphModule) -> bool:
    """Point each shape query of a value whose one other reader keeps its shape (a norm or an activation module
    reading only it) at that reader's result, then restore a topological order (the query, and what reads it,
    may now come before the node it reads: a stable sort keeps the rest of the order)."""
    moved = False
    for node in list(gm.graph.nodes):
        value = node
        while True:  # along a chain (conv -> norm -> activation), every query of the value at each step
            queries = [u for u in value.users if _is_shape_query(u) and u.args[0] is value]
            readers = [u for u in value.users if u not in queries]
            if not queries or len(readers) != 1 or readers[0].op != "call_module" or \
                    readers[0].args != (value,) or readers[0].kwargs or \
                    not isinstance(module_of(gm, readers[0]), _SHAPE_KEEPING):
                break
            for q in queries:
                q.replace_input_with(value, readers[0])
            value, moved = readers[0], True
    if moved:
        graph = nx.DiGraph()
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        graph.add_nodes_from(order)
        graph.add_edges_from((i, n) for n in order for i in n.all_input_nodes)
        previous = None
        for n in nx.lexicographical_topological_sort(graph, key=order.get):
            if previous is not None:
                previous.append(n)
            previous = n
        gm.graph.lint()
    return moved


def _unbound(x) -> bool:
    """Whether ``x`` is an item of ``unbind`` (through getitem)."""
    return isinstance(x, fx.Node) and x.target is operator.getitem and isinstance(x.args[0], fx.Node) and \
        (x.args[0].target is torch.unbind or x.args[0].target == "unbind")


def _is_stochastic_depth(target) -> bool:
    """torchvision's functional stochastic depth, found by name: the core does not import torchvision."""
    return getattr(target, "__name__", None) == "stochastic_depth" and \
        getattr(target, "__module__", "").startswith("torchvision.ops")


def _drop_unused_modules(gm: fx.GraphModule) -> None:
    """Delete the top-level submodules no call_module/get_attr node uses (or uses a child of).

    Not torch.fx's ``gm.delete_all_unused_submodules()``: that one tests each module path for membership in a
    list (1.4 s against 1.2 ms for a 2000-layer chain, so this pass would stop being linear), and it also deletes
    unused modules nested in used ones, which changes the model's state_dict where a dead nested layer has
    parameters. On every zoo model both leave the same modules and nodes."""
    used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for name, _ in list(gm.named_children()):
        if name not in used and not any(u == name or u.startswith(name + ".") for u in used):
            delattr(gm, name)
