"""The target-neutral lowering core: the Backend contract, its registry, and the walk every backend lowers with.

A backend is one module that subclasses :class:`Lowering` (ONNX backends subclass ``targets.onnx_base.
OnnxLowering``, which adds an ONNX builder and the standard operators) and registers a :class:`Backend`. The
core does what every target needs and none should copy:

- the analysis before anything is written: the target's rules (:mod:`quantfx.rules`, read from its profile)
  and the calibration check (a quantizer that never saw data is an error naming it);
- shapes for the example inputs, kept in the lowering (the user's ``node.meta['tensor_meta']`` is not touched);
- the walk over the compiled graph in topological order with dispatch by node kind (input, output, constant,
  activation quantizer, conv/linear, truncating pool, add, cat, product of two quantized tensors, other module /
  function / method), every
  failure re-raised as an ExportError naming the node;
- the integers of a layer: weights, and bias for external scaling (scale = input scale x weight scale, the
  accumulator's) or internal scaling (the bias quantizer's own scale).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import fx

from .errors import CalibrationError, ExportError, QuantArgumentError, QuantFXError, TargetError
from .graph import (
    attr_value, is_act_quant, is_add, is_cat, is_compute, is_link, is_product, is_trunc_pool, module_of, op_name,
    qmeta,
)
from .nn import exact_arithmetic
from .pipelines import annotate
from .quant import Quantizer
from .shapes import record_shapes, recorded_shapes
from . import rules


@dataclass
class Backend:
    """How one target lowers, saves, loads and runs its artefact."""

    name: str
    lower: Callable[[fx.GraphModule, tuple], Any]  # (qmodel, example_inputs) -> artefact
    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]
    run: Callable[[Any, tuple], list]  # (artefact, inputs) -> list of numpy outputs
    run_with_intermediates: Optional[Callable[[Any, tuple, list], dict]] = None
    # (artefact, inputs) -> a sentence on what could make it differ from the fake-quant model (runtime/CPU causes)
    diagnose: Optional[Callable[[Any, tuple], str]] = None
    suffix: str = ".onnx"  # the artefact's file suffix: export adds it to a path that has none
    # artefact -> None, or why it is not an artefact this backend wrote (verify refuses it, saying so)
    check: Optional[Callable[[Any], Optional[str]]] = None
    # run name -> (artefact, inputs) -> list of numpy outputs or None: other ways to run the same artefact (the torch
    # .pt2's torch.compile), which verify compares with the fake-quant model too
    variants: Mapping[str, Callable[[Any, tuple], Optional[list]]] = field(default_factory=dict)
    # format name -> the Backend that writes the artefact in that form (the torch target's 'torchscript')
    formats: Mapping[str, "Backend"] = field(default_factory=dict)


#: target name -> Backend; each backend module registers itself with :func:`register_backend`
BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def backend_for(qmodel, target: Optional[str] = None, format: Optional[str] = None) -> Backend:
    """The backend of ``target``, or of the model's profile; of its artefact form ``format`` when given."""
    name = target or getattr(getattr(qmodel, "profile", None), "name", None)
    if name is None:
        raise QuantArgumentError("export: the model has no target profile; pass target='onnx' | 'finn' | ...")
    if name not in BACKENDS:
        raise QuantArgumentError(f"export: no backend for target {name!r}; available: {', '.join(sorted(BACKENDS))}")
    backend = BACKENDS[name]
    if format is None or format == backend.suffix.lstrip("."):
        return backend
    if format not in backend.formats:
        forms = [backend.suffix.lstrip(".")] + sorted(backend.formats)
        raise QuantArgumentError(f"export: target {name!r} has no format {format!r}; use one of {', '.join(forms)}")
    return backend.formats[format]


def _inputs(qmodel, example_inputs) -> tuple:
    if example_inputs is None:
        metas = [n.meta.get("tensor_meta") for n in qmodel.graph.nodes if n.op == "placeholder"]
        if not metas or any(m is None for m in metas):
            raise QuantArgumentError("export: give example_inputs (the graph has no recorded input shapes)")
        return tuple(torch.zeros(tuple(m.shape), dtype=m.dtype) for m in metas)
    return (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)


def lower_with(lower_fn, qmodel: fx.GraphModule, example_inputs=None):
    """``lower_fn(qmodel, inputs)`` on the model in eval mode with fresh annotations (scales may have moved since
    the last calibration: QAT), its training flag restored afterwards: how every artefact form is lowered."""
    annotate(qmodel)
    was_training = qmodel.training
    qmodel.eval()
    try:
        return lower_fn(qmodel, _inputs(qmodel, example_inputs))
    finally:
        qmodel.train(was_training)


def check_calibrated(gm: fx.GraphModule, target: str) -> None:
    """Raise CalibrationError naming the first enabled quantizer that never saw data."""
    for name, m in gm.named_modules():
        if isinstance(m, Quantizer) and m.is_quant_enabled and not m.is_calibrated:
            raise CalibrationError(
                f"{target}: quantizer {m.qname or name} never saw data, so it has no scale; run "
                "quantfx.calibrate(qmodel, data) (or quantize(..., calibration_data=...)) before export")


class Lowering:
    """Base of every backend's lowering. Subclasses set ``target`` and implement the ``emit_*`` methods they
    need; :meth:`lower` runs the analysis, the walk and :meth:`finish`."""

    target = "?"

    def __init__(self, qmodel: fx.GraphModule, example_inputs, profile=None):
        self.gm = qmodel
        self.example_inputs = tuple(example_inputs)
        # the rules the graph is checked against: the model's own profile when it is for this target, else the
        # target's registered one (a model quantized for another target, lowered here)
        own = getattr(qmodel, "profile", None)
        self.profile = own if own is not None and own.name == self.target else profile
        self.env: dict = {}  # fx node -> what the backend made of its value
        self.tensor_meta: dict = {}  # fx node -> TensorMetadata for the example inputs
        self.static_values: dict = {}  # fx node -> Python value of shape arithmetic for the example inputs

    # -- analysis -------------------------------------------------------------------------------------

    def check(self) -> None:
        """Everything that must hold before anything is written: the target's rules (its profile's data), then
        calibration."""
        if self.profile is not None:
            rules.check(self.gm, self.profile, self.target)
        check_calibrated(self.gm, self.target)

    def propagate_shapes(self) -> None:
        """Shapes (torch.fx TensorMetadata) of every tensor-valued node for the example inputs, kept in
        ``self.tensor_meta``, and the values of shape arithmetic in ``self.static_values``: the model's shape
        record when it still holds for these inputs (calibration records one, :mod:`quantfx.shapes`), else
        from a run of the model. The graph's own ``tensor_meta`` (the user's shapes) is left as it was."""
        target = self.target

        def named(n, e):
            if not isinstance(e, QuantFXError):  # the model's own op failed on the quantized graph's values
                return ExportError(f"{target}: node {n.name} ({n.op} {op_name(self.gm, n)}) fails when the quantized "
                                   f"model runs: {type(e).__name__}: {e}; keep the module that holds it float "
                                   "(quantize(..., overrides={'its.name': None})) or mark it a leaf (leaf_modules=)")
            if n.name not in str(e) and e.args:  # said with the node that raised it
                e.args = (f"{target}: node {n.name}: {e.args[0]}",) + e.args[1:]
            return e

        record = recorded_shapes(self.gm, self.example_inputs)
        if record is None:
            with torch.no_grad(), exact_arithmetic(False):  # shapes only: the plain path is faster
                record = record_shapes(self.gm, self.example_inputs, on_error=named)
            if record is None:
                raise ExportError(f"{target}: the model's forward did not reach its output for the example inputs")
        by_name = {n.name: n for n in self.gm.graph.nodes}
        self.tensor_meta = {by_name[k]: v for k, v in record.tensor_meta.items()}
        self.static_values = {by_name[k]: v for k, v in record.statics.items()}

    def shape(self, node: fx.Node) -> tuple:
        tm = self.tensor_meta.get(node)
        if tm is None or not hasattr(tm, "shape"):
            raise ExportError(f"{self.target}: no shape known for node {node.name}")
        return tuple(tm.shape)

    def static_value(self, node: fx.Node):
        """The Python value (int, float, bool, shape) a node of shape arithmetic has for the example inputs."""
        if node not in self.static_values:
            raise ExportError(f"{self.target}: node {node.name} is neither a tensor nor a static value")
        return self.static_values[node]

    def is_tensor(self, node: fx.Node) -> bool:
        """Whether ``node`` computes a tensor (not shape arithmetic such as ``x.size(0)``)."""
        return node in self.tensor_meta

    # -- the walk -------------------------------------------------------------------------------------

    def lower(self):
        # no gradients: lowering reads values only, and an eval model's quantizers then keep each layer's
        # quantized weights (and their integers) once computed, where rules, shapes and the walk all read them
        with torch.no_grad():
            self.check()
            self.propagate_shapes()
            self.begin()
            for node in self.gm.graph.nodes:
                self.env[node] = self.lower_node(node)
            return self.finish()

    def begin(self) -> None:
        """Called before the walk."""

    def finish(self):
        """Called after the walk; returns the artefact."""
        raise NotImplementedError

    def lower_node(self, node: fx.Node):
        if node.op == "placeholder":  # an input fixed at a non-tensor default is no input of the artefact
            return self.emit_input(node) if self.is_tensor(node) else None
        if node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
            return self.emit_output(node, list(results))
        if is_link(self.gm, node):
            return None  # a link of the program (a layer's input quantizer), not a value
        if not self.is_tensor(node) and node.op != "get_attr":
            return None  # shape arithmetic (x.size(), ints): resolved into static shapes
        try:
            return self.emit(node)
        except QuantFXError:
            raise
        except Exception as e:
            raise ExportError(f"{self.target}: cannot lower node {node.name} ({node.op} {node.target}): "
                              f"{type(e).__name__}: {e}") from e

    def node_kind(self, node: fx.Node) -> Optional[str]:
        """The kind of a node, which names the ``emit_<kind>`` method that lowers it: 'constant' (get_attr), 'act',
        'compute', 'trunc_pool', 'add', 'cat', 'product', 'module', 'function', 'method'; None for any other."""
        if node.op == "get_attr":
            return "constant"
        for kind, test in (("act", is_act_quant), ("compute", is_compute), ("trunc_pool", is_trunc_pool)):
            if test(self.gm, node):
                return kind
        if is_add(node):
            return "add"
        if is_cat(node):
            return "cat"
        if is_product(self.gm, node):
            return "product"
        return {"call_module": "module", "call_function": "function", "call_method": "method"}.get(node.op)

    def emit(self, node: fx.Node):
        """Dispatch by node kind."""
        return self.emit_kind(node, self.node_kind(node))

    def emit_kind(self, node: fx.Node, kind: Optional[str]):
        """``emit_<kind>`` of ``node``."""
        if kind == "constant":
            return self.emit_constant(node, self.attribute(node))
        if kind == "module":
            return self.emit_module(node, module_of(self.gm, node))
        if kind is None:
            raise ExportError(f"{self.target}: node {node.name} ({node.op}) has no lowering")
        return getattr(self, "emit_" + kind)(node)

    def attribute(self, node: fx.Node):
        """What a get_attr node reads: a parameter or buffer, or a module (a quantizer passed to a layer)."""
        return attr_value(self.gm, node.target)

    def emit_input(self, node):
        raise NotImplementedError

    def emit_output(self, node, results: list):
        raise NotImplementedError

    def emit_constant(self, node, value):
        raise NotImplementedError

    def emit_act(self, node):
        raise NotImplementedError

    def emit_compute(self, node):
        raise NotImplementedError

    def emit_trunc_pool(self, node):
        raise TargetError(f"{self.target}: {node.target} is a truncating average pool, which this target "
                          "cannot express; quantize for this target so pools requantize instead")

    def emit_add(self, node):
        raise NotImplementedError

    def emit_cat(self, node):
        raise NotImplementedError

    def emit_product(self, node):
        raise TargetError(f"{self.target}: {node.target} multiplies two quantized tensors, which this target "
                          "cannot express; keep it float with overrides={" + repr(node.target) + ": None}")

    def product_scales(self, node):
        """(s_a, s_b, float32 accumulator scale s_a x s_b) of a QuantProduct node, from the graph."""
        a, b = (qmeta(x) for x in node.args[:2])
        if a.scale is None or b.scale is None:
            raise CalibrationError(f"{self.target}: an operand of {node.name} has no scale; calibrate first")
        return a.scale, b.scale, module_of(self.gm, node).acc_scale(a.scale, b.scale)

    def emit_module(self, node, module):
        raise ExportError(f"{self.target}: module {node.target} ({type(module).__name__}) has no lowering")

    def emit_function(self, node):
        raise ExportError(f"{self.target}: function {getattr(node.target, '__name__', node.target)} at node "
                          f"{node.name} has no lowering")

    def emit_method(self, node):
        raise ExportError(f"{self.target}: method .{node.target}() at node {node.name} has no lowering")

    # -- integers of a layer ----------------------------------------------------------------------------

    def input_scale(self, node) -> torch.Tensor:
        """The scale of a layer's input, from the graph."""
        meta = qmeta(node.args[0])
        if meta.scale is None:
            raise CalibrationError(f"{self.target}: the input of {node.target} has no scale; calibrate first")
        return meta.scale

    @staticmethod
    def weight_ints(layer):
        """(int weights, weight scale) of a quantized layer, in the layer's own weight layout."""
        with torch.no_grad():
            return layer.weight_quant.int_repr(layer.weight), layer.weight_quant.scale(layer.weight)

    @staticmethod
    def bias_ints(layer, in_scale):
        """(int bias, its scale, flat). External scaling: the scale is the accumulator's, input scale x weight
        scale as the float32 product the runtimes compute (one entry per output channel, or 0-d). Internal
        scaling: the bias quantizer's own scale."""
        with torch.no_grad():
            w_scale = layer.weight_quant.scale(layer.weight)
            bq = layer.bias_quant
            ints = bq.int_repr(layer.bias, in_scale, w_scale)
            if bq.bias_scaling == "external":
                return ints, layer.acc_scale(in_scale, w_scale).reshape(-1)
            return ints, bq.scale(layer.bias).reshape(-1)


__all__ = ["Backend", "BACKENDS", "register_backend", "backend_for", "lower_with", "check_calibrated", "Lowering"]
