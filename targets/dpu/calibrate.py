"""Fix positions chosen on calibration data: AMD Quark's MinMSE proposes, the network's output decides.

Quark's ``PowerOfTwoMethod.MinMSE`` (``quark/onnx/quantization/quant_utils.py``, ``quantize_data``, amd-quark 0.13)
starts from the position of the max, ``round(-log2(absmax / 127))``, tries the ``pos_range = 5`` positions
``pos - 1 .. pos + 3`` and keeps the one whose quantize-dequantize error over the calibration data is smallest.
:func:`local_positions` does just that for every weight (on the tensor) and every activation quantizer (on the
float activations of ``data``, as Quark's calibration collects them from the float model).

Alone, that lost output SQNR on 3 of the 8 test-zoo models against max-based positions: a tensor's own squared
error is not the network's. The refine rules move positions afterwards (a concat or an add aligning its
inputs, a pool held at its input's position), and a position that clips a little on one tensor can cost more
downstream than it saves there. :func:`calibrate_positions`, the dpu default (``quantize(model, 'dpu',
calibration_data=...)``, calibration_method 'auto' or 'mse'; 'minmax' keeps the max's positions), therefore
keeps each MinMSE proposal that differs from the max-based position only if it lowers the squared error of the
network's output against float over the calibration data, with the choices made so far in place and the DPU
compiler's rules (:func:`targets.dpu.positions.refine`) applied to the positions being judged: per differing
proposal, a forward of the graph from the first node the moved positions reach (the earlier nodes' values are
kept from the accepted positions), stopped once its error reaches the best. The choice stays a power of two;
the refine (which calibration runs next) reports its changes as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import Interpreter

from quantfx.calibration import _as_args, _n_inputs, _run_batches, quantizers
from quantfx.weight_rounding import float_view
from quantfx.pipelines import annotate
from quantfx.quant_tensor import value_of

from .positions import Rules, fix_pos, set_pos

POS_RANGE = 5  # Quark's default: positions pos - 1 .. pos + 3


@dataclass
class PositionChoice:
    quantizer: str
    max_position: int  # round(-log2(absmax / qmax))
    chosen: int


def _candidates(absmax: float, qmax: int) -> list[int]:
    p = round(-math.log2(max(absmax, 1e-30) / qmax))
    return [p - 1 + i for i in range(POS_RANGE)]


def _sq_errors(x: torch.Tensor, positions: list[int], q) -> list[float]:
    """The squared quantize-dequantize error of ``x`` at each fix position: the values
    ``quant.functional.fake_quant`` gives (a power-of-two scale divides exactly), in place in one buffer."""
    lo, hi = q.int_range()
    x = x.detach()
    buf = torch.empty_like(x)
    out = []
    for pos in positions:
        torch.mul(x, 2.0 ** pos, out=buf)
        if q.rounding == "half_even":
            buf.round_()
        elif q.rounding == "half_up":
            buf.add_(0.5).floor_()
        else:
            buf.floor_()
        buf.clamp_(lo, hi).mul_(2.0 ** -pos).sub_(x)
        out.append(float(buf.double().pow_(2).sum()))
    return out


def local_positions(qmodel, data, max_batches: int | None = None) -> list[PositionChoice]:
    """Choose and fix the min-MSE position of every per-tensor power-of-two weight and activation quantizer of
    ``qmodel`` (calibrated first, for each activation's max) on ``data``, each on its own tensor (Quark's MinMSE
    as it is); returns the choices."""
    choices = []
    for q, c, _ in _proposals(qmodel, data, max_batches):
        if q.kind == "act" and q.scale_group is not None:
            continue  # the members of a scale group keep their shared (max-based) scale
        set_pos(q, c.chosen)
        choices.append(c)
    annotate(qmodel)
    return choices


def _proposals(qmodel, data, max_batches):
    """(quantizer, PositionChoice, its position now) of every searched quantizer: min-MSE over the candidates on
    its own tensor (weights) or on its float activations over ``data``. Sets nothing."""
    choices = []
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            layer_w = getattr(m, "weight_quant", None)
            if layer_w is None or not layer_w.is_quant_enabled or layer_w.scale_type != "po2" or \
                    layer_w.scaling_per_output_channel:
                continue
            w = m.weight.detach()
            cands = _candidates(float(w.abs().max()), layer_w.int_range()[1])
            errs = _sq_errors(w, cands, layer_w)
            best = cands[min(range(POS_RANGE), key=errs.__getitem__)]
            choices.append((layer_w, PositionChoice(f"{name}.weight_quant", cands[1], best),
                            fix_pos(layer_w.scale(w))))
    acts = [q for q in quantizers(qmodel, "act") if q.scale_type == "po2" and not q.scaling_per_output_channel
            and q.fixed_scale is None and bool(q.calibrated)]
    errors = {}
    cands = {}
    for q in acts:
        top = float(q.stat.abs().max())
        cands[id(q)] = _candidates(top, q.int_range()[1])
        errors[id(q)] = [0.0] * POS_RANGE

    def observer(q):
        def observe(x):  # stands in for Quantizer.observe while calibrating: the float activation
            for k, e in enumerate(_sq_errors(x.detach().float(), cands[id(q)], q)):
                errors[id(q)][k] += e
        return observe

    every = quantizers(qmodel)
    searched = {id(q) for q in acts}
    for q in every:  # the others (a fixed scale, a pool the refine pinned to its input) pass values through
        if q.kind == "act":
            q.observe = observer(q) if id(q) in searched else (lambda x: None)
    for q in every:
        q.calibrating = True
    try:
        _run_batches(qmodel, data, False, "min-MSE positions", max_batches)
    finally:
        for q in every:
            if q.kind == "act":
                del q.observe
        for q in every:
            q.calibrating = False
    for q in acts:
        k = min(range(POS_RANGE), key=lambda j: errors[id(q)][j])
        choices.append((q, PositionChoice(q.qname or "act", cands[id(q)][1], cands[id(q)][k]), fix_pos(q.scale())))
    return choices


_UNSET = object()


def _snapshot(qs) -> list:
    return [(q, q.fixed_scale, q.spec_fields.get("fixed_scale", _UNSET)) for q in qs]


def _restore(snap) -> None:
    for q, fixed, field in snap:
        q.fixed_scale = fixed
        if field is _UNSET:
            q.spec_fields.pop("fixed_scale", None)
        else:
            q.spec_fields["fixed_scale"] = field


def _flat(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return torch.cat([_flat(o) for o in out])
    if isinstance(out, dict):
        return torch.cat([_flat(out[k]) for k in sorted(out)])
    return value_of(out).detach().double().reshape(-1)


JUDGE_SAMPLES = 16  # calibration samples the output error is judged on (one forward of them per proposal)


def _first_samples(batches: list[tuple], n: int) -> list[tuple]:
    """The first ``n`` samples of ``batches`` (tuples of input tensors, batch first), the last batch cut."""
    out, left = [], n
    for args in batches:
        if left <= 0:
            break
        size = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), 1)
        if size > left:
            args = tuple(a[:left] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)
        out.append(args)
        left -= min(size, left)
    return out


class _OutputError:
    """The squared error of the model's output against its float output (:func:`float_view`) over the first
    calibration samples, with the DPU compiler's rules applied to the positions being tried
    (refine moves positions after the search, so a position is judged as the DPU will get it).

    Every node's value of the last accepted positions is kept, so a trial recomputes only the graph from the
    first node that reads a quantizer whose position differs from the accepted ones (after the rules): a
    proposal late in the graph costs a forward of its tail, not of the network. Same values, bit for bit, as a
    forward of the whole model. :meth:`accept` makes the last trial's positions the accepted ones."""

    def __init__(self, qmodel, data, max_batches):
        self.qmodel = qmodel
        n_in = _n_inputs(qmodel)
        self.batches = _first_samples([_as_args(b, n_in) for i, b in enumerate(data)
                                       if max_batches is None or i < max_batches], JUDGE_SAMPLES)
        self.every = quantizers(qmodel)
        with torch.no_grad(), float_view(qmodel):
            self.refs = [_flat(qmodel(*args)) for args in self.batches]
        annotate(qmodel)
        self.rules = Rules(qmodel)
        self.nodes = list(qmodel.graph.nodes)
        self.first_reader = {}  # id(quantizer) -> index of the first node whose module holds it
        for k, node in enumerate(self.nodes):
            if node.op == "call_module":
                for m in qmodel.get_submodule(node.target).modules():
                    self.first_reader.setdefault(id(m), k)
        self.accepted = None  # (fixed scales after the rules, node values per batch, error)
        self._trial = None

    def __call__(self, bound: float = math.inf) -> float:
        """The error of the positions now; where the batches judged so far already reach ``bound`` the rest are
        not run (the sum only grows) and that partial sum is returned."""
        snap = _snapshot(self.every)
        try:
            self.rules()
            state = [q.fixed_scale for q in self.every]
            if self.accepted is None:
                start = 0
            else:
                moved = [q for q, now, then in zip(self.every, state, self.accepted[0]) if now != then]
                if not moved:
                    self._trial = self.accepted
                    return self.accepted[2]
                start = min(self.first_reader.get(id(q), 0) for q in moved)
            envs, err = [], 0.0
            with torch.no_grad():
                for j, (args, ref) in enumerate(zip(self.batches, self.refs)):
                    run = Interpreter(self.qmodel, garbage_collect_values=False)
                    prefix = {n: self.accepted[1][j][n] for n in self.nodes[:start]} if start else None
                    out = run.run(*args, initial_env=prefix)
                    envs.append(run.env)
                    err += float((_flat(out) - ref).pow(2).sum())
                    if err >= bound:
                        self._trial = None
                        return err
            self._trial = (state, envs, err)
            return err
        finally:
            _restore(snap)

    def accept(self) -> None:
        self.accepted = self._trial


def calibrate_positions(qmodel, data, max_batches: int | None = None) -> list[PositionChoice]:
    """Choose and fix the fix position of every per-tensor power-of-two weight and activation quantizer of a
    max-calibrated ``qmodel`` on ``data``: Quark's MinMSE proposes a position per tensor
    (:func:`local_positions`), and each proposal that differs from the max's position is kept only where it
    lowers the network output's squared error against float over the first :data:`JUDGE_SAMPLES` samples of
    ``data`` (per proposal, a forward of the graph after the first quantizer it moves: :class:`_OutputError`),
    judged in graph order with the earlier choices in place and the DPU compiler's rules (refine) applied.
    Per-tensor MSE alone ignores the refine rules that move positions afterwards (a concat or an add aligning
    its inputs, a pool held at its input's position) and the error the choice passes downstream: on the test zoo it lost output SQNR on 3 of 8
    models, this search on none (BENCHMARKS.md). Returns the kept choices (a rejected proposal is listed with
    ``chosen == max_position``)."""
    measure = _OutputError(qmodel, data, max_batches)
    proposals = _proposals(qmodel, data, max_batches)
    pinned = _pin_scales(qmodel)
    try:
        choices = _greedy(measure, proposals)
    finally:
        for q, scale in pinned:  # unpinned where no choice fixed it (set_pos records it in spec_fields)
            if q.fixed_scale == scale and q.spec_fields.get("fixed_scale") is None:
                q.fixed_scale = None
    annotate(qmodel)
    return choices


def _pin_scales(qmodel) -> list:
    """Fix every activation quantizer's scale at the value its statistics give, for the search's forwards: the
    same values, without recomputing the scale from the statistics at each call. Returns (quantizer, scale)."""
    pinned = []
    with torch.no_grad():
        for q in quantizers(qmodel, "act"):
            if q.fixed_scale is None and q.scale_type == "po2" and q.zero_point_type == "symmetric" and \
                    bool(q.calibrated) and not q.learned_scale and q.scale().numel() == 1:
                q.fixed_scale = float(q.scale())
                pinned.append((q, q.fixed_scale))
    return pinned


def _greedy(measure, proposals) -> list[PositionChoice]:
    best = measure()
    measure.accept()
    choices = []
    for q, c, now in proposals:
        if c.chosen == now:
            choices.append(c)
            continue
        members = q.scale_group.members if getattr(q, "scale_group", None) is not None else [q]
        before = _snapshot(members)
        set_pos(q, c.chosen)
        err = measure(bound=best)
        if err < best:
            best = err
            measure.accept()
            choices.append(c)
        else:
            _restore(before)
            choices.append(PositionChoice(c.quantizer, c.max_position, now))
    return choices


__all__ = ["calibrate_positions", "local_positions", "PositionChoice", "POS_RANGE"]
