"""swap_modules: replace float layers by ``quantfx.nn`` variants with the quantizers the target profile says.

- every Conv/ConvTranspose/Linear -> its Quant* twin (weights from the profile; parameters via load_state_dict);
  a weight of 4 bits or fewer gets its scale by MSE search (``weight_scale_stat='mse'``) unless an override says
  otherwise: at such widths clipping the largest weights costs less than a coarse grid for all the others;
- ReLU / ReLU6 / Hardtanh / Sigmoid -> QuantReLU / QuantReLU(max_val=6) / QuantHardTanh / QuantSigmoid
  (unsigned quantizers where the value is non-negative, as the profile says); LeakyReLU -> QuantLeakyReLU on
  profiles that compute it as the DPU does (``activation_approx='fixed_point'``), so the layer or add before it is not
  requantized: the DPU rounds once, at the LeakyReLU's output (``targets/dpu/lowering.py``, "LeakyReLU"); elsewhere a
  LeakyReLU stays a float op between two quantizers;
- average pooling -> truncating QuantAvgPool2d / QuantAdaptiveAvgPool2d when the profile pools in integers;
- a QuantIdentity after each graph input, and after every node that produces a float tensor (conv/linear
  accumulators, adds, float ops) which a quantized consumer reads, unless its only reader already quantizes;
- on profiles with float islands, a residual add read only by float islands (a transformer's LayerNorms) or by
  other such adds stays float, as PyTorch's PT2E x86 flow keeps it: the residual stream of a
  ViT holds tokens of very different magnitudes (a class token of ~0.02 beside patch tokens of ~3), which one
  8-bit per-tensor grid before each LayerNorm erases (``FLOAT_RESIDUAL``).

``overrides`` maps a module name or a module type to keyword overrides (``weight_bit_width``,
``act_bit_width``/``bit_width``, ``weight_quant``, ``act_quant``, ...) or to ``None`` to keep it float.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from quantfx.classify import layer_read_by_add
from quantfx.errors import QuantArgumentError
from quantfx.graph import (
    USER_FLOAT_KEY, float_island, is_act_quant, is_add, is_cat, is_invariant, is_tensor_node, is_trunc_pool, module_of,
    tensor_product_op,
)
from quantfx.nn import (
    QUANT_LAYER_FOR, QuantAdaptiveAvgPool2d, QuantAvgPool2d, QuantHardTanh, QuantLeakyReLU, QuantReLU, QuantSigmoid,
    adaptive_window, build_from_state, float_layer_kwargs,
)
from quantfx.pass_infra import PassResult
from quantfx.quant.specs import FIELDS, is_low_bit

from .base import ProfilePass

FLOAT = USER_FLOAT_KEY  # marker in node.meta for nodes the user kept float
FLOAT_RESIDUAL = "a residual add read only by float islands: kept float, as PT2E keeps it"  # its FLOAT marker


def split_override(values: dict, where: str) -> dict:
    """{'weight': {...}, 'act': {...}, 'bias': {...}, 'weight_quant': spec?, 'act_quant': spec?}."""
    out: dict[str, Any] = {"weight": {}, "act": {}, "bias": {}}
    for key, value in values.items():
        if key in ("weight_quant", "act_quant", "bias_quant"):
            out[key] = value
        elif key in FIELDS:
            out["act"][key] = value
        else:
            slot, _, fld = key.partition("_")
            if slot in ("weight", "act", "bias") and fld in FIELDS:
                out[slot][fld] = value
            else:
                raise QuantArgumentError(
                    f"overrides[{where!r}]: unknown key {key!r}; use weight_<field>, act_<field>, bias_<field>, "
                    f"weight_quant, act_quant or bias_quant, with field in {', '.join(FIELDS)}")
    return out


def find_override(overrides: dict, name: str, module) -> tuple[bool, Any]:
    """(found, value) for a module: its name first, then its type (most specific first)."""
    if name in overrides:
        return True, overrides[name]
    for cls in type(module).__mro__:
        if cls in overrides:
            return True, overrides[cls]
    return False, None


def _even_windows(output_size, in_shape) -> bool:
    """Whether an adaptive average pool's windows all have one size (the input a multiple of the output), so the
    integer sum has one divisor; True when the input shape is unknown (the pool says so when it runs)."""
    if in_shape is None or len(in_shape) < 2:
        return True
    return adaptive_window(in_shape[-2:], output_size) is not None


@dataclass(frozen=True)
class SwapModules(ProfilePass):
    name = "swap_modules"
    runs_code = False  # reads and edits the graph only
    overrides: dict = field(default_factory=dict, hash=False)

    def call(self, gm: fx.GraphModule) -> PassResult:
        taken: set = set()
        used_names: set = set()
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            module = module_of(gm, node)
            found, over = find_override(self.overrides, node.target, module)
            if found and node.target in self.overrides:
                used_names.add(node.target)
            if found and over is None:
                node.meta[FLOAT] = True
                continue
            meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
            new = self.quant_module(module, split_override(over or {}, node.target), node.target,
                                    in_shape=tuple(meta.shape) if hasattr(meta, "shape") else None)
            if new is not None:
                gm.add_submodule(node.target, new)
        # products of two tensors are named by their node (passes/quantize_products.py reads the override)
        used_names |= {n.name for n in gm.graph.nodes if n.name in self.overrides and tensor_product_op(n)}
        self._check_names(gm, used_names)
        if self.profile.float_islands_allowed:
            _keep_residuals_float(gm)
        self._insert_quantizers(gm, taken)
        return PassResult(gm, True)

    # -- module replacement ----------------------------------------------------------------------------

    def _act(self, unsigned: bool, over: dict) -> dict:
        p = self.profile
        spec = over.get("act_quant") or (p.act_quant_unsigned if unsigned else p.act_quant)
        return {"act_quant": spec, **{"bit_width": p.act_bit_width, **over["act"]}}

    def quant_module(self, m: nn.Module, over: dict, where: str = "", in_shape=None):
        p = self.profile
        cls = QUANT_LAYER_FOR.get(type(m))
        if cls is not None:
            act_keys = [f"act_{k}" for k in over["act"]] + (["act_quant"] if "act_quant" in over else [])
            if act_keys:
                raise QuantArgumentError(
                    f"overrides[{where!r}]: {', '.join(act_keys)} set an activation quantizer, but a "
                    f"{type(m).__name__} layer has none (its output is quantized by the activation after it, and "
                    "bare fields such as bit_width mean act_ ones); use weight_<field> or bias_<field> here, or "
                    "override the activation that follows it by its name")
            wq = over.get("weight_quant") or p.weight_quant
            wkw = {"weight_" + k: v for k, v in {"bit_width": p.weight_bit_width, **over["weight"]}.items()}
            if is_low_bit(wkw["weight_bit_width"]) and "weight_quant" not in over and \
                    "scale_stat" not in over["weight"] and getattr(wq, "scale_stat", "max") == "max":
                wkw["weight_scale_stat"] = "mse"
            if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and m.groups > 1 and \
                    m.out_channels // m.groups > 1 and "scaling_per_output_channel" not in over["weight"]:
                # a grouped transposed conv's weight (in, out / groups, k...) has no axis of output channels: a
                # scale per index of axis 1 would be shared by `groups` output channels, which neither the
                # accumulator scales of the lowerings nor ONNX's per-axis DequantizeLinear express. Per tensor.
                wkw["weight_scaling_per_output_channel"] = False
            q = build_from_state(cls, m.state_dict(), device=m.weight.device, dtype=m.weight.dtype,
                                 **float_layer_kwargs(m), bias=m.bias is not None, weight_quant=wq, **wkw)
            q.train(m.training)
            return q
        if isinstance(m, nn.ReLU6):
            return QuantReLU(max_val=6.0, **self._act(True, over))
        if isinstance(m, nn.ReLU):
            return QuantReLU(**self._act(True, over))
        if isinstance(m, nn.Hardtanh):
            return QuantHardTanh(min_val=m.min_val, max_val=m.max_val, **self._act(m.min_val >= 0, over))
        if isinstance(m, nn.Sigmoid):
            return QuantSigmoid(**self._act(True, over))
        if isinstance(m, nn.LeakyReLU) and p.recipe.activation_approx == "fixed_point":
            return QuantLeakyReLU(negative_slope=m.negative_slope, **self._act(False, over))
        if p.avgpool == "trunc":
            bits = over["act"].get("bit_width", p.act_bit_width)
            # the integer sum counts padded zeros: pools that leave them out of the average stay float
            no_pad = m.padding in (0, (0, 0)) if isinstance(m, nn.AvgPool2d) else True
            if isinstance(m, nn.AvgPool2d) and not m.ceil_mode and m.divisor_override is None and \
                    (m.count_include_pad or no_pad):
                return QuantAvgPool2d(m.kernel_size, m.stride, m.padding, bit_width=bits)
            if isinstance(m, nn.AdaptiveAvgPool2d) and _even_windows(m.output_size, in_shape):
                return QuantAdaptiveAvgPool2d(m.output_size, bit_width=bits)
        return None

    def _check_names(self, gm, used: set) -> None:
        names = [k for k in self.overrides if isinstance(k, str)]
        unknown = [k for k in names if k not in used]
        if unknown:
            known = [n.target for n in gm.graph.nodes if n.op == "call_module"] + \
                [n.name for n in gm.graph.nodes if tensor_product_op(n)]
            hints = {k: difflib.get_close_matches(k, known, n=3) for k in unknown}
            raise QuantArgumentError(
                "overrides name modules that are not in the traced model: " +
                "; ".join(f"{k!r} (did you mean {', '.join(map(repr, v))}?)" if v else repr(k)
                          for k, v in hints.items()) + f". Module names: {', '.join(known[:40])}")

    # -- quantizer insertion ---------------------------------------------------------------------------

    def _insert_quantizers(self, gm, taken) -> None:
        graph = gm.graph
        constant = _input_independent(gm)
        for node in list(graph.nodes):
            if node.op == "placeholder" and node.users and is_tensor_node(node):
                self.requantize(gm, node, node.name + "_quant", taken, bits=self.profile.input_bit_width)
            elif node in constant and all(u in constant for u in _readers(gm, node)):
                continue  # a constant computed from shapes and parameters (EdgeNeXt's Fourier position code)
            elif self._needs_requant(gm, node):
                self.requantize(gm, node, node.name + "_quant", taken)

    def _needs_requant(self, gm, node: fx.Node) -> bool:
        if node.op not in ("call_module", "call_function", "call_method") or not node.users:
            return False
        if is_act_quant(gm, node) or is_invariant(gm, node) or is_trunc_pool(gm, node) or is_cat(node):
            return False
        if not is_tensor_node(node):
            return False
        tm = node.meta.get("tensor_meta")
        if tm is not None and not hasattr(tm, "shape"):
            return False  # produces a tuple/list
        if tm is not None and not tm.dtype.is_floating_point:
            return False  # a boolean mask or integer indices (EdgeNeXt's ~mask): no grid to put them on
        users = list(node.users)
        if len(users) == 1 and is_act_quant(gm, users[0]):
            return False
        if self.profile.add_reads_layer_output and len(users) == 1 and layer_read_by_add(gm, users[0]) is node:
            return False  # the add reads the layer's float output (share_quantizers)
        return self._feeds_quantized(gm, node, from_float=bool(node.meta.get(FLOAT)))

    def _feeds_quantized(self, gm, node, from_float: bool) -> bool:
        for u in _readers(gm, node):
            if u.op == "output":
                if not from_float:
                    return True
            elif from_float and node.meta.get(FLOAT) == FLOAT_RESIDUAL and float_island(gm, u):
                continue  # a float residual read by a LayerNorm: float in, float op
            elif u.meta.get(FLOAT) == FLOAT_RESIDUAL and node.meta.get(FLOAT) != FLOAT_RESIDUAL:
                # a layer's or float island's value into a float residual add goes onto its own grid, so the
                # add sums grid values (float32 additions the runtime repeats to the bit), not kernel outputs
                return True
            elif not u.meta.get(FLOAT) and is_tensor_node(u):
                return True
        return False


def _input_independent(gm: fx.GraphModule) -> set:
    """The ops whose values do not depend on the values of the model's inputs, only on their shapes, parameters
    and literals: computed in float like constants, not put on 8-bit grids step by step (EdgeNeXt's position
    code divides by ``temperature ** (2 i / d)``, whose small terms an 8-bit grid rounds to 0: inf, then NaN)."""
    dependent = set()
    for n in gm.graph.nodes:
        reads_shape = (n.op == "call_function" and n.target is getattr and len(n.args) > 1
                       and n.args[1] in ("shape", "device", "dtype", "ndim")) or \
            (n.op == "call_method" and n.target in ("size", "dim", "numel"))
        if n.op == "placeholder" or (not reads_shape and any(a in dependent for a in n.all_input_nodes)):
            dependent.add(n)
    return {n for n in gm.graph.nodes if n not in dependent and n.op in ("call_function", "call_method",
                                                                          "call_module")}


def _readers(gm: fx.GraphModule, node: fx.Node):
    """The nodes that read ``node``'s value, through value-moving ops (each once)."""
    stack, seen = list(node.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if is_invariant(gm, u):
            stack.extend(u.users)
        else:
            yield u


def _keep_residuals_float(gm: fx.GraphModule) -> None:
    """Mark float (``FLOAT_RESIDUAL``) every add whose readers, through value-moving ops, are all float islands
    (not products), adds marked so, or shape arithmetic (``x.dim()`` checks); in reverse order, so a chain of
    residual adds resolves. (An add the output reads stays quantized: the model's outputs are on a grid.)"""
    def float_reader(u) -> bool:
        if u.op == "output":
            return False
        return not is_tensor_node(u) or u.meta.get(FLOAT) == FLOAT_RESIDUAL or \
            (float_island(gm, u) is not None and tensor_product_op(u) is None)

    for node in reversed(list(gm.graph.nodes)):
        if is_add(node) and not node.meta.get(FLOAT) and node.users and \
                all(float_reader(u) for u in _readers(gm, node)):
            node.meta[FLOAT] = FLOAT_RESIDUAL
