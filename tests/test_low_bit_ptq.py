"""Low-bit post-training quantization: per-channel weight scales, MSE scale search, learned weight rounding
(AdaRound), cross-layer equalization and bias correction. Each is measured against plain min/max on fixed
models (the improvement is asserted, not a value), and every result still exports and verifies at 0 LSB."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import quantfx
from quantfx.export import _intermediates, backend_for
from quantfx.graph import is_act_quant
from quantfx.passes.equalize_cross_layer import in_ranges, out_ranges
from quantfx.targets import int16_pairs
from quantfx.weight_rounding import adaround, float_view
from quantfx.zoo import _randomize_bn

ITERATIONS = 100  # learned-rounding steps per layer in these tests (the default is 1000)


def small_net(seed: int = 0) -> nn.Module:
    """A DigitsNet-shaped CNN for 1x8x8 inputs, random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    return _randomize_bn(model).eval()


def data(n: int = 4, batch: int = 32, seed: int = 0) -> list[torch.Tensor]:
    return [torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


CALIB = data()
HELD_OUT = torch.cat(data(2, 64, seed=100))


def sqnr(model, q, x=HELD_OUT) -> float:
    with torch.no_grad():
        return float(quantfx.sqnr(model(x), q(x)))


def quantize(model, target="finn", w=4, a=4, **kw):
    kw.setdefault("weight_rounding", "nearest")
    return quantfx.quantize(model, target, calibration_data=CALIB, weight_bit_width=w, act_bit_width=a,
                            progress=False, **kw)


def per_layer(**fields) -> dict:
    return {nn.Conv2d: dict(fields), nn.Linear: dict(fields)}


# -- each method against plain min/max -------------------------------------------------------------------


def test_per_channel_weights_are_finns_default_and_beat_per_tensor():
    model = small_net()
    q = quantize(model, w=4, a=8, calibration_method="minmax")
    assert all(m.weight_quant.scaling_per_output_channel for m in q.modules()
               if isinstance(m, quantfx.nn.QuantWBIOL))
    per_tensor = quantize(model, w=4, a=8, calibration_method="minmax",
                          overrides=per_layer(weight_scaling_per_output_channel=False))
    assert sqnr(model, q) > sqnr(model, per_tensor) + 1.0


def test_mse_weight_scales_are_the_low_bit_default_and_beat_max():
    """At 2 bits (ternary weights) the range makes most weights 0: the MSE scale keeps them."""
    model = small_net()
    q = quantize(model, w=2, a=8, calibration_method="minmax")
    assert {m.weight_quant.scale_stat for m in q.modules() if isinstance(m, quantfx.nn.QuantWBIOL)} == {"mse"}
    by_max = quantize(model, w=2, a=8, calibration_method="minmax", overrides=per_layer(weight_scale_stat="max"))
    assert sqnr(model, q) > sqnr(model, by_max) + 1.0
    eight = quantize(model, w=8, a=8)  # above 4 bits the range is kept
    assert {m.weight_quant.scale_stat for m in eight.modules() if isinstance(m, quantfx.nn.QuantWBIOL)} == {"max"}


def test_mse_activation_calibration_is_the_low_bit_default_and_beats_minmax():
    model = small_net()
    auto = quantize(model, w=8, a=4)
    minmax = quantize(model, w=8, a=4, calibration_method="minmax")
    methods = {q.calibrated_by for q in quantfx.quantizers(auto, "act") if q.bit_width == 4}
    assert methods == {"mse"}
    assert {q.calibrated_by for q in quantfx.quantizers(auto, "act") if q.bit_width == 8} == {"max"}
    assert sqnr(model, auto) > sqnr(model, minmax) + 1.0


@pytest.mark.parametrize("bits", [(3, 4), (2, 8)])
def test_learned_rounding_beats_nearest_on_held_out_data(bits):
    model = small_net()
    nearest = quantize(model, w=bits[0], a=bits[1])
    learned = quantize(model, w=bits[0], a=bits[1])
    rows = adaround(learned, CALIB, iterations=ITERATIONS, progress=False)
    assert [r.name for r in rows] == ["0", "3", "7", "11"]
    assert all(r.mse_learned <= r.mse_nearest for r in rows)
    assert sum(r.changed for r in rows) > 0
    assert sqnr(model, learned) > sqnr(model, nearest) + 1.0
    assert learned.notes["weight_rounding"] == [str(r) for r in rows]


def test_learned_rounding_moves_each_integer_at_most_one_step_from_nearest():
    model = small_net()
    q = quantize(model, w=3, a=4)
    with torch.no_grad():
        nearest = {n: m.int_weight().clone() for n, m in q.named_modules() if isinstance(m, quantfx.nn.QuantWBIOL)}
    adaround(q, CALIB, iterations=ITERATIONS, progress=False)
    for name, m in q.named_modules():
        if isinstance(m, quantfx.nn.QuantWBIOL):
            with torch.no_grad():
                ints = m.int_weight()
            assert m.weight_quant.rounding_learned
            assert int((ints - nearest[name]).abs().max()) <= 1, name
            lo, hi = m.weight_quant.int_range()
            assert int(ints.min()) >= lo and int(ints.max()) <= hi
            # the weights hold their integers exactly, on the frozen grid
            assert torch.equal(m.weight, ints.float() * m.weight_quant.broadcast(
                *m.weight_quant.qparams(m.weight), m.weight)[0])


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 8, 3, stride=2, padding=(1, 2), dilation=(1, 2)),
                                  nn.Conv2d(6, 6, 5, padding=2, groups=3), nn.Conv1d(6, 8, 7, padding=3)])
def test_a_large_map_steps_on_random_windows_computed_exactly(conv):
    """On maps larger than the window a step sees fewer samples and a window of the output, computed from the
    padded input's slice: the same numbers as that window of the whole layer's output."""
    from quantfx.weight_rounding import STEP_MACS, STEP_POSITIONS, WINDOW, _Steps
    torch.manual_seed(0)
    x = torch.randn(12, 6, *([45, 40] if isinstance(conv, nn.Conv2d) else [300]))
    with torch.no_grad():
        full = conv(x)
    step = _Steps(conv, x, full, 32, torch.Generator().manual_seed(0))
    assert step.window == tuple(min(o, WINDOW) for o in full.shape[2:]) and step.window != full.shape[2:]
    positions = int(np.prod(step.window))
    # a step stays within its budget of output positions and multiply-accumulates (or takes one sample)
    assert 1 <= step.samples <= 32
    assert step.samples == 1 or (step.samples * positions <= STEP_POSITIONS and
                                 step.samples * positions * conv.weight.numel() <= STEP_MACS)
    for _ in range(5):
        x_step, target, forward = step()
        assert target.shape[0] == min(step.samples, 12) and tuple(target.shape[2:]) == step.window
        with torch.no_grad():
            torch.testing.assert_close(forward(x_step, conv.weight, conv.bias), target, rtol=1e-5, atol=1e-5)


def test_learned_rounding_on_windows_lowers_the_whole_maps_error():
    """A 4-bit net on 48 x 48 inputs: its two convolutions learn on random windows of their 24 x 24 outputs, and
    the rounding learned there lowers the error over the whole maps of every calibration sample."""
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))).eval()
    calib = [torch.rand(16, 3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q = quantfx.quantize(model, "finn", calibration_data=calib, weight_bit_width=4, act_bit_width=4,
                         weight_rounding="nearest", progress=False)
    rows = {r.name: r for r in adaround(q, calib, iterations=200, progress=False)}
    for name in ("0", "3"):  # mse_* are measured on the whole maps, after learning on windows
        assert rows[name].changed > 0 and rows[name].mse_learned < 0.95 * rows[name].mse_nearest, rows[name]


def test_learned_rounding_is_deterministic_under_a_seed():
    model = small_net()
    runs = []
    for _ in range(2):
        q = quantize(model, w=3, a=3)
        adaround(q, CALIB, iterations=50, progress=False, seed=7)
        runs.append({k: v.clone() for k, v in q.state_dict().items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_learned_rounding_under_the_users_no_grad_is_the_same():
    """quantize() called inside ``torch.no_grad()`` (as in an evaluation loop) learns the same rounding: before,
    the first backward raised 'element 0 of tensors does not require grad'."""
    model = small_net()
    runs = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            q = quantize(model, w=3, a=3, weight_rounding="learned")
            assert torch.is_grad_enabled() == grad  # the user's mode, left as it was
        assert all(m.weight_quant.rounding_learned for m in q.modules() if isinstance(m, quantfx.nn.QuantWBIOL))
        runs.append(q.state_dict())
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_float_view_is_the_float_model_after_learned_rounding():
    model = small_net()
    q = quantize(model, w=3, a=3)
    adaround(q, CALIB, iterations=20, progress=False)
    with torch.no_grad(), float_view(q):
        assert torch.allclose(q(HELD_OUT), model(HELD_OUT), atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(q(HELD_OUT), model(HELD_OUT), atol=1e-3)  # quantized again after the block


def test_quantize_learns_rounding_by_default_at_low_bits_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    calib = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    low = quantfx.quantize(model, "finn", calibration_data=calib, weight_bit_width=4, act_bit_width=4,
                           progress=False)
    assert all(m.weight_quant.rounding_learned for m in low.modules() if isinstance(m, quantfx.nn.QuantWBIOL))
    table = quantfx.inspect(low, file=io.StringIO())
    assert "per-channel mse, learned rounding" in table and " mse" in table
    high = quantfx.quantize(model, "finn", calibration_data=calib, progress=False)
    assert not any(m.weight_quant.rounding_learned for m in high.modules()
                   if isinstance(m, quantfx.nn.QuantWBIOL))
    assert "per-channel max" in quantfx.inspect(high, file=io.StringIO())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched


def test_weight_rounding_argument_is_checked():
    with pytest.raises(quantfx.QuantArgumentError, match="weight_rounding='up'.*nearest"):
        quantfx.quantize(small_net(), "finn", calibration_data=CALIB, weight_rounding="up", progress=False)


# -- bias correction composes with learned rounding --------------------------------------------------------


def test_bias_correction_after_learned_rounding_reduces_the_mean_error():
    model = small_net()
    errors = {}
    for flag in (False, True):
        q = quantize(model, w=3, a=8)
        adaround(q, CALIB, iterations=ITERATIONS, progress=False)
        if flag:
            quantfx.correct_bias(q, CALIB, progress=False)
        with torch.no_grad():
            errors[flag] = float((q(HELD_OUT) - model(HELD_OUT)).mean(0).abs().mean())
    assert errors[True] < errors[False] / 1.5, errors


# -- cross-layer equalization ----------------------------------------------------------------------------


def imbalanced_net() -> nn.Module:
    """conv -> ReLU -> conv -> ReLU -> conv whose first layer's channels span three decades of range, the case
    per-tensor weight scales handle worst (MobileNet's depthwise layers are like this)."""
    model = small_net(seed=3)
    with torch.no_grad():
        spread = torch.logspace(-1.5, 1.5, 16)
        model[0].weight.mul_(spread.reshape(-1, 1, 1, 1))
        model[0].bias.mul_(spread)
        model[3].weight.div_(spread.reshape(1, -1, 1, 1))
    return model


def test_equalization_keeps_float_outputs_and_balances_ranges():
    model = imbalanced_net()
    pipeline = quantfx.pipeline_for("dpu", equalize=True)
    assert "equalize_cross_layer" in [p.name for p in pipeline]
    q = quantfx.quantize(model, "dpu", example_inputs=(CALIB[0],), pipeline=pipeline)
    with torch.no_grad(), float_view(q):
        assert torch.allclose(q(HELD_OUT), model(HELD_OUT), rtol=1e-4, atol=1e-5)
    first, second = q.get_submodule("0"), q.get_submodule("3")
    ratio = out_ranges(first) / in_ranges(second)
    assert float((ratio - 1).abs().max()) < 1e-3  # both sides of every channel have the same range
    before = out_ranges(model[0])
    assert float(before.max() / before.min()) > 100 and float(out_ranges(first).max() / out_ranges(first).min()) < 30


@pytest.mark.parametrize("target", ["dpu", "finn"])
def test_equalization_improves_per_tensor_quantization(target):
    model = imbalanced_net()
    kw = dict(overrides=per_layer(weight_scaling_per_output_channel=False)) if target == "finn" else {}
    results = {}
    for eq in (False, True):
        pipeline = quantfx.pipeline_for(target, equalize=eq)
        q = quantfx.quantize(model, target, calibration_data=CALIB, pipeline=pipeline, progress=False, **kw)
        results[eq] = sqnr(model, q)
    assert results[True] > results[False] + 3.0, results


def test_equalization_is_opt_in():
    for t in ("dpu", "finn", "onnx", "torch"):
        assert "equalize_cross_layer" not in [p.name for p in quantfx.pipeline_for(t)]
        assert "equalize_cross_layer" in [p.name for p in quantfx.pipeline_for(t, equalize=True)]


# -- every method's result is still exact in its runtime -------------------------------------------------


def lsb_errors(q, artefact, x) -> dict:
    """fx node -> max error in LSBs of every activation quantizer the artefact holds."""
    expected = _intermediates(q, (x,))
    got = backend_for(q).run_with_intermediates(artefact, (x,), list(expected))
    errors = {}
    for node in q.graph.nodes:
        if is_act_quant(q, node) and node.name in got:
            lsb = float(node.meta["quant"].scale.reshape(-1).min())
            errors[node.name] = float(np.max(np.abs(expected[node.name] - np.asarray(got[node.name])))) / lsb
    return errors


@pytest.mark.parametrize("target,bits", [("finn", (4, 4)), ("finn", (2, 4)), ("onnx", (3, 3)),
                                         ("torch", (7, 8)), ("dpu", (8, 8))])
def test_every_method_exports_and_verifies_at_zero_lsb(target, bits, tmp_path):
    model = small_net()
    q = quantize(model, target, w=bits[0], a=bits[1], bias_correction=True, weight_rounding="nearest")
    adaround(q, CALIB, iterations=50, progress=False)  # at 8 bits too, where 'auto' would not
    quantfx.calibrate(q, CALIB, progress=False, bias_correction=True)  # re-fix the scales after both
    assert all(m.weight_quant.rounding_learned for m in q.modules()
               if isinstance(m, quantfx.nn.QuantWBIOL) and m.weight_quant.fixed_scale is None)
    x = HELD_OUT[:8]
    artefact = quantfx.lower(q, (x[:1],))
    report = quantfx.verify(q, artefact, (x,))
    assert report.ok and report.max_error_lsb == 0.0, str(report)
    errors = lsb_errors(q, artefact, x)
    assert len(errors) == sum(1 for n in q.graph.nodes if is_act_quant(q, n))
    assert max(errors.values()) == 0.0, {k: v for k, v in errors.items() if v}
    if target == "onnx":
        # the same integers on x86 without VNNI: no int16 pair sum of the file's integer layers can saturate
        # (read off the file, so it holds whichever CPU runs this test)
        risks = int16_pairs.pair_risks(artefact)
        assert len(risks) == 4 and max(r.worst for r in risks) <= int16_pairs.INT16_MAX, risks
