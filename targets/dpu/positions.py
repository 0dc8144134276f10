"""Fix positions as the DPU compiler needs them: the refine pass on a compiled graph, and the checker of a file.

A fix position ``p`` is the scale ``2**-p`` of an 8-bit power-of-two quantizer. The DPU computes a layer's output
from the int8 input (position ``i``), int8 weights (``w``) and int8 bias (``b``) with shifts, and its compiler
refuses shifts outside the ranges the hardware has. The ranges below are those of AMD Quark's refine pass
(``quark/onnx/postprocess/refinement/refine.py``, ``QuantPosManager``, amd-quark 0.13), which adjusts the
positions of an XINT8 model to "meet the DPU compiler constraints":

- conv/linear ``shift_cut = w + i - o`` in [0, 16] (adjust_shift_cut: the weight position moves);
- conv/linear ``shift_bias = w + i - b`` in [min(0, -(24 - (8 + shift_cut))), 15], lower bound 0 when a
  LeakyReLU reads the layer (adjust_shift_bias: the bias position moves; above 15 quantfx coarsens the weight
  position instead where shift_cut allows, since a finer bias position than its own clips the bias); in a
  compiled graph of the dpu profile that LeakyReLU is the layer's output quantizer (QuantLeakyReLU), in a file
  the LeakyRelu reading the Conv;
- elementwise add ``shift_read = max(i) - min(i)`` in [0, 7] (adjust_shift_read: the finer input coarsens);
- elementwise add ``shift_write = min(i) - o`` in [-7, 25] (adjust_shift_write: the output position moves);
  elementwise multiply ``sum(i) - o`` in [0, 32] (quantfx maps no product but the hard-swish's to the DPU, and
  that one has the narrower shift_swish below);
- concat: inputs and output share one position, the smallest (align_concat);
- hard-sigmoid: input position in [0, 15], output position >= 7 and ``14 + i - o > 0`` (adjust_hard_sigmoid);
- hard-swish ``x * hard_sigmoid(x)``: ``shift_swish = i + h - o`` in [0, 15], ``h`` the hard-sigmoid's position
  (7, passes/approximate_activations.py) (adjust_shift_swish: the output position moves);
- pooling, padding, slicing, reshaping keep their input's position (align_pool, align_pad, align_slice,
  align_reshape): quantfx's compiled graph moves values through max-pool, pad, slice and reshape without
  requantizing, so only an average pool's requantizer can differ; it takes its input's position.

:func:`refine` applies them to the quantizers of a compiled graph (fixing their scales) and returns every
change; :func:`check_file` reads a lowered ONNX file and returns every broken rule (power-of-two scales,
symmetric int8, the ranges above, and the float-exactness bound of the verification form).
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from quantfx.classify import HARD_SIGMOID_SCALE, hard_swish_parts
from quantfx.graph import (data_input, is_act_quant, is_add, is_cat, is_compute, is_invariant, module_of, qmeta,
                           tensor_inputs)
from quantfx.nn import QuantLeakyReLU
from quantfx.pipelines import annotate
from quantfx.quant.functional import is_power_of_two

SHIFT_CUT = (0, 16)
SHIFT_BIAS_MAX = 15
SHIFT_READ = (0, 7)
SHIFT_WRITE_ADD = (-7, 25)
SHIFT_WRITE_MUL = (0, 32)
SHIFT_SWISH = (0, 15)
HARD_SIGMOID_IN = (0, 15)  # adjust_hard_sigmoid: input position in [0, 15], output position >= 7,
HARD_SIGMOID_OUT_MIN = 7  # shift_sigmoid = 14 + i - o in [0, 31]
MAX_LOOPS = 5  # Quark's adjust_quantize_info loops at most 5 times too
FLOAT_EXACT = 2 ** 24  # float32 integers are exact up to 2^24
REFINE_NOTE = "dpu.refine"  # qmodel.notes key: the refine changes made after calibration (the report lists them)


def fix_pos(scale) -> int:
    """The fix position of a power-of-two scale (``scale = 2**-pos``)."""
    v = float(scale.reshape(-1)[0]) if torch.is_tensor(scale) else float(np.asarray(scale).reshape(-1)[0])
    return int(round(-math.log2(v)))


def shift_bias_range(shift_cut: int, leaky: bool = False) -> tuple[int, int]:
    return (0 if leaky else min(0, -(24 - (8 + shift_cut))), SHIFT_BIAS_MAX)


@dataclass
class Change:
    node: str  # fx node (module path for layers)
    tensor: str  # 'weight' | 'bias' | 'output' | 'input <name>'
    old: int
    new: int
    rule: str
    limit: str


def set_pos(q, pos: int) -> None:
    """Fix a quantizer's scale at ``2**-pos`` (every member of its scale group too: they share one scale)."""
    members = q.scale_group.members if getattr(q, "scale_group", None) is not None else [q]
    for m in members:
        m.fixed_scale = 2.0 ** -pos
        m.spec_fields["fixed_scale"] = 2.0 ** -pos


def producing_quantizer(gm, node) -> Optional[nn.Module]:
    """The quantizer that put ``node``'s value on its grid: the activation quantizer producing it, through
    ops that only move values (and through a concat, whose inputs share one quantizer)."""
    meta = qmeta(node)
    if meta.kind != "act" or meta.scale is None or meta.scale.numel() != 1:
        return None
    while isinstance(node, fx.Node):
        if is_act_quant(gm, node):
            q = module_of(gm, node).act_quant
            return q if q.is_quant_enabled else None
        if is_cat(node):
            node = tensor_inputs(node)[0]
        elif is_invariant(gm, node):
            node = data_input(node)
        else:
            return None
    return None


class _Graph:
    """Positions of the quantizers of a compiled graph. The graph's structure is read once (which node each rule
    applies to, its quantizers); positions are cached per quantizer and fixed scale, since refine moves them only
    by fixing scales (:func:`set_pos`)."""

    def __init__(self, gm):
        self.gm = gm
        self._acts: dict = {}
        self._readers: dict = {}
        self._pos: dict = {}
        self._static: dict = {}
        self.sites = [(node, kind) for node in gm.graph.nodes if (kind := self._kind(node)) is not None]

    def _kind(self, node) -> Optional[str]:
        if is_compute(self.gm, node):
            return "layer"
        if is_add(node):
            return "add"
        if is_cat(node):
            return "cat"
        if _is_hard_sigmoid(node):
            return "hard_sigmoid"
        if hard_swish_parts(self.gm, node) is not None:
            return "hard_swish"
        if _is_avgpool(self.gm, node):
            return "avgpool"
        return None

    def static(self, key, compute):
        """``compute()``, once per ``key``: facts of the graph's structure, which refine does not change."""
        if key not in self._static:
            self._static[key] = compute()
        return self._static[key]

    def act_quantizer(self, node) -> Optional[nn.Module]:
        if node not in self._acts:
            self._acts[node] = producing_quantizer(self.gm, node)
        return self._acts[node]

    def reader_quantizer(self, node):
        """The activation quantizer that requantizes ``node``'s output (its only reader), or None."""
        if node not in self._readers:
            users = list(node.users)
            if len(users) != 1 or not is_act_quant(self.gm, users[0]):
                self._readers[node] = None, None
            else:
                m = module_of(self.gm, users[0])
                self._readers[node] = (m.act_quant if m.act_quant.is_quant_enabled else None), m
        return self._readers[node]

    def pos(self, q, tensor=None) -> int:
        """``q``'s fix position (a weight or bias quantizer's on its ``tensor``)."""
        key = (id(q), q.fixed_scale)
        if key not in self._pos:
            with torch.no_grad():
                self._pos[key] = fix_pos(q.scale(tensor) if tensor is not None else q.scale())
        return self._pos[key]


def _layer_positions(g: _Graph, node):
    layer = g.static(("module", node), lambda: module_of(g.gm, node))
    qi = g.act_quantizer(node.args[0])
    qo, reader = g.reader_quantizer(node)
    if qi is None or qo is None or not layer.weight_quant.is_quant_enabled:
        return None
    w = g.pos(layer.weight_quant, layer.weight)
    b = g.pos(layer.bias_quant, layer.bias) if layer.bias is not None and \
        layer.bias_quant.is_quant_enabled and layer.bias_quant.bias_scaling == "internal" else None
    # the layer's output quantizer is a LeakyReLU's: the DPU computes it in the layer (shift_bias >= 0)
    leaky = isinstance(reader, QuantLeakyReLU)
    return layer, g.pos(qi), w, b, g.pos(qo), qo, leaky


def _finest_unclipped(layer) -> float:
    """The finest fix position at which ``layer``'s bias integers stay inside their range (inf: a zero bias)."""
    top = float(layer.bias.detach().abs().max())
    qmax = layer.bias_quant.int_range()[1]
    return math.floor(math.log2((qmax + 0.5) / top)) if top > 0 else math.inf


def _is_avgpool(gm, node) -> bool:
    m = module_of(gm, node)
    return isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)) or node.target is torch.nn.functional.avg_pool2d


def _is_hard_sigmoid(node) -> bool:
    """``mul(relu6(add(x, 3)), 2731/2^14)``: the DPU's hard-sigmoid (passes/approximate_activations.py)."""
    if node.target is not operator.mul or len(node.args) != 2 or node.args[1] != HARD_SIGMOID_SCALE:
        return False
    r = node.args[0]
    return isinstance(r, fx.Node) and r.target is torch.nn.functional.relu6 and \
        isinstance(r.args[0], fx.Node) and r.args[0].target is operator.add and r.args[0].args[1] == 3.0


def hard_swish_input(gm, x) -> bool:
    """Whether ``x`` is the operand of a hard-swish product (passes/approximate_activations.py) as well as the
    input of its hard-sigmoid."""
    return any(hard_swish_parts(gm, user) is not None and hard_swish_parts(gm, user)[0] is x for user in x.users)


def hard_sigmoid_input(node):
    """The input ``x`` of the hard-sigmoid ``mul(relu6(add(x, 3)), 2731/2^14)`` that ``node`` (its add, relu6 or
    mul) belongs to, or None."""
    while isinstance(node, fx.Node) and node.target in (operator.mul, torch.nn.functional.relu6):
        if node.target is operator.mul and list(node.args[1:]) != [HARD_SIGMOID_SCALE]:
            return None
        node = node.args[0]
    if isinstance(node, fx.Node) and node.target is operator.add and list(node.args[1:]) == [3.0]:
        return node.args[0]
    return None


def _one_round(g: _Graph, set_pos=set_pos) -> list[Change]:
    """One sweep of the rules over the graph, moving positions with ``set_pos`` (a no-op: a read-only sweep that
    lists the rules the graph breaks; the position cache stays right, as positions move only by fixed scales)."""
    gm = g.gm
    changes: list[Change] = []
    for node, kind in g.sites:
        if kind == "layer":
            pos = _layer_positions(g, node)
            if pos is None:
                continue
            layer, i, w, b, o, _, leaky = pos
            sc = w + i - o
            lo, hi = SHIFT_CUT
            if not lo <= sc <= hi:
                new_w = min(max(sc, lo), hi) + o - i
                set_pos(layer.weight_quant, new_w)
                changes.append(Change(node.target, "weight", w, new_w, f"shift_cut = w + i - o = {sc}",
                                      f"[{lo}, {hi}]"))
                w, sc = new_w, new_w + i - o
            if b is not None:
                lo, hi = shift_bias_range(sc, leaky)
                sb = w + i - b
                short = (w + i - hi) - max(b, _finest_unclipped(layer)) if sb > hi else 0
                if short > 0 and sc - short >= SHIFT_CUT[0]:
                    # a bias position finer than the finest that holds the bias would clip it: coarsen the
                    # weights instead, which the bias outweighs by 2^15 steps of the accumulator or more
                    new_w = w - short
                    set_pos(layer.weight_quant, new_w)
                    changes.append(Change(node.target, "weight", w, new_w, f"shift_bias = w + i - b = {sb}",
                                          f"[{lo}, {hi}], without clipping the bias"))
                    w, sc = new_w, new_w + i - o
                    lo, hi = shift_bias_range(sc, leaky)
                    sb = w + i - b
                if not lo <= sb <= hi:
                    new_b = w + i - min(max(sb, lo), hi)
                    set_pos(layer.bias_quant, new_b)
                    changes.append(Change(node.target, "bias", b, new_b, f"shift_bias = w + i - b = {sb}",
                                          f"[{lo}, {hi}]"))
        elif kind == "add":
            ins = [(a, g.act_quantizer(a)) for a in tensor_inputs(node)]
            qo, _ = g.reader_quantizer(node)
            if any(q is None for _, q in ins) or qo is None:
                continue
            pos = [g.pos(q) for _, q in ins]
            sr = max(pos) - min(pos)
            if sr > SHIFT_READ[1]:
                k = int(np.argmax(pos))
                new = min(pos) + SHIFT_READ[1]
                set_pos(ins[k][1], new)
                changes.append(Change(node.name, f"input {ins[k][0].name}", pos[k], new,
                                      f"shift_read = max(i) - min(i) = {sr}", f"[{SHIFT_READ[0]}, {SHIFT_READ[1]}]"))
                pos[k] = new
            o = g.pos(qo)
            sw = min(pos) - o
            lo, hi = SHIFT_WRITE_ADD
            if not lo <= sw <= hi:
                new = min(pos) - min(max(sw, lo), hi)
                set_pos(qo, new)
                changes.append(Change(node.name, "output", o, new, f"shift_write = min(i) - o = {sw}",
                                      f"[{lo}, {hi}]"))
        elif kind == "cat":
            ins = [(a, g.act_quantizer(a)) for a in tensor_inputs(node)]
            qo = g.act_quantizer(node)
            if any(q is None for _, q in ins) or qo is None:
                continue
            target = min([g.pos(q) for _, q in ins] + [g.pos(qo)])
            for name, q in [(f"input {a.name}", q) for a, q in ins] + [("output", qo)]:
                p = g.pos(q)
                if p != target:
                    set_pos(q, target)
                    changes.append(Change(node.name, name, p, target, "concat inputs and output share one "
                                          "position", "the smallest"))
        elif kind == "hard_sigmoid":
            x = node.args[0].args[0].args[0]  # mul(relu6(add(x, 3)), 2731/2^14)
            qi, (qo, _) = g.act_quantizer(x), g.reader_quantizer(node)
            if qi is None or qo is None:
                continue
            i, o = g.pos(qi), g.pos(qo)
            new_i = min(max(i, HARD_SIGMOID_IN[0]), HARD_SIGMOID_IN[1])
            if new_i < i and g.static(("hard_swish_input", x), lambda: hard_swish_input(gm, x)):
                # a hard-swish's x * hard_sigmoid(x): its x is the product's operand too, and moving it to
                # position 15 zeroes every |x| < 2^-16 (a random-weight MobileNetV3 at 0 dB). It keeps its
                # position, and the report places this hard-sigmoid on the CPU (arch.py: hard-sigmoid input
                # position above 15)
                new_i = i
            new_o = max(o, HARD_SIGMOID_OUT_MIN)
            if 14 + new_i - new_o <= 0:
                new_o = 14 + new_i
            for what, q, old, new, rule, limit in (
                    ("input", qi, i, new_i, "hard-sigmoid input position", f"[{HARD_SIGMOID_IN[0]}, "
                                                                           f"{HARD_SIGMOID_IN[1]}]"),
                    ("output", qo, o, new_o, "hard-sigmoid output position, shift_sigmoid = 14 + i - o > 0",
                     f">= {HARD_SIGMOID_OUT_MIN}")):
                if new != old:
                    set_pos(q, new)
                    changes.append(Change(node.name, what, old, new, rule, limit))
        elif kind == "hard_swish":
            x, h = g.static(("hard_swish", node), lambda: hard_swish_parts(gm, node))
            qx, qh, (qo, _) = g.act_quantizer(x), g.act_quantizer(h), g.reader_quantizer(node)
            if qx is None or qh is None or qo is None:
                continue
            i, hp, o = g.pos(qx), g.pos(qh), g.pos(qo)
            ss, (lo, hi) = i + hp - o, SHIFT_SWISH
            if not lo <= ss <= hi:
                new = i + hp - min(max(ss, lo), hi)
                set_pos(qo, new)
                changes.append(Change(node.name, "output", o, new, f"shift_swish = i + h - o = {ss}",
                                      f"[{lo}, {hi}]"))
        elif kind == "avgpool":
            qi = g.act_quantizer(node.args[0])
            after = node
            if len(node.users) == 1 and next(iter(node.users)).target is operator.mul:
                after = next(iter(node.users))  # the DPU's k / 2^n correction of the window's sum
            qo, _ = g.reader_quantizer(after)
            if qi is None or qo is None:
                continue
            i, o = g.pos(qi), g.pos(qo)
            if i != o:
                set_pos(qo, i)
                changes.append(Change(node.name, "output", o, i, "pooling keeps its input's position",
                                      f"input position {i}"))
        if changes:  # later rules read the new positions from the quantizers (scale()), not from annotations
            return changes
    return changes


def refine(gm: fx.GraphModule) -> list[Change]:
    """Adjust the fix positions of a calibrated compiled graph to the DPU compiler's rules (module docstring),
    in place; returns every change (node, tensor, old -> new position, rule, limit). Idempotent: a refined graph
    gives no change. A position it moves is fixed (the quantizer's ``fixed_scale``): calibrating again leaves it
    where the rule put it. Calibration runs it last (the pass ``refine_fix_positions`` of the dpu recipe), so the
    calibrated model computes what the file will; the lowering only checks (:func:`position_problems`)."""
    annotate(gm)
    changes = Rules(gm)()
    if changes:
        annotate(gm)  # the graph's metadata follows the moved positions
    return changes


def position_problems(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """The DPU compiler's rules that the positions of a compiled graph break, read-only: ``[(node, message)]``,
    empty on a graph :func:`refine` has been run on (calibration runs it). The rule checker reads this analysis
    from the dpu profile's constraints."""
    return [(c.node, f"{c.tensor} position {c.old}: {c.rule} is outside {c.limit} (position {c.new} keeps it; "
                     "calibrate the model again, or run the pass refine_fix_positions on it)")
            for c in _one_round(_Graph(gm), set_pos=lambda q, pos: None)]


class Rules:
    """:func:`refine`'s rules on an annotated graph whose structure and calibration stay as they are (only
    positions move): the graph is read once, so calling it again after moving positions (the position search
    judges every proposal as refine leaves it) costs a scan of the rules' nodes, not of the graph. Calling it
    applies the rules in place and returns the changes; it does not annotate."""

    def __init__(self, gm: fx.GraphModule):
        self.graph = _Graph(gm)

    def __call__(self) -> list[Change]:
        changes: list[Change] = []
        for _ in range(MAX_LOOPS * max(1, len(self.graph.gm.graph.nodes))):
            step = _one_round(self.graph)
            if not step:
                break
            changes += step
        return changes


# -- the checker of a lowered file ------------------------------------------------------------------------


class _File:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.nodes = list(g.node)

    def dq_pos(self, value) -> Optional[int]:
        n = self.producer.get(value)
        return fix_pos(self.inits[n.input[1]]) if n is not None and n.op_type == "DequantizeLinear" else None

    def q_pos(self, value, through=("Relu", "Clip", "LeakyRelu")) -> Optional[int]:
        """The position of the QuantizeLinear that reads ``value`` (directly or after ReLU/Clip/LeakyRelu, which
        the DPU computes in the layer or add before them)."""
        for n in self.consumers.get(value, []):
            if n.op_type == "QuantizeLinear":
                return fix_pos(self.inits[n.input[1]])
            if n.op_type in through:
                p = self.q_pos(n.output[0], ())
                if p is not None:
                    return p
        return None

    def is_hard_sigmoid_mul(self, n) -> bool:
        """Whether ``n`` is the hard-sigmoid's ``Mul(Clip(Add(x, 3), 0, 6), HARD_SIGMOID_SCALE)``."""
        return n is not None and n.op_type == "Mul" and any(
            i in self.inits and self.inits[i].size == 1 and float(self.inits[i]) == np.float32(HARD_SIGMOID_SCALE)
            for i in n.input)

    def is_hard_sigmoid_grid(self, value) -> bool:
        """Whether ``value`` is ``DQ(Q(hard-sigmoid Mul))``: the int8 hard-sigmoid of a hard-swish."""
        dq = self.producer.get(value)
        q = self.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q is not None and q.op_type == "QuantizeLinear" and \
            self.is_hard_sigmoid_mul(self.producer.get(q.input[0]))

    def leaky_slope(self, value) -> Optional[float]:
        """The slope of the LeakyRelu that alone reads ``value``, or None."""
        users = self.consumers.get(value, [])
        if len(users) != 1 or users[0].op_type != "LeakyRelu":
            return None
        return next((a.f for a in users[0].attribute if a.name == "alpha"), 0.01)

    def dq_ints(self, value):
        n = self.producer.get(value)
        if n is None or n.op_type != "DequantizeLinear" or n.input[0] not in self.inits:
            return None
        return self.inits[n.input[0]], float(self.inits[n.input[1]])


_KEEP_POSITION = ("MaxPool", "AveragePool", "GlobalAveragePool", "Pad", "Slice", "Split", "Reshape", "Flatten",
                  "Transpose", "DepthToSpace", "SpaceToDepth", "Squeeze", "Unsqueeze")


def slope_odd_numerator(slope: float) -> int:
    """The odd part of a LeakyReLU slope's numerator in 1/256 (26/256: 13): a float32 product of an integer sum
    with the slope is exact while the sum times this stays below 2^24."""
    num = int(round(slope * 256))
    return num // (num & -num) if num else 1


def check_file(model: onnx.ModelProto) -> list[str]:
    """Every rule a dpu file breaks (empty: it meets them all): each Q/DQ scale an exact power of two with an int8
    zero point 0; conv/linear shift_cut and shift_bias, add shift_read and shift_write, hard-swish shift_swish in
    the DPU compiler's ranges; concat inputs and output at one position; pooling/layout ops keeping their input's
    position; and each layer's float sum bound (|input code| x sum|w| + |bias|, in units of the finest step, times
    the slope's odd numerator before a LeakyRelu, <= 2^24) and each hard-sigmoid's (input position <= 9), under
    which the verification form (float kernels) is exact on every CPU."""
    f = _File(model)
    problems = []
    for n in f.nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            s = f.inits.get(n.input[1])
            if s is None or s.size != 1 or not is_power_of_two(float(s.reshape(-1)[0])):
                problems.append(f"{n.name}: scale {s} is not one power of two")
            z = f.inits.get(n.input[2]) if len(n.input) > 2 else None
            if z is None or np.any(z != 0) or z.dtype != np.int8:
                problems.append(f"{n.name}: zero point {z} is not int8 0")
        elif n.op_type in ("Conv", "Gemm", "ConvTranspose"):
            problems += _check_layer(f, n)
        elif n.op_type == "Add":
            ins = [f.dq_pos(v) for v in n.input]
            o = f.q_pos(n.output[0])
            if None in ins or o is None:
                continue
            if max(ins) - min(ins) > SHIFT_READ[1]:
                problems.append(f"{n.name}: shift_read {max(ins) - min(ins)} outside {SHIFT_READ}")
            if not SHIFT_WRITE_ADD[0] <= min(ins) - o <= SHIFT_WRITE_ADD[1]:
                problems.append(f"{n.name}: shift_write {min(ins) - o} outside {SHIFT_WRITE_ADD}")
        elif n.op_type == "Mul" and len(n.input) == 2 and any(f.is_hard_sigmoid_grid(v) for v in n.input):
            ins, o = [f.dq_pos(v) for v in n.input], f.q_pos(n.output[0], ())
            if None not in ins and o is not None and not SHIFT_SWISH[0] <= sum(ins) - o <= SHIFT_SWISH[1]:
                problems.append(f"{n.name}: shift_swish {sum(ins) - o} outside {SHIFT_SWISH}")
        elif f.is_hard_sigmoid_mul(n):
            # clip(x + 3, 0, 6) x 2731 / 2^14 is exact in float32 while 6 x 2^i x 2731 <= 2^24 (i <= 9); the DPU
            # computes it in integers whatever i (refine allows 0..15)
            clip = f.producer.get(n.input[0])
            add = f.producer.get(clip.input[0]) if clip is not None and clip.op_type == "Clip" else None
            i = f.dq_pos(add.input[0]) if add is not None and add.op_type == "Add" else None
            steps = 6 * 2 ** i * round(HARD_SIGMOID_SCALE * 2 ** 14) if i is not None else 0
            if steps > FLOAT_EXACT:
                problems.append(f"{n.name}: the hard-sigmoid product can reach {steps} steps (input position {i}), "
                                "past 2^24: the verification form may round")
        elif n.op_type == "Concat":
            ins = [f.dq_pos(v) for v in n.input]
            o = f.q_pos(n.output[0], ())
            if None not in ins and len(set(ins + ([o] if o is not None else []))) > 1:
                problems.append(f"{n.name}: concat positions {ins} -> {o} differ")
        elif n.op_type in _KEEP_POSITION:
            i = f.dq_pos(n.input[0])
            for out in n.output:
                o = f.q_pos(out, ())
                if i is not None and o is not None and i != o:
                    problems.append(f"{n.name}: {n.op_type} changes the position {i} -> {o}")
    return problems


def _check_layer(f: _File, n) -> list[str]:
    out = []
    i = f.dq_pos(n.input[0])
    w = f.dq_ints(n.input[1])
    if i is None or w is None:
        return out
    w_int, w_scale = w
    wp = fix_pos(w_scale)
    o = f.q_pos(n.output[0])
    sc = wp + i - o if o is not None else None
    if sc is not None and not SHIFT_CUT[0] <= sc <= SHIFT_CUT[1]:
        out.append(f"{n.name}: shift_cut {sc} outside {SHIFT_CUT}")
    b = f.dq_ints(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    slope = f.leaky_slope(n.output[0])
    if b is not None and sc is not None:
        sb = wp + i - fix_pos(b[1])
        lo, hi = shift_bias_range(sc, leaky=slope is not None)
        if not lo <= sb <= hi:
            out.append(f"{n.name}: shift_bias {sb} outside [{lo}, {hi}]")
    # float exactness of the verification form: every partial sum an integer multiple of the finest step
    acc_pos = wp + i
    unit_pos = max(acc_pos, fix_pos(b[1])) if b is not None else acc_pos
    axis = 1 if n.op_type == "ConvTranspose" else 0
    if n.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in n.attribute):
        axis = 1
    wa = np.moveaxis(np.abs(w_int.astype(np.int64)), axis, 0).reshape(w_int.shape[axis], -1).sum(1)
    bound = 128 * wa * 2 ** (unit_pos - acc_pos)
    if b is not None:
        bound = bound + np.abs(b[0].astype(np.int64)).reshape(-1) * 2 ** (unit_pos - fix_pos(b[1]))
    if slope is not None:  # the LeakyRelu's product: the sum times the slope's odd numerator (26/256: 13)
        bound = bound * slope_odd_numerator(slope)
    if int(bound.max(initial=0)) > FLOAT_EXACT:
        out.append(f"{n.name}: a float sum can reach {int(bound.max())} steps, past 2^24: the verification form "
                   "may round")
    return out


__all__ = ["refine", "Rules", "Change", "check_file", "slope_odd_numerator", "fix_pos", "is_power_of_two",
           "shift_bias_range", "SHIFT_CUT",
           "SHIFT_BIAS_MAX", "producing_quantizer", "SHIFT_READ", "SHIFT_WRITE_ADD", "SHIFT_WRITE_MUL", "SHIFT_SWISH",
           "asdict"]
