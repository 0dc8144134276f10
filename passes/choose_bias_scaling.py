"""choose_bias_scaling: pick each bias quantizer per target profile and link layers to their input quantizer.

- ``external``: bias scale = input scale x weight scale (32-bit by default, 16-bit option): FINN, ONNX, torch;
- ``internal``: the bias's own N-bit scale (power of two when the profile says so): DPU;
- ``float``: the bias stays float (FINN accepts it).

Layers whose arithmetic needs the input scale at run time (external-scale biases, truncating average pools)
take the activation quantizer upstream of them as a graph argument: ``self.conv(x, input_quantizer=q)`` with
``q`` a get_attr node of that quantizer, so the link is an edge of the program (printed in its code, kept by
pickling and copying). When such a layer has no quantizer upstream, one is inserted, so users never meet a
run-time "input scale required".

Each conv/linear whose output goes into an activation quantizer computes its integer accumulator exactly in
eval mode (``exact_accumulator``). On profiles with ``requant='multiplier'`` (onnx), when every reader of the
layer is an identity or ReLU activation quantizer, the layer hands them its accumulator as a QuantTensor
(``return_quant_tensor``, marked ``exact``) and they requantize it with the runtime's float32 multiplier
(``requant='multiplier'``), so the fake-quant model and the integer kernels agree to the bit (not only to within
a rounding tie).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from quantfx.graph import is_act_quant, is_compute, is_trunc_pool, module_of, producer
from quantfx.pass_infra import PassResult
from quantfx.quant import (
    Int32Bias, Int8BiasPerTensorFixedPointInternalScaling, Int8BiasPerTensorFloatInternalScaling, make_quantizer,
)

from .base import ProfilePass
from .swap_modules import find_override, split_override

def bias_spec(mode: str, power_of_two: bool):
    if mode == "external":
        return Int32Bias
    if mode == "internal":
        return Int8BiasPerTensorFixedPointInternalScaling if power_of_two else Int8BiasPerTensorFloatInternalScaling
    return None


@dataclass(frozen=True)
class ChooseBiasScaling(ProfilePass):
    name = "choose_bias_scaling"
    runs_code = False  # reads and edits the graph only
    overrides: dict = field(default_factory=dict, hash=False)

    def call(self, gm: fx.GraphModule) -> PassResult:
        p = self.profile
        taken: set = set()
        for node in list(gm.graph.nodes):
            if is_trunc_pool(gm, node):
                # the integer sum needs its input's grid: requantize an input no quantizer produced
                src = producer(gm, node.args[0])
                if not is_act_quant(gm, src):
                    src = self.requantize(gm, node.args[0], node.name + "_input_quant", taken, users=[node])
                _pass_input_quantizer(gm, node, src)
                continue
            if not is_compute(gm, node):
                continue
            layer = module_of(gm, node)
            found, over = find_override(self.overrides, node.target, layer)
            over = split_override(over or {}, node.target) if found else {"bias": {}}
            mode = p.bias_scaling
            spec = over.get("bias_quant", bias_spec(mode, p.power_of_two))
            src = producer(gm, node.args[0])
            needs_input_scale = layer.bias is not None and spec is not None and \
                getattr(spec, "bias_scaling", "internal") == "external"
            if not is_act_quant(gm, src) and needs_input_scale:
                src = self.requantize(gm, node.args[0], node.name + "_input_quant", taken, users=[node])
            _pass_input_quantizer(gm, node, src if is_act_quant(gm, src) else None)
            if layer.bias is None or spec is None:
                continue
            bias_over = {"bit_width": p.bias_bit_width, **over["bias"]}
            layer.bias_quant = make_quantizer(spec, "bias", name=f"{node.target}.bias_quant", **bias_over)
        self._link_requantizers(gm, p.requant)
        return PassResult(gm, True)

    @staticmethod
    def _link_requantizers(gm, requant: str) -> None:
        for node in gm.graph.nodes:
            if not is_compute(gm, node):
                continue
            readers = list(node.users)
            acts = [module_of(gm, u) for u in readers if is_act_quant(gm, u) and u.args and u.args[0] is node]
            if not acts:
                continue
            layer = module_of(gm, node)
            layer.exact_accumulator = True
            if requant != "float" and len(acts) == len(readers) and all(a.runtime_requant_ok() for a in acts):
                layer.return_quant_tensor = True  # the accumulator travels on the edge, marked exact
                for act in acts:
                    act.requant = requant


def _pass_input_quantizer(gm: fx.GraphModule, node: fx.Node, src) -> None:
    """Give ``node`` (a layer or truncating pool) the quantizer of activation node ``src`` as its
    ``input_quantizer`` argument, through a get_attr node of that quantizer (None: no argument)."""
    kwargs = dict(node.kwargs)
    old = kwargs.pop("input_quantizer", None)
    if src is not None:
        with gm.graph.inserting_before(node):
            kwargs["input_quantizer"] = gm.graph.get_attr(f"{src.target}.act_quant")
    node.kwargs = kwargs
    if isinstance(old, fx.Node) and not old.users:  # the pass ran before: its link is replaced
        gm.graph.erase_node(old)
