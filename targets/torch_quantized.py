"""torch target: a ``torch.fx.GraphModule`` of PyTorch's quantized modules and ops, saved as TorchScript.

This is the one file that uses PyTorch's quantized-tensor API (``torch.ao.nn.quantized``, ``quantized::`` ops,
``quint8`` tensors), which PyTorch has deprecated: a successor API is a change to this file alone.

How each part of the compiled graph runs (``TorchProgram.report`` lists every node):

- conv / linear whose output an identity or ReLU activation quantizer reads: ``torch.ao.nn.quantized`` Conv /
  Linear (``ConvReLU`` / ``LinearReLU`` for a ReLU), weights int8 per channel, the bias as the float
  ``b_int x (input scale x weight scale)`` chosen so that the engine's ``bias / (input scale x weight scale)``
  gives back ``b_int`` exactly. fbgemm then computes ``rne(float(acc + b_int) x m) + zp`` with the float32
  multiplier ``m = s_in x s_w / s_out``: the integers of the profile's ``requant='multiplier'`` fake-quant model.
  Where no float32 bias gives its integer back, fbgemm adds the nearest quotient ``fl(b / (s_in x s_w))``, and
  so does the fake-quant model of ``requant='multiplier_float_bias'`` (the fbgemm and x86 profiles).
  An activation range narrower than the dtype's (7 bits in a quint8: the W8A7 scheme) adds a quantized
  ``clamp``; the default W7A8 scheme uses the whole quint8 range and needs none. On the 'x86' and 'onednn'
  profiles (``exact_requant``) every float32 step of that requantization is exact (power-of-two activation
  scales, even zero points, multipliers on multiples of 2^-15: :func:`exact_requant_problems` checks each
  layer), so oneDNN, which the x86 engine picks on AVX512-VNNI CPUs, and fbgemm, which it picks elsewhere, give
  the same integers; a layer off that grid, and every transposed conv, runs on its exact accumulator instead.
- residual add read by an identity / ReLU quantizer: ``quantized::add`` / ``add_relu``;
- ``cat`` of tensors on one grid (shared quantizer): quantized ``torch.cat``; max pooling, flatten / view /
  reshape / permute / transpose / squeeze / chunk / split / slicing: on the quantized tensors;
- everything else runs in float on dequantized values with the fake-quant model's own float ops (so the
  same float results) and is quantized again by the next activation quantizer exactly as the fake-quant
  model rounds (``round(x / scale) + zp``, clamped; PyTorch's ``quantize_per_tensor`` multiplies by
  ``1 / scale`` instead, which parts from it at ties). The report marks these nodes ``float``.

The artefact is TorchScript (``torch.jit.script`` of the GraphModule): it holds quantized modules, which
``torch.export`` does not take, and loads with plain ``torch.jit.load``. Weights are packed when the file is
loaded, by the quantized engine set at that moment: the file records its engine and ``load`` sets it.
"""
from __future__ import annotations

import contextlib
import warnings
import copy
import json
import math
import operator
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import fx, nn

from quantfx.classify import layer_read_by_add
from quantfx.errors import ExportError, QuantArgumentError, TargetError
from quantfx.graph import float_island, input_quantizer_of, is_add, module_of, op_name, qmeta, tensor_inputs
from quantfx.lowering import Backend, Lowering
from quantfx.pipelines import annotate
from quantfx.quant import functional as qf
from quantfx.nn import (
    QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d, QuantHardTanh, QuantIdentity,
    QuantLinear, QuantReLU, QuantSigmoid, QuantSoftmax,
)
from quantfx.nn.softmax import table_softmax

from .torch_profile import ENGINES, TORCH

META_FILE = "quantfx.json"
F32_EXACT = 2 ** 24

_CONV = {nn.Conv1d: nnq.Conv1d, nn.Conv2d: nnq.Conv2d, nn.Conv3d: nnq.Conv3d,
         nn.ConvTranspose1d: nnq.ConvTranspose1d, nn.ConvTranspose2d: nnq.ConvTranspose2d}
_CONV_RELU = {nn.Conv1d: nniq.ConvReLU1d, nn.Conv2d: nniq.ConvReLU2d, nn.Conv3d: nniq.ConvReLU3d}
_MOVE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
                 "chunk", "split", "t", "expand", "clone", "detach", "reshape_as", "view_as"}
_MOVE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                   torch.chunk, torch.split, torch.t, operator.getitem, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                   torch.max_pool2d}
_MOVE_MODULES = (nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Identity, nn.Dropout, nn.Unflatten)


@contextlib.contextmanager
def quantized_engine(name: str):
    """PyTorch's quantized engine set to ``name`` within the block (weights pack for the engine in force)."""
    if name not in torch.backends.quantized.supported_engines:
        raise QuantArgumentError(f"torch target: engine {name!r} is not in this PyTorch build "
                                 f"(supported: {', '.join(torch.backends.quantized.supported_engines)})")
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


# What PyTorch says each time this form is written or read: the deprecation of quantized tensors and of
# TorchScript, which this module's docstring states once for the user who asks for format='torchscript'.
_DEPRECATIONS = (
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"),
    (FutureWarning, r"`torch\.jit\.(script|save|load)` is deprecated"),
    (UserWarning, r"The TorchScript type system doesn't support instance-level annotations"),
    (UserWarning, r"'torch\.load' received a zip file that looks like a TorchScript archive"),
)


@contextlib.contextmanager
def without_deprecation_warnings():
    """The block without :data:`_DEPRECATIONS`' warnings (any other warning still shows). The quantized-tensor
    one is a C++ warning given once per process; it is given here first, under the filter, so that loading a
    file (where C++ prints it past Python's warnings) does not show it either."""
    with warnings.catch_warnings():
        for category, message in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        torch._empty_affine_quantized([1], scale=1.0, zero_point=0, dtype=torch.quint8)
        yield


# -- functions the lowered graph calls (TorchScript compiles them into the file) -------------------------


@torch.fx.wrap
def quantize_as_fake_quant(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                           signed: bool) -> torch.Tensor:
    """``clamp(round(x / scale) + zp)`` as a quantized tensor: the fake-quant model's rounding (half to even
    of the float32 quotient), where ``quantize_per_tensor`` rounds ``x * (1 / scale)``. The integers ``k`` are
    handed to ``quantize_per_tensor`` as ``fl(k x scale)``, which any of its code paths (``x x fl(1 / scale)``,
    with or without a fused ``+ zp``, or ``x / scale``) rounds back to ``k``: off by at most ``|k| x 2^-22``, and
    ``|k| <= 255``. Two float passes fewer than rounding, shifting and converting the codes here."""
    k = torch.round(x / scale).clamp_(qmin - zero_point, qmax - zero_point).mul_(scale)
    return torch.quantize_per_tensor(k, scale, zero_point, torch.qint8 if signed else torch.quint8)


@torch.fx.wrap
def requantize_accumulator(acc: torch.Tensor, acc_bias: torch.Tensor, bias_quotient: torch.Tensor,
                           multiplier: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                           relu: bool) -> torch.Tensor:
    """An exact integer accumulator (bias integers ``acc_bias`` included) requantized as the fake-quant model's
    ``requant='multiplier'`` / ``'multiplier_float_bias'`` do (and the engine's quantized layers):
    ``rne(fl(fl(acc - b_int) + q) x m) + zp``, clamped, as a quint8 tensor; ``q`` is the bias integer itself, or
    under fbgemm the float32 quotient its float bias gives."""
    t = (acc - acc_bias).float() + bias_quotient
    if relu:
        t = torch.clamp(t, min=0.0)
    v = torch.clamp(t * multiplier, qmin - zero_point, qmax - zero_point)
    q = torch.round(v) + zero_point
    return torch._make_per_tensor_quantized_tensor(q.to(torch.uint8), scale, zero_point)


@torch.fx.wrap
def requantize_accumulator_bias_after(acc: torch.Tensor, acc_bias: torch.Tensor, acc_scale: torch.Tensor,
                                      inv_scale: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                                      relu: bool) -> torch.Tensor:
    """An exact integer accumulator (bias integers ``acc_bias`` included) requantized as the fake-quant model's
    ``requant='float_bias'`` does, and oneDNN's int8 layers: ``rne(fl(fl(fl(acc - b_int) x s_acc) + b) x
    fl(1 / s_out)) + zp)`` in float32 steps, clamped, as a quint8 tensor."""
    t = (acc - acc_bias).float() * acc_scale + acc_bias.float() * acc_scale
    if relu:
        t = torch.clamp(t, min=0.0)
    q = torch.clamp(torch.round(t * inv_scale + float(zero_point)), qmin, qmax)
    return torch._make_per_tensor_quantized_tensor(q.to(torch.uint8), scale, zero_point)


@torch.fx.wrap
def exact_layer_output(acc: torch.Tensor, acc_scale: torch.Tensor) -> torch.Tensor:
    """An exact integer accumulator (float64) times its float32 scale, as the fake-quant model rounds it: one
    float32 product below 2^22, else the float64 product rounded to float32."""
    small = acc.abs().max() < 4194304.0 if acc.numel() > 0 else torch.tensor(True)
    if bool(small):
        return acc.float() * acc_scale
    return (acc * acc_scale.double()).float()


@torch.fx.wrap
def exact_product(a: torch.Tensor, b: torch.Tensor, acc_scale: torch.Tensor, matmul: bool) -> torch.Tensor:
    """The product of two quantized tensors on the accumulator grid, as the fake-quant model's QuantProduct
    computes it: the operands' integers ``q - zp`` multiplied exactly (float64), then ``float32(acc) x s_a s_b``."""
    ia = a.int_repr().double() - float(a.q_zero_point())
    ib = b.int_repr().double() - float(b.q_zero_point())
    acc = torch.matmul(ia, ib) if matmul else ia * ib
    return acc.float() * acc_scale


# -- the artefact --------------------------------------------------------------------------------------


@dataclass
class TorchProgram:
    """The torch artefact: the lowered module (a GraphModule in memory, a ScriptModule once loaded), the
    quantized engine it runs on, and the lowering report (one row per node of the quantized graph)."""

    module: nn.Module
    engine: str
    report: list = field(default_factory=list)
    node_values: dict = field(default_factory=dict)  # quantized-graph node -> lowered node (in-memory only)

    def __call__(self, *inputs):
        with quantized_engine(self.engine), torch.no_grad():
            return self.module(*inputs)

    def fingerprint(self) -> bytes:
        """Bytes that change with anything the program computes: its code, every buffer, and each quantized
        layer's integer weights, scales, bias and output grid (tools/artefact_digests.py hashes them)."""
        parts = [self.engine.encode(), getattr(self.module, "code", "").encode()]
        with quantized_engine(self.engine):
            for name, m in sorted(self.module.named_modules()):
                if hasattr(m, "weight") and callable(m.weight) and hasattr(m, "zero_point"):
                    w = m.weight()
                    bias = m.bias()
                    parts += [name.encode(), w.int_repr().numpy().tobytes(),
                              w.q_per_channel_scales().numpy().tobytes() if w.qscheme() == torch.per_channel_affine
                              else repr(w.q_scale()).encode(), repr((m.scale, m.zero_point)).encode(),
                              b"" if bias is None else bias.detach().numpy().tobytes()]
            for name, b in sorted(self.module.named_buffers()):
                parts += [name.encode(), b.detach().numpy().tobytes()]
        return b"\0".join(parts)

    def fallbacks(self) -> list:
        """Report rows of the nodes that run in float."""
        return [r for r in self.report if r["how"] == "float"]

    def table(self) -> str:
        rows = [("node", "op", "runs as", "why")] + [(r["node"], r["op"], r["runs_as"], r.get("why", ""))
                                                      for r in self.report]
        widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
        return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows)


@dataclass
class _Q:
    """A lowered value: its node in the new graph, and its grid when it is a quantized tensor."""

    node: fx.Node
    scale: Optional[float] = None
    zero_point: int = 0
    signed: bool = False

    @property
    def quantized(self) -> bool:
        return self.scale is not None


@dataclass
class _Deferred:
    """A conv/linear or add node, lowered once its reader is known: fused into the quantized op that the
    activation quantizer after it becomes, or (read by anything else) computed in float."""

    node: fx.Node
    done: Optional[_Q] = None


@dataclass
class _Shape:
    """A node of shape arithmetic, copied as it is."""

    node: fx.Node


_QUANT_LAYERS = (QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d, QuantLinear)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d)


def _qparams(q) -> tuple[float, int]:
    scale, zp = q.qparams(None)
    return float(scale.reshape(())), int(zp.reshape(()).round())


class TorchLowering(Lowering):
    target = "torch"

    def begin(self):
        self.engine = (self.profile or TORCH).options.get("engine", "fbgemm")
        if self.engine not in ENGINES:
            raise QuantArgumentError(f"torch target: engine={self.engine!r}; use one of {', '.join(ENGINES)}")
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.report: list = []
        self.node_values: dict = {}
        self._weights: dict = {}  # id(layer) -> weight_ints(layer)
        self._deferred_why: dict = {}  # add node -> why it was not fused
        self._acc: dict = {}  # layer node -> (exact accumulator node, float32 accumulator scale)
        self._inexact: dict = {}  # layer node -> why its requantization would not be exact in every kernel

    # -- building ------------------------------------------------------------------------------------

    def _attr_name(self, base: str) -> str:
        base = base.replace(".", "_") or "v"
        name, i = base, 1
        while hasattr(self.root, name):
            name, i = f"{base}_{i}", i + 1
        return name

    def add_module(self, base: str, module: nn.Module) -> str:
        name = self._attr_name(base)
        self.root.add_module(name, module)
        return name

    def buffer(self, base: str, value: torch.Tensor) -> fx.Node:
        name = self._attr_name(base)
        self.root.register_buffer(name, value.detach().clone())
        return self.graph.get_attr(name)

    def call(self, fn, *args) -> fx.Node:
        return self.graph.call_function(fn, tuple(args))

    def note(self, node, runs_as: str, how: str = "quantized", why: str = "") -> None:
        row = {"node": node.name, "op": op_name(self.gm, node), "runs_as": runs_as, "how": how}
        if why:
            row["why"] = why
        self.report.append(row)

    # -- values --------------------------------------------------------------------------------------

    def value(self, node: fx.Node) -> _Q:
        """The lowered value of ``node``; a deferred conv/linear or add read here runs in float."""
        v = self.env[node]
        if isinstance(v, _Deferred):
            if v.done is None:
                v.done = self._add_float(v.node) if is_add(v.node) else self._layer_float(v.node)
                self.node_values[v.node.name] = v.done.node.name
            return v.done
        return v

    def as_float(self, arg) -> fx.Node:
        """The float tensor of a lowered value: a quantized one dequantized (``(q - zp) x scale`` in float32,
        as the fake-quant model holds it)."""
        v = self.value(arg)
        return self.graph.call_method("dequantize", (v.node,)) if v.quantized else v.node

    def _arg(self, a, quantized_ok: bool):
        if isinstance(a, fx.Node) and a.op == "placeholder" and self.env.get(a) is None:
            return a.args[0] if a.args else None  # an input fixed at its non-tensor default (passes/trace.py)
        if isinstance(a, fx.Node) and isinstance(self.env.get(a), _Shape):
            return self.env[a].node
        if isinstance(a, fx.Node) and a in self.env:
            v = self.value(a)
            return v.node if (quantized_ok or not v.quantized) else self.as_float(a)
        return a

    def quantize(self, x: fx.Node, q) -> _Q:
        """Float ``x`` onto the grid of quantizer ``q``, rounded as the fake-quant model rounds."""
        scale, zp = _qparams(q)
        lo, hi = q.int_range()
        return _Q(self.call(quantize_as_fake_quant, x, scale, zp, lo, hi, q.signed), scale, zp, q.signed)

    def clamp_to(self, y: _Q, q) -> _Q:
        """A quantized ``clamp`` to the quantizer's integer range where it is narrower than the dtype's (a
        7-bit range in a quint8: the kernels saturate at 255)."""
        lo, hi = q.int_range()
        if (lo, hi) == ((-128, 127) if y.signed else (0, 255)):
            return y
        node = self.call(torch.clamp, y.node, (lo - y.zero_point) * y.scale, (hi - y.zero_point) * y.scale)
        return _Q(node, y.scale, y.zero_point, y.signed)

    # -- the walk ------------------------------------------------------------------------------------

    def lower_node(self, node):
        if node.op in ("call_function", "call_method") and not self.is_tensor(node):
            # shape arithmetic (x.size(1), n // 2): kept as it is, on whichever tensor it reads
            return _Shape(self.graph.node_copy(node, lambda a: self._arg(a, True)))
        out = super().lower_node(node)
        if isinstance(out, _Q) and node.op not in ("placeholder", "output"):
            self.node_values[node.name] = out.node.name
        return out

    def emit_input(self, node):
        return _Q(self.graph.placeholder(node.name))

    def emit_output(self, node, results):
        outs = [self.as_float(r) for r in results]
        self.graph.output(tuple(outs) if isinstance(node.args[0], (list, tuple)) else outs[0])

    def emit_constant(self, node, value):
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"torch: get_attr {node.target} reads a {type(value).__name__}, not a tensor")
        return _Q(self.buffer(node.target, value))

    def emit_compute(self, node):
        return _Deferred(node)

    def emit_add(self, node):
        return _Deferred(node)

    def emit_act(self, node):
        m = module_of(self.gm, node)
        q = m.act_quant
        src = self.env[node.args[0]]
        if isinstance(src, _Deferred) and src.done is None and q.is_quant_enabled:
            fused = self._fused_add(src.node, node, m) if is_add(src.node) else self._fused_layer(src.node, node, m)
            if fused is not None:
                src.done = fused  # later readers of the layer/add (none, when fusable) get the requantized value
                return fused
            if not is_add(src.node) and self._multiplier_requant(src.node, m):
                requantized = self._requantize_in_float(src.node, node, m)
                if requantized is not None:
                    return requantized
        if m.input_quant.is_quant_enabled:
            raise ExportError(f"torch: {node.target} has an input quantizer; compiled graphs put quantizers on "
                              "their own nodes")
        y = self._act_fn(node, m, self.as_float(node.args[0]))
        if not q.is_quant_enabled:
            self.note(node, "float", "float", "its activation quantizer is disabled")
            return _Q(y)
        plain = type(m) is QuantIdentity or (type(m) is QuantReLU and m.max_val is None)
        self.note(node, "quantize", "quantized" if plain else "float",
                  "" if plain else f"{type(m).__name__} in float (no quantized kernel on this grid), then quantized")
        return self.quantize(y, q)

    def _act_fn(self, node, m, x):
        if isinstance(m, QuantReLU):
            return self.call(F.relu, x) if m.max_val is None else self.call(torch.clamp, x, 0.0, float(m.max_val))
        if isinstance(m, QuantHardTanh):
            return self.call(torch.clamp, x, float(m.min_val), float(m.max_val))
        if isinstance(m, QuantSigmoid):
            return self.call(torch.sigmoid, x)
        if type(m) is QuantIdentity:
            return x
        raise ExportError(f"torch: activation {node.target} ({type(m).__name__}) has no lowering")

    # -- conv / linear ---------------------------------------------------------------------------------

    def _fused_layer(self, node, act_node, m) -> Optional[_Q]:
        """The quantized conv/linear module that computes the layer and its activation quantizer, when the
        fake-quant model requantizes the accumulator with one multiplier (what the module does), else None."""
        layer = module_of(self.gm, node)
        if len(node.users) != 1 or not isinstance(layer, _QUANT_LAYERS) or not self._multiplier_requant(node, m):
            return None
        x = self.value(node.args[0])
        if not x.quantized:
            return None
        relu = isinstance(m, QuantReLU)
        exact = (self.profile or TORCH).exact_requant
        if isinstance(layer, _TRANSPOSED) and (relu or layer.weight_quant.scaling_per_output_channel or exact):
            # no ConvTransposeReLU; per-channel transposed weights are not packed by fbgemm; the x86 engine packs
            # per-tensor ones with oneDNN on VNNI CPUs, whose quantized deconvolutions and fbgemm's give other
            # integers on some shapes (a grouped 1x1 one: up to 193 LSB): the exact accumulator instead
            if exact:
                self._inexact[node] = "a transposed convolution, packed by oneDNN or fbgemm by CPU"
            return None
        scale, zp = _qparams(m.act_quant)
        if exact:
            problems = self._exact_requant_problems(node, layer, x, scale, zp)
            if problems:
                self._inexact[node] = "; ".join(problems)
                return None
        # constructing a quantized module packs an empty weight; qnnpack's packing is deferred to the first run,
        # so construct under it and pack the real weight once, with the target's engine
        cheap = "qnnpack" if "qnnpack" in torch.backends.quantized.supported_engines else self.engine
        with quantized_engine(cheap):
            qlayer = self._quantized_module(layer, relu)
        bias, inexact, residual = self._float_bias(layer, node)
        with quantized_engine(self.engine):
            qlayer.set_weight_bias(self._quantized_weight(layer), bias)
        qlayer.scale, qlayer.zero_point = scale, zp
        name = self.add_module(node.target, qlayer)
        why = [self._accumulator_note(node, layer, x)]
        if inexact:
            modelled = (self.profile or TORCH).requant == "multiplier_float_bias"
            why.append(f"{inexact} bias integer(s) have no exact float32 form: the engine adds them off by up to "
                       f"{residual:.2g} of an accumulator step, " + (
                           "as the fake-quant model does (requant='multiplier_float_bias')" if modelled else
                           "which moves an output by 1 only next to a rounding tie"))
        self.note(node, type(qlayer).__name__, why="; ".join(w for w in why if w))
        self.note(act_node, f"requantized by {name}")
        return self.relu6_cap(self.clamp_to(_Q(self.graph.call_module(name, (x.node,)), scale, zp, False),
                                            m.act_quant), m)

    def _exact_requant_problems(self, node, layer, x: _Q, scale: float, zp: int) -> list[str]:
        _, w_scale = self.weight_ints(layer)
        pos, neg = self._channel_sums(layer)
        worst = torch.maximum(pos, neg) * self._x_bound(node, x)  # the largest |acc| any input codes give
        b_int = torch.zeros_like(worst) if layer.bias is None else \
            self.bias_ints(layer, self.input_scale(node))[0].reshape(-1).double()
        s_w = w_scale.reshape(-1).float().expand(worst.shape)
        return exact_requant_problems(float(self.input_scale(node)), s_w.numpy(), scale, zp, b_int.numpy(),
                                      worst.numpy())

    def _channel_sums(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of positive, sum of |negative|) weight integers per output channel, float64, computed once."""
        key = ("sums", id(layer))
        if key not in self._weights:
            ints, _ = self.weight_ints(layer)
            axis = 1 if isinstance(layer, _TRANSPOSED) else 0
            rows = ints.transpose(0, axis).reshape(ints.shape[axis], -1).float()  # exact: |sums| < 2^24
            total, size = rows.sum(1).double(), rows.abs().sum(1).double()
            self._weights[key] = ((size + total) / 2, (size - total) / 2)
        return self._weights[key]

    def _x_bound(self, node, x: _Q) -> int:
        """The largest |input code - zero point| of a layer's input."""
        meta = qmeta(node.args[0])
        lo, hi = (0, 255) if meta.bit_width is None else qf.int_range(meta.bit_width, meta.signed, meta.narrow)
        return max(abs(lo - x.zero_point), abs(hi - x.zero_point))

    def _multiplier_requant(self, node, m) -> bool:
        """Whether the fake-quant model requantizes this layer's exact accumulator into ``m`` with one
        multiplier (``QuantAct._requantize_like_runtime``)."""
        layer = module_of(self.gm, node)
        meta = qmeta(node.args[0])
        if getattr(m, "requant", "float") == "float" or not m.runtime_requant_ok() or m.act_quant.signed or \
                not layer.exact_integer_form() or meta.scale is None or meta.scale.numel() != 1:
            return False
        if isinstance(m, QuantReLU) and m.max_val is not None:
            return m.code_cap(*m.act_quant.qparams(None)) is not False
        return True

    def relu6_cap(self, y: _Q, m) -> _Q:
        """A quantized ``clamp`` at the ReLU6's 6 where its grid passes 6 on a code (``QuantReLU.code_cap``)."""
        if not isinstance(m, QuantReLU) or m.code_cap(*m.act_quant.qparams(None)) is None:
            return y
        return _Q(self.call(torch.clamp, y.node, 0.0, float(m.max_val)), y.scale, y.zero_point, y.signed)

    def _requantize_in_float(self, node, act_node, m) -> Optional[_Q]:
        """A layer with no quantized module (a transposed conv with per-channel weights), its exact accumulator
        requantized in the artefact as the fake-quant model does; None when the layer has no integer form here."""
        self.value(node)  # the exact accumulator, in float64
        if node not in self._acc:
            return None
        acc, acc_scale, b_node = self._acc[node]
        scale, zp = _qparams(m.act_quant)
        lo, hi = m.act_quant.int_range()
        s_out = torch.tensor(scale, dtype=torch.float32)
        relu = isinstance(m, QuantReLU)
        if m.requant == "float_bias":
            self.note(act_node, "requantize in float", "float", "its layer has no quantized module: the exact "
                      "accumulator scaled, its bias added in float32, x the output scale's reciprocal (as oneDNN)")
            if b_node is None:
                b_node = self.buffer(act_node.name + "_no_bias", torch.zeros((), dtype=torch.float64))
            return _Q(self.call(requantize_accumulator_bias_after, acc, b_node,
                                self.buffer(act_node.name + "_acc_scale", acc_scale.float()),
                                self.buffer(act_node.name + "_inv_scale", 1.0 / s_out), scale, zp, lo, hi, relu),
                      scale, zp, False)
        mult = acc_scale.float() * (1.0 / s_out) if m.requant == "inverse_multiplier" else acc_scale.float() / s_out
        mult = self.buffer(act_node.name + "_multiplier", mult)
        if b_node is None:
            b_node = quotient = self.buffer(act_node.name + "_no_bias", torch.zeros((), dtype=torch.float64))
        else:
            b_int = self.root.get_buffer(b_node.target)
            q = qf.float32_bias(b_int, acc_scale)[1] if m.requant == "multiplier_float_bias" else b_int.float()
            quotient = self.buffer(act_node.name + "_bias_quotient", q)
        why = self._inexact.get(node)
        self.note(act_node, "requantize in float", "float",
                  (f"fbgemm and oneDNN could round its requantization differently ({why})" if why else
                   "its layer has no quantized module") + ": the exact accumulator x one float32 multiplier")
        return self.relu6_cap(_Q(self.call(requantize_accumulator, acc, b_node, quotient, mult, scale, zp, lo, hi,
                                           relu), scale, zp, False), m)

    def _quantized_module(self, layer, relu: bool) -> nn.Module:
        if isinstance(layer, nn.Linear):
            if relu:
                return nniq.LinearReLU(layer.in_features, layer.out_features, bias=layer.bias is not None)
            return nnq.Linear(layer.in_features, layer.out_features, bias_=layer.bias is not None)
        base = next(t for t in _CONV if isinstance(layer, t))
        kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                      bias=layer.bias is not None)
        if base in _TRANSPOSED:
            return _CONV[base](layer.in_channels, layer.out_channels, layer.kernel_size,
                               output_padding=layer.output_padding, **kwargs)
        return (_CONV_RELU if relu else _CONV)[base](layer.in_channels, layer.out_channels, layer.kernel_size,
                                                     padding_mode=layer.padding_mode, **kwargs)

    def weight_ints(self, layer):
        """(int weights, weight scale), computed once per layer."""
        hit = self._weights.get(id(layer))
        if hit is None:
            hit = self._weights[id(layer)] = super().weight_ints(layer)
        return hit

    def _quantized_weight(self, layer) -> torch.Tensor:
        ints, scale = self.weight_ints(layer)
        scale = scale.reshape(-1).double()
        if scale.numel() == 1:
            return torch._make_per_tensor_quantized_tensor(ints.to(torch.int8), float(scale[0]), 0)
        return torch._make_per_channel_quantized_tensor(ints.to(torch.int8), scale,
                                                        torch.zeros(scale.numel(), dtype=torch.long),
                                                        layer.weight_quant.channel_axis)

    def _float_bias(self, layer, node) -> tuple[Optional[torch.Tensor], int, float]:
        """(float32 bias, channels where it is not exact, largest residual). fbgemm adds ``float32(b / s_acc)``
        to the float32 accumulator, so ``b`` is chosen (``b_int x s_acc`` or a few ulps from it) to make that
        quotient the bias integer. For some scales no float32 ``b`` gives an integer back exactly: there the
        nearest quotient is used, off by a fraction ``delta`` of an accumulator step, which can move an output
        only where ``acc x m`` lies within ``delta x m`` of a rounding tie."""
        if layer.bias is None:
            return None, 0, 0.0
        ints, scale = self.bias_ints(layer, self.input_scale(node))
        ints = ints.reshape(-1).double()
        s = scale.reshape(-1).float().expand(ints.shape)
        if bool((ints.abs() >= F32_EXACT).any()):
            raise TargetError(f"torch: {node.target}: bias integers reach {int(ints.abs().max())}, past float32's "
                              "exact integers (2^24), which the engine's float32 bias cannot carry; give the layer "
                              "fewer weight bits or keep it float (overrides={name: None})")
        if (self.profile or TORCH).requant == "float_bias":  # oneDNN adds b itself after scaling: the fake-quant model's b
            return ints.float() * s, 0, 0.0
        best, quotient = qf.float32_bias(ints, s)
        err = (quotient - ints.float()).abs()
        return best, int((err > 0).sum()), float(err.max())

    def _accumulator_note(self, node, layer, x: _Q) -> str:
        """fbgemm adds the bias to float32(accumulator): exact while |acc + bias| < 2^24 (the fake-quant model
        needs |acc| < 2^22). Said in the report where this layer's worst case passes that."""
        pos, neg = self._channel_sums(layer)
        worst = float((pos + neg).max()) * self._x_bound(node, x)
        if worst >= 2 ** 22:
            return (f"worst-case accumulator {int(worst)} passes 2^22: inputs that come near it may round "
                    "differently from the fake-quant model")
        return ""

    def _layer_float(self, node) -> _Q:
        """A conv/linear whose output is read in float: the fake-quant model's own computation (the exact
        integer accumulator times its scale, or the float layer on fake-quantized weights)."""
        layer = module_of(self.gm, node)
        x = self.value(node.args[0])
        meta = qmeta(node.args[0])
        q_in = input_quantizer_of(self.gm, node)
        if not x.quantized and q_in is not None and layer.exact_integer_form() and meta.scale is not None and \
                meta.scale.numel() == 1:
            # its input was moved in float (a zero pad with no quantized kernel): the values are still on the
            # input quantizer's grid, so quantizing them again is exact and the layer keeps its integer form
            x = self.quantize(x.node, q_in)
        if layer.exact_integer_form() and x.quantized and meta.scale is not None and meta.scale.numel() == 1:
            ints, w_scale = self.weight_ints(layer)
            # int_repr() is uint8 (quint8): widened before the zero point is subtracted, or codes below it wrap
            xi = self.call(torch.sub, self.graph.call_method("double", (self.graph.call_method("int_repr", (x.node,)),)),
                           x.zero_point)
            acc = self._float_op(layer, xi, self.buffer(node.target + "_w_int", ints.double()))
            shape = [1] * len(self.shape(node))
            shape[layer.out_channel_axis % len(shape)] = -1
            b_node = None
            if layer.bias is not None:
                b, _ = self.bias_ints(layer, self.input_scale(node))
                b_node = self.buffer(node.target + "_b_int", b.double().reshape(shape))
                acc = self.call(torch.add, acc, b_node)
            acc_scale = layer.acc_scale(self.input_scale(node), w_scale).float()
            acc_scale = acc_scale.reshape(shape) if acc_scale.numel() > 1 else acc_scale
            self._acc[node] = (acc, acc_scale, b_node)
            out = self.call(exact_layer_output, acc, self.buffer(node.target + "_acc_scale", acc_scale))
            self.note(node, f"float {type(layer).__name__[5:]} on integers", "float",
                      "read in float (no identity/ReLU quantizer requantizes it): exact integer accumulator x scale")
            return _Q(out)
        with torch.no_grad():
            w = layer.quant_weight()
            w = getattr(w, "value", w)
            b = None
            if layer.bias is not None:
                b = layer.quant_bias() if layer.bias_quant.is_quant_enabled else layer.bias
                b = getattr(b, "value", b)
        out = self._float_op(layer, self.as_float(node.args[0]), self.buffer(node.target + "_weight", w),
                             None if b is None else self.buffer(node.target + "_bias", b))
        self.note(node, f"float {type(layer).__name__[5:]}", "float",
                  "not an integer layer in the fake-quant model: float op on fake-quantized weights")
        return _Q(out)

    def _float_op(self, layer, x, w, b=None) -> fx.Node:
        if isinstance(layer, nn.Linear):
            return self.call(F.linear, x, w, b)
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            raise ExportError(f"torch: padding_mode={layer.padding_mode!r} has no lowering; use zero padding")
        n = len(layer.kernel_size)
        if isinstance(layer, _TRANSPOSED):
            fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d}[n]
            return self.call(fn, x, w, b, layer.stride, layer.padding, layer.output_padding, layer.groups,
                             layer.dilation)
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
        return self.call(fn, x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)

    # -- add, cat, moves, the rest -------------------------------------------------------------------------

    def _fused_add(self, node, act_node, m) -> Optional[_Q]:
        """``quantized::add`` / ``add_relu`` of two quantized inputs into the grid of the quantizer after, when
        it gives the fake-quant model's integers for every pair of input codes (checked exhaustively); else None
        (the add runs in float and the quantizer rounds as the model does)."""
        ins = tensor_inputs(node)
        a, b = (self.value(i) for i in ins)
        if not self._add_fusable(node, a, b, m):
            return None
        relu = isinstance(m, QuantReLU)
        op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
        differ, pairs = self._add_differs(op, ins, a, b, m.act_quant, relu)
        if differ:
            self._deferred_why[node] = (f"quantized::add rounds {differ} of the {pairs} pairs of input codes "
                                        "otherwise than the fake-quant model (rounding ties)")
            return None
        scale, zp = _qparams(m.act_quant)
        self.note(node, "quantized::add_relu" if relu else "quantized::add")
        self.note(act_node, f"requantized by {node.name}")
        return self.clamp_to(_Q(self.call(op, a.node, b.node, scale, zp), scale, zp, False), m.act_quant)

    @staticmethod
    def _add_fusable(node, a: _Q, b: _Q, m) -> bool:
        """An add of two quantized values read by one unsigned per-tensor identity / plain ReLU quantizer alone."""
        return len(node.users) == 1 and a.quantized and b.quantized and not m.act_quant.signed and \
            not m.act_quant.scaling_per_output_channel and \
            (type(m) is QuantIdentity or (type(m) is QuantReLU and m.max_val is None))

    def _add_differs(self, op, ins, a: _Q, b: _Q, q, relu: bool) -> tuple[int, int]:
        """(pairs of input codes where ``op`` gives other integers than the fake-quant model, pairs checked).
        The model adds the two dequantized float32 values and rounds ``sum / scale`` half to even;
        quantized::add dequantizes with a fused multiply-add and rounds ``sum x float32(1 / scale)``, which parts
        from it at rounding ties (an output grid a power of two times the inputs' makes them common). Every
        pair of codes is run through the kernel twice: contiguous (its vectorized loop) and strided (its scalar
        loop)."""
        ranges = []
        for node in ins:
            meta = qmeta(node)
            bits = meta.bit_width if meta.bit_width is not None else 8
            ranges.append(qf.int_range(bits, meta.signed, meta.narrow))
        ca = torch.arange(ranges[0][0], ranges[0][1] + 1, dtype=torch.float32)
        cb = torch.arange(ranges[1][0], ranges[1][1] + 1, dtype=torch.float32)
        qa, qb = (t.reshape(-1) for t in torch.meshgrid(ca, cb, indexing="ij"))
        scale, zp = _qparams(q)
        lo, hi = q.int_range()
        s_a, s_b = torch.tensor(a.scale, dtype=torch.float32), torch.tensor(b.scale, dtype=torch.float32)
        total = (qa - a.zero_point) * s_a + (qb - b.zero_point) * s_b
        if relu:
            total = torch.relu(total)
        want = torch.clamp(torch.round(total / torch.tensor(scale, dtype=torch.float32)) + zp, lo, hi)

        def quantized(codes, grid):
            dtype = torch.int8 if grid.signed else torch.uint8
            return torch._make_per_tensor_quantized_tensor(codes.to(dtype), grid.scale, grid.zero_point)

        with quantized_engine(self.engine):
            xa, xb = quantized(qa, a), quantized(qb, b)
            got = op(xa, xb, scale, zp).int_repr().float()
            wide_a = quantized(torch.stack([qa, qa], 1).reshape(-1), a)[::2]  # strided: the scalar loop
            wide_b = quantized(torch.stack([qb, qb], 1).reshape(-1), b)[::2]
            got_scalar = op(wide_a, wide_b, scale, zp).int_repr().float()
        differ = (torch.clamp(got, lo, hi) != want) | (torch.clamp(got_scalar, lo, hi) != want)
        return int(differ.sum()), int(want.numel())

    def _add_float(self, node) -> _Q:
        a, b = tensor_inputs(node)
        self.note(node, "float add", "float",
                  self._deferred_why.get(node, "not read by one identity/ReLU quantizer alone"))
        return _Q(self.call(node.target, self.as_float(a), self.as_float(b)))

    def emit_product(self, node):
        """A QuantProduct: on the quantized operands' integers (exact), scaled to the accumulator's value; the
        activation quantizer after it quantizes that value as the model does."""
        a, b = (self.value(x) for x in node.args[:2])
        op = module_of(self.gm, node).op
        if not (a.quantized and b.quantized):
            raise ExportError(f"torch: {node.target}: an operand of the product is not a quantized tensor here; keep "
                              "the product float with overrides={" + repr(node.target) + ": None}")
        _, _, acc_scale = self.product_scales(node)
        scale = self.buffer(node.name + "_acc_scale", acc_scale.float().reshape(()))
        self.note(node, f"integer {op} (exact, accumulator scale {float(acc_scale):.3g})")
        return _Q(self.call(exact_product, a.node, b.node, scale, op == "matmul"))

    def emit_cat(self, node):
        items = [self.value(a) for a in tensor_inputs(node)]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        fn = torch.stack if node.target is torch.stack else torch.cat
        first = items[0]
        if all(i.quantized and (i.scale, i.zero_point, i.signed) == (first.scale, first.zero_point, first.signed)
               for i in items):
            self.note(node, f"quantized {fn.__name__}")
            return _Q(self.call(fn, [i.node for i in items], dim), first.scale, first.zero_point, first.signed)
        self.note(node, f"float {fn.__name__}", "float", "its inputs are not on one grid")
        return _Q(self.call(fn, [self.as_float(a) for a in tensor_inputs(node)], dim))

    def _moves(self, node) -> bool:
        if node.op == "call_module":
            return isinstance(module_of(self.gm, node), _MOVE_MODULES)
        if node.op == "call_method":
            return node.target in _MOVE_METHODS
        return node.target in _MOVE_FUNCTIONS

    def _generic(self, node, make):
        """Any other node: on the quantized tensor when it only moves values (the grid is kept), else in float
        on dequantized values with the fake-quant model's own op."""
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        v = self.value(src) if src is not None else None
        kwargs = {k: self._arg(a, False) for k, a in node.kwargs.items()}
        if v is not None and v.quantized and self._moves(node):
            out = make(fx.map_arg(node.args, lambda a: self._arg(a, True)), kwargs)
            self.note(node, f"quantized {op_name(self.gm, node)}")
            return self._tuple_or_q(node, out, v)
        out = make(fx.map_arg(node.args, lambda a: self._arg(a, False)), kwargs)
        island = float_island(self.gm, node)
        self.note(node, "float", "float", f"float island: {island}" if island else
                  "no quantized kernel keeps the fake-quant model's arithmetic")
        return self._tuple_or_q(node, out, None)

    def _table_softmax(self, node, m) -> _Q:
        """A QuantSoftmax with its table and scale as buffers, computed by the model's own ``table_softmax``."""
        x = node.args[0]
        tabled = m.table_for(self.attribute(node.kwargs["input_quantizer"]), self.shape(x)[m.dim])
        if tabled is None:
            return self._generic(node, lambda args, kwargs: self.graph.call_function(torch.softmax, args[:1],
                                                                                     {"dim": m.dim}))
        table, scale = tabled
        self.note(node, "float softmax from an exp table (the same float32 result in every runtime)", "float",
                  f"float island: {float_island(self.gm, node)}")
        return _Q(self.call(table_softmax, self.as_float(x), self.buffer(node.name + "_exp_table", table),
                            self.buffer(node.name + "_scale", scale), m.dim))

    def _tuple_or_q(self, node, out, grid: Optional[_Q]):
        keep = (grid.scale, grid.zero_point, grid.signed) if grid is not None else (None, 0, False)
        meta = self.tensor_meta.get(node)
        if isinstance(meta, (list, tuple)) and not hasattr(meta, "shape"):  # several tensors (chunk, split)
            n = len(meta)
            return tuple(_Q(self.call(operator.getitem, out, i), *keep) for i in range(n))
        return _Q(out, *keep)

    def emit_module(self, node, m):
        if isinstance(m, QuantSoftmax):
            return self._table_softmax(node, m)
        name = self.add_module(node.target, copy.deepcopy(m))
        return self._generic(node, lambda args, kwargs: self.graph.call_module(name, args, kwargs))

    def emit_function(self, node):
        if node.target is operator.getitem and isinstance(self.env.get(node.args[0]), tuple):
            return self.env[node.args[0]][node.args[1]]
        return self._generic(node, lambda args, kwargs: self.graph.call_function(node.target, args, kwargs))

    def emit_method(self, node):
        return self._generic(node, lambda args, kwargs: self.graph.call_method(node.target, args, kwargs))

    def finish(self) -> TorchProgram:
        gm = fx.GraphModule(self.root, self.graph, class_name="QuantfxTorchProgram")
        gm.eval()
        return TorchProgram(gm, self.engine, self.report, dict(self.node_values))


# -- exact requantization (the 'x86' profile) -----------------------------------------------------------

# a requantization multiplier on multiples of 2^GRID_EXP keeps every float32 step of an in-range output exact
GRID_EXP = -15


def _odd_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, E) with ``x = M x 2^E`` exactly and M odd, for positive float64 ``x``."""
    frac, exp = np.frexp(x)
    mant = (frac * 2.0 ** 53).astype(np.int64)
    tz = np.log2((mant & -mant).astype(np.float64)).astype(np.int64)
    return mant >> tz, exp.astype(np.int64) - 53 + tz


def exact_requant_problems(s_in: float, s_w, s_out: float, zp_out: int, b_int, worst) -> list[str]:
    """Why a conv/linear's requantization may round differently in fbgemm and oneDNN, or [] when every float32
    step is exact for it. fbgemm computes ``rne(fl(fl(acc + b) x m)) + zp``, oneDNN ``rne(fl(fl(fl(acc x s) + b
    x s) x (1 / s_out)) + zp)``, with ``s = s_in x s_w``, ``m = s / s_out``. With s_in and s_out powers of two and
    ``m = M x 2^E`` (M odd), an output in range has ``|V| = |(acc + b) x m| < 2^8``: then ``(acc + b) x M < 2^(8-E)``
    and ``|acc| x M < 2^(8-E) + |b| x M``, so both orders are exact while ``2^(8-E) + |b| x M <= 2^24``, and both
    round the same value; an even zero point makes adding it before rounding (oneDNN) or after (fbgemm) alike. An
    output out of range stays out of range in both while the rounding errors, below ``(worst + |b|) x m x 2^-22``,
    stay under half a step. ``s_w``, ``b_int``, ``worst`` (the largest ``|acc|`` any input gives): per channel."""
    problems = []
    if not qf.is_power_of_two(s_in):
        problems.append(f"input scale {s_in!r} is not a power of two")
    if not qf.is_power_of_two(s_out):
        problems.append(f"output scale {s_out!r} is not a power of two")
    if zp_out % 2:
        problems.append(f"output zero point {zp_out} is odd")
    if problems:
        return problems
    m = np.asarray(s_w, dtype=np.float32).astype(np.float64) * s_in / s_out  # float32(s_in x s_w) / s_out: exact
    mant, exp = _odd_parts(m)
    b, worst = np.abs(np.asarray(b_int, dtype=np.float64)), np.asarray(worst, dtype=np.float64)
    bad = np.flatnonzero(2.0 ** (8 - exp) + b * mant > F32_EXACT)
    if bad.size:
        c = int(bad[0])
        return [f"channel {c}: multiplier {m[c]!r} = {mant[c]} x 2^{exp[c]} with bias integer {int(b[c])} leaves "
                "float32's exact range (its weight scale is off the 2^-15 multiplier grid: calibrate again)"]
    bad = np.flatnonzero((worst + b) * m > 2.0 ** 21)
    if bad.size:
        c = int(bad[0])
        return [f"channel {c}: worst-case accumulator {int(worst[c])} x multiplier {m[c]:.3g} passes 2^21 output steps"]
    return []


def exact_requant_grid(qmodel) -> None:
    """After calibration, on a profile with ``exact_requant`` (the torch target's 'x86'): put each conv/linear's
    weight scale on the grid (``scale_step``) that makes its requantization multiplier ``s_in x s_w / s_out`` a
    multiple of ``2^E``, E = -15 or coarser where the bias is large (:func:`exact_requant_problems`). A weight
    scale moves up by at most one step (under 2^-15 / m of itself: about 3 % at m = 2^-10)."""
    profile = getattr(qmodel, "profile", None)
    if profile is None or not profile.exact_requant:
        return
    steps: dict = {}
    for node in qmodel.graph.nodes:
        layer = module_of(qmodel, node) if node.op == "call_module" else None
        if not isinstance(layer, _QUANT_LAYERS) or len(node.users) != 1 or not layer.weight_quant.is_quant_enabled:
            continue
        user, other = next(iter(node.users)), 0.0
        if profile.add_reads_layer_output and layer_read_by_add(qmodel, user) is node and len(user.users) == 1:
            # the add's quantizer requantizes this layer's output plus the other input: |layer output| stays
            # within the output range plus the other input's (its codes x its scale)
            add_other = next(a for a in tensor_inputs(user) if a is not node)
            other_meta = qmeta(add_other)
            if other_meta.scale is None or other_meta.scale.numel() != 1:
                continue
            other, user = 256.0 * float(other_meta.scale), next(iter(user.users))
        act = module_of(qmodel, user) if user.op == "call_module" else None
        meta = qmeta(node.args[0])
        if getattr(act, "act_quant", None) is None or not act.act_quant.is_quant_enabled or meta.scale is None or \
                meta.scale.numel() != 1:
            continue
        s_in = float(meta.scale)
        s_out = float(act.act_quant.scale(None).reshape(-1)[0])
        if not (qf.is_power_of_two(s_in) and qf.is_power_of_two(s_out)):
            continue
        bias = 0.0 if layer.bias is None else float(layer.bias.detach().abs().max()) / s_out
        exp = max(GRID_EXP, math.ceil(math.log2(256.0 + other / s_out + bias + 2.0)) - 24)
        q = layer.weight_quant
        steps[q] = max(steps.get(q, 0.0), 2.0 ** exp * s_out / s_in)
    for q, step in steps.items():
        q.scale_step = q.spec_fields["scale_step"] = step  # a field: the weight cache's key changes with it
    if steps:
        annotate(qmodel)


# -- runtime ---------------------------------------------------------------------------------------------


def _lower(qmodel, example_inputs) -> TorchProgram:
    with without_deprecation_warnings():
        return TorchLowering(qmodel, example_inputs, profile=TORCH).lower()


def save_program(program: TorchProgram, path) -> None:
    with quantized_engine(program.engine), without_deprecation_warnings():
        script = program.module if isinstance(program.module, torch.jit.ScriptModule) else \
            torch.jit.script(program.module)
    meta = {"producer": "quantfx", "engine": program.engine, "report": program.report}
    with without_deprecation_warnings():
        torch.jit.save(script, str(path), _extra_files={META_FILE: json.dumps(meta)})


def load_program(path) -> TorchProgram:
    """A saved program, its weights packed by the engine it records (set while loading)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/extra/" + META_FILE)]
            meta = json.loads(z.read(names[0])) if names else {}
    except zipfile.BadZipFile as e:
        raise ExportError(f"{path} is not a TorchScript archive ({e})") from e
    if meta.get("producer") != "quantfx":
        raise ExportError(f"{path} was not written by quantfx (no {META_FILE} in the archive)")
    engine = meta.get("engine", "fbgemm")
    with quantized_engine(engine), without_deprecation_warnings():
        module = torch.jit.load(str(path), map_location="cpu")
    return TorchProgram(module, engine, meta.get("report", []), {})


def not_quantfx(program) -> Optional[str]:
    if not isinstance(program, TorchProgram):
        return f"is a {type(program).__name__}, not a quantfx torch program"
    return None


def run_program(program: TorchProgram, inputs) -> list:
    out = program(*inputs)
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    return [o.detach().numpy() for o in out]


def run_program_intermediates(program: TorchProgram, inputs, fx_names) -> dict:
    """Values of the given quantized-graph nodes (dequantized), from an in-memory program."""
    if not program.node_values or not isinstance(program.module, fx.GraphModule):
        raise ExportError("torch: intermediate values need the program as lowered (quantfx.lower), not a loaded file")
    wanted = {program.node_values[n]: n for n in fx_names if n in program.node_values}
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted and torch.is_tensor(out):
                values[wanted[n.name]] = (out.dequantize() if out.is_quantized else out).detach().numpy()
            return out

    with quantized_engine(program.engine), torch.no_grad():
        Recorder(program.module).run(*inputs)
    return values


BACKEND = Backend(
    name="torch", lower=_lower, save=save_program, load=load_program, run=run_program,
    run_with_intermediates=run_program_intermediates, suffix=".pt", check=not_quantfx)
