"""Target rules as data: one checker reads a target profile's rule fields and checks a compiled graph before it is
lowered.

Every rule is a field of a profile's :class:`quantfx.profile.Constraints` (bit ranges, signedness, zero points,
per-channel scales, power-of-two scales, rounding modes, bias scaling, FINN's structural rules, the int16 pair
rule of x86 8-bit kernels), so a new target states its constraints in its profile and writes no checking code;
a rule over several quantizers at once (the DPU compiler's shift ranges) is a read-only analysis the
constraints list (``analyses``), which this checker runs after the others.
:func:`violations` is the analysis (every broken rule, in graph order); :func:`check` raises the first as a
``TargetError`` that names the node, the rule and the way out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import fx

from .errors import TargetError
from .graph import (
    float_island, is_act_quant, is_add, is_compute, is_monotonic_island, is_product, is_trunc_pool, module_of, qmeta,
    tensor_inputs,
)
from .nn import QuantHardTanh, QuantIdentity, QuantReLU, QuantSigmoid
from .quant import functional as qf

INT16_MAX = 32767
BIAS_FIXES = {"external": "an int32 bias with scale = input scale x weight scale (use Int32Bias)",
              "internal": "a bias with its own scale (bias_scaling='internal')",
              "float": "a float bias (bias_scaling='float')"}


def code_max(lo: int, hi: int) -> int:
    """The largest code a u8 x s8 kernel multiplies for activation codes in [lo, hi]: unsigned codes as they
    are; signed ones moved to unsigned (+128), as onnxruntime's MLAS does for int8 activations on x86."""
    return hi if lo >= 0 else max(hi + 128, -lo)


def top2_sum(w_int, axis: int = 0) -> np.ndarray:
    """|w|_1st + |w|_2nd of each slice along ``axis`` (an output channel): the largest pair sum of weights.
    ``w_int``: a numpy array or a torch tensor (taken as it is: no copy)."""
    if isinstance(w_int, torch.Tensor):
        w = w_int.abs().movedim(axis, 0).reshape(w_int.shape[axis], -1)
        if w.shape[1] < 2:
            return w.amax(dim=1).numpy() if w.shape[1] else np.zeros(w.shape[0], np.int64)
        return torch.topk(w, 2, dim=1, sorted=False).values.sum(1).numpy()
    w = np.moveaxis(np.abs(np.asarray(w_int, np.int64)), axis, 0).reshape(np.shape(w_int)[axis], -1)
    if w.shape[1] < 2:
        return w.max(axis=1, initial=0)
    part = np.partition(w, w.shape[1] - 2, axis=1)
    return part[:, -1] + part[:, -2]


@dataclass
class Violation:
    node: str  # the fx node (module path for layers and quantizers)
    message: str  # "<what is wrong>; <the rule> (<the way out>)", without the target prefix

    def error(self, target: str) -> TargetError:
        return TargetError(f"{target}: {self.node} {self.message}" if self.node else f"{target}: {self.message}")


def violations(gm: fx.GraphModule, profile) -> list[Violation]:
    """Every rule of ``profile`` that the compiled graph ``gm`` breaks, in graph order."""
    return list(_walk(gm, profile))


def check(gm: fx.GraphModule, profile, target: str | None = None) -> None:
    """Raise the first violation of ``profile``'s rules as a TargetError (prefixed with ``target``)."""
    for v in _walk(gm, profile):
        raise v.error(target or profile.name)


def _walk(gm, p) -> Iterator[Violation]:
    c = p.constraints
    weight_users: dict[int, list] = {}
    for node in gm.graph.nodes:
        if is_act_quant(gm, node):
            yield from _act(node, module_of(gm, node), p)
        elif is_compute(gm, node):
            layer = module_of(gm, node)
            if layer.weight_quant.is_quant_enabled:
                weight_users.setdefault(id(layer.weight_quant), []).append(node.target)
            yield from _layer(node, layer, p)
        elif is_trunc_pool(gm, node):
            pool = module_of(gm, node)
            yield from _rounding(node.target, "truncation", pool.rounding, qmeta(node.args[0]).signed, p,
                                 c.quant_rounding)
        elif is_product(gm, node) and not c.tensor_products_allowed:
            op = module_of(gm, node).op
            yield Violation(node.target, f"multiplies two quantized tensors ({op} of {node.args[0].name} and "
                                       f"{node.args[1].name}); {c.runtime} has no layer for a product of two "
                                       "activations (its streamlining absorbs a Mul by a constant only): quantize "
                                       "for 'onnx', 'torch' or 'dpu', which compute it on integers, or remove the "
                                       "product (e.g. the squeeze-excitation gate) from the model")
        elif not c.float_islands_allowed and float_island(gm, node) and not is_monotonic_island(gm, node):
            what = type(module_of(gm, node)).__name__ if node.op == "call_module" else \
                getattr(node.target, "__name__", str(node.target))
            yield Violation(node.name, f"({what}) would run in float between quantizers, a float island "
                                       f"({float_island(gm, node)}); {c.runtime} builds integer layers and "
                                       "thresholds of monotonic activations only: quantize for 'onnx', 'torch' or "
                                       "'dpu', which run it in float, or replace it (ReLU, Hardtanh, Sigmoid)")
        elif is_add(node) and c.add_same_datatype:
            grids = {(m.bit_width, m.signed) for m in map(qmeta, tensor_inputs(node)) if m.kind == "act"}
            if len(grids) > 1:
                kinds = ", ".join(sorted(f"{'INT' if s else 'UINT'}{b}" for b, s in grids))
                yield Violation(node.name, f"adds {kinds} inputs; {c.runtime}'s AddStreams needs identical input "
                                           f"datatypes (quantize with the {p.name} profile's add_grid='quantizer', "
                                           "which requantizes the ReLU-side input onto the shared grid)")
    if c.weight_quantizer_per_layer:
        for users in weight_users.values():
            if len(users) > 1:
                what = f"one weight quantizer feeds {', '.join(users)}" if len(set(users)) == len(users) else \
                    f"{users[0]} is called {len(users)} times, so its weight quantizer feeds {len(users)} nodes"
                yield Violation("", f"{what}; {c.runtime} needs a weight quantizer per layer (give each layer "
                                    "its own weight_quant)")
    for analysis in c.analyses:  # rules over several quantizers at once (the DPU's shift ranges)
        for node, message in analysis(gm):
            yield Violation(node, message)


def _bits(node, what, q, rng, knob, runtime) -> Iterator[Violation]:
    lo, hi = rng
    if lo <= q.bit_width <= hi:
        return
    takes = f"at most {hi} bits here (use {knob} <= {hi})" if lo <= 1 else \
        f"{lo}..{hi} bits here (use {knob} between {lo} and {hi})"
    yield Violation(node, f"{what} is {q.bit_width}-bit; {runtime} takes {takes}")


def _rounding(node, what, rounding, signed, p, allowed) -> Iterator[Violation]:
    c = p.constraints
    if rounding not in allowed:
        yield Violation(node, f"{what} rounds {rounding}; {c.runtime} rounds {', '.join(allowed)} "
                              f"(use rounding='{allowed[0]}')")
    elif rounding == "half_up" and signed and not c.half_up_signed_ok:
        yield Violation(node, f"{what} is signed and rounds 'half_up' (ties toward +inf); {c.runtime}'s "
                              "HALF_UP rounds ties away from zero, so negative ties would differ (use "
                              "rounding='half_even' or 'floor')")


def _common(node, what, q, p) -> Iterator[Violation]:
    """Rules every quantizer meets: zero point, scale type."""
    c = p.constraints
    if not c.zero_point_allowed and q.zero_point_type != "symmetric":
        yield Violation(node, f"{what} has a zero point (asymmetric); {c.runtime} needs zero point 0 (use a "
                              "symmetric quantizer such as Int8ActPerTensorFloat)")
    if c.power_of_two and q.scale_type != "po2":
        yield Violation(node, f"{what} has a float scale; {c.runtime} needs power-of-two scales (use a "
                              "FixedPoint quantizer, scale_type='po2')")


def _act(node, m, p) -> Iterator[Violation]:
    c = p.constraints
    q = m.act_quant
    if not q.is_quant_enabled:
        return
    what = "output quantizer"
    yield from _common(node.target, what, q, p)
    yield from _bits(node.target, what, q, c.act_bit_range, "act_bit_width", c.runtime)
    yield from _rounding(node.target, what, q.rounding, q.signed, p, c.act_rounding)
    if q.scaling_per_output_channel and not c.act_per_channel_allowed:
        yield Violation(node.target, f"{what} is per-channel; {c.runtime} activations are per-tensor")
    if c.unsigned_after_relu:
        if isinstance(m, (QuantReLU, QuantSigmoid)):
            fn = "ReLU" if isinstance(m, QuantReLU) else "Sigmoid"
            if q.signed:
                yield Violation(node.target, f"{what} is signed; {c.runtime} needs unsigned activations after "
                                             f"{fn} (use Uint8ActPerTensorFloat or signed=False)")
            elif q.narrow_range:
                yield Violation(node.target, f"{what} is narrow-range; {c.runtime} needs non-narrow activations "
                                             f"after {fn} (use narrow_range=False)")
        elif isinstance(m, (QuantIdentity, QuantHardTanh)) and not q.signed:
            yield Violation(node.target, f"{what} is unsigned; {c.runtime} needs signed identity activations "
                                         "(use Int8ActPerTensorFloat or signed=True)")


def _layer(node, layer, p) -> Iterator[Violation]:
    c = p.constraints
    wq, bq = layer.weight_quant, layer.bias_quant
    if wq.is_quant_enabled:
        what = "weight quantizer"
        yield from _common(node.target, what, wq, p)
        yield from _bits(node.target, what, wq, c.weight_bit_range, "weight_bit_width", c.runtime)
        if c.weight_signed is not None and wq.signed != c.weight_signed:
            yield Violation(node.target, f"{what} is {'signed' if wq.signed else 'unsigned'}; {c.runtime} stores "
                                         f"{'signed' if c.weight_signed else 'unsigned'} weights "
                                         f"(use signed={c.weight_signed})")
        if wq.scaling_per_output_channel and not c.per_channel_weights_allowed:
            yield Violation(node.target, f"{what} is per-channel; {c.runtime} takes per-tensor weight scales "
                                         "(use a PerTensor weight quantizer)")
        yield from _rounding(node.target, what, wq.rounding, wq.signed, p, c.quant_rounding)
        if c.pair_kernels and c.cpu == "any":
            yield from _pairs(node, layer, p)
    if layer.bias is not None and bq.is_quant_enabled:
        if bq.bias_scaling not in c.bias_modes_allowed:
            fixes = " or ".join(BIAS_FIXES[m] for m in c.bias_modes_allowed)
            yield Violation(node.target, f"bias is scaled {bq.bias_scaling}; {c.runtime} takes {fixes}")
        yield from _rounding(node.target, "bias quantizer", bq.rounding, bq.signed, p, c.quant_rounding)


def _pairs(node, layer, p) -> Iterator[Violation]:
    """The int16 pair rule of x86 8-bit kernels without VNNI: no two weights of a layer times its largest input
    code may pass 32767 (quantfx.targets.int16_pairs)."""
    c = p.constraints
    meta = qmeta(node.args[0])
    if meta.kind != "act" or meta.scale is None or meta.bit_width > 8:
        return  # a float input: the runtime runs the layer in float
    a_max = code_max(*qf.int_range(meta.bit_width, meta.signed, meta.narrow))
    with torch.no_grad():
        ints = layer.weight_quant.int_repr(layer.weight)
    top = int(top2_sum(ints, axis=layer.weight_channel_axis).max(initial=0))  # per output channel
    if a_max * top > INT16_MAX:
        name = node.target
        yield Violation(name, f"can sum {a_max} x {top} = {a_max * top} in one int16 pair of {c.runtime}'s u8 x s8 "
                              f"kernels (input codes up to {a_max}, its two largest weight magnitudes summing to "
                              f"{top}; limit {INT16_MAX}), which saturates on x86 CPUs without VNNI, so the file "
                              "would give other integers there. Give it 7-bit weights (overrides="
                              f"{{{name!r}: dict(weight_bit_width=7)}}) or a 7-bit input, or quantize with "
                              "cpu='vnni' if every CPU it will run on has AVX512-VNNI/AVX-VNNI or is ARM")


__all__ = ["Violation", "violations", "check", "code_max", "top2_sum", "INT16_MAX"]
