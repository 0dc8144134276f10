"""canonicalize: functional/method forms become the forms later passes understand; outputs unchanged.

Each test counts node occurrences before and after the pass and compares outputs with torch.equal."""
import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from quantfx.passes import Canonicalize, Trace


def occurrences(gm) -> Counter:
    """(op, target) -> count; call_module targets are the module's class, functions their object."""
    out = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[("call_module", type(gm.get_submodule(n.target)))] += 1
        elif n.op in ("call_function", "call_method"):
            out[(n.op, n.target)] += 1
    return out


def canonicalize(gm, *inputs):
    """(occurrences before, occurrences after, gm after); asserts the outputs are unchanged."""
    before_out, before = gm(*[t.clone() for t in inputs]), occurrences(gm)  # clones: iadd writes in place
    result = Canonicalize()(gm)
    gm = result.graph_module
    gm.recompile()
    assert result.modified
    assert torch.equal(gm(*[t.clone() for t in inputs]), before_out)
    return before, occurrences(gm), gm


def traced(module):
    return Trace()(module).graph_module


class Activations(nn.Module):
    def forward(self, x):
        a = F.relu(x) + torch.relu(x) + x.relu()
        b = F.relu6(x) + F.hardtanh(x, -2.0, 2.0)
        c = torch.sigmoid(x) + x.sigmoid()
        return a + b + c


def test_activations_become_modules():
    before, after, gm = canonicalize(traced(Activations()), torch.randn(2, 3) * 4)
    fn, meth, mod = "call_function", "call_method", "call_module"
    assert before[(fn, F.relu)] == 1 and before[(fn, torch.relu)] == 1 and before[(meth, "relu")] == 1
    assert before[(fn, F.relu6)] == 1 and before[(fn, F.hardtanh)] == 1
    assert before[(fn, torch.sigmoid)] == 1 and before[(meth, "sigmoid")] == 1
    assert before[(mod, nn.ReLU)] == before[(mod, nn.ReLU6)] == before[(mod, nn.Hardtanh)] == 0
    assert after[(mod, nn.ReLU)] == 3 and after[(mod, nn.ReLU6)] == 1 and after[(mod, nn.Hardtanh)] == 1
    assert after[(mod, nn.Sigmoid)] == 2
    for key in [(fn, F.relu), (fn, torch.relu), (meth, "relu"), (fn, F.relu6), (fn, F.hardtanh),
                (fn, torch.sigmoid), (meth, "sigmoid")]:
        assert after[key] == 0, key
    hardtanh = next(gm.get_submodule(n.target) for n in gm.graph.nodes
                    if n.op == mod and type(gm.get_submodule(n.target)) is nn.Hardtanh)
    assert (hardtanh.min_val, hardtanh.max_val) == (-2.0, 2.0)
    assert after[(fn, operator.add)] == before[(fn, operator.add)] == 6


class Adds(nn.Module):
    def forward(self, x, y):
        a = torch.add(x, y)
        b = x.add(y)
        return torch.concat([a + b, y], 1)


def test_adds_and_concat_become_operator_add_and_cat():
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    before, after, _ = canonicalize(traced(Adds()), x, y)
    assert before[("call_function", torch.add)] == 1 and before[("call_method", "add")] == 1
    assert before[("call_function", operator.add)] == 1 and before[("call_function", torch.concat)] == 1
    assert after[("call_function", operator.add)] == 3
    assert after[("call_function", torch.add)] == after[("call_method", "add")] == 0
    assert after[("call_function", torch.cat)] == 1 and after[("call_function", torch.concat)] == 0


def test_iadd_becomes_operator_add():
    # fx traces `a += b` as operator.add, so the iadd form is built by hand
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    graph.output(graph.call_function(operator.iadd, (a, b)))
    gm = fx.GraphModule(nn.Module(), graph)
    x, y = torch.randn(3), torch.randn(3)
    before, after, _ = canonicalize(gm, x, y)
    assert before[("call_function", operator.iadd)] == 1 and before[("call_function", operator.add)] == 0
    assert after[("call_function", operator.iadd)] == 0 and after[("call_function", operator.add)] == 1


def test_add_with_alpha_is_left_alone():
    class Alpha(nn.Module):
        def forward(self, x, y):
            return torch.add(x, y, alpha=2)
    gm = traced(Alpha())
    result = Canonicalize()(gm)
    assert result.modified is False
    assert occurrences(result.graph_module)[("call_function", torch.add)] == 1


class MeanDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()

    def forward(self, x):
        x = self.ident(self.drop(self.conv(x)))
        return F.dropout(x.mean((2, 3)), 0.1, training=False)


def test_mean_becomes_pool_and_flatten_and_dropout_is_removed():
    gm = traced(MeanDropout().eval())
    before, after, gm = canonicalize(gm, torch.randn(2, 3, 4, 4))
    assert before[("call_method", "mean")] == 1 and before[("call_module", nn.AdaptiveAvgPool2d)] == 0
    assert before[("call_module", nn.Dropout)] == 1 and before[("call_module", nn.Identity)] == 1
    assert before[("call_function", F.dropout)] == 1
    assert after[("call_method", "mean")] == 0
    assert after[("call_module", nn.AdaptiveAvgPool2d)] == 1 and after[("call_function", torch.flatten)] == 1
    pool = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target != "conv")
    assert gm.get_submodule(pool.target).output_size == 1
    assert [u.target for u in pool.users] == [torch.flatten]
    assert after[("call_module", nn.Dropout)] == after[("call_module", nn.Identity)] == 0
    assert after[("call_function", F.dropout)] == 0
    assert not hasattr(gm, "drop") and not hasattr(gm, "ident")  # unused submodules dropped
    assert len(gm.graph.nodes) == 5  # x, conv, pool, flatten, output


def test_mean_with_keepdim_needs_no_flatten():
    class KeepDim(nn.Module):
        def forward(self, x):
            return x.mean((2, 3), keepdim=True)
    before, after, _ = canonicalize(traced(KeepDim()), torch.randn(2, 3, 4, 4))
    assert after[("call_module", nn.AdaptiveAvgPool2d)] == 1 and after[("call_function", torch.flatten)] == 0


def test_mean_over_channels_is_not_a_pool():
    class ChannelMean(nn.Module):
        def forward(self, x):
            return x.mean(1)
    result = Canonicalize()(traced(ChannelMean()))
    assert result.modified is False
    assert occurrences(result.graph_module)[("call_method", "mean")] == 1


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
    model = SharedRelu()
    gm = traced(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "relu", "conv", "relu"]
    _, after, gm = canonicalize(gm, torch.randn(1, 3, 4, 4))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls[0] == calls[2] == "conv"  # the conv keeps its single set of weights
    assert calls[1] == "relu" and calls[3] not in ("relu", "conv")
    assert gm.get_submodule(calls[1]) is not gm.get_submodule(calls[3])
    assert type(gm.get_submodule(calls[3])) is nn.ReLU
    assert after[("call_module", nn.ReLU)] == 2 and after[("call_module", nn.Conv2d)] == 2
    assert sum(1 for _ in gm.parameters()) == 2  # conv.weight, conv.bias: not duplicated


def test_no_change_reports_unmodified():
    gm = traced(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    nodes = [(n.op, n.target) for n in gm.graph.nodes]
    result = Canonicalize()(gm)
    assert result.modified is False and [(n.op, n.target) for n in result.graph_module.graph.nodes] == nodes


def test_functional_pools_become_modules():
    class Pools(nn.Module):
        def forward(self, t):
            return F.avg_pool2d(t, 2) + F.adaptive_avg_pool2d(t, 4)
    before, after, gm = canonicalize(traced(Pools()), torch.randn(2, 3, 8, 8))
    assert before[("call_function", F.avg_pool2d)] == 1 and before[("call_function", F.adaptive_avg_pool2d)] == 1
    assert after[("call_function", F.avg_pool2d)] == after[("call_function", F.adaptive_avg_pool2d)] == 0
    assert after[("call_module", nn.AvgPool2d)] == 1 and after[("call_module", nn.AdaptiveAvgPool2d)] == 1


class NormAct(nn.Module):
    """timm's BatchNormAct2d in short: a shape assertion on the conv's output, then the activation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()

    def forward(self, x):
        x = self.conv(x)
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        return self.act(x)


def test_shape_assertion_reads_the_activation_and_still_runs():
    before, after, gm = canonicalize(traced(NormAct()), torch.randn(2, 3, 8, 8))
    assert before[("call_function", torch._assert)] == after[("call_function", torch._assert)] == 1
    assert after[("call_function", operator.eq)] == 1
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv")
    act = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "act")
    assert [u.target for u in conv.users] == ["act"]  # the activation is the conv's one reader
    assert {u.args[1] for u in act.users if u.target is getattr} == {"ndim"}  # the query reads the activation
    with pytest.raises(Exception, match="expected 4D"):
        gm(torch.randn(3, 8, 8))  # the check still runs


class NormActChain(nn.Module):
    """A query on the conv and another on the norm (both shapes the activation's)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x):
        x = self.conv(x)
        torch._assert(x.ndim == 4, "conv")
        x = self.bn(x)
        torch._assert(x.size(1) == 8, "bn")
        return self.act(x)


def test_shape_queries_along_a_chain_all_read_its_end():
    model = NormActChain().eval()
    _, _, gm = canonicalize(traced(model), torch.randn(2, 3, 8, 8))
    queries = [n for n in gm.graph.nodes if n.target is getattr or n.target == "size"]
    assert len(queries) == 2 and {q.args[0].target for q in queries} == {"act"}
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x))
    assert sum(n.target is torch._assert for n in gm.graph.nodes) == 2  # both checks still run


def test_conv_before_a_shape_assertion_takes_its_activation_as_output_quantizer():
    # no requantizer between the conv and its ReLU6 (a second rounding): one act quantizer after the input's
    import quantfx
    from quantfx.nn import QuantIdentity
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    for target in ("onnx", "torch", "dpu", "finn"):
        q = quantfx.quantize(NormAct().eval(), target, calibration_data=data, progress=False)
        identities = [n.target for n in q.graph.nodes
                      if n.op == "call_module" and type(q.get_submodule(n.target)) is QuantIdentity]
        assert identities == ["x_quant"], (target, identities)
