"""approximate_activations: the dpu profile's LeakyReLU slope, hard-sigmoid/swish and average-pool constants, as
Quark simulates the DPU; the rewritten model verifies at 0 LSB in onnxruntime and the report keeps them on the
DPU; other profiles' pipelines do not run the pass."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantfx
from quantfx.passes.approximate_activations import HARD_SIGMOID_SCALE, avgpool_factor, leaky_slope
from quantfx.targets import dpu


class Acts(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.hswish = nn.Hardswish()
        self.hsig = nn.Hardsigmoid()
        self.pool = nn.AvgPool2d(3)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.gap(self.pool(self.hsig(self.hswish(self.c2(self.leaky(self.c1(x)))))))


def test_constants_match_quarks_dpu_simulation():
    assert leaky_slope(0.1) == 26 / 256 and leaky_slope(0.2) == 51 / 256
    assert HARD_SIGMOID_SCALE * 16384 == 2731
    # Quark's table, and its nearest-fraction rule elsewhere (power-of-two areas exact)
    assert {k: avgpool_factor(k, k) for k in (3, 5, 6, 7, 14)} == {3: (7, 6), 5: (10, 8), 6: (7, 8), 7: (21, 10),
                                                                   14: (21, 12)}
    for k in (2, 4, 8):
        num, n = avgpool_factor(k, k)
        assert num / 2 ** n == 1 / (k * k)
    for k in (9, 10, 11, 12):
        num, n = avgpool_factor(k, k)
        assert abs(num / 2 ** n - 1 / k ** 2) < 1 / k ** 2 / 64


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = Acts().eval()
    data = [torch.randn(4, 3, 23, 23)]
    return model, quantfx.quantize(model, "dpu", calibration_data=data, progress=False), data


def test_the_graph_computes_the_dpu_constants(compiled):
    model, q, _ = compiled
    assert model.leaky.negative_slope == 0.1  # the user's model is not modified
    assert q.get_submodule("leaky").negative_slope == 26 / 256
    consts = [a for n in q.graph.nodes if n.target is operator.mul for a in n.args if isinstance(a, float)]
    assert consts.count(HARD_SIGMOID_SCALE) == 2 and 7 / 64 in consts and 21 / 1024 in consts
    sums = [n for n in q.graph.nodes if n.target is F.avg_pool2d]
    assert len(sums) == 2 and all(n.kwargs["divisor_override"] == 1 for n in sums)
    assert not any(isinstance(m, (nn.Hardswish, nn.Hardsigmoid, nn.AvgPool2d, nn.AdaptiveAvgPool2d))
                   for m in q.modules())


def test_verifies_at_zero_lsb_and_stays_on_the_dpu(compiled):
    _, q, data = compiled
    art = quantfx.lower(q, (data[0][:1],), target="dpu")
    for seed in (1, 2):
        x = torch.randn(8, 3, 23, 23, generator=torch.Generator().manual_seed(seed))
        assert quantfx.verify(q, art, (x,)).max_error_lsb == 0.0
    rep = dpu.report(art)
    assert rep.on("CPU") == [], rep.table()
    ops = {p.op for p in rep.nodes}
    assert {"leaky_relu", "hard_sigmoid", "hard_swish", "avgpool2d"} <= ops
    assert {o.op_type for o in art.graph.node} >= {"LeakyRelu", "Conv", "Clip", "Mul"}


def test_other_profiles_do_not_run_it():
    names = [p.name for p in quantfx.pipeline_for("onnx")]
    assert "approximate_activations" not in names
    assert "approximate_activations" in [p.name for p in quantfx.pipeline_for("dpu")]
    torch.manual_seed(0)
    q = quantfx.quantize(Acts().eval(), "onnx", calibration_data=[torch.randn(2, 3, 23, 23)], progress=False)
    assert q.get_submodule("leaky").negative_slope == 0.1


def test_refine_hard_sigmoid_positions():
    """Quark's adjust_hard_sigmoid: the input position in [0, 15], the output's at least 7. An input with a
    large range (position < 0) moves to 0 and is reported; the file verifies at 0 LSB."""
    from quantfx.targets.dpu.positions import fix_pos, producing_quantizer, refine

    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.hsig = nn.Hardsigmoid()

        def forward(self, x):
            return self.hsig(x)

    torch.manual_seed(0)
    data = [torch.randn(4, 16) * 400]  # |x| up to ~1600: position -4 on the input
    q = quantfx.quantize(Big().eval(), "dpu", calibration_data=data, progress=False)
    assert refine(q) == []  # calibration refined it already and noted the changes
    moved = {c["tensor"]: c for c in q.notes["dpu.refine"] if "hard-sigmoid" in c["rule"]}
    assert moved["input"]["old"] < 0 and moved["input"]["new"] == 0
    out = next(n for n in q.graph.nodes if n.op == "output").args[0]
    assert fix_pos(producing_quantizer(q, out).scale()) >= 7
    art = quantfx.lower(q, (data[0][:1],), target="dpu")
    assert quantfx.verify(q, art, (torch.randn(8, 16) * 400,)).max_error_lsb == 0.0
