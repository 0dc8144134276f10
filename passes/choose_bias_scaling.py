"""choose_bias_scaling: pick each bias quantizer per target profile and link layers to their input quantizer.

- ``external``: bias scale = input scale x weight scale (32-bit by default, 16-bit option): FINN, ONNX, torch;
- ``internal``: the bias's own N-bit scale (power of two when the profile says so): DPU;
- ``float``: the bias stays float (FINN accepts it).

Layers whose arithmetic needs the input scale at run time (external-scale biases, truncating average pools)
are linked to the activation quantizer upstream of them. When such a layer has no quantizer upstream, one is
inserted, so users never meet a run-time "input scale required".

On profiles with ``requant='multiplier'`` (onnx), each conv/linear whose output goes straight into an
identity or ReLU activation quantizer is linked to it: in eval mode the layer computes its integer accumulator
exactly and the activation requantizes it with the runtime's float32 multiplier, so the fake-quant model and
the integer kernels agree to the bit (not only to within a rounding tie).
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
                module_of(gm, node)._set_input_quantizer(module_of(gm, src).act_quant)
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
            layer._set_input_quantizer(module_of(gm, src).act_quant if is_act_quant(gm, src) else None)
            if layer.bias is None or spec is None:
                continue
            bias_over = {"bit_width": p.bias_bit_width, **over["bias"]}
            layer.bias_quant = make_quantizer(spec, "bias", name=f"{node.target}.bias_quant", **bias_over)
        self._link_requantizers(gm, p.requant == "multiplier")
        return PassResult(gm, True)

    @staticmethod
    def _link_requantizers(gm, multiplier: bool) -> None:
        for node in gm.graph.nodes:
            if not is_act_quant(gm, node) or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            src, act = node.args[0], module_of(gm, node)
            if is_compute(gm, src):
                layer = module_of(gm, src)
                # plain attributes, not submodules: the layer belongs to its own node
                layer.__dict__["exact_accumulator"] = True
                if multiplier and act.runtime_requant_ok():
                    act.__dict__["requant_from"] = layer
