"""Mixed precision under a hardware budget: each layer's weight width and each activation quantizer's width
chosen from the widths the target accepts, to lose the least accuracy under a cost budget.

1. *Sensitivity*, on the calibration data: starting from the calibrated model at its own widths (the widest),
   one layer's weights alone (rounded as the model will be: GPTQ, or nearest) or one activation quantizer alone
   (calibrated as quantize calibrates it) are lowered to each candidate width, and the rise of the output's
   squared error against the float model is recorded. Such errors add up roughly as independent noise, so the
   sum over the layers is the objective.
2. *Allocation*, exactly: an integer program (scipy's ``milp``, HiGHS) with one binary per layer and width
   combination (weight width, input activation width and, where a cost reads it, output activation width) tied
   to one binary per activation quantizer and width, minimising the summed sensitivity subject to every budget.
3. *Whole models*: the program's choice, the best uniform widths that fit and, for a few rounds of refinement,
   the program's best with one variable forced a width up or down from the best so far, are measured as whole
   models (calibrated, weights rounded by GPTQ), and the lowest output error is kept.
4. The chosen widths are written into the quantizers (``bit_width``, and the MSE weight-scale search at 4 bits
   or fewer as swap_modules gives it), so inspect, diagrams and every backend read ordinary per-layer widths.

Costs are registered by name (:func:`register_cost`): 'bops' (MACs x weight bits x activation bits, per sample)
and 'weight_bytes' here; targets add their own (finn: 'finn_luts', 'finn_brams' from FINN's resource
formulas, ``targets/finn_cost.py``). A budget value at most 1 is a fraction of the cost of the model with
8-bit weights and activations.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import fx, nn

from .calibration import _as_args, _n_inputs, _progress, _run_batches, auto_stat
from .classify import is_act_quant, is_compute, module_of
from .errors import QuantArgumentError
from .gptq import BLOCK, _round_layer, gptq, hessians
from .graph import input_quantizer_of
from .nn import QuantWBIOL, exact_arithmetic
from .quant import Quantizer, is_low_bit
from .quant_tensor import value_of
from .weight_rounding import float_view

NOTE = "mixed_precision"  # qmodel.notes key: the chosen widths and costs
WIDTHS = (2, 3, 4, 5, 6, 8)  # candidate widths (those the target's profile accepts)
REFERENCE_BITS = 8  # a budget <= 1 is a fraction of the cost at this width everywhere
SAMPLES = 512  # calibration samples the search measures on at most
REFINE_ROUNDS = 3  # rounds of whole-model refinement after the integer program


@dataclass(frozen=True)
class LayerShape:
    """What a cost needs to know of one conv/linear layer."""
    name: str
    kind: str  # 'linear' | 'conv' | 'depthwise' (groups == in channels == out channels)
    macs: int  # multiply-accumulates of one sample
    params: int  # weights
    rows: int  # the weight matrix's input dimension (MW: in channels / groups x kernel positions)
    cols: int  # its output dimension (MH: out channels)
    kernel: int  # kernel positions (1 for linear)
    positions: int  # output positions of one sample (pixels; tokens of a linear)
    act_signed: bool  # the input activation is signed


#: cost name -> fn(layer, weight_bits, act_bits, out_act_bits or None) -> cost of the layer
COSTS: dict[str, Callable[[LayerShape, int, int, Optional[int]], float]] = {}
#: cost names that read the output activation's width (finn's thresholds)
READS_OUTPUT: set[str] = set()


def register_cost(name: str, fn: Callable, reads_output: bool = False) -> None:
    """Register a budget key: ``fn(layer: LayerShape, w_bits, a_bits, out_bits) -> float``."""
    COSTS[name] = fn
    if reads_output:
        READS_OUTPUT.add(name)


register_cost("bops", lambda l, w, a, b: float(l.macs * w * a))
register_cost("weight_bytes", lambda l, w, a, b: l.params * w / 8)


@dataclass
class Choice:
    """The outcome of the search: widths per layer and costs against the budget."""
    weights: dict[str, int]  # layer -> weight bits
    acts: dict[str, int]  # activation quantizer -> bits
    costs: dict[str, float]  # budget key -> cost of the chosen widths
    limits: dict[str, float]  # budget key -> the limit
    reference: dict[str, float]  # budget key -> cost at 8 bits everywhere
    predicted: float  # summed sensitivity (output MSE above the widest model's)
    chosen_by: str = "search"  # or the uniform widths, where they measured better as a whole model
    sensitivity: dict = field(default_factory=dict, repr=False)  # ('w', layer) / ('a', quantizer) -> {bits: mse}
    measured: Optional[float] = None  # the chosen widths' output MSE against float, measured as a whole model

    def lines(self) -> list[str]:
        """The cost of each budget key against its limit (``qmodel.notes['mixed_precision']``; inspect prints
        them under the table, whose width columns show the choice)."""
        return [f"{k} {self.costs[k]:.4g} <= {self.limits[k]:.4g} ({self.costs[k] / self.reference[k]:.3f} of "
                "the 8-bit model)" for k in self.limits] + [f"widths by {self.chosen_by}"]


def parse_budget(budget) -> dict[str, float]:
    """``{'bops': 0.25}`` or the command line's ``'bops=0.25,weight_bytes=20000'`` -> dict, checked."""
    if isinstance(budget, str):
        items = {}
        for part in filter(None, budget.split(",")):
            key, sep, value = part.partition("=")
            try:
                items[key.strip()] = float(value)
            except ValueError:
                raise QuantArgumentError(f"budget: {part!r} is not key=number (e.g. bops=0.25)") from None
            if not sep:
                raise QuantArgumentError(f"budget: {part!r} is not key=number (e.g. bops=0.25)")
        budget = items
    if not isinstance(budget, dict) or not budget:
        raise QuantArgumentError(f"budget={budget!r}: give a dict such as {{'bops': 0.25}}")
    for key, value in budget.items():
        if key not in COSTS:
            raise QuantArgumentError(f"budget: unknown key {key!r}; use {', '.join(sorted(COSTS))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise QuantArgumentError(f"budget[{key!r}]={value!r}: give a positive number (<= 1: a fraction of "
                                     "the 8-bit model's cost)")
    return {k: float(v) for k, v in budget.items()}


# -- the model's layers and activation quantizers ------------------------------------------------------------


@dataclass
class _Layer:
    shape: LayerShape
    module: QuantWBIOL
    act: Optional[int]  # index of the activation variable of its input, or None (fixed width)
    out: Optional[int]  # index of the activation variable that reads its output, or None
    fixed: tuple  # (input bits, output bits or None: nothing quantizes it) where those are not variables


def _shape(gm, node, m) -> LayerShape:
    out_meta = node.meta.get("tensor_meta")
    out_shape = tuple(out_meta.shape) if hasattr(out_meta, "shape") else None
    if isinstance(m, nn.Linear):
        positions = math.prod(out_shape[1:-1]) if out_shape else 1
        kernel, kind, rows, cols = 1, "linear", m.in_features, m.out_features
    else:
        positions = math.prod(out_shape[2:]) if out_shape else 1
        kernel = math.prod(m.kernel_size)
        kind = "depthwise" if m.groups > 1 and m.groups == m.in_channels == m.out_channels else "conv"
        rows, cols = m.in_channels // m.groups * kernel, m.out_channels
    src = input_quantizer_of(gm, node)
    return LayerShape(node.target, kind, m.weight.numel() * positions, m.weight.numel(), rows, cols, kernel,
                      positions, bool(getattr(src, "signed", False)))


def _groups(q: Quantizer) -> list[Quantizer]:
    """The quantizers that must share ``q``'s width: the members of its ScaleGroup (one scale), or itself."""
    group = getattr(q, "scale_group", None)
    return list(getattr(group, "members", None) or [q])


def _model_layers(gm: fx.GraphModule, reads_out: bool):
    """(layers, activation variables: lists of quantizers that take one width): those a layer reads, and with
    ``reads_out`` those that read a layer."""
    acts: list[list[Quantizer]] = []
    index: dict[int, int] = {}

    def var(q) -> Optional[int]:
        if q is None or not q.is_quant_enabled or q.fixed_scale is not None or q.learned_scale:
            return None
        if id(q) not in index:
            members = _groups(q)
            for m in members:
                index[id(m)] = len(acts)
            acts.append(members)
        return index[id(q)]

    layers = []
    for node in gm.graph.nodes:
        if not is_compute(gm, node):
            continue
        m = module_of(gm, node)
        if not m.weight_quant.is_quant_enabled or m.weight_quant.fixed_scale is not None:
            continue
        reader = next(iter(node.users)) if len(node.users) == 1 else None
        out_q = module_of(gm, reader).act_quant if reader is not None and is_act_quant(gm, reader) else None
        src = input_quantizer_of(gm, node)
        fixed = (src.bit_width if src is not None and src.is_quant_enabled else REFERENCE_BITS,
                 out_q.bit_width if out_q is not None and out_q.is_quant_enabled else None)
        layers.append(_Layer(_shape(gm, node, m), m, var(src), var(out_q) if reads_out else None, fixed))
    return layers, acts


# -- setting widths in place --------------------------------------------------------------------------------


def set_weight_bits(q: Quantizer, bits: int, base_stat: str) -> None:
    """Give a weight quantizer ``bits``, with the MSE scale search at 4 bits or fewer where its own statistic
    (``base_stat``) is the range, as swap_modules does for a width given up front."""
    q.bit_width = q.spec_fields["bit_width"] = bits
    stat = "mse" if is_low_bit(bits) and base_stat == "max" else base_stat
    q.scale_stat = q.spec_fields["scale_stat"] = stat  # fields: the weight caches' keys change with them


def _set_act_bits(members, bits: int) -> None:
    for q in members:
        q.bit_width = q.spec_fields["bit_width"] = bits


@contextlib.contextmanager
def _kept(quantizers):
    """Restore the quantizers' widths, statistics and scales after the block."""
    saved = [(q, dict(q.spec_fields), {k: v.clone() for k, v in q.state_dict().items()},
              getattr(q, "calibrated_by", None)) for q in quantizers]
    try:
        yield
    finally:
        for q, fields, state, by in saved:
            for k in ("bit_width", "scale_stat"):
                if k in fields:
                    setattr(q, k, fields[k])
                    q.spec_fields[k] = fields[k]
            q.load_state_dict(state)
            if by is not None:
                q.calibrated_by = by
            q.__dict__.pop("_wcache", None)
            q.__dict__.pop("_icache", None)


# -- measuring the model at given widths ---------------------------------------------------------------------


def _outputs(model, batches) -> torch.Tensor:
    n_in = _n_inputs(model)
    outs = []
    with torch.no_grad():
        for b in batches:
            y = model(*_as_args(b, n_in))
            ys = y if isinstance(y, (tuple, list)) else [y]
            outs.append(torch.cat([value_of(t).detach().float().reshape(len(value_of(t)), -1) for t in ys
                                   if torch.is_tensor(value_of(t))], 1))
    return torch.cat(outs)


@contextlib.contextmanager
def _trial(gm, layers, acts):
    """Within the block widths, activation scales and weights (rounded by GPTQ) may change; afterwards the model
    is as it was: quantizer fields and state, weights, their float originals and rounding marks, notes."""
    modules = [l.module for l in layers]
    saved = [(m, m.weight.data.clone(), getattr(m, "float_weight", None),
              {k: m.weight_quant.__dict__[k] for k in ("rounding_learned", "rounding_method")
               if k in m.weight_quant.__dict__}) for m in modules]
    notes = dict(getattr(gm, "notes", {}))
    try:
        with _kept([m.weight_quant for m in modules] + [q for members in acts for q in members]):
            yield
    finally:
        for m, weight, original, marks in saved:
            m.weight.data.copy_(weight)
            if original is None and getattr(m, "float_weight", None) is not None:
                delattr(m, "float_weight")
            for k in ("rounding_learned", "rounding_method"):
                m.weight_quant.__dict__.pop(k, None)
            m.weight_quant.__dict__.update(marks)
        if hasattr(gm, "notes"):
            gm.notes.clear()
            gm.notes.update(notes)


class _Evaluator:
    """Measures the output error against float of the model at chosen widths, as quantize will leave it: each
    activation quantizer calibrated as :func:`quantfx.calibrate` does (every quantizer observing the float model,
    so its statistic at a width depends on nothing else: computed once per width and kept), the weights rounded
    by ``rounding`` ('gptq': GPTQ on these batches, with the widths in place; 'nearest')."""

    def __init__(self, gm, layers, acts, batches, rounding: str):
        self.gm, self.layers, self.acts, self.batches, self.rounding = gm, layers, acts, batches, rounding
        with float_view(gm):
            self.reference = _outputs(gm, batches)
        self._states: dict = {}  # (activation variable, bits) -> its members' state after calibration
        self._hessians = None  # the top-width model's layer Hessians, for one layer's GPTQ alone
        self.measured = 0  # whole models measured

    def error(self) -> float:
        return float((_outputs(self.gm, self.batches) - self.reference).pow(2).mean())

    def act_states(self, bits: int) -> list:
        """Per activation variable, its members' calibrated state at ``bits`` (one pass over the batches for all
        variables at once)."""
        if bits not in self._states:
            everyone = _act_quantizers(self.gm)
            weights = [l.module.weight_quant for l in self.layers]
            with _kept(everyone):
                for members in self.acts:
                    _set_act_bits(members, bits)
                for q in everyone:
                    q.begin_calibration(auto_stat(q))
                for q in weights:
                    q.calibrating = True
                try:
                    _run_batches(self.gm, self.batches, False, "mixed precision: activation scales", None)
                finally:
                    for q in everyone:
                        q.end_calibration()
                    for q in weights:
                        q.calibrating = False
                self._states[bits] = [[_state_of(q) for q in members] for members in self.acts]
        return self._states[bits]

    def set_act(self, j: int, bits: int) -> None:
        _set_act_bits(self.acts[j], bits)
        for q, state in zip(self.acts[j], self.act_states(bits)[j]):
            _load_state(q, state)

    def top_hessians(self) -> None:
        """Every layer's input Hessian in the model at its own (widest) widths, for :meth:`round_one`."""
        if self._hessians is None:
            self._hessians = hessians(self.gm, [(l.shape.name, l.module) for l in self.layers], self.batches)

    def round_one(self, i: int) -> None:
        """Layer ``i``'s weights alone rounded by GPTQ on the widest model's Hessian of its input."""
        name = self.layers[i].shape.name
        if name in self._hessians:
            _round_layer(name, self.layers[i].module, *self._hessians[name], BLOCK)

    def whole(self, w_bits, act_bits) -> float:
        """The output error of the model with these widths (the model is left as it was)."""
        self.measured += 1
        with _trial(self.gm, self.layers, self.acts):
            for l, bits in zip(self.layers, w_bits):
                set_weight_bits(l.module.weight_quant, bits, l.module.weight_quant.scale_stat)
            for j, bits in enumerate(act_bits):
                self.set_act(j, bits)
            if self.rounding == "gptq":
                gptq(self.gm, self.batches, progress=False)
            return self.error()


def _act_quantizers(gm) -> list[Quantizer]:
    seen, out = set(), []
    for m in gm.modules():
        if isinstance(m, Quantizer) and m.is_quant_enabled and m.kind == "act" and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _state_of(q: Quantizer) -> tuple:
    return ({k: v.clone() for k, v in q.state_dict().items()}, getattr(q, "calibrated_by", None))


def _load_state(q: Quantizer, state: tuple) -> None:
    q.load_state_dict(state[0])
    if state[1] is not None:
        q.calibrated_by = state[1]
    q.__dict__.pop("_icache", None)


def sensitivities(gm, layers, acts, w_widths, a_widths, batches, progress=False, rounding="nearest",
                  evaluator: Optional[_Evaluator] = None) -> dict:
    """``{('w', i): {bits: mse}, ('a', j): {bits: mse}}``: the output's squared error against float, less the
    model's own at its widths, with layer i's weights (rounded by ``rounding``: 'gptq' on the Hessian of its
    input in the widest model, or 'nearest') or activation variable j (calibrated as quantize does) alone at
    ``bits``."""
    ev = evaluator or _Evaluator(gm, layers, acts, batches, rounding)
    base = ev.error()
    if ev.rounding == "gptq":
        ev.top_hessians()
    out = {}
    jobs = [("w", i, b) for i in range(len(layers)) for b in w_widths]
    jobs += [("a", j, b) for j in range(len(acts)) for b in a_widths]
    for kind, i, bits in _progress(jobs, progress, "mixed precision: sensitivity"):
        if kind == "w":
            q = layers[i].module.weight_quant
            if bits == q.bit_width:
                out.setdefault((kind, i), {})[bits] = 0.0
                continue
            with _trial(gm, layers[i:i + 1], []):
                set_weight_bits(q, bits, q.scale_stat)
                if ev.rounding == "gptq":
                    ev.round_one(i)
                out.setdefault((kind, i), {})[bits] = max(0.0, ev.error() - base)
        else:
            members = acts[i]
            if bits == members[0].bit_width:
                out.setdefault((kind, i), {})[bits] = 0.0
                continue
            with _kept(members):
                ev.set_act(i, bits)
                out.setdefault((kind, i), {})[bits] = max(0.0, ev.error() - base)
    return out


# -- allocation ----------------------------------------------------------------------------------------------


def _combos(layer, w_widths, a_widths, fixed_a, fixed_b, reads_out):
    """The (w, a, b) width combinations of one layer: a from its activation variable or fixed, b likewise
    where a cost reads the output width (else None)."""
    a_opts = a_widths if layer.act is not None else [fixed_a]
    b_opts = (a_widths if layer.out is not None else [fixed_b]) if reads_out else [None]
    return [(w, a, b) for w in w_widths for a in a_opts for b in b_opts]


def allocate(layers, acts, sens, w_widths, a_widths, limits: dict, fixed: list, force: Optional[dict] = None
             ) -> Optional[tuple]:
    """Solve the integer program; returns (weight bits per layer, bits per activation variable, summed
    sensitivity), or None where nothing fits. ``fixed[i]`` = (input bits, output bits) of layer i where they
    are not variables; ``force`` {('w', i) or ('a', j): (lowest, highest) bits} narrows a variable's widths."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # scipy loads slowly; only budgets need it
    reads_out = any(k in READS_OUTPUT for k in limits)
    combos = [_combos(l, w_widths, a_widths, fixed[i][0], fixed[i][1], reads_out) for i, l in enumerate(layers)]
    n_z = sum(len(c) for c in combos)
    n = n_z + len(acts) * len(a_widths)
    y0 = n_z  # index of y[j, a] = y0 + j * len(a_widths) + a_index
    c = np.zeros(n)
    rows, lo, hi = [], [], []

    def row():
        r = np.zeros(n)
        rows.append(r)
        return r

    k = 0
    for i, (layer, opts) in enumerate(zip(layers, combos)):
        r = row()
        lo.append(1), hi.append(1)
        for t, (w, a, b) in enumerate(opts):
            c[k + t] = sens[("w", i)][w]
            r[k + t] = 1
        for var, pos in ((layer.act, 1), (layer.out, 2) if reads_out else (None, 2)):
            if var is None:
                continue
            for ai, a in enumerate(a_widths):  # the layer's combos with this width = the variable's choice
                r = row()
                lo.append(0), hi.append(0)
                for t, combo in enumerate(opts):
                    if combo[pos] == a:
                        r[k + t] = 1
                r[y0 + var * len(a_widths) + ai] = -1
        k += len(opts)
    for j in range(len(acts)):
        r = row()
        lo.append(1), hi.append(1)
        for ai, a in enumerate(a_widths):
            r[y0 + j * len(a_widths) + ai] = 1
            c[y0 + j * len(a_widths) + ai] = sens[("a", j)][a]
    for key, limit in limits.items():
        r = row()
        lo.append(-np.inf), hi.append(limit)
        k = 0
        for layer, opts in zip(layers, combos):
            for t, (w, a, b) in enumerate(opts):
                r[k + t] = COSTS[key](layer.shape, w, a, b)
            k += len(opts)
    upper = np.ones(n)
    for (kind, v), (low, high) in (force or {}).items():
        if kind == "w":
            k = sum(len(o) for o in combos[:v])
            for t, (w, a, b) in enumerate(combos[v]):
                if not low <= w <= high:
                    upper[k + t] = 0
        else:
            for ai, a in enumerate(a_widths):
                if not low <= a <= high:
                    upper[y0 + v * len(a_widths) + ai] = 0
    scale = max(float(np.abs(c).max()), 1e-30)  # HiGHS's tolerances are absolute: an objective of order 1
    res = milp(c / scale, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(n),
               bounds=Bounds(0, upper))
    if res.x is None:
        return None
    x = np.round(res.x).astype(int)
    weights, k = [], 0
    for opts in combos:
        t = int(np.argmax(x[k:k + len(opts)]))
        weights.append(opts[t][0])
        k += len(opts)
    act_bits = [a_widths[int(np.argmax(x[y0 + j * len(a_widths):y0 + (j + 1) * len(a_widths)]))]
                for j in range(len(acts))]
    return weights, act_bits, float(res.fun) * scale


def _cost(key, layers, w_bits, a_bits, b_bits) -> float:
    return sum(COSTS[key](l.shape, w, a, b) for l, w, a, b in zip(layers, w_bits, a_bits, b_bits))


def _uniform(layers, acts, sens, w_widths, a_widths, limits, keep: set, top: int):
    """(weight bits, activation bits, summed sensitivity) of the one-width-everywhere assignment (a weight and an
    activation width; the activation variables in ``keep``, the model's inputs, at ``top`` as ``act_bit_width``
    leaves them) that fits every limit with the least summed sensitivity, or None."""
    best = None
    for w in w_widths:
        for a in a_widths:
            w_bits = [w] * len(layers)
            act_bits = [top if j in keep else a for j in range(len(acts))]
            a_of = [act_bits[l.act] if l.act is not None else l.fixed[0] for l in layers]
            b_of = [act_bits[l.out] if l.out is not None else l.fixed[1] for l in layers]
            if any(_cost(k, layers, w_bits, a_of, b_of) > limit for k, limit in limits.items()):
                continue
            total = sum(sens[("w", i)][w] for i in range(len(layers))) + \
                sum(sens[("a", j)][b] for j, b in enumerate(act_bits))
            if best is None or total < best[2]:
                best = (w_bits, act_bits, total)
    return best


def _neighbours(layers, acts, sens, w_widths, a_widths, limits, fixed, w_bits, act_bits) -> list:
    """The integer program's best assignments with one variable forced at least a width up, or at least a width
    down, from ``w_bits`` / ``act_bits`` (the others free to pay for it): the moves of the refinement."""
    out = []
    variables = [("w", i, b, w_widths) for i, b in enumerate(w_bits)] + \
        [("a", j, b, a_widths) for j, b in enumerate(act_bits)]
    for kind, v, now, widths in variables:
        k = widths.index(now)
        moves = ([(widths[k + 1], widths[-1])] if k + 1 < len(widths) else []) + \
            ([(widths[0], widths[k - 1])] if k > 0 else [])
        for low_high in moves:
            solved = allocate(layers, acts, sens, w_widths, a_widths, limits, fixed, {(kind, v): low_high})
            if solved is not None:
                out.append((tuple(solved[0]), tuple(solved[1]), solved[2]))
    return out


def model_cost(qmodel: fx.GraphModule, key: str) -> float:
    """The cost ``key`` (a budget key) of a compiled model at its widths, e.g. ``model_cost(q, 'bops')``."""
    parse_budget({key: 1})
    layers, _ = _model_layers(qmodel, True)
    return _cost(key, layers, [l.module.weight_quant.bit_width for l in layers], [l.fixed[0] for l in layers],
                 [l.fixed[1] for l in layers])


def _reads_input(gm, members) -> bool:
    """Whether an activation variable quantizes a model input (a placeholder)."""
    ids = {id(q) for q in members}
    return any(n.op == "call_module" and id(gm.get_submodule(n.target)) in ids and n.args and
               isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder" for n in gm.graph.nodes)


def choose_widths(qmodel: fx.GraphModule, data: Iterable, budget, *, widths: Optional[Iterable[int]] = None,
                  progress: bool = True, max_batches: Optional[int] = None, rounding: str = "gptq",
                  refine: int = REFINE_ROUNDS) -> Choice:
    """Choose and set the widths of a calibrated compiled model under ``budget`` (see the module docstring);
    the model's own widths are the widest candidates. Recalibrate the model afterwards (quantize does).
    ``rounding``: the weight rounding the model will get ('nearest' | 'gptq' | 'learned' | 'auto'); the search
    measures with GPTQ for all but 'nearest' (learned rounding is too slow to run per candidate; GPTQ is its
    stand-in). ``refine``: rounds of whole-model refinement after the integer program (0: none).
    Raises QuantArgumentError for an unknown budget key, or a budget no candidate widths meet (naming the
    smallest reachable cost)."""
    limits_in = parse_budget(budget)
    profile = getattr(qmodel, "profile", None)
    layers, acts = _model_layers(qmodel, any(k in READS_OUTPUT for k in limits_in))
    if not layers:
        raise QuantArgumentError("budget: the model has no quantized conv/linear layer whose width could change")
    w_top = max(l.module.weight_quant.bit_width for l in layers)
    a_top = max([m[0].bit_width for m in acts] or [REFERENCE_BITS])
    w_range = getattr(profile, "weight_bit_range", (2, 8))
    a_range = getattr(profile, "act_bit_range", (2, 8))
    cands = tuple(widths) if widths is not None else WIDTHS
    w_widths = sorted({b for b in cands if max(2, w_range[0]) <= b <= min(w_top, w_range[1])} | {w_top})
    a_widths = sorted({b for b in cands if max(2, a_range[0]) <= b <= min(a_top, a_range[1])} | {a_top})
    fixed = [l.fixed for l in layers]
    eight = [REFERENCE_BITS] * len(layers)
    ref = {k: _cost(k, layers, eight, eight, [None if l.fixed[1] is None else REFERENCE_BITS for l in layers])
           for k in limits_in}
    limits = {k: v * ref[k] if v <= 1 else v for k, v in limits_in.items()}
    samples, batches = 0, []
    for i, b in enumerate(data):
        if (max_batches is not None and i >= max_batches) or samples >= SAMPLES:
            break
        batches.append(b)
        samples += len(_as_args(b, _n_inputs(qmodel))[0])
    ev = _Evaluator(qmodel, layers, acts, batches, "nearest" if rounding == "nearest" else "gptq")
    was_training = qmodel.training
    qmodel.eval()
    try:
        with exact_arithmetic(False):  # the plain fake-quant path: widths change in place
            sens = sensitivities(qmodel, layers, acts, w_widths, a_widths, batches, progress, evaluator=ev)
            solved = allocate(layers, acts, sens, w_widths, a_widths, limits, fixed)
            if solved is None:
                low = [min(w_widths)] * len(layers)
                a_low = [min(a_widths) if l.act is not None else f[0] for l, f in zip(layers, fixed)]
                b_low = [min(a_widths) if l.out is not None else f[1] for l, f in zip(layers, fixed)]
                least = {k: _cost(k, layers, low, a_low, b_low) for k in limits}
                raise QuantArgumentError(
                    "budget: no widths meet " + ", ".join(f"{k} <= {limits[k]:.4g}" for k in limits) +
                    f"; the narrowest (W{min(w_widths)}A{min(a_widths)}) cost " +
                    ", ".join(f"{k} {least[k]:.4g}" for k in least) + " (raise the budget, or allow narrower widths)")
            # the summed sensitivities ignore how layers' errors interact: the integer program's choice, the best
            # uniform widths that fit (so the search never loses to them on this data) and, for ``refine`` rounds,
            # the program's best with one width forced up or down from the best so far are measured as whole
            # models (calibrated and rounded as quantize will), and the lowest output error is kept
            keep = {j for j, m in enumerate(acts) if _reads_input(qmodel, m)}
            pool = {(tuple(solved[0]), tuple(solved[1])): (solved[2], "search")}
            for held in (set(), keep):
                uniform = _uniform(layers, acts, sens, w_widths, a_widths, limits, held, a_top)
                if uniform is not None:
                    pool.setdefault((tuple(uniform[0]), tuple(uniform[1])), (uniform[2], "uniform"))
            measured = {key: ev.whole(*key) for key in _progress(list(pool), progress, "mixed precision: models")}
            best = min(measured, key=measured.get)
            for _ in range(refine):
                moves = _neighbours(layers, acts, sens, w_widths, a_widths, limits, fixed, *best)
                fresh = [(w, a) for w, a, _ in moves if (w, a) not in measured]
                for (w, a, predicted) in moves:
                    pool.setdefault((w, a), (predicted, "search, refined"))
                for key in _progress(fresh, progress, "mixed precision: refining"):
                    measured[key] = ev.whole(*key)
                step = min(measured, key=measured.get)
                if step == best:
                    break
                best = step
    finally:
        qmodel.train(was_training)
    w_bits, act_bits = list(best[0]), list(best[1])
    predicted, chosen_by = pool[best]
    if chosen_by == "uniform":
        chosen_by = "uniform (measured better than the search)"
    chosen_by += f"; {ev.measured} whole models measured"
    for l, bits in zip(layers, w_bits):
        set_weight_bits(l.module.weight_quant, bits, l.module.weight_quant.scale_stat)
    for members, bits in zip(acts, act_bits):
        _set_act_bits(members, bits)
    a_of = [act_bits[l.act] if l.act is not None else f[0] for l, f in zip(layers, fixed)]
    b_of = [act_bits[l.out] if l.out is not None else f[1] for l, f in zip(layers, fixed)]
    names = {id(q): n for n, q in qmodel.named_modules() if isinstance(q, Quantizer)}
    choice = Choice({l.shape.name: b for l, b in zip(layers, w_bits)},
                    {names.get(id(m[0]), m[0].qname): b for m, b in zip(acts, act_bits)},
                    {k: _cost(k, layers, w_bits, a_of, b_of) for k in limits}, limits, ref, predicted, chosen_by,
                    {k: dict(v) for k, v in sens.items()}, measured[best])
    if hasattr(qmodel, "notes"):
        qmodel.notes[NOTE] = choice.lines()
    return choice


__all__ = ["choose_widths", "model_cost", "register_cost", "parse_budget", "COSTS", "LayerShape", "Choice"]
