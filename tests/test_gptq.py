"""GPTQ weight rounding (quantfx.gptq): on real images (scikit-learn's digits) its layer output error and the
model's SQNR against float beat round-to-nearest at low widths; the scale stays the quantizer's on every
target's grid (per-channel, per-tensor, power-of-two), the integers stay in range, and every artefact verifies
at 0 LSB."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import quantfx
from quantfx.gptq import _columns, gptq, hessians
from quantfx.nn import QuantWBIOL
from quantfx.quant.functional import is_power_of_two
from quantfx.weight_rounding import float_view

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402


def _digits():
    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]


IMAGES = _digits()
CALIB = [IMAGES[i:i + 64] for i in range(0, 256, 64)]
HELD_OUT = IMAGES[-256:]


def net() -> nn.Module:
    """A DigitsNet-shaped CNN with a grouped convolution, briefly trained so its weights are not random."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    labels = torch.tensor(load_digits().target)[torch.randperm(len(IMAGES), generator=torch.Generator()
                                                              .manual_seed(0))]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(0, 1024, 64):
        opt.zero_grad()
        nn.functional.cross_entropy(model(IMAGES[i:i + 64]), labels[i:i + 64]).backward()
        opt.step()
    return model.eval()


MODEL = net()


def quantize(target="finn", w=4, a=4, rounding="gptq", **kw):
    return quantfx.quantize(MODEL, target, calibration_data=CALIB, weight_bit_width=w, act_bit_width=a,
                            weight_rounding=rounding, progress=False, **kw)


def sqnr(q) -> float:
    with torch.no_grad():
        return float(quantfx.sqnr(MODEL(HELD_OUT), q(HELD_OUT)))


def layer_mse(q, name) -> float:
    """The layer's output error (before bias and activation) on the held-out images, its own quantized input
    against the float weights."""
    layer, got = q.get_submodule(name), []

    def hook(mod, args, kwargs):
        x = mod._quant_input(args[0], kwargs.get("input_quantizer"))[0]
        w = getattr(mod, "float_weight", None)
        got.append(mod.inner_forward(x, mod.quant_weight().value, None) -
                   mod.inner_forward(x, mod.weight if w is None else w, None))

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        q(HELD_OUT)
    handle.remove()
    return float(got[0].pow(2).mean())


@pytest.mark.parametrize("bits", [(4, 4), (3, 8), (2, 8)])
def test_gptq_beats_nearest_on_held_out_digits(bits):
    nearest, g = quantize(w=bits[0], a=bits[1], rounding="nearest"), quantize(w=bits[0], a=bits[1], rounding="nearest")
    rows = gptq(g, CALIB, progress=False)
    assert [r.name for r in rows] == ["0", "3", "7", "11"]
    assert all(r.mse_learned < r.mse_nearest and r.changed > 0 for r in rows), rows
    assert g.notes["weight_rounding"] == [str(r) for r in rows]
    quantfx.calibrate(g, CALIB, progress=False)  # as quantize(weight_rounding='gptq') does: scales after
    for r in rows:  # on images it did not see, each layer's output error is lower than nearest rounding's
        assert layer_mse(g, r.name) < layer_mse(nearest, r.name), r.name
    assert sqnr(g) > sqnr(nearest) + 1.0, (sqnr(g), sqnr(nearest))


@pytest.mark.parametrize("target,bits,per_channel", [
    ("finn", (4, 4), True), ("finn", (3, 4), False), ("onnx", (4, 4), True), ("dpu", (8, 8), False),
    ("torch", (7, 8), True)])
def test_gptq_keeps_each_targets_grid_and_verifies_at_zero_lsb(target, bits, per_channel):
    """The scale is the one nearest rounding uses (per-channel, per-tensor, a power of two on the dpu); only the
    integers differ, they stay in range, and the artefact reproduces them."""
    kw = {} if per_channel or target != "finn" else dict(overrides={
        t: dict(weight_scaling_per_output_channel=False) for t in (nn.Conv2d, nn.Linear)})
    nearest = quantize(target, *bits, rounding="nearest", **kw)
    g = quantize(target, *bits, **kw)
    changed = 0
    for (name, m), m0 in zip(((n, m) for n, m in g.named_modules() if isinstance(m, QuantWBIOL)),
                             (m for m in nearest.modules() if isinstance(m, QuantWBIOL))):
        wq = m.weight_quant
        assert wq.rounding_method == "gptq" and wq.scaling_per_output_channel == per_channel, name
        with torch.no_grad():
            assert torch.equal(wq.scale(m.weight), m0.weight_quant.scale(m0.weight)), name
            ints = m.int_weight()
            s, z = wq.broadcast(wq.scale(m.weight), wq.zero_point(m.weight), m.weight)
            if target == "dpu":
                assert all(is_power_of_two(float(v)) for v in s.reshape(-1)), name
            if target != "torch":  # the weights hold their integers exactly; the torch target's x86 grid moves
                # the weight scale up by at most one 2^-15 step after calibration (exact_requant_grid)
                assert torch.equal(m.weight, (ints.float() - z) * s), name
            changed += int((ints != m0.int_weight()).sum())
        lo, hi = wq.int_range()
        assert lo <= int(ints.min()) and int(ints.max()) <= hi, name
    assert changed > 0
    assert sqnr(g) > sqnr(nearest), (sqnr(g), sqnr(nearest))
    x = HELD_OUT[:32]
    report = quantfx.verify(g, quantfx.lower(g, (x[:1],)), (x,))
    assert report.ok and report.max_error_lsb == 0.0, str(report)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 8, 3, padding=1, groups=2), nn.Conv2d(4, 4, (3, 2), stride=2, dilation=(1, 2), groups=4),
    nn.Conv2d(3, 5, 3, padding="same", padding_mode="reflect"), nn.Conv1d(4, 6, 5, padding=2, stride=2),
    nn.Linear(7, 3)])
def test_columns_times_the_weight_are_the_layer(layer):
    """The Hessian's rows are the layer's input as its weight matrix sees it: W [out, in/groups x kernel] times
    each group's columns gives the layer's output."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 9, 10)[
        (..., 0) if isinstance(layer, nn.Conv1d) else (...,)]
    with torch.no_grad():
        y = layer(x) - (0 if layer.bias is None else layer.bias.reshape(-1, *[1] * (x.dim() - 2)).T
                        if isinstance(layer, nn.Linear) else layer.bias.reshape(-1, *[1] * (x.dim() - 2)))
        groups = _columns(layer, x)
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        per = w.shape[0] // len(groups)
        parts = [g @ w[i * per:(i + 1) * per].T for i, g in enumerate(groups)]  # [rows, out of the group]
        got = torch.cat(parts, 1)
        want = y.reshape(-1, y.shape[-1]) if isinstance(layer, nn.Linear) else \
            y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    assert torch.allclose(got, want, atol=1e-5)


def test_gptq_is_deterministic_and_keeps_the_float_model():
    runs = [quantize(w=3, a=4) for _ in range(2)]
    a, b = (r.state_dict() for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad(), float_view(runs[0]):
        assert torch.allclose(runs[0](HELD_OUT), MODEL(HELD_OUT), atol=1e-4)
    assert "per-channel mse, gptq rounding" in quantfx.inspect(runs[0], file=io.StringIO())


def test_hessians_come_from_one_pass_and_skip_transposed_convolutions():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2, stride=2)).eval()
    q = quantfx.quantize(model, "finn", calibration_data=CALIB, weight_bit_width=4, act_bit_width=4,
                         weight_rounding="nearest", progress=False)
    layers = [(n, m) for n, m in q.named_modules() if isinstance(m, QuantWBIOL)]
    found = hessians(q, layers, CALIB)
    assert list(found) == ["0"]
    (h,), rows = found["0"]
    assert rows == 256 * 8 * 8 and h.shape == (9, 9) and torch.allclose(h, h.T)
    rows = gptq(q, CALIB, progress=False)
    assert [r.name for r in rows] == ["0"] and q.get_submodule("2").weight_quant.rounding_method is None


def test_block_size_is_checked():
    with pytest.raises(quantfx.QuantArgumentError, match="block=0"):
        gptq(quantize(rounding="nearest"), CALIB, block=0, progress=False)
