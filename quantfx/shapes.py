"""Shapes of a compiled model's nodes for given inputs: recorded by running the model once (torch.fx ShapeProp),
kept with the model and reused while nothing they depend on has changed.

A lowering needs the shape of every tensor and the value of every piece of shape arithmetic (``x.size(0)``) for
its example inputs. Running the model for them costs a forward pass (a tenth of a ResNet's export), and
calibration has just run the model on batches of that shape, so the first calibration batch records them.
A record is reused only when its key still holds: the inputs' shapes and dtypes, every node of the graph (name, op,
target, arguments), and for every module the graph calls or attribute it reads, its identity, type, configuration
(``extra_repr``: channels, kernel, stride, ...) and the shapes of its own parameters and buffers (a quantizer's
statistics excepted). Values (scales, weights) do not enter the key: no shape depends on them. Anything else runs
the model again.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .graph import attr_value
from .quant import Quantizer
from .quant_tensor import value_of

# model -> its record, beside the model rather than in it: never pickled, deep-copied or saved with it
_RECORDS: "weakref.WeakKeyDictionary[fx.GraphModule, ShapeRecord]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ShapeRecord:
    key: tuple
    tensor_meta: dict  # node name -> TensorMetadata (a tuple of them for several outputs)
    statics: dict  # node name -> the Python value of shape arithmetic (int, float, bool, shape)


def _module_key(m) -> tuple:
    if isinstance(m, Quantizer):  # a layer's quantizer read by a link: its statistics shape nothing
        return id(m), type(m).__qualname__
    own = tuple((k, tuple(v.shape)) for k, v in (*m._parameters.items(), *m._buffers.items()) if v is not None)
    return id(m), type(m).__qualname__, m.extra_repr(), own


def shape_key(gm: fx.GraphModule, inputs: tuple) -> tuple:
    """What the shapes of ``gm``'s nodes for ``inputs`` depend on (module docstring)."""
    sig = tuple((tuple(x.shape), x.dtype) if torch.is_tensor(x) else (type(x).__name__, repr(x)) for x in inputs)
    parts = []
    for n in gm.graph.nodes:  # the graph itself, not gm.code: an edited graph that was not recompiled counts
        parts.append((n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs)))
        if n.op == "call_module":
            parts.append((n.target, _module_key(gm.get_submodule(n.target))))
        elif n.op == "get_attr":
            v = attr_value(gm, n.target)
            parts.append((n.target, tuple(v.shape) if torch.is_tensor(v) else
                          _module_key(v) if isinstance(v, torch.nn.Module) else (id(v), repr(v))))
    return sig, tuple(parts)


def _is_static(out) -> bool:
    scalars = (bool, int, float)
    return isinstance(out, scalars) or (isinstance(out, (tuple, list, torch.Size)) and
                                        all(isinstance(v, scalars) for v in out))


def record_shapes(gm: fx.GraphModule, inputs: tuple, keep_meta: bool = False,
                  on_error: Optional[Callable[[fx.Node, BaseException], BaseException]] = None,
                  ) -> Optional[ShapeRecord]:
    """Run ``gm`` on ``inputs`` once, node by node as its forward would, recording every node's shape (torch.fx
    TensorMetadata, as ShapeProp gives it) and the value of shape arithmetic; the record is kept with the model
    and returned. With ``keep_meta`` the shapes also go into each node's ``meta['tensor_meta']`` (else the graph
    is left as it was). An error a node raises comes out as it is (no torch.fx traceback printed or appended),
    or as ``on_error(node, exc)`` gives it. Returns None, keeping nothing, when the run did not reach the output
    (a forward stopped early)."""
    tensor_meta, statics, done = {}, {}, []

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            try:
                out = super().run_node(n)
            except Exception as e:
                if on_error is None:
                    raise
                raise on_error(n, e) from None
            found = []

            def meta_of(v):
                v = value_of(v)  # a layer's exact accumulator (QuantTensor) has the shape of its value
                if isinstance(v, torch.Tensor):
                    found.append(True)
                    return _extract_tensor_metadata(v)
                return v

            meta = map_aggregate(out, meta_of)
            if found:
                tensor_meta[n.name] = meta
                if keep_meta:
                    n.meta["tensor_meta"] = meta
            if _is_static(out):
                statics[n.name] = out
            if n.op == "output":
                done.append(True)
            return out

    key = shape_key(gm, inputs)
    recorder = Recorder(gm)
    recorder.extra_traceback = False  # the user's error as raised, not with torch.fx's node dump appended
    recorder.run(*inputs)
    record = ShapeRecord(key, tensor_meta, statics) if done else None
    if record is None:
        _RECORDS.pop(gm, None)
    else:
        _RECORDS[gm] = record
    return record


def recorded_shapes(gm: fx.GraphModule, inputs: tuple) -> Optional[ShapeRecord]:
    """The model's record when it still holds for ``inputs`` (its key), else None."""
    record = _RECORDS.get(gm)
    return record if record is not None and record.key == shape_key(gm, inputs) else None
