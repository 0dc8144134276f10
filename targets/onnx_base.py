"""ONNX lowering on the target-neutral core (quantfx.lowering): an ONNX builder and the standard operators.

The core walks the graph, checks rules and calibration and gives the integers; this class builds an ``onnx_ir``
graph (named ``ir.Value`` s, initializers, nodes), serialized to an ``onnx.ModelProto`` at the end, and lowers
the standard operators (Conv, Gemm, Add, Concat, pools, reshapes, ...). A target subclass says how quantizers,
weights, biases and truncating pools are written (plain QDQ, :mod:`targets.qdq`; QONNX ``Quant``/``Trunc`` for
FINN) and lists, in ``steps``, the named steps (:mod:`targets.onnx_steps`) that make the rest of its form. Ops
that only move values go through :meth:`OnnxLowering.move`, which a target may route onto integers (FINN does).
Nodes and tensors are named after the fx nodes, which carry the module names; ``quantfx.node_values`` in the
model's metadata maps each fx node to its value, for verify.
"""
from __future__ import annotations

import json
import math
import operator
from typing import Optional

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnx import helper
from torch import fx, nn

from quantfx.errors import ExportError
from quantfx.graph import data_input, module_of, tensor_inputs
from quantfx.lowering import Lowering
from quantfx.tables import FLOAT_ISLANDS_KEY, float_islands
from quantfx.nn import QuantHardTanh, QuantLeakyReLU, QuantReLU, QuantSigmoid, QuantSoftmax, adaptive_window
from quantfx.quant import Quantizer

_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
NODE_VALUES_KEY = "quantfx.node_values"
_ALIAS_METHODS = {"contiguous", "clone", "detach"}


def np32(t) -> np.ndarray:
    # a tensor converted by torch: its int64 -> float32 is ~3x numpy's (integer weights of a ResNet-50: 0.2 s)
    return t.detach().to("cpu", torch.float32).numpy() if torch.is_tensor(t) else np.asarray(t, dtype=np.float32)


def feed(graph_inputs, inputs) -> dict:
    """The input dict of a session: each input (tensor or array) as float32 (integer ones, such as token ids, as
    int64), by the graph's input names."""
    out = {}
    for i, x in zip(graph_inputs, inputs):
        x = x.detach().numpy() if torch.is_tensor(x) else np.asarray(x)
        out[i.name] = x.astype(np.int64 if x.dtype.kind in "iub" else np.float32)
    return out


def save_onnx(model: onnx.ModelProto, path) -> None:
    onnx.save(model, str(path))


def load_onnx(path) -> onnx.ModelProto:
    return onnx.load(str(path))


def not_quantfx(model) -> Optional[str]:
    """None for an ONNX model quantfx lowered; else what gives it away (verify refuses other files)."""
    if not isinstance(model, onnx.ModelProto):
        return f"is a {type(model).__name__}, not an ONNX model"
    if model.producer_name != "quantfx" or not any(p.key == NODE_VALUES_KEY for p in model.metadata_props):
        return f"was not written by quantfx (producer {model.producer_name or 'unknown'!r})"
    return None


def node_values(model: onnx.ModelProto) -> dict:
    """fx node name -> the value that holds it in ``model`` (stamped by the lowering)."""
    for prop in model.metadata_props:
        if prop.key == NODE_VALUES_KEY:
            return json.loads(prop.value)
    return {}


def file_float_islands(model: onnx.ModelProto) -> list:
    """The float islands a file quantfx wrote lists (``[{'node', 'op', 'why'}]``): the ops it runs in float
    between a DequantizeLinear and a QuantizeLinear."""
    for prop in model.metadata_props:
        if prop.key == FLOAT_ISLANDS_KEY:
            return json.loads(prop.value)
    return []


def with_values(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the values ``names`` (for intermediate checks)."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    existing = {o.name for o in extended.graph.output}
    for name in dict.fromkeys(names):
        if name not in existing:
            extended.graph.output.append(helper.make_empty_tensor_value_info(name))
    return extended


_ATTRS = {int: ir.AttrInt64, float: ir.AttrFloat32, str: ir.AttrString}


def _attr(name: str, value) -> ir.Attr:
    """An ``ir.Attr`` typed by the value's Python type (every list attribute here is of ints): onnx_ir's own
    inference (``ir.convenience.convert_attribute``) checks lists against its runtime protocols, ~0.2 ms each."""
    if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
        return ir.AttrInt64s(name, value)
    make = _ATTRS.get(type(value))
    return make(name, value) if make else ir.convenience.convert_attribute(name, value)


def _pair(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


class OnnxLowering(Lowering):
    """Subclasses set ``target`` and ``opset``, implement ``emit_act_quant``, ``emit_weight`` and ``emit_bias``
    (or the whole ``emit_act`` / ``emit_compute``) and list their ``steps`` (:class:`targets.onnx_steps.Step`),
    whose stages run in the order listed."""

    target = "onnx"
    opset = 13
    extra_opsets: dict = {}
    producer_name = "quantfx"
    dynamic_batch = True  # inputs/outputs get a symbolic batch dimension
    steps: tuple = ()

    def begin(self) -> None:
        opsets = {"": self.opset, **self.extra_opsets}
        self.graph = ir.Graph([], [], nodes=[], opset_imports=opsets,
                              name=f"{type(self.gm).__name__}_{self.target}")
        self.value_of_node: dict = {}  # fx node name -> onnx value name (for intermediate checks)
        self._names: set = set()
        self._next_suffix: dict = {}  # base -> index of its next candidate name (fresh)
        self._memo: dict = {}  # step -> its state for this lowering
        self.current_node: Optional[fx.Node] = None  # the node being emitted

    def memo(self, step, factory):
        """``step``'s state in this lowering, made by ``factory()`` on first use."""
        if step not in self._memo:
            self._memo[step] = factory()
        return self._memo[step]

    # -- naming and building -----------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... : the first of them not taken yet."""
        base = base.replace(".", "_") or "v"
        # names are only ever added, so the candidates of ``base`` before the last one it got stay taken: the
        # search starts there (a fresh scan from ``base_1`` made a base asked for k times cost O(k^2))
        i = self._next_suffix.get(base, 0)
        name = f"{base}_{i}" if i else base
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        self._next_suffix[base] = i + 1
        return name

    def const(self, base: str, array, dtype=None) -> ir.Value:
        arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
        # no type/shape on the value: onnx_ir would write a value_info for every initializer
        value = ir.Value(name=self.fresh(base), const_value=ir.Tensor(arr))
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs, base: str, n_out: int = 1, domain: str = "", **attrs):
        outs = [ir.Value(name=self.fresh(base if n_out == 1 else f"{base}_{i}")) for i in range(n_out)]
        # attributes sorted by name, as onnx.helper.make_node writes them
        ir.Node(domain, op_type, inputs, [_attr(k, v) for k, v in sorted(attrs.items())], outputs=outs,
                name=self.fresh(f"{base}_{op_type}"), graph=self.graph)
        return outs[0] if n_out == 1 else outs

    def move(self, op_type: str, inputs, base: str, n_out: int = 1, **attrs):
        """An op that only moves or selects values (pools of max, reshapes, transposes, slices, zero padding,
        concatenation): ``op`` here; a target that holds activations as integers runs it on them."""
        return self.op(op_type, inputs, base, n_out, **attrs)

    # -- hooks ----------------------------------------------------------------------------------------

    def emit_act_quant(self, x: ir.Value, q: Quantizer, base: str) -> ir.Value:
        raise NotImplementedError

    def emit_weight(self, layer, base: str) -> ir.Value:
        raise NotImplementedError

    def emit_bias(self, layer, in_scale: torch.Tensor, base: str) -> Optional[ir.Value]:
        raise NotImplementedError

    # -- the walk -------------------------------------------------------------------------------------

    def emit(self, node: fx.Node):
        """The first form a step gives ``node``, else the kind's ``emit_*``; then each step's ``emitted``."""
        self.current_node = node
        kind = self.node_kind(node)
        out = next((v for v in (s.form(self, node, kind) for s in self.steps) if v is not None), None)
        if out is None:
            out = self.emit_kind(node, kind)
        for step in self.steps:
            out = step.emitted(self, node, out)
        return out

    def lower_node(self, node: fx.Node):
        value = super().lower_node(node)
        if isinstance(value, ir.Value) and node.op not in ("placeholder", "output"):
            self.value_of_node[node.name] = value.name
        return value

    def emit_input(self, node):
        dtype = getattr(self.tensor_meta.get(node), "dtype", torch.float32)
        kind = ir.DataType.FLOAT if dtype.is_floating_point else ir.DataType.INT64  # token ids: int64
        value = ir.val(self.fresh(node.name), kind, self._io_shape(node))
        self.graph.inputs.append(value)
        return value

    def emit_output(self, node, results):
        for i, r in enumerate(results):
            value = self.op("Identity", [self.env[r]], "output" if len(results) == 1 else f"output_{i}")
            value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(self._io_shape(r))
            self.graph.outputs.append(value)
        return None

    def finish(self) -> onnx.ModelProto:
        model = ir.Model(self.graph, ir_version=min(onnx.IR_VERSION, 10), producer_name=self.producer_name)
        for step in self.steps:
            step.rewrite(self, model)
        model.metadata_props[NODE_VALUES_KEY] = json.dumps(self.value_of_node)
        islands = float_islands(self.gm)
        if islands:
            model.metadata_props[FLOAT_ISLANDS_KEY] = json.dumps(islands)
        return ir.serde.serialize_model(model)

    def _io_shape(self, node) -> list:
        shape = list(self.shape(node))
        return (["batch"] + shape[1:]) if self.dynamic_batch else shape

    def emit_constant(self, node, value):
        if torch.is_tensor(value) and not value.is_floating_point():  # masks and indices keep their type
            return self.const(node.name, value.detach().cpu().numpy())
        return self.const(node.name, np32(value))

    def emit_add(self, node):
        a, b = tensor_inputs(node)
        return self.op("Add", [self.env[a], self.env[b]], node.name)

    # -- quantized layers -----------------------------------------------------------------------------

    def emit_act(self, node):
        m = module_of(self.gm, node)
        x = self.env[node.args[0]]
        if isinstance(m, QuantReLU):
            x = self.op("Relu", [x], node.name + "_relu") if m.max_val is None else \
                self.op("Clip", [x, self.const(node.name + "_min", np.float32(0)),
                                 self.const(node.name + "_max", np.float32(m.max_val))], node.name + "_relu6")
        elif isinstance(m, QuantHardTanh):
            x = self.op("Clip", [x, self.const(node.name + "_min", np.float32(m.min_val)),
                                 self.const(node.name + "_max", np.float32(m.max_val))], node.name + "_hardtanh")
        elif isinstance(m, QuantSigmoid):
            x = self.op("Sigmoid", [x], node.name + "_sigmoid")
        elif isinstance(m, QuantLeakyReLU):
            x = self.op("LeakyRelu", [x], node.name + "_leaky", alpha=float(m.negative_slope))
        if m.input_quant.is_quant_enabled:
            raise ExportError(f"{self.target}: {node.target} has an input quantizer; compiled graphs put "
                              "quantizers on their own nodes")
        if not m.act_quant.is_quant_enabled:
            return x
        return self.emit_act_quant(x, m.act_quant, node.name)

    def emit_compute(self, node):
        layer = module_of(self.gm, node)
        x = self.env[node.args[0]]
        w = self.emit_weight(layer, node.target) if layer.weight_quant.is_quant_enabled else \
            self.const(node.target + ".weight", np32(layer.weight))
        b = None
        if layer.bias is not None:
            b = self.emit_bias(layer, self.input_scale(node), node.target) if layer.bias_quant.is_quant_enabled \
                else self.const(node.target + ".bias", np32(layer.bias))
        return self.emit_layer(node, layer, x, w, b)

    def emit_layer(self, node, layer, x, w, b, name=None):
        """The ONNX op of a conv/linear layer on inputs ``x``, ``w``, ``b`` (values); its output is called
        ``name`` (the node's name by default). A step's ``layer`` form first."""
        for step in self.steps:
            y = step.layer(self, node, layer, x, w, b, name)
            if y is not None:
                return y
        ins = [x, w] + ([b] if b is not None else [])
        node_name = name or node.name
        if isinstance(layer, nn.Linear):
            if len(self.shape(node.args[0])) == 2:
                return self.op("Gemm", ins, node_name, transB=1)
            wt = self.op("Transpose", [w], node_name + "_wT", perm=[1, 0])
            y = self.op("MatMul", [x, wt], node_name + "_matmul")
            return self.op("Add", [y, b], node_name) if b is not None else y
        n = len(layer.kernel_size)
        attrs = dict(kernel_shape=list(layer.kernel_size), strides=_pair(layer.stride, n),
                     dilations=_pair(layer.dilation, n), group=layer.groups)
        if isinstance(layer.padding, str):
            if layer.padding == "valid":
                attrs["pads"] = [0] * 2 * n
            else:
                attrs["auto_pad"] = "SAME_UPPER"
        else:
            p = _pair(layer.padding, n)
            attrs["pads"] = p + p
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            raise ExportError(f"{self.target}: {node.target} uses padding_mode={layer.padding_mode!r}; "
                              "only zero padding lowers to ONNX Conv")
        if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
            attrs["output_padding"] = _pair(layer.output_padding, n)
            return self.op("ConvTranspose", ins, node_name, **attrs)
        return self.op("Conv", ins, node_name, **attrs)

    # -- standard ops ---------------------------------------------------------------------------------

    def emit_cat(self, node):
        items = [self.env[a] for a in tensor_inputs(node)]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(self.shape(node))
        if node.target is torch.stack:
            axis = dim % rank
            items = [self.move("Unsqueeze", [i, self.const(node.name + "_axes", np.array([axis], np.int64))],
                             node.name + "_unsq") for i in items]
            return self.move("Concat", items, node.name, axis=axis)
        return self.move("Concat", items, node.name, axis=dim % rank)

    def emit_module(self, node, m):
        x = self.env[node.args[0]]
        if isinstance(m, _MAXPOOL_MODULES):
            return self._maxpool(node, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, (nn.AdaptiveMaxPool2d,)) and _pair(m.output_size, 2) == [1, 1]:
            return self.move("GlobalMaxPool", [x], node.name)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            ins, out = self.shape(node.args[0])[-2:], self.shape(node)[-2:]
            if tuple(out) == (1, 1):
                return self.op("GlobalAveragePool", [x], node.name)
            k = adaptive_window(ins, out)
            if k is None:
                raise ExportError(f"{self.target}: {node.target}: adaptive pool {ins}->{out} has uneven windows")
            return self.op("AveragePool", [x], node.name, kernel_shape=list(k), strides=list(k))
        if isinstance(m, nn.AvgPool2d):
            k = _pair(m.kernel_size, 2)
            p = _pair(m.padding, 2)
            return self.op("AveragePool", [x], node.name, kernel_shape=k, strides=_pair(m.stride or k, 2),
                           pads=p + p, count_include_pad=int(m.count_include_pad), ceil_mode=int(m.ceil_mode))
        if isinstance(m, nn.Flatten):
            return self._flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            base = node.target
            return self.op("BatchNormalization", [
                x, self.const(base + ".weight", np32(m.weight if m.affine else torch.ones(m.num_features))),
                self.const(base + ".bias", np32(m.bias if m.affine else torch.zeros(m.num_features))),
                self.const(base + ".running_mean", np32(m.running_mean)),
                self.const(base + ".running_var", np32(m.running_var))], node.name, epsilon=float(m.eps))
        island = self.emit_float_island_module(node, m, x)
        if island is not None:
            return island
        simple = {nn.ReLU: "Relu", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh"}
        for cls, op_type in simple.items():
            if type(m) is cls:
                return self.op(op_type, [x], node.name)
        if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d)):
            return self._pad(node, list(m.padding), 0.0)
        if isinstance(m, nn.Upsample):
            return self._resize(node, x, m.mode, m.align_corners)
        if isinstance(m, nn.PixelShuffle):
            return self.move("DepthToSpace", [x], node.name, blocksize=m.upscale_factor, mode="CRD")
        if isinstance(m, nn.Linear) or isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
            w = self.const(node.target + ".weight", np32(m.weight))
            b = self.const(node.target + ".bias", np32(m.bias)) if m.bias is not None else None
            return self.emit_layer(node, m, x, w, b)
        raise ExportError(f"{self.target}: module {node.target} ({type(m).__name__}) has no ONNX lowering")

    def _maxpool(self, node, x, kernel, stride, padding, dilation, ceil_mode):
        n = len(self.shape(node)) - 2
        k = _pair(kernel, n)
        p = _pair(padding, n)
        return self.move("MaxPool", [x], node.name, kernel_shape=k, strides=_pair(stride or kernel, n),
                       pads=p + p, dilations=_pair(dilation, n), ceil_mode=int(bool(ceil_mode)))

    def _flatten(self, node, x, start, end):
        rank = len(self.shape(node.args[0]))
        if start % rank == 1 and end % rank == rank - 1:
            return self.move("Flatten", [x], node.name, axis=1)
        return self._reshape(node, x)

    def _reshape(self, node, x):
        out, inp = list(self.shape(node)), list(self.shape(data_input(node)))
        sizes = _size_args(node)
        dynamic = [i for i, s in enumerate(sizes) if (isinstance(s, int) and s == -1) or _reads_batch(s)]
        if self.dynamic_batch and len(dynamic) == 1 and len(out) == len(sizes):
            out[dynamic[0]] = -1  # the one size written -1 or computed from the batch (x.view(L, B * h, d))
        elif out and inp and out[0] == inp[0]:
            out[0] = 0  # keep the batch dimension dynamic
        elif out and self.dynamic_batch:
            out[0] = -1  # the batch folded into dim 0 (LeViT's x.flatten(0, 1)): its size times the static rest
        return self.move("Reshape", [x, self.const(node.name + "_shape", np.array(out, np.int64))], node.name)

    def _squeeze(self, node, x):
        """``squeeze(dim)`` / ``unsqueeze(dim)`` as ONNX Squeeze / Unsqueeze on those axes, so the other sizes (the
        batch) stay what they are at run time; without dims, a reshape to the example's shape."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return self._reshape(node, x)
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        shape = self.shape(data_input(node))
        if node.target in (torch.unsqueeze, "unsqueeze"):
            op_type, axes = "Unsqueeze", [d % (len(shape) + 1) for d in dims]
        else:  # torch squeezes only axes of size 1
            op_type, axes = "Squeeze", [d % len(shape) for d in dims if shape[d % len(shape)] == 1]
            if not axes:
                return x
        return self.move(op_type, [x, self.const(node.name + "_axes", np.array(axes, np.int64))], node.name)

    def _args(self, node, names_defaults):
        out = []
        for i, (name, default) in enumerate(names_defaults):
            out.append(node.args[i] if len(node.args) > i else node.kwargs.get(name, default))
        return out

    def emit_function(self, node):
        t = node.target
        if t in (F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool2d):
            _, k, s, p, d, c = self._args(node, [("input", None), ("kernel_size", None), ("stride", None),
                                                 ("padding", 0), ("dilation", 1), ("ceil_mode", False)])
            return self._maxpool(node, self.env[node.args[0]], k, s, p, d, c)
        if t is torch.flatten:
            _, start, end = self._args(node, [("input", None), ("start_dim", 0), ("end_dim", -1)])
            return self._flatten(node, self.env[node.args[0]], start, end)
        if t is torch.reshape:
            return self._reshape(node, self.env[node.args[0]])
        if t in (torch.transpose, torch.permute, torch.t):
            return self._transpose(node, self.env[node.args[0]], node.args[1:])
        if t in (torch.chunk, torch.split):
            return self._split(node)
        if t is operator.getitem:
            return self._getitem(node)
        if t in (F.pixel_shuffle, torch.pixel_shuffle):
            return self.move("DepthToSpace", [self.env[node.args[0]]], node.name, blocksize=int(node.args[1]),
                           mode="CRD")
        if t is F.pad:
            return self._pad(node)
        if t in (torch.squeeze, torch.unsqueeze):
            return self._squeeze(node, self.env[node.args[0]])
        if t in (operator.mul, torch.mul, operator.truediv, operator.sub, operator.add, torch.add, torch.sub):
            return self._binary(node)
        island = self.emit_float_island_function(node)
        if island is not None:
            return island
        if t is torch.mean:
            return self._mean(node, self.env[node.args[0]])
        if t is torch.sum:
            return self._sum(node, self.env[node.args[0]])
        if t is torch.roll:
            return self._roll(node, self.env[node.args[0]])
        if t is torch.unbind:
            return self._unbind(node, self.env[node.args[0]])
        if t in (operator.invert, torch.logical_not, torch.bitwise_not):
            return self.op("Not", [self.env[node.args[0]]], node.name)
        if t is F.interpolate:
            _, _, _, mode, align = self._args(node, [("input", None), ("size", None), ("scale_factor", None),
                                                     ("mode", "nearest"), ("align_corners", None)])
            return self._resize(node, self.env[node.args[0]], mode, align)
        if t in (torch.sigmoid, torch.tanh, F.silu, torch.relu, F.relu):
            op_type = {torch.sigmoid: "Sigmoid", torch.tanh: "Tanh", torch.relu: "Relu", F.relu: "Relu"}.get(t)
            if op_type:
                return self.op(op_type, [self.env[node.args[0]]], node.name)
            x = self.env[node.args[0]]
            return self.op("Mul", [x, self.op("Sigmoid", [x], node.name + "_sig")], node.name)
        captured = self._captured_function(node)
        if captured is not None:
            return captured
        raise ExportError(f"{self.target}: function {getattr(t, '__name__', t)} at node {node.name} has no "
                          "ONNX lowering")

    def emit_method(self, node):
        t = node.target
        x = self.env[node.args[0]]
        if t in _ALIAS_METHODS:
            return x
        if t == "expand":
            return self._expand(node, x)
        if t == "mean":
            return self._mean(node, x)
        if t == "sum":
            return self._sum(node, x)
        if t == "softmax":
            _, dim = self._args(node, [("self", None), ("dim", None)])
            return self._softmax(node, x, int(dim))
        if t in ("squeeze", "unsqueeze"):
            return self._squeeze(node, x)
        if t in ("view", "reshape", "reshape_as", "view_as"):
            return self._reshape(node, x)
        if t == "flatten":
            _, start, end = self._args(node, [("self", None), ("start_dim", 0), ("end_dim", -1)])
            return self._flatten(node, x, start, end)
        if t in ("transpose", "permute", "t"):
            return self._transpose(node, x, node.args[1:])
        if t in ("chunk", "split"):
            return self._split(node)
        if t in ("mul", "div", "sub"):
            return self._binary(node)
        if t == "unbind":
            return self._unbind(node, x)
        if t in ("__invert__", "logical_not", "bitwise_not"):
            return self.op("Not", [x], node.name)
        raise ExportError(f"{self.target}: method .{t}() at node {node.name} has no ONNX lowering")

    # -- float islands: ops with no integer kernel, in float between a DequantizeLinear and a QuantizeLinear ----
    # Each is written with the float operations PyTorch's CPU kernels use (same formula, same order), so the
    # values differ from the fake-quant model's by float32 rounding only.

    def _c(self, node, name, value):
        return self.const(f"{node.name}_{name}", np32(value))

    def _hard_sigmoid6(self, node, x):
        """``min(max(x + 3, 0), 6)``, the clamp of hard-sigmoid and hard-swish."""
        y = self.op("Add", [x, self._c(node, "three", 3.0)], node.name + "_plus3")
        return self.op("Clip", [y, self._c(node, "zero", 0.0), self._c(node, "six", 6.0)], node.name + "_relu6")

    def _activation(self, node, kind: str, x, **p):
        n = node.name
        if kind == "silu":  # x / (1 + exp(-x))
            e = self.op("Exp", [self.op("Neg", [x], n + "_neg")], n + "_exp")
            return self.op("Div", [x, self.op("Add", [e, self._c(node, "one", 1.0)], n + "_den")], n)
        if kind == "gelu":
            if p.get("approximate", "none") == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                cube = self.op("Mul", [self.op("Mul", [x, x], n + "_sq"), x], n + "_cube")
                inner = self.op("Add", [x, self.op("Mul", [cube, self._c(node, "k", 0.044715)], n + "_kx3")],
                                n + "_inner")
                t = self.op("Tanh", [self.op("Mul", [inner, self._c(node, "beta", math.sqrt(2 / math.pi))],
                                             n + "_scaled")], n + "_tanh")
            else:  # x * 0.5 * (1 + erf(x / sqrt(2)))
                t = self.op("Erf", [self.op("Mul", [x, self._c(node, "rsqrt2", 1 / math.sqrt(2))], n + "_scaled")],
                            n + "_erf")
            half = self.op("Mul", [x, self._c(node, "half", 0.5)], n + "_half")
            return self.op("Mul", [half, self.op("Add", [t, self._c(node, "one", 1.0)], n + "_1p")], n)
        if kind == "hardsigmoid":  # min(max(x + 3, 0), 6) / 6
            return self.op("Div", [self._hard_sigmoid6(node, x), self._c(node, "six_d", 6.0)], n)
        if kind == "hardswish":  # x * min(max(x + 3, 0), 6) / 6
            y = self.op("Mul", [x, self._hard_sigmoid6(node, x)], n + "_x_relu6")
            return self.op("Div", [y, self._c(node, "six_d", 6.0)], n)
        if kind == "mish":  # x * tanh(softplus(x))
            return self.op("Mul", [x, self.op("Tanh", [self.op("Softplus", [x], n + "_softplus")], n + "_tanh")], n)
        if kind == "leaky_relu":
            return self.op("LeakyRelu", [x], n, alpha=float(p.get("negative_slope", 0.01)))
        if kind == "elu":
            return self.op("Elu", [x], n, alpha=float(p.get("alpha", 1.0)))
        if kind == "tanh":
            return self.op("Tanh", [x], n)
        if kind == "softmax":
            return self._softmax(node, x, int(p["dim"]))
        return None

    def _softmax(self, node, x, axis):
        """``exp(x - max) / sum``, as its own ops: onnxruntime fuses ``DequantizeLinear -> Softmax ->
        QuantizeLinear`` into QLinearSoftmax, whose exp table rounds otherwise (1 LSB at 4% of a ViT's attention
        weights); the spelled-out form stays float."""
        n = node.name
        axes = self.const(n + "_axes", np.array([axis], np.int64))
        peak = self.op("ReduceMax", [x], n + "_max", axes=[axis], keepdims=1)
        e = self.op("Exp", [self.op("Sub", [x, peak], n + "_shifted")], n + "_exp")
        return self.op("Div", [e, self.op("ReduceSum", [e, axes], n + "_sum", keepdims=1)], n)

    def _table_softmax(self, node, m, x):
        """A QuantSoftmax as the fake-quant model computes it (``table_softmax``, quantfx/nn/softmax.py): code
        distances to the row's max, a Gather from the same exp table, exact sums, one reciprocal; a float softmax
        where the model computes one (its row too long for exact sums)."""
        axis = int(m.dim)
        tabled = m.table_for(self.attribute(node.kwargs["input_quantizer"]), self.shape(node.args[0])[axis])
        if tabled is None:
            return self._softmax(node, x, axis)
        table, scale = tabled
        name = node.name
        peak = self.op("ReduceMax", [x], name + "_max", axes=[axis], keepdims=1)
        steps = self.op("Div", [self.op("Sub", [peak, x], name + "_below"), self._c(node, "scale", scale)],
                        name + "_steps")
        codes = self.op("Cast", [self.op("Round", [steps], name + "_round")], name + "_codes", to=7)  # int64
        e = self.op("Gather", [self.const(name + "_exp_table", table.numpy()), codes], name + "_exp", axis=0)
        total = self.op("ReduceSum", [e, self.const(name + "_axes", np.array([axis], np.int64))], name + "_sum",
                        keepdims=1)
        return self.op("Mul", [e, self.op("Reciprocal", [total], name + "_rsum")], name)

    def _prelu(self, node, x, weight):
        rank = len(self.shape(node))
        w = np32(weight).reshape(-1)
        slope = w.reshape((w.size,) + (1,) * (rank - 2)) if w.size > 1 and rank >= 2 else w
        return self.op("PRelu", [x, self.const(node.name + "_slope", slope)], node.name)

    def _normalized(self, n: str, x, axes: list, eps: float, out: str):
        """``(x - mean) * (1 / sqrt(var + eps))`` over ``axes``, its nodes named after ``n``, the result ``out``."""
        mean = self.op("ReduceMean", [x], n + "_mean", axes=axes, keepdims=1)
        d = self.op("Sub", [x, mean], n + "_centered")
        var = self.op("ReduceMean", [self.op("Mul", [d, d], n + "_sq")], n + "_var", axes=axes, keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.const(n + "_eps", np32(eps))], n + "_var_eps")], n + "_std")
        return self.op("Mul", [d, self.op("Reciprocal", [std], n + "_rstd")], out)

    def _affine(self, n: str, y, weight, bias, shape=None):
        """``y * weight + bias`` (either may be None), the parameters reshaped to ``shape`` if given; the result
        is named ``n``."""
        if weight is not None:
            w = np32(weight) if shape is None else np32(weight).reshape(shape)
            y = self.op("Mul", [y, self.const(n + "_weight", w)], n + "_scaled" if bias is not None else n)
        if bias is not None:
            b = np32(bias) if shape is None else np32(bias).reshape(shape)
            y = self.op("Add", [y, self.const(n + "_bias", b)], n)
        return y

    def _layer_norm(self, node, x, shape, weight, bias, eps):
        """``(x - mean) * (1 / sqrt(var + eps)) * weight + bias`` over the last ``len(shape)`` axes."""
        n = node.name
        affine = weight is not None or bias is not None
        y = self._normalized(n, x, list(range(-len(shape), 0)), eps, n + "_normed" if affine else n)
        return self._affine(n, y, weight, bias)

    def _group_norm(self, node, x, groups, weight, bias, eps):
        """LayerNorm over each group of channels (``x`` reshaped to N x groups x rest), then per-channel affine."""
        shape = self.shape(node)
        n = node.name
        affine = weight is not None or bias is not None
        grouped = self.op("Reshape", [x, self.const(n + "_groups", np.array([0, groups, -1], np.int64))], n + "_g")
        y = self._normalized(n + "_gn", grouped, [-1], eps, n + "_gn")
        y = self.op("Reshape", [y, self.const(n + "_shape", np.array([0] + list(shape[1:]), np.int64))],
                    n + "_ug" if affine else n)
        per_channel = (len(shape[1:]) and shape[1],) + (1,) * (len(shape) - 2)
        return self._affine(n, y, weight, bias, per_channel)

    def _sdpa(self, node):
        q, k, v, mask, dropout, causal, scale = self._args(node, [
            ("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
            ("is_causal", False), ("scale", None)])
        if dropout or (causal and mask is not None) or node.kwargs.get("enable_gqa"):
            raise ExportError(f"{self.target}: node {node.name}: scaled_dot_product_attention with dropout, "
                              "enable_gqa or both a mask and is_causal has no lowering here (eval, one of them)")
        n = node.name
        e = self.shape(q)[-1]
        rank = len(self.shape(k))
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        kt = self.op("Transpose", [self.env[k]], n + "_kT", perm=perm)
        scores = self.op("MatMul", [self.env[q], kt], n + "_scores")
        scores = self.op("Mul", [scores, self._c(node, "scale", scale if scale is not None else 1 / math.sqrt(e))],
                         n + "_scaled")
        if causal:
            length, source = self.shape(q)[-2], self.shape(k)[-2]
            keep = self.const(n + "_causal", np.tril(np.ones((length, source), dtype=bool)))
            scores = self.op("Where", [keep, scores, self._c(node, "masked", -np.inf)], n + "_masked")
        elif mask is not None:
            scores = self._attention_mask(node, scores, mask)
        attn = self._softmax(type("N", (), {"name": n + "_softmax"}), scores, -1)
        return self.op("MatMul", [attn, self.env[v]], n)

    def _mha(self, node, m):
        """nn.MultiheadAttention in eval without masks: the input projections, per-head attention, the output
        projection; returns (output, None) as the module does with need_weights=False."""
        query, key, value = (node.args + (None, None, None))[:3]
        key = key if key is not None else node.kwargs.get("key")
        value = value if value is not None else node.kwargs.get("value")
        extra = {k: v for k, v in node.kwargs.items() if k not in ("key", "value", "need_weights")}
        if node.kwargs.get("need_weights", True) or any(v is not None and v is not False for v in extra.values()) \
                or not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise ExportError(f"{self.target}: node {node.name}: MultiheadAttention lowers with need_weights=False, "
                              "no masks, one embedding size for query, key and value, no bias_k/bias_v")
        n, e, h = node.name, m.embed_dim, m.num_heads
        d = e // h
        w = np32(m.in_proj_weight)
        b = np32(m.in_proj_bias) if m.in_proj_bias is not None else None
        heads = []
        for i, (src, what) in enumerate(((query, "q"), (key, "k"), (value, "v"))):
            x = self.env[src] if m.batch_first else self.op("Transpose", [self.env[src]], f"{n}_{what}_bf",
                                                               perm=[1, 0, 2])
            y = self.op("MatMul", [x, self.const(f"{n}_{what}_wT", w[i * e:(i + 1) * e].T.copy())], f"{n}_{what}_mm")
            if b is not None:
                y = self.op("Add", [y, self.const(f"{n}_{what}_b", b[i * e:(i + 1) * e])], f"{n}_{what}_proj")
            y = self.op("Reshape", [y, self.const(f"{n}_{what}_heads", np.array([0, 0, h, d], np.int64))],
                        f"{n}_{what}_split")
            heads.append(self.op("Transpose", [y], f"{n}_{what}_bhld", perm=[0, 2, 1, 3]))
        q, k, v = heads
        kt = self.op("Transpose", [k], n + "_kT", perm=[0, 1, 3, 2])
        scores = self.op("Mul", [self.op("MatMul", [q, kt], n + "_scores"), self._c(node, "scale", 1 / math.sqrt(d))],
                         n + "_scaled")
        attn = self._softmax(type("N", (), {"name": n + "_softmax"}), scores, -1)
        y = self.op("Transpose", [self.op("MatMul", [attn, v], n + "_attend")], n + "_blhd", perm=[0, 2, 1, 3])
        y = self.op("Reshape", [y, self.const(n + "_merge", np.array([0, 0, e], np.int64))], n + "_merged")
        y = self.op("MatMul", [y, self.const(n + "_out_wT", np32(m.out_proj.weight).T.copy())], n + "_out_mm")
        if m.out_proj.bias is not None:
            y = self.op("Add", [y, self.const(n + "_out_b", np32(m.out_proj.bias))], n + "_out")
        if not m.batch_first:
            y = self.op("Transpose", [y], n + "_seq_first", perm=[1, 0, 2])
        return (y, None)

    def _reduced_axes(self, node):
        _, dim, keepdim = self._args(node, [("input", None), ("dim", None), ("keepdim", False)])
        rank = len(self.shape(data_input(node)))
        dims = list(range(rank)) if dim is None else [d % rank for d in (dim if isinstance(dim, (list, tuple))
                                                                        else [dim])]
        return dims, int(bool(keepdim))

    def _mean(self, node, x):
        dims, keepdim = self._reduced_axes(node)
        return self.op("ReduceMean", [x], node.name, axes=dims, keepdims=keepdim)

    def _sum(self, node, x):
        """``x.sum(dim)`` (ResNeSt's split attention sums its radix branches): ReduceSum, axes as an input."""
        if node.kwargs.get("dtype") is not None:
            raise ExportError(f"{self.target}: node {node.name}: sum with a dtype has no lowering")
        dims, keepdim = self._reduced_axes(node)
        axes = self.const(node.name + "_axes", np.array(dims, np.int64))
        return self.op("ReduceSum", [x, axes], node.name, keepdims=keepdim)

    _ISLAND_MODULES = {nn.SiLU: "silu", nn.GELU: "gelu", nn.Hardsigmoid: "hardsigmoid", nn.Hardswish: "hardswish",
                       nn.Mish: "mish", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.Softmax: "softmax"}
    _ISLAND_FUNCTIONS = {F.silu: "silu", F.gelu: "gelu", F.hardsigmoid: "hardsigmoid", F.hardswish: "hardswish",
                         F.mish: "mish", F.leaky_relu: "leaky_relu", F.elu: "elu", F.softmax: "softmax",
                         torch.softmax: "softmax"}

    def emit_float_island_module(self, node, m, x):
        """The ONNX ops of a float-island module (activation, normalization), or None for other modules."""
        if isinstance(m, QuantSoftmax):
            return self._table_softmax(node, m, x)
        kind = self._ISLAND_MODULES.get(type(m))
        if kind is not None:
            params = {"approximate": getattr(m, "approximate", "none"),
                      "negative_slope": getattr(m, "negative_slope", 0.01), "alpha": getattr(m, "alpha", 1.0),
                      "dim": getattr(m, "dim", None)}
            if kind == "softmax" and m.dim is None:
                raise ExportError(f"{self.target}: {node.target}: nn.Softmax without dim has no lowering")
            return self._activation(node, kind, x, **params)
        if isinstance(m, nn.PReLU):
            return self._prelu(node, x, m.weight)
        if isinstance(m, nn.LayerNorm):
            return self._layer_norm(node, x, tuple(m.normalized_shape), m.weight, m.bias, float(m.eps))
        if isinstance(m, nn.MultiheadAttention):
            return self._mha(node, m)
        if isinstance(m, nn.Embedding):
            return self._embedding(node, m, x)
        if isinstance(m, nn.GroupNorm):
            return self._group_norm(node, x, m.num_groups, m.weight if m.affine else None,
                                    m.bias if m.affine else None, float(m.eps))
        return None

    def emit_float_island_function(self, node):
        t = node.target
        kind = self._ISLAND_FUNCTIONS.get(t)
        if kind is not None:
            x = self.env[node.args[0]]
            names = {"silu": [], "mish": [], "hardsigmoid": [], "hardswish": [], "gelu": [],
                     "leaky_relu": [("negative_slope", 0.01)], "elu": [("alpha", 1.0)], "softmax": [("dim", None)]}
            values = dict(zip([k for k, _ in names[kind]],
                              self._args(node, [("input", None)] + names[kind])[1:]))
            values.setdefault("approximate", node.kwargs.get("approximate", "none"))
            return self._activation(node, kind, x, **values)
        if t is F.layer_norm:
            _, shape, w, b, eps = self._args(node, [("input", None), ("normalized_shape", None), ("weight", None),
                                                    ("bias", None), ("eps", 1e-5)])
            wv = self.attribute(w) if isinstance(w, fx.Node) and w.op == "get_attr" else None
            bv = self.attribute(b) if isinstance(b, fx.Node) and b.op == "get_attr" else None
            if (w is not None and wv is None) or (b is not None and bv is None):
                raise ExportError(f"{self.target}: node {node.name}: layer_norm with computed weights has no lowering")
            return self._layer_norm(node, self.env[node.args[0]], tuple(shape), wv, bv, float(eps))
        if t is F.prelu:
            w = node.args[1]
            return self._prelu(node, self.env[node.args[0]], self.attribute(w))
        if t is F.scaled_dot_product_attention:
            return self._sdpa(node)
        return None

    def _expand(self, node, x):
        """``x.expand(sizes)``: ONNX Expand to the sizes, each -1 the input's own, each size read off a tensor's
        shape (``y.shape[0]``: the dynamic batch) taken from that tensor at run time."""
        sizes = node.args[1:]
        sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes
        inp = self.shape(node.args[0])
        parts = []
        for i, s in enumerate(sizes):
            src = _shape_source(s)
            if src is not None:
                tensor, axis = src
                shp = self.op("Shape", [self.env[tensor]], f"{node.name}_shape{i}")
                parts.append(self.op("Gather", [shp, self.const(f"{node.name}_axis{i}", np.array([axis], np.int64))],
                                     f"{node.name}_dim{i}", axis=0))
            else:
                value = self.static_value(s) if isinstance(s, fx.Node) else s
                value = inp[i - (len(sizes) - len(inp))] if value == -1 else value
                parts.append(self.const(f"{node.name}_size{i}", np.array([value], np.int64)))
        shape = self.op("Concat", parts, node.name + "_sizes", axis=0)
        return self.move("Expand", [x, shape], node.name)

    def _transpose(self, node, x, dims):
        rank = len(self.shape(node))
        if node.target in ("transpose", torch.transpose):
            a, b = (d % rank for d in dims[:2])
            perm = list(range(rank))
            perm[a], perm[b] = perm[b], perm[a]
        elif node.target in ("t", torch.t):
            perm = [1, 0]
        else:
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
            perm = [d % rank for d in dims]
        return self.move("Transpose", [x], node.name, perm=perm)

    def _split(self, node):
        x = self.env[node.args[0]]
        shape = self.shape(node.args[0])
        if node.target in (torch.chunk, "chunk"):
            _, chunks, dim = self._args(node, [("input", None), ("chunks", None), ("dim", 0)])
            dim %= len(shape)
            size = math.ceil(shape[dim] / chunks)
            sizes = [min(size, shape[dim] - i) for i in range(0, shape[dim], size)]
        else:
            _, split, dim = self._args(node, [("tensor", None), ("split_size_or_sections", None), ("dim", 0)])
            dim %= len(shape)
            sizes = list(split) if isinstance(split, (list, tuple)) else \
                [min(split, shape[dim] - i) for i in range(0, shape[dim], split)]
        outs = self.move("Split", [x, self.const(node.name + "_sizes", np.array(sizes, np.int64))], node.name,
                       n_out=len(sizes), axis=dim)
        return tuple(outs) if isinstance(outs, list) else (outs,)

    def _getitem(self, node):
        src, idx = node.args
        value = self.env[src]
        if isinstance(value, tuple):
            return value[idx]
        shape = self.shape(src)
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(item, fx.Node) for item in idx):
            return self._gather(node, value, idx)
        starts, ends, axes, steps, squeeze = [], [], [], [], []
        for axis, item in enumerate(idx):
            if item is Ellipsis:
                raise ExportError(f"{self.target}: node {node.name}: Ellipsis indexing has no lowering")
            if isinstance(item, slice):
                item = slice(*(self.static_value(v) if isinstance(v, fx.Node) else v  # Swin: x[:, :H, :W]
                               for v in (item.start, item.stop, item.step)))
                if item == slice(None):
                    continue
                s, e, st = item.indices(shape[axis])
                starts.append(s), ends.append(e), axes.append(axis), steps.append(st)
            elif isinstance(item, int):
                i = item % shape[axis]
                starts.append(i), ends.append(i + 1), axes.append(axis), steps.append(1)
                squeeze.append(axis)
            else:
                raise ExportError(f"{self.target}: node {node.name}: index {item!r} has no lowering")
        y = value
        if axes:
            y = self.move("Slice", [value, self.const(node.name + "_starts", np.array(starts, np.int64)),
                                  self.const(node.name + "_ends", np.array(ends, np.int64)),
                                  self.const(node.name + "_axes", np.array(axes, np.int64)),
                                  self.const(node.name + "_steps", np.array(steps, np.int64))],
                        node.name if not squeeze else node.name + "_slice")
        if squeeze:
            y = self.move("Squeeze", [y, self.const(node.name + "_sq", np.array(squeeze, np.int64))], node.name)
        return y

    # -- lowerings the timm catalogue needs (issue 27): indexing by a tensor, resizing ----------------------

    def _gather(self, node, value, idx):
        """``x[:, index]``: indexing by one integer tensor (a registered buffer, as EfficientFormer's attention-bias
        indices, or a computed one), every other axis whole: ONNX Gather on that axis."""
        axes = [axis for axis, item in enumerate(idx) if isinstance(item, fx.Node)]
        if len(axes) != 1 or any(item != slice(None) for item in idx if not isinstance(item, fx.Node)):
            raise ExportError(f"{self.target}: node {node.name}: indexing by {idx!r} has no lowering; index one axis "
                              "by one integer tensor and take the other axes whole (x[:, index])")
        index = idx[axes[0]]
        if index.op == "get_attr":
            indices = self.const(node.name + "_indices", np.asarray(self.attribute(index).detach(), np.int64))
        else:
            indices = self.op("Cast", [self.env[index]], node.name + "_indices", to=int(ir.DataType.INT64))
        return self.move("Gather", [value, indices], node.name, axis=axes[0])

    def _roll(self, node, x):
        """``torch.roll(x, shifts, dims)`` (Swin's shifted windows): per axis, the last ``shift`` entries moved to
        the front, as two Slices and a Concat."""
        _, shifts, dims = self._args(node, [("input", None), ("shifts", None), ("dims", None)])
        if dims is None:
            raise ExportError(f"{self.target}: node {node.name}: torch.roll without dims (a flattened roll) has no "
                              "lowering; give dims")
        shifts = shifts if isinstance(shifts, (list, tuple)) else [shifts]
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        shape = self.shape(node.args[0])
        for i, (shift, dim) in enumerate(zip(shifts, dims)):
            shift = self.static_value(shift) if isinstance(shift, fx.Node) else shift
            n = shape[dim]
            cut = (n - shift % n) % n
            if cut == 0:
                continue
            parts = []
            for j, (lo, hi) in enumerate(((cut, n), (0, cut))):
                parts.append(self.move("Slice", [x, self.const(f"{node.name}_{i}{j}_lo", np.array([lo], np.int64)),
                                                 self.const(f"{node.name}_{i}{j}_hi", np.array([hi], np.int64)),
                                                 self.const(f"{node.name}_{i}{j}_ax", np.array([dim], np.int64))],
                                       f"{node.name}_{i}{j}"))
            x = self.move("Concat", parts, f"{node.name}_{i}", axis=dim % len(shape))
        return x

    def _unbind(self, node, x):
        """``x.unbind(dim)`` (ViT's ``q, k, v = qkv.unbind(0)``): Split into pieces of 1, each squeezed."""
        _, dim = self._args(node, [("input", None), ("dim", 0)])
        shape = self.shape(node.args[0])
        dim %= len(shape)
        parts = self.move("Split", [x, self.const(node.name + "_sizes", np.ones(shape[dim], np.int64))], node.name,
                          n_out=shape[dim], axis=dim)
        parts = parts if isinstance(parts, list) else [parts]
        axes = self.const(node.name + "_axes", np.array([dim], np.int64))
        return tuple(self.move("Squeeze", [p, axes], f"{node.name}_{i}") for i, p in enumerate(parts))

    def _resize(self, node, x, mode: str, align_corners):
        """``nn.Upsample`` / ``F.interpolate`` to the traced output size: ONNX Resize with PyTorch's coordinate
        rule for the mode (nearest: ``floor(out x in / out)``; linear: half-pixel, or align-corners)."""
        ins, out = self.shape(node.args[0]), self.shape(node)
        scales = self.const(node.name + "_scales", np.array([o / i for o, i in zip(out, ins)], np.float32))
        if mode == "nearest":
            attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        elif mode in ("linear", "bilinear", "trilinear"):
            attrs = dict(mode="linear", coordinate_transformation_mode="align_corners" if align_corners
                         else "pytorch_half_pixel")
        else:
            raise ExportError(f"{self.target}: node {node.name}: interpolation mode {mode!r} has no ONNX lowering; "
                              "use 'nearest' or '(bi)linear'")
        return self.op("Resize", [x, self.const(node.name + "_roi", np.zeros(0, np.float32)), scales], node.name,
                       **attrs)

    def _pad(self, node, pad=None, value=None):
        """F.pad (constant mode), or a ZeroPad module's ``pad`` (F.pad's order: last axis first)."""
        if pad is None:
            _, pad, mode, value = self._args(node, [("input", None), ("pad", None), ("mode", "constant"),
                                                    ("value", None)])
            if mode != "constant":
                raise ExportError(f"{self.target}: node {node.name}: F.pad mode {mode!r} has no lowering")
        rank = len(self.shape(node))
        pad = [self.static_value(p) if isinstance(p, fx.Node) else p for p in pad]  # sizes computed from shapes
        begins, ends = [0] * rank, [0] * rank
        for i in range(len(pad) // 2):
            axis = rank - 1 - i
            begins[axis], ends[axis] = pad[2 * i], pad[2 * i + 1]
        return self.move("Pad", [self.env[node.args[0]], self.const(node.name + "_pads", np.array(begins + ends,
                                                                                               np.int64)),
                               self.const(node.name + "_value", np.float32(value or 0.0))], node.name)

    def _binary(self, node):
        op_type = {operator.mul: "Mul", torch.mul: "Mul", "mul": "Mul", operator.truediv: "Div", "div": "Div",
                   operator.sub: "Sub", torch.sub: "Sub", "sub": "Sub", operator.add: "Add",
                   torch.add: "Add"}[node.target]
        ins = []
        for i, a in enumerate(node.args[:2]):
            if isinstance(a, fx.Node) and not self.is_tensor(a):
                a = self.static_value(a)  # shape arithmetic (h / 16): a constant of this graph
            ins.append(self.env[a] if isinstance(a, fx.Node) else self.const(f"{node.name}_c{i}", np.float32(a)))
        return self.op(op_type, ins, node.name)

    # -- ops of graphs captured by torch.export (issue 27, capture): attention masks, embeddings, masking ---------

    def _attention_mask(self, node, scores, mask):
        """scores masked as scaled_dot_product_attention does: a boolean mask keeps where True (-inf elsewhere),
        a float mask is added."""
        m = self.env[mask]
        dtype = self.attribute(mask).dtype if mask.op == "get_attr" else \
            getattr(mask.meta.get("tensor_meta"), "dtype", torch.float32)
        if dtype == torch.bool:
            return self.op("Where", [m, scores, self._c(node, "masked", -np.inf)], node.name + "_masked")
        return self.op("Add", [scores, m], node.name + "_masked")

    _ELEMENTWISE = {torch.exp: "Exp", torch.sqrt: "Sqrt", operator.neg: "Neg", torch.neg: "Neg"}

    def _captured_function(self, node):
        """Element-wise float functions that decomposed activations are made of (GPT-2's tanh GELU spells
        ``x ** 3``), or None."""
        t = node.target
        if t in self._ELEMENTWISE:
            return self.op(self._ELEMENTWISE[t], [self.env[node.args[0]]], node.name)
        if t is torch.rsqrt:
            x = self.op("Sqrt", [self.env[node.args[0]]], node.name + "_sqrt")
            return self.op("Reciprocal", [x], node.name)
        if t is torch.unbind:
            _, dim = self._args(node, [("input", None), ("dim", 0)])
            shape = self.shape(node.args[0])
            dim %= len(shape)
            parts = self.move("Split", [self.env[node.args[0]], self.const(node.name + "_sizes", np.ones(
                shape[dim], np.int64))], node.name + "_split", n_out=shape[dim], axis=dim)
            parts = parts if isinstance(parts, list) else [parts]
            axes = self.const(node.name + "_axis", np.array([dim], np.int64))
            return tuple(self.move("Squeeze", [p, axes], f"{node.name}_{i}") for i, p in enumerate(parts))
        if t is torch.pow and isinstance(node.args[1], (int, float)):
            return self.op("Pow", [self.env[node.args[0]], self._c(node, "exponent", node.args[1])], node.name)
        return None

    def _embedding(self, node, m, ids):
        """nn.Embedding: the rows of its (float) table gathered by the integer ids."""
        if m.max_norm is not None:
            raise ExportError(f"{self.target}: {node.target}: nn.Embedding with max_norm has no lowering")
        return self.op("Gather", [self.const(node.target + ".weight", np32(m.weight)), ids], node.name, axis=0)


def _size_args(node) -> list:
    """The target sizes of a ``reshape`` / ``view`` call as written (ints and nodes of shape arithmetic)."""
    if not ((node.op == "call_method" and node.target in ("view", "reshape")) or
            (node.op == "call_function" and node.target is torch.reshape)):
        return []
    sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
    sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes
    return list(sizes)


def _reads_batch(size) -> bool:
    """Whether a size expression reads dimension 0 of a tensor (the batch) at run time."""
    source = _shape_source(size)
    if source is not None:
        return source[1] == 0
    return isinstance(size, fx.Node) and size.op == "call_function" and \
        getattr(size.target, "__module__", None) in ("_operator", "operator") and \
        any(_reads_batch(a) for a in size.all_input_nodes)


def _shape_source(size):
    """(tensor node, axis) when ``size`` is ``tensor.shape[axis]`` / ``tensor.size(axis)`` in the graph, else None."""
    if not isinstance(size, fx.Node):
        return None
    if size.op == "call_function" and size.target is operator.getitem and isinstance(size.args[1], int):
        shape = size.args[0]
        if isinstance(shape, fx.Node) and ((shape.op == "call_function" and shape.target is getattr and
                                            shape.args[1] == "shape") or
                                           (shape.op == "call_method" and shape.target == "size" and
                                            len(shape.args) == 1)):
            return shape.args[0], size.args[1]
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2 and isinstance(size.args[1], int):
        return size.args[0], size.args[1]
    return None


__all__ = ["OnnxLowering", "np32", "NODE_VALUES_KEY", "FLOAT_ISLANDS_KEY", "file_float_islands", "feed", "save_onnx",
           "load_onnx", "node_values", "with_values",
           "not_quantfx"]
