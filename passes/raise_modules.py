"""raise_modules: functional calls whose weights are parameters (``get_attr``) become the modules later passes
fuse, quantize and lower: ``F.conv*`` -> ``nn.Conv*`` / ``nn.ConvTranspose*``, ``F.linear`` and ``torch.addmm``
(GPT-2's Conv1D) -> ``nn.Linear``, ``F.batch_norm`` -> ``nn.BatchNorm*``, ``F.layer_norm`` -> ``nn.LayerNorm``,
``F.group_norm`` -> ``nn.GroupNorm``, ``F.prelu`` -> ``nn.PReLU``, ``F.embedding`` -> ``nn.Embedding``; and,
in a graph captured by torch.export, the activation calls an activation module of the user's made
(``F.relu`` inside an ``nn.ReLU``) -> that module again.

Each module is named by the user's module path: the innermost entry of the node's ``nn_module_stack`` (torch.export)
or the module owning the weight (symbolic tracing, e.g. timm's ``BatchNormAct2d``, which calls ``F.batch_norm`` on
its own parameters). Parameters reach the new module through ``load_state_dict``. A graph captured either way
then reads the same to every later pass, ``overrides``, ``inspect`` and the diagrams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantfx.classify import attr_value
from quantfx.graph import replace_module
from quantfx.nn import build_from_state
from quantfx.pass_infra import Pass, PassResult

_CONV = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_CONV_T = {F.conv_transpose1d: nn.ConvTranspose1d, F.conv_transpose2d: nn.ConvTranspose2d,
           F.conv_transpose3d: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
# activation functions and the module that calls each (only raised where the export says that module ran)
_ACTIVATIONS = {
    F.relu: nn.ReLU, F.relu6: nn.ReLU6, F.hardtanh: nn.Hardtanh, torch.sigmoid: nn.Sigmoid, torch.tanh: nn.Tanh,
    F.gelu: nn.GELU, F.silu: nn.SiLU, F.hardswish: nn.Hardswish, F.hardsigmoid: nn.Hardsigmoid, F.mish: nn.Mish,
    F.leaky_relu: nn.LeakyReLU, F.elu: nn.ELU, F.softmax: nn.Softmax,
}


def _arg(node, i, name, default=None):
    """Argument ``i`` of a call, given by position or as keyword ``name``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _module_path(node: fx.Node) -> Optional[tuple[str, str]]:
    """(path, type name) of the innermost user module the node ran in (torch.export's nn_module_stack)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    return path, kind


def _rank(node: fx.Node) -> Optional[int]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


@dataclass(frozen=True)
class RaiseModules(Pass):
    """Functional conv/linear/norm/activation calls on parameters -> modules named by the user's module paths."""

    name = "raise_modules"
    runs_code = False  # reads and edits the graph only

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        raised: dict[str, tuple] = {}  # path -> (module, parameter nodes) of what this pass installed
        modified = False
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            built = self._build(gm, node)
            if built is None:
                continue
            module, x, params = built
            path = self._path(gm, node, params, module)
            if path is None:
                continue
            if path in raised:
                if raised[path][1] != params:
                    continue  # a second call on other weights under the same module path: leave it functional
            else:
                replace_module(gm, path, module)
                raised[path] = (module, params)
            with graph.inserting_before(node):
                new = graph.call_module(path, (x,))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            new._rename(path.replace(".", "_"))
            modified = True
        if modified:
            graph.eliminate_dead_code()
        return PassResult(gm, modified)

    # -- what a call becomes ------------------------------------------------------------------------------

    def _build(self, gm, node):
        """(module, data input, parameter nodes) the call becomes, or None where it stays a call."""
        t = node.target
        values = {}

        def param(a, optional=False):
            if a is None and optional:
                return True
            if not isinstance(a, fx.Node) or a.op != "get_attr":
                return False
            v = attr_value(gm, a.target)
            if not torch.is_tensor(v):
                return False
            values[a] = v.detach()
            return True

        if t in _CONV or t in _CONV_T:
            x, w, b = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
            if not (param(w) and param(b, True)):
                return None
            transposed = t in _CONV_T
            if transposed:
                names = [("stride", 1), ("padding", 0), ("output_padding", 0), ("groups", 1), ("dilation", 1)]
            else:
                names = [("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)]
            opts = {k: _arg(node, 3 + i, k, d) for i, (k, d) in enumerate(names)}
            weight = values[w]
            groups = int(opts["groups"])
            in_ch, out_ch = (weight.shape[0], weight.shape[1] * groups) if transposed else \
                (weight.shape[1] * groups, weight.shape[0])
            if isinstance(opts["padding"], str) and opts["padding"] == "same" and any(
                    s != 1 for s in _tuple(opts["stride"])):
                return None
            cls = (_CONV_T if transposed else _CONV)[t]
            state = {"weight": weight, "bias": values[b] if b is not None else torch.zeros(out_ch)}
            module = build_from_state(cls, state, device=weight.device, dtype=weight.dtype, in_channels=in_ch,
                                      out_channels=out_ch, kernel_size=tuple(weight.shape[2:]),
                                      bias=True, **{k: _tuple(v) if k != "padding" or not isinstance(v, str)
                                                    else v for k, v in opts.items()})
            if b is None:
                module.bias = None
            return module, x, _nodes(w, b)
        if t is F.linear or t is torch.addmm:
            if t is F.linear:
                x, w, b = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
            else:
                b, x, w = node.args[:3]
            if not (param(w) and param(b, True)):
                return None
            weight = values[w] if t is F.linear else values[w].t().contiguous()
            state = {"weight": weight}
            if b is not None:
                state["bias"] = values[b]
            module = build_from_state(nn.Linear, state, device=weight.device, dtype=weight.dtype,
                                      in_features=weight.shape[1], out_features=weight.shape[0], bias=b is not None)
            return module, x, _nodes(w, b)
        if t is F.batch_norm:
            x, mean, var = node.args[:3]
            w, b = _arg(node, 3, "weight"), _arg(node, 4, "bias")
            training, eps = _arg(node, 5, "training", False), _arg(node, 7, "eps", 1e-5)
            if training or not (param(mean) and param(var) and param(w, True) and param(b, True)):
                return None
            owner = _owner(gm, mean)
            cls = next((c for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) if isinstance(owner, c)), None)
            cls = cls or _BN.get(_rank(x) or 4, nn.BatchNorm2d)
            module = cls(values[mean].shape[0], eps=float(eps), affine=w is not None, device=values[mean].device)
            state = {"running_mean": values[mean], "running_var": values[var]}
            if w is not None:
                state["weight"] = values[w]
                state["bias"] = values[b] if b is not None else torch.zeros_like(values[w])
            module.load_state_dict(state, strict=False)
            return module.eval(), x, _nodes(mean, var, w, b)
        if t is F.layer_norm or t is F.group_norm:
            x = node.args[0]
            w, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
            eps = float(_arg(node, 4, "eps", 1e-5))
            if not (param(w, True) and param(b, True)):
                return None
            if t is F.layer_norm:
                module = nn.LayerNorm(tuple(_arg(node, 1, "normalized_shape")), eps=eps,
                                      elementwise_affine=w is not None, bias=b is not None)
            else:
                channels = (values.get(w) if w is not None else None)
                if channels is None:
                    return None
                module = nn.GroupNorm(int(_arg(node, 1, "num_groups")), channels.shape[0], eps=eps)
            state = {k: values[v] for k, v in (("weight", w), ("bias", b)) if v is not None}
            module.load_state_dict(state, strict=t is F.layer_norm)
            return module, x, _nodes(w, b)
        if t is F.prelu:
            x, w = node.args[:2]
            if not param(w):
                return None
            module = nn.PReLU(values[w].numel())
            module.load_state_dict({"weight": values[w].reshape(-1)})
            return module, x, _nodes(w)
        if t is F.embedding:
            x, w = node.args[:2]
            if not param(w) or len(node.args) > 2 or node.kwargs:
                return None
            module = nn.Embedding(*values[w].shape, device="meta")
            module.weight = nn.Parameter(values[w], requires_grad=False)
            return module, x, _nodes(w)
        if t in _ACTIVATIONS and "nn_module_stack" in node.meta:
            found = _module_path(node)
            cls = _ACTIVATIONS[t]
            if found is None or found[1] != f"{cls.__module__}.{cls.__qualname__}" or \
                    any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
                return None
            return _activation(cls, node), node.args[0], ()
        return None

    @staticmethod
    def _path(gm, node, params, module) -> Optional[str]:
        """The user's module path for the raised module. A parameter not named as the module names its own
        (``nn.MultiheadAttention``'s ``in_proj_weight``) gives a child named after it (``self_attention.in_proj``);
        else torch.export's innermost module, unless the parameter's owner lies inside it (the ``out_proj.weight``
        MultiheadAttention reads itself: ``self_attention.out_proj``); else the module owning the parameter."""
        owner, name = (params[0].target.rpartition(".")[::2]) if params else (None, None)
        if params and name not in _OWN_NAMES:
            child = name.removesuffix("_weight")
            return f"{owner}.{child}" if owner else child
        found = _module_path(node)
        if found is not None and found[0] and not (owner and owner.startswith(found[0] + ".")):
            return found[0]
        return owner or None


#: the names raised modules give the first parameter of their call (weight, or running_mean of a batch norm)
_OWN_NAMES = {"weight", "bias", "running_mean"}


def _activation(cls, node):
    if cls is nn.Hardtanh:
        return nn.Hardtanh(float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0)))
    if cls is nn.GELU:
        return nn.GELU(approximate=node.kwargs.get("approximate", "none"))
    if cls is nn.LeakyReLU:
        return nn.LeakyReLU(float(_arg(node, 1, "negative_slope", 0.01)))
    if cls is nn.ELU:
        return nn.ELU(float(_arg(node, 1, "alpha", 1.0)))
    if cls is nn.Softmax:
        return nn.Softmax(dim=_arg(node, 1, "dim"))
    return cls()


def _owner(gm, node: fx.Node):
    path = node.target.rpartition(".")[0]
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def _nodes(*nodes) -> tuple:
    return tuple(n for n in nodes if n is not None)


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v
