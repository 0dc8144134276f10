"""canonicalize: functional/method forms become the forms later passes understand; outputs unchanged."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantfx.passes import Canonicalize, Trace


def run(module, x):
    gm = Trace()(module).graph_module
    before = gm(x)
    gm = Canonicalize()(gm).graph_module
    gm.recompile()
    assert torch.equal(gm(x), before)
    return gm


def modules(gm, cls):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)]


class Activations(nn.Module):
    def forward(self, x):
        a = F.relu(x) + torch.relu(x) + x.relu()
        b = F.relu6(x) + F.hardtanh(x, -2.0, 2.0)
        c = torch.sigmoid(x) + x.sigmoid()
        return a + b + c


def test_activations_become_modules():
    gm = run(Activations(), torch.randn(2, 3) * 4)
    assert len(modules(gm, nn.ReLU)) == 3 and len(modules(gm, nn.ReLU6)) == 1
    ht = modules(gm, nn.Hardtanh)
    assert len([n for n in ht if type(gm.get_submodule(n.target)) is nn.Hardtanh]) == 1
    assert gm.get_submodule(ht[-1].target).min_val == -2.0
    assert len(modules(gm, nn.Sigmoid)) == 2
    assert not any(n.op == "call_function" and n.target in (F.relu, torch.relu, torch.sigmoid)
                   for n in gm.graph.nodes)


class Adds(nn.Module):
    def forward(self, x, y):
        a = torch.add(x, y)
        b = x.add(y)
        a += b
        return torch.concat([a, y], 1)


def test_adds_and_concat():
    gm = Trace()(Adds()).graph_module
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    before = gm(x, y)
    gm = Canonicalize()(gm).graph_module
    gm.recompile()
    assert torch.equal(gm(x, y), before)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 3
    assert any(n.target is torch.cat for n in gm.graph.nodes)


class MeanDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()

    def forward(self, x):
        x = self.ident(self.drop(self.conv(x)))
        return F.dropout(x.mean((2, 3)), 0.1, training=False)


def test_mean_becomes_pool_and_dropout_is_removed():
    m = MeanDropout().eval()
    gm = run(m, torch.randn(2, 3, 4, 4))
    assert len(modules(gm, nn.AdaptiveAvgPool2d)) == 1
    assert any(n.target is torch.flatten for n in gm.graph.nodes)
    assert not modules(gm, (nn.Dropout, nn.Identity))
    assert not any(n.target is F.dropout for n in gm.graph.nodes)
    assert not hasattr(gm, "drop")


class SharedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        a = self.relu(self.conv(x))
        b = self.relu(self.conv(a))  # stateless relu and weighted conv both called twice
        return a + b


def test_stateless_module_called_twice_is_duplicated_weights_are_not():
    gm = run(SharedRelu(), torch.randn(1, 3, 4, 4))
    relus = modules(gm, nn.ReLU)
    assert len(relus) == 2 and len({n.target for n in relus}) == 2
    assert gm.get_submodule(relus[0].target) is not gm.get_submodule(relus[1].target)
    convs = modules(gm, nn.Conv2d)
    assert len(convs) == 2 and {n.target for n in convs} == {"conv"}


def test_no_change_reports_unmodified():
    gm = Trace()(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())).graph_module
    assert Canonicalize()(gm).modified is False


@pytest.mark.parametrize("x", [torch.randn(2, 3, 8, 8)])
def test_functional_pools_become_modules(x):
    class Pools(nn.Module):
        def forward(self, t):
            return F.avg_pool2d(t, 2) + F.adaptive_avg_pool2d(t, 4)
    gm = run(Pools(), x)
    assert len(modules(gm, nn.AvgPool2d)) == 1 and len(modules(gm, nn.AdaptiveAvgPool2d)) == 1
