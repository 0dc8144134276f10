"""quantfx.zoo: every test model runs, has the right output shape, is finite, traces with torch.fx to the
same output bit for bit, and is deterministic; the large benchmark models have the measured graph sizes."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from quantfx.zoo import (TEST_MODELS, _randomize_bn, deep_chain, densenet121_like, example_input, resnet18_like,
                         resnet50_like)

NAMES = sorted(TEST_MODELS)
EXPECTED_NAMES = {"lenet", "resnet", "mobilenetv2", "unet", "densenet", "inception", "shufflenet", "mlp"}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TEST_MODELS[name][0]().eval()


def n_modules(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_registry_names_and_shapes():
    assert set(TEST_MODELS) == EXPECTED_NAMES
    for name, (ctor, shape) in TEST_MODELS.items():
        assert callable(ctor) and shape[0] == 1, name
    assert TEST_MODELS["lenet"][1] == (1, 1, 28, 28)
    assert TEST_MODELS["mlp"][1] == (1, 64)
    for name in EXPECTED_NAMES - {"lenet", "mlp"}:
        assert TEST_MODELS[name][1] == (1, 3, 32, 32), name


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_finite_and_trace_exact(name):
    model = build(name)
    x = example_input(name, batch=2)
    assert x.shape == (2,) + TEST_MODELS[name][1][1:]
    with torch.no_grad():
        eager = model(x)
        traced = fx.symbolic_trace(model)
        out = traced(x)
    if name == "unet":
        assert eager.shape == (2, 2, 32, 32)
    else:
        assert eager.shape == (2, 10)
    assert torch.isfinite(eager).all()
    assert eager.abs().max() > 0
    assert torch.equal(out, eager)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_seed(name):
    x = example_input(name, batch=3, seed=5)
    with torch.no_grad():
        a, b = build(name, seed=7)(x), build(name, seed=7)(x)
    assert torch.equal(a, b)


def test_example_input_deterministic_and_batched():
    a, b = example_input("resnet", batch=4, seed=1), example_input("resnet", batch=4, seed=1)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, example_input("resnet", batch=4, seed=2))
    assert example_input("mlp").shape == (2, 64)
    assert example_input("lenet", batch=1).shape == (1, 1, 28, 28)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES - {"mlp"}))
def test_batchnorm_stats_are_non_trivial(name):
    bns = [m for m in build(name).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns, name
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert ((bn.running_var >= 0.5) & (bn.running_var <= 1.5)).all()
        assert ((bn.weight >= 0.5) & (bn.weight <= 1.5)).all()
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


def test_randomize_bn_is_fixed():
    a, b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
    _randomize_bn(a), _randomize_bn(b)
    for name in ("running_mean", "running_var", "weight", "bias"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def _targets(gm: fx.GraphModule, op: str) -> list:
    return [n.target for n in gm.graph.nodes if n.op == op]


def test_topology_features():
    """The graph patterns the compiler's tests rely on are really there."""
    # MobileNetV2: an add output feeds another add.
    gm = fx.symbolic_trace(build("mobilenetv2"))
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) >= 2
    assert any(a in adds for add in adds for a in add.args)
    depthwise = [m for m in gm.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert depthwise
    # DenseNet: a cat feeds a cat.
    gm = fx.symbolic_trace(build("densenet"))
    cats = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert len(cats) >= 3 and any(c in cats for cat in cats for c in cat.args[0])
    # UNet: transposed convs and two skip concatenations.
    gm = fx.symbolic_trace(build("unet"))
    assert n_modules(gm, nn.ConvTranspose2d) == 2 and _targets(gm, "call_function").count(torch.cat) == 2
    # Inception: one four-way concatenation.
    gm = fx.symbolic_trace(build("inception"))
    cat = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.cat)
    assert len(cat.args[0]) == 4
    # ShuffleNet: chunk, cat, view/transpose/contiguous/view.
    gm = fx.symbolic_trace(build("shufflenet"))
    methods = _targets(gm, "call_method")
    assert {"chunk", "view", "contiguous", "size"} <= set(methods) and methods.count("view") == 2
    assert torch.transpose in _targets(gm, "call_function")


def test_shufflenet_channel_shuffle_other_batch():
    """The shuffle reads the batch size from the tensor, so a traced model works for any batch."""
    model = build("shufflenet")
    traced = fx.symbolic_trace(model)
    x = example_input("shufflenet", batch=5)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_resnet50_like_graph_size_and_forward():
    torch.manual_seed(0)
    model = resnet50_like().eval()
    gm = fx.symbolic_trace(model)
    assert 150 <= len(gm.graph.nodes) <= 200  # measured: 177
    assert len(gm.graph.nodes) == 177
    assert n_modules(model, nn.Conv2d) == 53  # 1 stem + 16*3 + 4 downsample
    assert _targets(gm, "call_function").count(operator.add) == 16
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, out = model(x), gm(x)
    assert eager.shape == (1, 1000) and torch.isfinite(eager).all()
    assert torch.equal(out, eager)


def test_resnet18_like_graph_size_and_forward():
    torch.manual_seed(0)
    model = resnet18_like(num_classes=100).eval()
    gm = fx.symbolic_trace(model)
    assert len(gm.graph.nodes) == 71  # measured
    assert n_modules(model, nn.Conv2d) == 20  # 1 stem + 8*2 + 3 downsample
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, out = model(x), gm(x)
    assert eager.shape == (1, 100) and torch.isfinite(eager).all()
    assert torch.equal(out, eager)



def test_densenet121_like_is_torchvisions_topology_and_traces():
    """Growth 32, blocks (6, 12, 24, 16), bn_size 4: torchvision densenet121's 7,978,856 parameters, 120 convs
    (stem, 58 dense layers of two, 3 transitions), a cat before every dense layer and at every block's end."""
    torch.manual_seed(0)
    model = densenet121_like().eval()
    assert sum(p.numel() for p in model.parameters()) == 7_978_856
    assert n_modules(model, nn.Conv2d) == 120
    gm = fx.symbolic_trace(model)
    assert _targets(gm, "call_function").count(torch.cat) == 58 + 4
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # 224 works too; 64 is faster
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(gm(x), logits)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()

def test_deep_chain_200():
    torch.manual_seed(0)
    model = deep_chain(200).eval()
    gm = fx.symbolic_trace(model)
    assert n_modules(model, nn.Conv2d) == 201  # stem + 200
    assert n_modules(model, nn.BatchNorm2d) == 200
    assert len(gm.graph.nodes) == 656  # measured: x, stem, 200*3, 50 adds, pool, flatten, fc, output
    assert _targets(gm, "call_function").count(operator.add) == 50
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, out = model(x), gm(x)
    assert eager.shape == (2, 10) and torch.isfinite(eager).all()
    assert torch.equal(out, eager)


def test_deep_chain_node_count_is_linear():
    """Graph size is an exact linear function of num_layers (3 nodes per layer, one add per 4 layers)."""
    for n in (4, 8, 40):
        assert len(fx.symbolic_trace(deep_chain(n)).graph.nodes) == 6 + 3 * n + n // 4
