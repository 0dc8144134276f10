"""trace: symbolic tracing, leaf modules, concrete_args, and a clear TraceError for untraceable models."""
import inspect
import operator

import pytest
import torch
from torch import fx, nn

import quantfx
from quantfx.passes import Trace


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow
            return y
        return -y


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DataDependent()
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(self.block(x))


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, double: bool = False):
        y = self.conv(x)
        return y + y if double else y


def test_trace_gives_a_graph_module_with_equal_outputs():
    m = Wrapper().eval()
    m.block = nn.Conv2d(3, 3, 1)
    gm = Trace()(m).graph_module
    assert isinstance(gm, fx.GraphModule)
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(gm(x), m(x))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["block", "head"]


def test_untraceable_model_names_the_source_line_and_the_way_out():
    with pytest.raises(quantfx.TraceError) as e:
        Trace()(Wrapper())
    message = str(e.value)
    lines, first = inspect.getsourcelines(DataDependent.forward)
    lineno = first + next(i for i, line in enumerate(lines) if "if y.sum() > 0" in line)
    assert f"test_trace.py:{lineno} in forward: if y.sum() > 0" in message
    assert "leaf_modules" in message and "concrete_args" in message
    assert isinstance(e.value, quantfx.QuantFXError)


@pytest.mark.parametrize("leaf", [DataDependent, "block"])
def test_leaf_modules_by_type_or_name(leaf):
    model = Wrapper().eval()
    gm = Trace(leaf_modules=(leaf,))(model).graph_module
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["block", "head"]  # not traced into: no block.conv node
    assert isinstance(gm.get_submodule("block"), DataDependent)
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(gm(x), model(x))


def test_concrete_args_fix_a_branch():
    gm = Trace(concrete_args=(("double", True),))(Flagged()).graph_module
    assert sum(1 for n in gm.graph.nodes if n.target is operator.add) == 1
    x = torch.randn(1, 3, 2, 2)
    m = Flagged()
    m.load_state_dict(gm.state_dict())
    assert torch.equal(gm(x, True), m(x, True))


def test_quantize_passes_leaf_modules_through():
    q = quantfx.quantize(Wrapper().eval(), "finn", leaf_modules=[DataDependent],
                         example_inputs=(torch.randn(1, 3, 4, 4),))
    assert any(n.target == "block" for n in q.graph.nodes if n.op == "call_module")
