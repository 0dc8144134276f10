"""propagate_shapes: run example inputs through the graph and record each node's tensor shape/dtype
(``node.meta['tensor_meta']``, as torch.fx's ShapeProp does). Later passes use it to tell tensors from
tuples and to size pooling windows; lowering uses it for shapes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from quantfx.classify import TENSOR_KEY
from quantfx.pass_infra import Pass, PassResult


def _floating(meta) -> bool:
    """False for metadata of an integer or boolean tensor; True otherwise (float tensors, containers)."""
    dtype = getattr(meta, "dtype", None)
    return not isinstance(dtype, torch.dtype) or dtype.is_floating_point


@dataclass(frozen=True)
class PropagateShapes(Pass):
    name = "propagate_shapes"
    runs_code = False  # reads and edits the graph only
    example_inputs: tuple = field(default=(), compare=False, hash=False, repr=False)

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.example_inputs:
            return PassResult(gm, False)
        with torch.no_grad():
            ShapeProp(gm).propagate(*self.example_inputs)
        # which values are tensors (ShapeProp records metadata for tensors and containers of them only): later
        # passes put quantizers on tensors alone, never on shapes, Python scalars or booleans (x.size(2) == 224),
        # nor on integer and boolean tensors (token ids, position ids, masks)
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "call_function", "call_method", "call_module"):
                node.meta[TENSOR_KEY] = "tensor_meta" in node.meta and _floating(node.meta["tensor_meta"])
        return PassResult(gm, False)
