"""tabulate_softmax: a softmax whose input is a per-tensor quantized activation becomes a
:class:`quantfx.nn.QuantSoftmax`, computed from a table of ``exp`` over code distances, integer sums and one
reciprocal, so the fake-quant model and every runtime get the same float32 result by construction (a float
softmax lands a few ulps apart in torch and onnxruntime, and a value on a rounding boundary of the quantizer
after it then differs by 1 LSB: quantfx/nn/softmax.py).

The input is walked back through quantization-invariant ops to its activation quantizer, which the new node takes
as a graph argument, ``self.softmax(x, input_quantizer=...)``. Left as they are: softmaxes over float values
(after a mask, inside attention modules), over inputs of more than 12 bits or per-channel grids, with a
``dtype``, and those the user keeps float: ``overrides={'<node name>': None}``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantfx.graph import is_act_quant, module_of, producer, unique_name
from quantfx.nn.softmax import QuantSoftmax, tabulable
from quantfx.pass_infra import PassResult

from .base import ProfilePass
from .swap_modules import FLOAT

_FUNCTIONS = (F.softmax, torch.softmax)


def _softmax_dim(gm, node: fx.Node):
    """The ``dim`` of a softmax node (module, function or method) without a dtype, else None."""
    if node.op == "call_module":
        m = module_of(gm, node)
        return m.dim if type(m) is nn.Softmax and len(node.args) == 1 and not node.kwargs else None
    if (node.op == "call_function" and node.target in _FUNCTIONS) or \
            (node.op == "call_method" and node.target == "softmax"):
        if node.kwargs.get("dtype") is not None or len(node.args) > 2:
            return None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim if isinstance(dim, int) else None
    return None


def _row_length(node: fx.Node, dim: int):
    meta = node.meta.get("tensor_meta")
    return meta.shape[dim] if hasattr(meta, "shape") else None


@dataclass(frozen=True)
class TabulateSoftmax(ProfilePass):
    name = "tabulate_softmax"
    runs_code = False  # reads and edits the graph only
    needs_profile = False
    overrides: dict = field(default_factory=dict, hash=False)

    def call(self, gm: fx.GraphModule) -> PassResult:
        taken: set = set()
        modified = False
        for node in list(gm.graph.nodes):
            dim = _softmax_dim(gm, node)
            if dim is None or (node.name in self.overrides and self.overrides[node.name] is None):
                continue
            x = node.args[0]
            src = producer(gm, x) if isinstance(x, fx.Node) else None
            if src is None or not is_act_quant(gm, src):
                continue
            n = _row_length(node, dim)
            if not tabulable(gm.get_submodule(src.target).act_quant, n if n is not None else 1):
                continue
            # a module keeps its path; a function becomes a module named after its node
            name = node.target if node.op == "call_module" else unique_name(gm, node.name, taken)
            gm.add_submodule(name, QuantSoftmax(dim))
            with gm.graph.inserting_before(node):
                link = gm.graph.get_attr(f"{src.target}.act_quant")
                new = gm.graph.call_module(name, (x,), {"input_quantizer": link})
            new.meta.update({k: v for k, v in node.meta.items() if k != FLOAT})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        return PassResult(gm, modified)  # the pass manager recompiles and lints a modified graph
