"""Weight rounding learned on calibration data (AdaRound: Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020).

Each weight integer is the floor of ``w / s`` plus a learned 0 or 1, so it lies at most one step from the nearest
integer. Layer by layer, in graph order, the choice minimises the error of the layer's output (through the
activation that reads it) against the float model's, on the inputs the quantized model gives the layer with
the layers before it already rounded ("asymmetric reconstruction", the paper's section 5). The result is
written into the weights themselves (every weight on its grid, ``s x q``) and the weight scale is frozen
(:meth:`quantfx.quant.Quantizer.freeze_weight_scale`), so every backend exports exactly these integers.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import fx, nn

from .calibration import StopForward, _as_args, _n_inputs, _progress, _run_batches
from .errors import QuantArgumentError
from .nn import QuantWBIOL
from .quant import Quantizer
from .quant import functional as qf
from .quant.quantizer import _distributed

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper eq. 23)
NOTE = "weight_rounding"  # qmodel.notes key: one record per rounded layer
DEFAULT_ITERATIONS = 1000  # Adam steps per layer when quantize/calibrate learn the rounding
STEP_POSITIONS = 2048  # output positions (samples x spatial window) one Adam step of a convolution sees at most
WINDOW = 16  # a convolution's step sees a random window of at most this many outputs along each spatial axis
STEP_MACS = 2 ** 27  # multiply-accumulates of one step's forward at most (fewer samples for wide layers)
# Adam steps x rounding variables of one layer at most: a step's element-wise work grows with the weight count,
# so the larger layers (a ResNet's 128-channel 3x3 and up: 147 k weights and more) take fewer steps, never under
# MIN_ITERATIONS; every layer of up to 67 k weights (every digits and test-zoo layer: 48 k at most) keeps all its
# iterations. 2^26 (was 2^28) brought the ResNet-18 shape's W4A4 under 2 minutes on 2 cores (BENCHMARKS.md)
WEIGHT_STEPS = 2 ** 26
MIN_ITERATIONS = 200


@dataclass
class RoundedLayer:
    """What learned rounding did to one layer."""
    name: str
    bits: int
    changed: int  # weight integers that differ from round-to-nearest
    total: int
    mse_nearest: float  # output error on the calibration data before ...
    mse_learned: float  # ... and after

    def __str__(self):
        return (f"{self.name}: {self.bits}-bit, {self.changed}/{self.total} integers off nearest, output MSE "
                f"{self.mse_nearest:.3g} -> {self.mse_learned:.3g}")


@contextlib.contextmanager
def float_view(model: nn.Module):
    """Within the block every quantizer of ``model`` is off and every layer whose weights learned rounding
    replaced has its float weights back (``float_weight``): the compiled model computes its float original."""
    qs = [m for m in model.modules() if isinstance(m, Quantizer) and m.is_quant_enabled]
    swapped = [(m, m.weight.data) for m in model.modules()
               if isinstance(m, QuantWBIOL) and getattr(m, "float_weight", None) is not None]
    for q in qs:
        q.is_quant_enabled = False
    for m, _ in swapped:
        m.weight.data = m.float_weight
    try:
        yield model
    finally:
        for q in qs:
            q.is_quant_enabled = True
        for m, rounded in swapped:
            m.weight.data = rounded


def _capture(model, layer, batches, quantized_input: bool) -> list[torch.Tensor]:
    """The input ``layer`` computes with, per batch: as quantized by its input quantizer (or the upstream
    quantizer the graph passes), or the plain value in a float view."""
    got = []

    def hook(mod, args, kwargs):
        x, src = args[0], kwargs.get("input_quantizer", args[1] if len(args) > 1 else None)
        got.append(mod._quant_input(x, src if quantized_input else None)[0].detach())
        raise StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run_batches(model, batches, False, "learning weight rounding", None)
    finally:
        handle.remove()
    return got


def _layer_inputs(qmodel: nn.Module, layers: list, batches: list):
    """Yield ``(name, layer, x_float, x_quant)`` per layer of ``layers`` in order: the layer's input over every
    batch in a float view and as the quantized model computes it, the layers yielded before already rounded
    (the caller rounds each before asking for the next). A graph module is run once, node by node, every batch
    in lockstep (:class:`_Lockstep`), instead of once per layer up to that layer; another module is run up to
    each layer twice (:func:`_capture`). Under torch.distributed each rank runs its own batches and the inputs
    are gathered from every rank (:func:`_all_ranks`)."""
    if not isinstance(qmodel, fx.GraphModule):
        for name, layer in layers:
            with float_view(qmodel):
                x_float = _all_ranks(_capture(qmodel, layer, batches, quantized_input=False))
            yield name, layer, x_float, _all_ranks(_capture(qmodel, layer, batches, quantized_input=True))
        return
    float_run, quant_run = _Lockstep(qmodel, batches), _Lockstep(qmodel, batches)
    wanted = {layer: name for name, layer in layers}
    for node in qmodel.graph.nodes:
        layer = qmodel.get_submodule(node.target) if node.op == "call_module" else None
        if layer in wanted:  # its first call: the one _capture sees
            name = wanted.pop(layer)
            with float_view(qmodel):
                x_float = float_run.layer_input(node, layer, quantized=False)
            yield name, layer, x_float, quant_run.layer_input(node, layer, quantized=True)
        if not wanted:
            return
        with float_view(qmodel):
            float_run.step(node)
        quant_run.step(node)


class _Lockstep:
    """One run of a graph module per batch, advanced one node at a time (torch.fx.Interpreter's node
    semantics; a value is dropped after its last user)."""

    def __init__(self, gm: fx.GraphModule, batches: list):
        n_in = _n_inputs(gm)
        self.runs = []
        for batch in batches:
            run = fx.Interpreter(gm, garbage_collect_values=False)
            run.env, run.args_iter = {}, iter(_as_args(batch, n_in))
            self.runs.append(run)
        self.last_use = {}
        for node in gm.graph.nodes:
            for used in node.all_input_nodes:
                self.last_use[used] = node

    def step(self, node) -> None:
        if node.op == "output":
            return
        with torch.no_grad():
            for run in self.runs:
                run.env[node] = run.run_node(node)
                for used in node.all_input_nodes:
                    if self.last_use.get(used) is node:
                        del run.env[used]

    def layer_input(self, node, layer, quantized: bool) -> torch.Tensor:
        """The input ``layer`` computes with at ``node`` over every batch (see :func:`_capture`)."""
        got = []
        with torch.no_grad():
            for run in self.runs:
                args, kwargs = run.fetch_args_kwargs_from_env(node)
                src = kwargs.get("input_quantizer", args[1] if len(args) > 1 else None)
                got.append(layer._quant_input(args[0], src if quantized else None)[0].detach())
        return _all_ranks(got)


def _all_ranks(per_batch: list) -> torch.Tensor:
    """The per-batch tensors of this process concatenated; under torch.distributed, every rank's, in the order
    of one process's data (rank r's i-th batch is batch i x world + r: rank r holds data[r::world]), so that
    every rank learns the same rounding, the rounding one process learns on all the data."""
    dist = _distributed()
    if dist is None:
        return torch.cat(per_batch)
    world = dist.get_world_size()
    every = [None] * world
    dist.all_gather_object(every, per_batch)
    return torch.cat([part[i] for i in range(max(map(len, every))) for part in every if i < len(part)])


def _after(gm: fx.GraphModule, node) -> Optional[callable]:
    """The float function the layer's output goes through before anything else reads it (its activation
    module, in a float view), or None (the identity): the reconstruction error is measured after it."""
    if node is None or len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or user.args[0] is not node:
        return None
    fn = getattr(gm.get_submodule(user.target), "act_fn", None)
    return fn if callable(fn) else None


def _layers(qmodel: nn.Module, max_bits: int):
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantWBIOL) and m.weight_quant.is_quant_enabled and \
                1 < m.weight_quant.bit_width <= max_bits and m.weight_quant.fixed_scale is None:
            yield name, m


def _batches(data, max_batches: Optional[int], who: str) -> list:
    """The first ``max_batches`` batches of ``data`` as a list; QuantArgumentError naming ``who`` if none."""
    batches = [b for i, b in enumerate(data) if max_batches is None or i < max_batches]
    if not batches:
        raise QuantArgumentError(f"{who}: the calibration data is empty; give at least one batch")
    return batches


def adaround(qmodel: nn.Module, data: Iterable, *, iterations: Optional[int] = None, batch_size: int = 32,
             lr: float = 1e-2, reg: float = 0.01, max_bits: int = 8, seed: int = 0, progress: bool = True,
             max_batches: Optional[int] = None) -> list[RoundedLayer]:
    """Learn the rounding of every quantized layer's weights of ``qmodel`` (calibrated; weight bit widths 2 to
    ``max_bits``) on ``data``; ``iterations`` Adam steps per layer (default :data:`DEFAULT_ITERATIONS`; a layer of
    more than :data:`WEIGHT_STEPS` / ``iterations`` weights takes fewer, at least :data:`MIN_ITERATIONS`) on random
    ``batch_size`` samples (on large feature maps, fewer samples and a random output window: :class:`_Steps`).
    Deterministic under ``seed`` (for one torch thread count). Under torch.distributed, rank r holding
    ``data[r::world]``, every rank learns the rounding one process learns on all of ``data``. Returns one
    :class:`RoundedLayer` per layer, also kept in ``qmodel.notes['weight_rounding']``."""
    iterations = DEFAULT_ITERATIONS if iterations is None else iterations
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise QuantArgumentError(f"adaround: iterations={iterations!r}; give at least 1")
    batches = _batches(data, max_batches, "adaround")
    was_training = qmodel.training
    qmodel.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    layers = list(_layers(qmodel, max_bits))
    nodes = {n.target: n for n in qmodel.graph.nodes if n.op == "call_module"} \
        if isinstance(qmodel, fx.GraphModule) else {}
    try:
        for name, layer, x_float, x_quant in _progress(_layer_inputs(qmodel, layers, batches), progress and
                                                       bool(layers), "learning weight rounding"):
            after = _after(qmodel, nodes.get(name))
            out.append(_round_layer(name, layer, x_float, x_quant, after, iterations, batch_size, lr, reg, gen))
    finally:
        qmodel.train(was_training)
    if hasattr(qmodel, "notes"):
        qmodel.notes[NOTE] = [str(r) for r in out]
    return out


class _Steps:
    """The data of one Adam step: random samples and, for a convolution with zero padding, a random window of
    its output (at most :data:`WINDOW` positions per spatial axis), computed exactly from the padded input's
    matching slice. At most ``batch_size`` samples, :data:`STEP_POSITIONS` output positions and
    :data:`STEP_MACS` multiply-accumulates a step, at least one sample: a step of a ResNet stem at 112 x 112 or
    of a 512-channel convolution costs about what a step of a small layer does, while the 8 x 8 maps of a
    small CNN are taken whole, ``batch_size`` samples a step."""

    def __init__(self, layer, x, target, batch_size, gen):
        self.layer, self.target, self.gen, self.n = layer, target, gen, x.shape[0]
        conv = isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed and \
            layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
        self.out_shape = tuple(target.shape[2:]) if conv else ()
        self.window = tuple(min(o, WINDOW) for o in self.out_shape)
        # output positions of one sample in a step (a Linear's rows: its tokens), each costing the weight's size
        positions = math.prod(target.shape[1:-1]) if isinstance(layer, nn.Linear) else \
            math.prod(self.window if conv else target.shape[2:])
        self.samples = max(1, min(batch_size, STEP_POSITIONS // positions,
                                  STEP_MACS // (positions * layer.weight.numel())))
        if conv and self.window != self.out_shape:
            pad = [p for p in reversed(layer.padding) for _ in (0, 1)]
            self.x = nn.functional.pad(x, pad)
            self.conv = getattr(nn.functional, f"conv{len(self.out_shape)}d")
        else:
            self.x, self.conv = x, None

    def _forward(self, x, w, b):
        layer = self.layer
        return self.conv(x, w, b, layer.stride, 0, layer.dilation, layer.groups)

    def __call__(self):
        idx = torch.randint(0, self.n, (min(self.samples, self.n),), generator=self.gen)
        if self.conv is None:
            return self.x[idx], self.target[idx], self.layer.inner_forward
        starts = [int(torch.randint(0, o - c + 1, (1,), generator=self.gen)) for o, c in
                  zip(self.out_shape, self.window)]
        x_slices, out_slices = [], []
        for start, c, k, s, d in zip(starts, self.window, self.layer.kernel_size, self.layer.stride,
                                     self.layer.dilation):
            out_slices.append(slice(start, start + c))
            x_slices.append(slice(start * s, (start + c - 1) * s + d * (k - 1) + 1))
        # the window first (a view), then the samples: only the window is copied, not whole maps
        return self.x[(..., *x_slices)][idx], self.target[(..., *out_slices)][idx], self._forward


def _store(layer, w, rounded, method: str) -> None:
    """Write weights chosen on the grid of float weights ``w`` (``rounded``: every value ``s x q``) into the
    layer: the weight scale frozen at ``w``'s, the float original kept for :func:`float_view`, the quantizer
    marked as rounded by ``method`` ('learned' | 'gptq')."""
    wq = layer.weight_quant
    wq.freeze_weight_scale(w)
    if getattr(layer, "float_weight", None) is None:  # the float original, for float_view (not saved)
        layer.register_buffer("float_weight", w.clone(), persistent=False)
    layer.weight.copy_(rounded)
    wq.rounding_learned = True
    wq.rounding_method = method


def _round_layer(name, layer, x_float, x_quant, after, iterations, batch_size, lr, reg, gen) -> RoundedLayer:
    wq = layer.weight_quant
    original = getattr(layer, "float_weight", None)  # rounded before: start again from the float weights
    w = (layer.weight if original is None else original).detach().clone()
    with torch.no_grad():
        scale, zp = wq.qparams(w)
        s, z = wq.broadcast(scale, zp, w)
        qmin, qmax = wq.int_range()
        base = torch.floor(w / s)
        rest = w / s - base
        nearest = torch.clamp(qf.round_int(w / s, wq.rounding) + z, qmin, qmax)
        bias = None if layer.bias is None else layer.bias.detach()
        f = after or (lambda y: y)
        target = f(layer.inner_forward(x_float, w, bias))

    def weight_of(ints):
        return (ints - z) * s

    def output_mse(weights) -> float:
        with torch.no_grad():
            return float((f(layer.inner_forward(x_quant, weights, bias)) - target).pow(2).mean())

    before = output_mse(weight_of(nearest))
    if not before > 0:  # nearest rounding already reproduces the float output
        return RoundedLayer(name, wq.bit_width, 0, w.numel(), before, before)
    steps = max(min(iterations, MIN_ITERATIONS), min(iterations, WEIGHT_STEPS // w.numel()))
    h = _learn(layer, base, s, z, qmin, qmax, rest, _Steps(layer, x_quant, target, batch_size, gen), f, bias,
               before, steps, lr, reg)
    with torch.no_grad():
        learned = torch.clamp(base + (h >= 0.5).to(w.dtype) + z, qmin, qmax)
        after_mse = output_mse(weight_of(learned))
        if after_mse > before:  # never worse than nearest on the data it saw
            learned = nearest
            after_mse = before
        changed = int((learned != nearest).sum())
        _store(layer, w, weight_of(learned), "learned")
    return RoundedLayer(name, wq.bit_width, changed, learned.numel(), before, after_mse)


def _learn(layer, base, s, z, qmin, qmax, rest, step, f, bias, before, iterations, lr, reg) -> torch.Tensor:
    """AdaRound's optimisation of one layer: ``iterations`` Adam steps on V, where the weight integers are
    ``clamp(base + h(V) + z, qmin, qmax)`` with h the rectified sigmoid (paper eq. 23), started at the fractional
    part ``rest`` of ``w / s``; the loss is the output error on ``step``'s data relative to nearest rounding's
    (``before``: the regulariser then weighs the same at any magnitude) plus, after a fifth of the steps,
    ``reg x mean(1 - |2h - 1|^beta)`` with beta annealed from 20 to 2 (eq. 24). Returns h(V) at the end.

    Only the layer's own forward and backward go through autograd; h, the weights and the gradient of V are
    computed element-wise by hand, in place (a step's element-wise work, not the convolution, is what a wide
    layer's step costs: a third of autograd's)."""
    stretch = ZETA - GAMMA
    v = nn.Parameter(-torch.log(stretch / (rest.clamp(1e-4, 1 - 1e-4) - GAMMA) - 1))
    opt = torch.optim.Adam([v], lr=lr)
    warmup = iterations // 5
    with torch.no_grad():
        s_full = s.expand_as(base)
        lo, hi = qmin - z.expand_as(base), qmax - z.expand_as(base)  # bounds of base + h
        s_base = base * s
        # weights whose integer range base + [0, 1] reaches past qmin or qmax (few: clipped by the scale):
        # clamped there, with the gradient only where base + h stays within the bounds (qf.clamp_ste's rule)
        edge = ((base < lo) | (base + 1 > hi)).nonzero(as_tuple=True)
        base_e, lo_e, hi_e, s_e = base[edge], lo[edge], hi[edge], s_full[edge]
        sig, h, wt = torch.empty_like(base), torch.empty_like(base), torch.empty_like(base)
        gamma, stretch_t = torch.tensor(GAMMA, dtype=base.dtype), torch.tensor(stretch, dtype=base.dtype)
    with torch.enable_grad():  # quantize() may be called under the user's torch.no_grad()
        for it in range(iterations):
            with torch.no_grad():
                torch.sigmoid(v, out=sig)
                torch.addcmul(gamma, sig, stretch_t, out=h).clamp_(0, 1)
                torch.addcmul(s_base, s, h, out=wt)  # (base + h) x s
                q_e = base_e + h[edge]
                wt[edge] = torch.clamp(q_e, lo_e, hi_e) * s_e
            weight = wt.detach().requires_grad_()
            x_step, target_step, forward = step()
            loss = (f(forward(x_step, weight, bias)) - target_step).pow(2).mean() / before
            loss.backward()
            with torch.no_grad():
                grad = weight.grad.mul_(s)  # d loss / d h
                grad[edge] = torch.where((q_e >= lo_e) & (q_e <= hi_e), grad[edge], 0)
                if it >= warmup:
                    beta = 2 + 18 * (1 - (it - warmup) / max(1, iterations - warmup))
                    # d/dh of reg x mean(1 - |2h - 1|^beta) = -reg x 2 beta |2h - 1|^(beta - 1) sign(2h - 1) / n
                    r = torch.mul(h, 2).sub_(1)
                    power = torch.exp(r.abs().log_().mul_(beta - 1)).copysign_(r)
                    grad.add_(power, alpha=-reg * 2 * beta / h.numel())
                # dh/dV = (zeta - gamma) sigmoid (1 - sigmoid) where h is not clamped to 0 or 1
                inside = torch.addcmul(h, h, h, value=-1).sign_()
                grad.mul_(torch.addcmul(sig, sig, sig, value=-1).mul_(stretch).mul_(inside))
            v.grad = grad
            opt.step()
    with torch.no_grad():
        return torch.clamp(torch.sigmoid(v) * stretch + GAMMA, 0, 1)


__all__ = ["adaround", "float_view", "RoundedLayer"]
