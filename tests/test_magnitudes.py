"""Any magnitude float32 holds quantizes as well as unit scale: a ReLU network is positively homogeneous, so
scaling its inputs and biases by m (activations ~m) or one layer's weights and bias by m and the next layer's
weights by 1/m (weights ~m) leaves the function the same up to the factor; the quantized model must keep its
unit-scale SQNR and its artefact must still verify at 0 LSB. (A fixed 2^-40 floor on scales once flattened
activations around 1e-12 to nothing.)"""
import copy
import math

import pytest
import torch
from torch import nn

import quantfx
from quantfx.errors import QuantFXError
from quantfx.export import BACKENDS

torch.manual_seed(0)
BASE = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                     nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
DATA = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(3)]
TEST = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(99))


def scaled(kind: str, m: float):
    """(model, input factor) computing m x the base function (acts) or the base function (weights)."""
    model = copy.deepcopy(BASE)
    with torch.no_grad():
        if kind == "acts":
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.mul_(m)
            return model, m
        model[3].weight.mul_(m)
        model[3].bias.mul_(m)
        model[7].weight.div_(m)
    return model, 1.0


def quality(target, kind, m):
    model, k = scaled(kind, m)
    q = quantfx.quantize(model, target, calibration_data=[d * k for d in DATA], progress=False)
    with torch.no_grad():
        snr = quantfx.sqnr(model(TEST * k), q(TEST * k))
    report = quantfx.verify(q, quantfx.lower(q, (TEST[:1] * k,)), TEST * k)
    return snr, report.max_error_lsb


@pytest.fixture(scope="module")
def unit():
    return {t: quality(t, "acts", 1.0)[0] for t in BACKENDS}


@pytest.mark.parametrize("kind", ["acts", "weights"])
@pytest.mark.parametrize("m", [1e-20, 1e-12, 1e8])
@pytest.mark.parametrize("target", sorted(BACKENDS))
def test_any_magnitude_keeps_the_unit_scale_sqnr(unit, target, kind, m):
    snr, lsb = quality(target, kind, m)
    ref = unit[target]
    profile = quantfx.targets.get_profile(target)
    if profile.power_of_two or profile.act_quant.scale_type == "po2":
        # power-of-two grids (the dpu's; the torch target's activations) are invariant under powers of two only:
        # the same mantissa at unit magnitude
        ref = quality(target, kind, m / 2.0 ** math.floor(math.log2(m)))[0]
    assert abs(snr - ref) < 0.5 and unit[target] > 25, (snr, ref, unit[target])
    assert lsb == 0.0


def test_an_accumulator_scale_below_float32_is_a_clear_error():
    """Inputs ~1e-20 into weights ~1e-20: input scale x weight scale ~1e-44 has no float32 (normal) form."""
    model, k = scaled("acts", 1e-20)
    with torch.no_grad():
        model[3].weight.mul_(1e-20)
        model[3].bias.mul_(1e-20)
        model[7].weight.div_(1e-20)
    q = quantfx.quantize(model, "onnx", calibration_data=[d * k for d in DATA], progress=False)
    for use in (lambda: q(TEST * k), lambda: quantfx.lower(q, (TEST[:1] * k,))):
        with pytest.raises(QuantFXError, match=r"3\.bias_quant: the accumulator scale.*below float32"):
            use()


def biased(m: float, bias: bool):
    """The base model with one conv's weights scaled by m and its bias left as it was (its output is then the
    bias, nearly), or removed (the next layer then reads inputs ~m against its unit-scale bias): a bias far
    outside int32 at input scale x weight scale."""
    model = copy.deepcopy(BASE)
    with torch.no_grad():
        model[3].weight.mul_(m)
        if not bias:
            model[3].bias = None
    return model


@pytest.mark.parametrize("bias", [True, False], ids=["own_bias", "next_bias"])
@pytest.mark.parametrize("m", [1e-20, 1e-12, 1e-6])
@pytest.mark.parametrize("target", sorted(BACKENDS))
def test_a_bias_outside_int32_is_fitted_not_clipped(target, m, bias):
    """The layer whose bias would need more than int32 holds gets a coarser weight grid (recorded in the notes);
    no bias integer is clipped, so the SQNR is the unit model's and the artefact verifies at 0 LSB."""
    model = biased(m, bias)
    q = quantfx.quantize(model, target, calibration_data=DATA, progress=False)
    with torch.no_grad():
        snr = quantfx.sqnr(model(TEST), q(TEST))
    assert snr > 35, snr
    assert quantfx.verify(q, quantfx.lower(q, (TEST[:1],)), TEST).max_error_lsb == 0.0
    for node in q.graph.nodes:
        layer = q.get_submodule(node.target) if node.op == "call_module" else None
        if getattr(layer, "bias", None) is not None and getattr(layer, "bias_quant", None) is not None:
            qmin, qmax = layer.bias_quant.int_range()
            ints = layer.int_bias()
            assert qmin < int(ints.min()) and int(ints.max()) < qmax, (node.target, ints)
    if target in ("onnx", "finn") and m < 1e-6:  # the layers whose grid moved, named
        assert [n.split(":")[0] for n in q.notes["bias_range"]] == (["3"] if bias else ["7"])


def test_a_bias_grown_after_calibration_is_an_error_not_a_clip():
    model = biased(1e-6, True)
    q = quantfx.quantize(model, "onnx", calibration_data=DATA, progress=False)
    with torch.no_grad():
        q.get_submodule("3").bias.mul_(1e9)
    for use in (lambda: q(TEST), lambda: quantfx.lower(q, (TEST[:1],))):
        with pytest.raises(QuantFXError, match=r"3\.bias_quant: bias .* beyond the 32-bit bias range.*calibrate"):
            use()
    quantfx.calibrate(q, DATA, progress=False)  # the way out the message names
    assert quantfx.verify(q, quantfx.lower(q, (TEST[:1],)), TEST).max_error_lsb == 0.0


class Inception(nn.Module):
    """Parallel branches (1x1; 3x3; 1x1 then 3x3; max-pool then 1x1), each ReLU, concatenated."""

    def __init__(self, cin, c):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(cin, c, 3, padding=1), nn.ReLU())
        self.b5 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, c, 1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], 1)


def shrinking_inception(blocks: int = 6, c: int = 4, factor: float = 0.1) -> nn.Module:
    """A stem, ``blocks`` inception blocks whose convs are scaled (weights and biases) so that each block's
    output is ``factor`` x its input in magnitude, and a pooled linear head: the head reads activations
    ~factor^blocks against its unit-scale bias."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(1, 4 * c, 3, padding=1), nn.ReLU())
    body = nn.Sequential(*[Inception(4 * c, c) for _ in range(blocks)])
    net = nn.Sequential(stem, body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10)).eval()
    with torch.no_grad():
        h = stem(DATA[0])
        for blk in body:
            k = float(h.abs().mean() * factor / blk(h).abs().mean())
            two_deep = (blk.b5[0], blk.b5[2])  # k^(1/2) each: ReLU networks are positively homogeneous
            for m in blk.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.mul_(k ** 0.5 if m in two_deep else k)
                    m.bias.mul_(k ** 0.5 if m is two_deep[0] else k)
            h = blk(h)
    return net


@pytest.mark.parametrize("target", sorted(BACKENDS))
def test_activations_shrinking_tenfold_per_inception_block(target):
    """Six blocks take activations from ~1 to ~1e-6; the shared grid of each concat and the head's int32 bias
    (before the bias fit: 0.7 dB on onnx and finn, and 18 LSB from the onnx file) keep the SQNR (48-52 dB)."""
    model = shrinking_inception()
    with torch.no_grad():
        assert 1e-7 < float(model[:2](TEST).abs().mean()) < 1e-5
    q = quantfx.quantize(model, target, calibration_data=DATA, progress=False)
    with torch.no_grad():
        snr = quantfx.sqnr(model(TEST), q(TEST))
    assert snr > 35, snr
    assert quantfx.verify(q, quantfx.lower(q, (TEST[:1],)), TEST).max_error_lsb == 0.0
