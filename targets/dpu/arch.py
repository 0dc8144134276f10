"""DPU architectures as data, and the legality analysis: which node of a compiled graph the DPU runs, which the CPU
runs, and why (rule and limit).

Limits are read from the Vitis AI User Guide UG1414 v3.0, table "Currently Supported Operators" (column
DPUCZDX8G_ISA1_B4096: channel_parallel 16, bank_depth 2048; conv2d kernel w, h in [1, 16], strides in [1, 8],
pads in [0, (kernel - 1) * dilation], ``kernel_w * kernel_h * ceil(input_channel / channel_parallel) <=
bank_depth``, ``output_channel <= 256 * channel_parallel``, ``dilation * input_channel <= 256 *
channel_parallel``) and the DPU product guides' feature tables (PG338 for DPUCZDX8G, PG367 for DPUCAHX8H: pooling
kernels and strides in [1, 8], average pooling square; transposed conv kernel and stride in [1, 16]; activations
ReLU, ReLU6, LeakyReLU, hard-sigmoid, hard-swish). The smaller DPUCZDX8G cores differ in channel parallelism
(PG338: B512 is 4x8x8, B1024 8x8x8, B4096 8x16x16: pixel x input-channel x output-channel parallelism); their
bank depth is taken as B4096's.

A profile variant is one more :class:`DpuArch` in :data:`ARCHS` (a new table, not new control flow).
"""
from __future__ import annotations

import json
import math
import operator
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch.nn.functional as F
from torch import fx, nn

from quantfx.classify import HARD_SIGMOID_SCALE, hard_swish_parts
from quantfx.errors import QuantArgumentError
from quantfx.graph import (
    float_island, is_act_quant, is_add, is_cat, is_compute, is_invariant, is_link, is_product, module_of, qmeta,
)
from quantfx.nn import QuantHardTanh, QuantIdentity, QuantLeakyReLU, QuantReLU, QuantSigmoid

from .positions import HARD_SIGMOID_IN, fix_pos, hard_sigmoid_input


@dataclass(frozen=True)
class DpuArch:
    """What one DPU configuration accepts (UG1414 / PG338 limits; ranges are inclusive)."""

    name: str
    channel_parallel: int
    bank_depth: int
    conv_kernel: tuple = (1, 16)
    conv_stride: tuple = (1, 8)
    dwconv_kernel: tuple = (1, 16)
    dwconv_stride: tuple = (1, 8)
    tconv_kernel: tuple = (1, 16)
    tconv_stride: tuple = (1, 16)
    pool_kernel: tuple = (1, 8)
    pool_stride: tuple = (1, 8)
    activations: tuple = ("relu", "relu6", "leaky_relu", "hard_sigmoid", "hard_swish")

    @property
    def max_channels(self) -> int:
        return 256 * self.channel_parallel


DPUCZDX8G_B4096 = DpuArch("DPUCZDX8G_ISA1_B4096", channel_parallel=16, bank_depth=2048)
ARCHS: dict[str, DpuArch] = {a.name: a for a in (
    DPUCZDX8G_B4096,
    replace(DPUCZDX8G_B4096, name="DPUCZDX8G_ISA1_B1024", channel_parallel=8),
    replace(DPUCZDX8G_B4096, name="DPUCZDX8G_ISA1_B512", channel_parallel=8),
    # PG367: DPUCAHX8H (U50/U280), strides [1, 4], depthwise kernels [1, 3] with strides [1, 2]
    DpuArch("DPUCAHX8H_ISA2", channel_parallel=16, bank_depth=2048, conv_stride=(1, 4), dwconv_kernel=(1, 3),
            dwconv_stride=(1, 2), activations=("relu", "relu6", "leaky_relu")),
)}
DEFAULT_ARCH = DPUCZDX8G_B4096.name


def get_arch(arch) -> DpuArch:
    if isinstance(arch, DpuArch):
        return arch
    if arch not in ARCHS:
        raise QuantArgumentError(f"dpu: unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch]


@dataclass
class Placement:
    """Where one node of the compiled graph runs: ``device`` 'DPU' or 'CPU', the operator as the DPU names it,
    and for the CPU why (the rule and its limit)."""

    node: str
    op: str
    device: str
    rule: str = ""
    limit: str = ""


@dataclass
class DpuReport:
    """The legality of every node for one architecture, and the refine pass's changes of fix positions."""

    arch: str
    nodes: list = field(default_factory=list)  # Placement
    refine: list = field(default_factory=list)  # refine.Change as dicts

    def on(self, device: str) -> list:
        return [p for p in self.nodes if p.device == device]

    def to_json(self) -> str:
        return json.dumps({"arch": self.arch, "nodes": [asdict(p) for p in self.nodes], "refine": self.refine})

    @classmethod
    def from_json(cls, text: str) -> "DpuReport":
        d = json.loads(text)
        return cls(d["arch"], [Placement(**p) for p in d["nodes"]], d.get("refine", []))

    def table(self) -> str:
        rows = [("node", "op", "device", "rule / limit")]
        rows += [(p.node, p.op, p.device, f"{p.rule} ({p.limit})" if p.rule else "") for p in self.nodes]
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"DPU report for {self.arch}: {len(self.on('DPU'))} nodes on the DPU, {len(self.on('CPU'))} on "
                 "the CPU"]
        lines += [f"{a:{w[0]}s}  {b:{w[1]}s}  {c:{w[2]}s}  {d}".rstrip() for a, b, c, d in rows]
        if self.refine:
            lines.append("refined fix positions:")
            lines += [f"  {c['node']} {c['tensor']}: {c['old']} -> {c['new']} ({c['rule']}, {c['limit']})"
                      for c in self.refine]
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def _pair(v, n=2):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


def _within(name, values, rng) -> Optional[tuple[str, str]]:
    bad = [v for v in values if not rng[0] <= v <= rng[1]]
    return (f"{name} {tuple(values)}", f"[{rng[0]}, {rng[1]}]") if bad else None


DPU_LEAKY_SLOPE = 26 / 256
_PRODUCT_RULE = "a product of two tensors other than hard-swish's x * hard_sigmoid(x) is not mapped to the DPU here"


class Legality:
    """Places every node of a compiled graph on the DPU or the CPU for ``arch``; ``shapes`` maps fx nodes to
    their output shapes (the lowering's), for pooling windows and input channels."""

    def __init__(self, gm: fx.GraphModule, arch: DpuArch, shapes: dict):
        self.gm, self.arch, self.shapes = gm, arch, shapes

    def run(self) -> list[Placement]:
        out = []
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr") or is_link(self.gm, node) or node not in self.shapes:
                continue
            out.append(self.place(node))
        return out

    def place(self, node) -> Placement:
        gm = self.gm
        m = module_of(gm, node)
        if is_compute(gm, node):
            return self._layer(node, m)
        if is_act_quant(gm, node):
            return self._act(node, m)
        if is_add(node):
            return Placement(node.name, "elementwise-sum", "DPU")
        if is_product(gm, node):  # on integers, on the accumulator grid (passes/quantize_products.py)
            if m.op == "mul":
                return Placement(node.name, "elementwise-mul", "CPU", _PRODUCT_RULE,
                                 "keep it on the CPU (on integers), or write the gate as a hard-swish")
            return Placement(node.name, "matmul", "CPU", "a matmul of two activations is not in UG1414's DPU "
                             "operator table", "it runs on the CPU, on integers, between DPU subgraphs")
        if is_cat(node):
            return Placement(node.name, "concat", "DPU")
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or \
                node.target in (F.max_pool2d, F.avg_pool2d):
            return self._pool(node, m)
        if node.op == "call_function" and node.target in (F.relu6, operator.add, operator.mul):
            return self._approx(node)
        if is_invariant(gm, node):
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            if isinstance(m, nn.Module):
                what = type(m).__name__
            if what in ("transpose", "permute", "Transpose", "t"):
                return Placement(node.name, "transpose", "CPU", "transpose is not in UG1414's DPU operator table",
                                 "the compiler fuses only a channel shuffle")
            return Placement(node.name, f"layout ({what})", "DPU")
        if isinstance(m, nn.LeakyReLU):
            return self._leaky(node, m.negative_slope)
        what = type(m).__name__ if m is not None else getattr(node.target, "__name__", str(node.target))
        island = float_island(gm, node)
        if island is not None:
            return Placement(node.name, what, "CPU", f"float island: {island}",
                             "it runs in float on the CPU between DPU subgraphs")
        return Placement(node.name, what, "CPU", "float operator: not quantized, the DPU computes on int8 only",
                         "quantize it (drop its override) or keep it on the CPU")

    def _approx(self, node) -> Placement:
        """The float ops of passes/approximate_activations.py: hard-sigmoid/hard-swish and the average pool's
        correction, which the DPU computes in the layer or pool they follow."""
        const = [a for a in node.args if isinstance(a, (int, float))]
        x = hard_sigmoid_input(node)
        if x is None and node.target is operator.mul and not const and hard_swish_parts(self.gm, node) is not None:
            x = hard_swish_parts(self.gm, node)[0]
        meta = qmeta(x) if x is not None else None
        if meta is not None and meta.scale is not None and fix_pos(meta.scale) > HARD_SIGMOID_IN[1]:
            # refine keeps a hard-swish's input position (its x is the product's operand too)
            return Placement(node.name, "hard_swish" if node.target is operator.mul and not const else
                             "hard_sigmoid", "CPU", f"hard-sigmoid input position {fix_pos(meta.scale)}",
                             f"[{HARD_SIGMOID_IN[0]}, {HARD_SIGMOID_IN[1]}]")
        if node.target is F.relu6 or (node.target is operator.add and const == [3.0]):
            return self._named(node, "hard_sigmoid")
        if node.target is operator.mul and const == [HARD_SIGMOID_SCALE]:
            return self._named(node, "hard_sigmoid")
        if node.target is operator.mul and const and node.args[0].target is F.avg_pool2d:
            return Placement(node.name, "avgpool2d (k / 2^n correction)", "DPU")
        if node.target is operator.mul and not const:
            if hard_swish_parts(self.gm, node) is not None:
                return self._named(node, "hard_swish")
            return Placement(node.name, "elementwise-mul", "CPU", _PRODUCT_RULE,
                             "keep it on the CPU, or write the gate as a hard-swish")
        return Placement(node.name, getattr(node.target, "__name__", str(node.target)), "CPU",
                         "float operator: not quantized, the DPU computes on int8 only",
                         "quantize it or keep it on the CPU")

    def _named(self, node, op) -> Placement:
        if op in self.arch.activations:
            return Placement(node.name, op, "DPU")
        return Placement(node.name, op, "CPU", f"activation {op} is not one the DPU computes",
                         "/".join(self.arch.activations))

    def _leaky(self, node, slope) -> Placement:
        """A LeakyReLU runs on the DPU with slope 26/256 only (Vitis AI vai_q_pytorch,
        ``pytorch_nndct/hardware/dpu_op_filter.py``: filter_leaky_relu and check_nonlinear place any other slope
        on the CPU; the vai_q_tensorflow2 README says the same of alpha != 0.1)."""
        if slope != DPU_LEAKY_SLOPE:
            return Placement(node.name, "leaky_relu", "CPU", f"LeakyReLU slope {slope} ({slope * 256:g}/256)",
                             "the DPU computes only slope 26/256 (0.1 in the float model)")
        return self._named(node, "leaky_relu")

    def _act(self, node, m) -> Placement:
        if isinstance(m, QuantLeakyReLU):
            return self._leaky(node, m.negative_slope)
        if isinstance(m, QuantReLU):
            op = "relu" if m.max_val is None else ("relu6" if float(m.max_val) == 6.0 else "clip")
        elif isinstance(m, QuantHardTanh):
            op = "relu6" if float(m.min_val) == 0.0 and float(m.max_val) == 6.0 else "clip"
        elif isinstance(m, QuantSigmoid):
            op = "sigmoid"
        elif isinstance(m, QuantIdentity):
            return Placement(node.name, "requantize", "DPU")
        else:
            op = type(m).__name__
        if op in self.arch.activations:
            return Placement(node.name, op, "DPU")
        return Placement(node.name, op, "CPU", f"activation {op} is not one the DPU computes",
                         "/".join(self.arch.activations))

    def _layer(self, node, m) -> Placement:
        a = self.arch
        if isinstance(m, nn.Linear):
            cin = m.in_features
            if math.ceil(cin / a.channel_parallel) > a.bank_depth:
                return Placement(node.name, "inner-product", "CPU", f"input_channel {cin}",
                                 f"ceil(input_channel / {a.channel_parallel}) <= bank_depth {a.bank_depth}")
            if m.out_features > a.max_channels:
                return Placement(node.name, "inner-product", "CPU", f"output_channel {m.out_features}",
                                 f"<= 256 * channel_parallel = {a.max_channels}")
            return Placement(node.name, "inner-product", "DPU")
        if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            return Placement(node.name, type(m).__name__, "CPU", f"{len(m.kernel_size)}-d convolution",
                             "the DPUCZDX8G computes 2-d convolutions only")
        k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        cin, cout, g = m.in_channels, m.out_channels, m.groups
        transposed = isinstance(m, nn.ConvTranspose2d)
        depthwise = g > 1 and g == cin == cout
        op = ("depthwise-" if depthwise else "") + ("transposed-conv2d" if transposed else "conv2d")
        if g > 1 and not depthwise:
            return Placement(node.name, op, "CPU", f"groups {g} with {cin} -> {cout} channels",
                             "conv2d (groups 1) or depthwise-conv2d (groups = channels)")
        kr, sr = (a.tconv_kernel, a.tconv_stride) if transposed else \
            (a.dwconv_kernel, a.dwconv_stride) if depthwise else (a.conv_kernel, a.conv_stride)
        checks = [_within("kernel", k, kr), _within("stride", s, sr)]
        if not isinstance(m.padding, str):
            p = _pair(m.padding)
            checks.append(None if transposed else
                          _within("padding", p, (0, min((kk - 1) * dd for kk, dd in zip(k, d)))))
        in_size = k[0] * k[1] * math.ceil((1 if depthwise else cin) / a.channel_parallel)
        if in_size > a.bank_depth:
            checks.append((f"kernel_w * kernel_h * ceil(input_channel / {a.channel_parallel}) = {in_size}",
                           f"<= bank_depth {a.bank_depth}"))
        if cout > a.max_channels:
            checks.append((f"output_channel {cout}", f"<= 256 * channel_parallel = {a.max_channels}"))
        if max(d) > 1 and max(d) * cin > a.max_channels:
            checks.append((f"dilation * input_channel = {max(d) * cin}", f"<= {a.max_channels}"))
        bad = next((c for c in checks if c), None)
        if bad:
            return Placement(node.name, op, "CPU", *bad)
        return Placement(node.name, op, "DPU")

    def _pool(self, node, m) -> Placement:
        a = self.arch
        avg = isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)) or node.target is F.avg_pool2d
        op = "avgpool2d" if avg else "maxpool2d"
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            ins, outs = self.shapes[node.args[0]][-2:], self.shapes[node][-2:]
            if ins[0] % outs[0] or ins[1] % outs[1]:
                return Placement(node.name, op, "CPU", f"adaptive pool {tuple(ins)} -> {tuple(outs)}",
                                 "even windows")
            k = (ins[0] // outs[0], ins[1] // outs[1])
            s = k
        elif m is not None:
            k = _pair(m.kernel_size)
            s = _pair(m.stride or m.kernel_size)
        else:
            k = _pair(node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"])
            st = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
            s = _pair(st or k)
        bad = _within("kernel", k, a.pool_kernel) or _within("stride", s, a.pool_stride)
        if not bad and avg and k[0] != k[1]:
            bad = (f"kernel {k}", "average pooling kernels are square")
        if bad:
            return Placement(node.name, op, "CPU", *bad)
        return Placement(node.name, op, "DPU")


def legality(gm: fx.GraphModule, shapes: dict, arch=DEFAULT_ARCH) -> list[Placement]:
    """Every node of ``gm`` placed on the DPU or the CPU for ``arch`` (a name from :data:`ARCHS` or a DpuArch)."""
    return Legality(gm, get_arch(arch), shapes).run()


__all__ = ["DpuArch", "ARCHS", "DEFAULT_ARCH", "get_arch", "Placement", "DpuReport", "legality"]
