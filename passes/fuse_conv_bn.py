"""fuse_conv_bn: fold a BatchNorm that follows a Conv/ConvTranspose/Linear into its weight and bias.

The fused layer is a new module of the same class that receives its parameters through ``load_state_dict``
(never ``deepcopy``). The fold uses the running statistics, so a BatchNorm in training mode is refused.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx, nn

from quantfx.errors import QuantFXError
from quantfx.graph import BN_TYPES, FLOAT_COMPUTE_TYPES, is_tensor_node, module_of, replace_module
from quantfx.nn import build_from_state, float_layer_kwargs
from quantfx.pass_infra import Pass, PassResult



def fold_weights(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``layer`` followed by ``bn`` in eval mode.

    Not torch.nn.utils.fusion's ``fuse_conv_bn_weights``/``fuse_linear_bn_weights``: they scale by
    ``gamma * rsqrt(var + eps)`` and multiply the bias in another order, which differs from this fold in the last
    bit (and so would change the artefacts: BENCHMARKS.md, "Conv+BN fold"), and their transposed case ignores
    ``groups``."""
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_mean, dtype=w.dtype)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean, dtype=w.dtype)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        groups = layer.groups
        # weight [in, out/groups, k...]: output channel o = g * (out/groups) + j lives at [g-block, j]
        w_g = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        f = factor.reshape(groups, 1, w.shape[1], *([1] * (w.dim() - 2)))
        w = (w_g * f).reshape(w.shape)
        b = b if layer.bias is not None else torch.zeros(layer.out_channels, dtype=w.dtype)
    else:
        w = w * factor.reshape(-1, *([1] * (w.dim() - 1)))
    bias = (b - bn.running_mean) * factor + beta
    return w, bias


@dataclass(frozen=True)
class FuseConvBN(Pass):
    """Conv1d/2d/3d, ConvTranspose1d/2d and Linear followed by BatchNorm (conv with a single user)."""

    name = "fuse_conv_bn"
    runs_code = False  # reads and edits the graph only

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")  # once, not per BN
        for node in list(gm.graph.nodes):
            bn = module_of(gm, node)
            if not isinstance(bn, BN_TYPES) or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            src = node.args[0]
            layer = module_of(gm, src)
            reason = self.refuse(gm, src, layer, bn, calls)
            if reason:
                continue
            if bn.training:
                raise QuantFXError(
                    f"fuse_conv_bn: {node.target} is in training mode, so its batch statistics are not "
                    f"fixed; call model.eval() first (quantfx.quantize does this on its own copy)")
            w, b = fold_weights(layer, bn)
            # a new layer of the same class, with a bias, receiving its parameters through load_state_dict
            fused = build_from_state(type(layer), {"weight": w, "bias": b}, device=w.device,
                                     **float_layer_kwargs(layer), bias=True)
            fused.train(layer.training)
            gm.add_submodule(src.target, fused)  # replaces the conv under the same name
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            replace_module(gm, node.target, None)  # a raised BN keeps its module's children (bn1.act)
            modified = True
        return PassResult(gm, modified)

    @staticmethod
    def refuse(gm, src: fx.Node, layer, bn, calls: Optional[Counter] = None) -> str:
        """Why this conv/bn pair cannot be fused ('' when it can). ``calls``: call_module target -> count."""
        if not isinstance(layer, FLOAT_COMPUTE_TYPES):
            return "producer is not a float conv/linear"
        # users that read the output's shape only (timm's BatchNormAct2d asserts x.ndim == 4) see the same shape
        users = [u for u in src.users if is_tensor_node(u)]
        if len(users) != 1:
            return f"{src.target} has {len(users)} users; folding would change the other users"
        if calls is None:
            calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        if calls[src.target] != 1:
            return f"{src.target} is called more than once; its weights are shared"
        channels = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
        if bn.num_features != channels:
            return f"BatchNorm has {bn.num_features} features, layer has {channels} outputs"
        return ""
