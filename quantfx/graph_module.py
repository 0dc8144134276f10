"""``QuantGraphModule``: the compiled model, a GraphModule that remembers its target profile, with the pickling
and deep-copy support that keeps the profile and the graph's metadata."""
from __future__ import annotations

import copy

from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

from .pipelines import annotate


class QuantGraphModule(fx.GraphModule):
    """A quantized GraphModule that remembers its target profile; picklable and deep-copyable."""

    def __init__(self, root, graph, profile=None, class_name: str = "QuantGraphModule"):
        super().__init__(root, graph, class_name)
        self.profile = profile if profile is not None else getattr(root, "profile", None)
        # what passes after compilation recorded for the lowering to report (e.g. the dpu refine's changes)
        self.notes = dict(getattr(root, "notes", None) or {})

    def __reduce__(self):
        fn, args = super().__reduce__()
        # node.meta is not pickled; shapes are kept so annotate can size average-pool windows again
        # (without memory_format, which torch.save cannot pickle)
        shapes = {n.name: n.meta["tensor_meta"]._replace(memory_format=None) for n in self.graph.nodes
                  if isinstance(n.meta.get("tensor_meta"), TensorMetadata)}
        return (_rebuild, (fn, args, self.profile, shapes, self.notes))

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)  # torch rebuilds a plain GraphModule: wrap it again
        out = QuantGraphModule(res, res.graph, self.profile)
        out.notes = copy.deepcopy(self.notes, memo)
        _copy_meta(self, out)
        return out


def _copy_meta(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    for a, b in zip(src.graph.nodes, dst.graph.nodes):
        b.meta.update(a.meta)


def _rebuild(fn, args, profile, shapes=None, notes=None):
    gm = fn(*args)
    out = QuantGraphModule(gm, gm.graph, profile)
    out.notes = dict(notes or {})
    for node in out.graph.nodes:
        if shapes and node.name in shapes:
            node.meta["tensor_meta"] = shapes[node.name]
    annotate(out)
    return out
