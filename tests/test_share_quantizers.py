"""share_quantizers: every add/cat input gets one shared quantizer object, transitively, identical scales."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import quantfx
from quantfx.graph import is_act_quant, is_add, is_cat, module_of, producer, tensor_inputs
from quantfx.zoo import TEST_MODELS, example_input


GROUPED = ["resnet", "mobilenetv2", "unet", "densenet", "inception", "shufflenet"]


def calibrated(name, target="finn"):
    torch.manual_seed(0)
    model = TEST_MODELS[name][0]().eval()
    data = [example_input(name, batch=2, seed=i) for i in range(3)]
    return quantfx.quantize(model, target, calibration_data=data, progress=False)


def input_quantizers(q, node):
    sources = [producer(q, a) for a in tensor_inputs(node)]
    assert all(is_act_quant(q, s) for s in sources), [s.name for s in sources]
    return [module_of(q, s).act_quant for s in sources]


@pytest.mark.parametrize("target", ["finn", "onnx", "dpu"])
@pytest.mark.parametrize("name", GROUPED)
def test_every_add_and_cat_input_shares_one_quantizer(name, target):
    q = calibrated(name, target)
    joins = [n for n in q.graph.nodes if is_add(n) or is_cat(n)]
    assert joins
    for node in joins:
        quantizers = input_quantizers(q, node)
        assert all(qz is quantizers[0] for qz in quantizers), node.name
        scales = [qz.scale() for qz in quantizers]
        assert all(torch.equal(scales[0], s) for s in scales)


def test_transitive_groups():
    q = calibrated("densenet")  # cat of a cat of a cat...
    cats = [n for n in q.graph.nodes if is_cat(n)]
    assert len(cats) == 4
    assert len({id(input_quantizers(q, n)[0]) for n in cats}) == 1
    q = calibrated("mobilenetv2")  # blocks 0->1 and 3->4: an add feeding an add
    adds = [n for n in q.graph.nodes if is_add(n)]
    assert len(adds) == 4
    groups = [id(input_quantizers(q, n)[0]) for n in adds]
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[1] != groups[2]
    for first, second in ((adds[0], adds[1]), (adds[2], adds[3])):
        # the first add's output reaches the second through one requantizer on the same (shared) grid
        requant = [s for s in (producer(q, a) for a in tensor_inputs(second)) if s.args[0] is first]
        assert len(requant) == 1 and type(module_of(q, requant[0])).__name__ == "QuantIdentity"
        assert module_of(q, requant[0]).act_quant is input_quantizers(q, first)[0]


def test_relu_outputs_keep_their_unsigned_grid_for_finn():
    q = calibrated("resnet")
    relus = [m for m in q.modules() if type(m).__name__ == "QuantReLU"]
    assert relus and all(not m.act_quant.signed for m in relus)


def random_dag(seed: int) -> nn.Module:
    """convs producing branches that random adds and cats combine (cats of cats, adds of adds)."""
    rng = random.Random(seed)
    ops = []
    n_tensors = 2
    for _ in range(rng.randint(3, 7)):
        kind = rng.choice(["conv", "add", "cat"])
        a, b = rng.randrange(n_tensors), rng.randrange(n_tensors)
        ops.append((kind, a, b))
        n_tensors += 1

    class Dag(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(len(ops) + 2))

        def forward(self, x):
            ts = [self.convs[0](x), torch.relu(self.convs[1](x))]
            for i, (kind, a, b) in enumerate(ops):
                if kind == "conv":
                    ts.append(self.convs[i + 2](ts[a]))
                elif kind == "add":
                    ts.append(ts[a] + ts[b])
                else:
                    ts.append(torch.cat([ts[a], ts[b]], 1)[:, :4])
            return sum(ts[2:]) if len(ts) > 2 else ts[0]
    return Dag()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), target=st.sampled_from(["finn", "onnx", "dpu"]))
def test_property_random_dags(seed, target):
    model = random_dag(seed).eval()
    x = torch.randn(2, 4, 5, 5)
    q = quantfx.quantize(model, target, calibration_data=[x], progress=False)
    chained = 0
    for node in q.graph.nodes:
        if is_add(node) or is_cat(node):
            quantizers = input_quantizers(q, node)
            assert all(qz is quantizers[0] for qz in quantizers)
        if is_add(node):  # an add fed (through its requantizer) by an add shares that add's group
            for src in (producer(q, a) for a in tensor_inputs(node)):
                upstream = producer(q, src.args[0])
                if type(module_of(q, src)).__name__ == "QuantIdentity" and is_add(upstream):
                    assert input_quantizers(q, upstream)[0] is input_quantizers(q, node)[0]
                    chained += 1
    assert chained == sum(1 for n in q.graph.nodes if is_add(n) for a in tensor_inputs(n)
                          if is_add(producer(q, producer(q, a).args[0])))
    with torch.no_grad():
        y, yq = model(x), q(x)
    assert float((y - yq).pow(2).mean() / y.pow(2).mean()) < 0.05
