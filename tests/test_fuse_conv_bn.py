"""fuse_conv_bn: Conv/ConvTranspose/Linear + BatchNorm folded; outputs match to 1e-5 relative."""
import pytest
import torch
from torch import nn

import quantfx
from quantfx.passes import FuseConvBN, Trace
from quantfx.zoo import _randomize_bn


CASES = [
    (nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), (2, 3, 10)),
    (nn.Conv2d(3, 6, 3, groups=3), nn.BatchNorm2d(6), (2, 3, 8, 8)),
    (nn.Conv3d(3, 6, 3, bias=False), nn.BatchNorm3d(6), (2, 3, 5, 5, 5)),
    (nn.ConvTranspose1d(3, 6, 3), nn.BatchNorm1d(6), (2, 3, 10)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (nn.Linear(8, 5), nn.BatchNorm1d(5), (4, 8)),
]


def rel_err(a, b):
    return float(((a - b).abs().max() / b.abs().max()).detach())


@pytest.mark.parametrize("layer, bn, shape", CASES, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_fusion_matches_unfused(layer, bn, shape):
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(layer, bn)).eval()
    x = torch.randn(shape)
    expected = model(x)
    gm = Trace()(model).graph_module
    result = FuseConvBN()(gm)
    gm = result.graph_module
    gm.recompile()
    assert result.modified
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    assert rel_err(gm(x), expected) < 1e-5
    fused = gm.get_submodule("0")
    assert fused is not layer and fused.weight is not layer.weight and fused.bias is not None
    assert type(fused) is type(layer)


def test_refused_when_the_conv_has_two_users():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _randomize_bn(TwoUsers()).eval()
    gm = Trace()(model).graph_module
    conv_node = next(n for n in gm.graph.nodes if n.target == "conv")
    reason = FuseConvBN.refuse(gm, conv_node, gm.conv, gm.bn)
    assert reason == "conv has 2 users; folding would change the other users"
    conv = gm.conv
    assert FuseConvBN()(gm).modified is False
    assert gm.conv is conv and sum(isinstance(m, nn.BatchNorm2d) for m in gm.modules()) == 1
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(gm(x), model(x))


def test_refused_when_the_conv_is_called_twice():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn2(self.conv(self.bn1(self.conv(x))))  # one set of weights, two BNs

    model = _randomize_bn(Shared()).eval()
    gm = Trace()(model).graph_module
    first = next(n for n in gm.graph.nodes if n.target == "conv")
    assert FuseConvBN.refuse(gm, first, gm.conv, gm.bn1) == "conv is called more than once; its weights are shared"
    assert FuseConvBN()(gm).modified is False
    assert sum(isinstance(m, nn.BatchNorm2d) for m in gm.modules()) == 2
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(gm(x), model(x))


def test_training_mode_is_a_clear_error():
    gm = Trace()(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train()).graph_module
    with pytest.raises(quantfx.QuantFXError, match="training mode.*model.eval"):
        FuseConvBN()(gm)


def test_quantize_fuses_on_a_copy_even_in_training_mode():
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())).train()
    q = quantfx.quantize(model, "finn", example_inputs=(torch.randn(1, 3, 4, 4),))
    assert model.training and isinstance(model[1], nn.BatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
