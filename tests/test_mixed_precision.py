"""Mixed precision under a budget (quantfx.mixed_precision, targets/finn_cost.py): every budget key holds, the
allocation is the integer program's optimum (checked by enumeration), the chosen widths are ordinary per-layer
widths that inspect shows and every backend exports at 0 LSB, and the result beats the uniform widths of the
same cost on real images."""
from __future__ import annotations

import copy
import io
import itertools

import numpy as np
import pytest
import torch

import quantfx
from quantfx.cli import main as cli_main
from quantfx.mixed_precision import LayerShape, _Layer, allocate, model_cost, parse_budget
from quantfx.targets.finn_cost import finn_brams, finn_luts
from test_gptq import CALIB, HELD_OUT, MODEL


def quantize(target="finn", **kw):
    kw.setdefault("weight_rounding", "nearest")
    return quantfx.quantize(MODEL, target, calibration_data=CALIB, progress=False, **kw)


def sqnr(q) -> float:
    with torch.no_grad():
        return float(quantfx.sqnr(MODEL(HELD_OUT), q(HELD_OUT)))


EIGHT = quantfx.quantize(MODEL, "finn", example_inputs=(CALIB[0][:1],), progress=False)


@pytest.fixture(scope="module")
def mixed():
    return quantize(budget={"bops": 0.25})


def test_bops_budget_holds_and_beats_uniform_w4a4_of_the_same_cost(mixed):
    uniform = quantize(weight_bit_width=4, act_bit_width=4)
    assert model_cost(mixed, "bops") <= 0.25 * model_cost(EIGHT, "bops") + 1e-6
    assert model_cost(uniform, "bops") >= model_cost(mixed, "bops") * 0.95  # the same cost, near enough
    rows = [r for r in quantfx.layer_table(mixed) if r["weight_bits"] is not None]
    assert len({(r["weight_bits"], r["act_bits"]) for r in rows}) > 1  # not one width everywhere
    assert sqnr(mixed) > sqnr(uniform) + 1.0, (sqnr(mixed), sqnr(uniform))


def test_inspect_shows_the_chosen_widths_and_the_cost(mixed):
    text = quantfx.inspect(mixed, file=io.StringIO())
    assert "mixed precision, widths chosen under a budget: bops" in text
    assert mixed.notes["mixed_precision"][-1].startswith(("widths by search", "widths by uniform"))
    assert "whole models measured" in mixed.notes["mixed_precision"][-1]
    for name, m in mixed.named_modules():
        if isinstance(m, quantfx.nn.QuantWBIOL):
            line = next(l for l in text.splitlines() if l.startswith(name + " "))
            assert f" {m.weight_quant.bit_width} " in line, line


@pytest.mark.parametrize("target", ["finn", "onnx"])
def test_several_keys_all_hold_and_export_at_zero_lsb(target):
    q = quantize(target, budget={"bops": 0.2, "weight_bytes": 0.45})
    eight = quantfx.quantize(MODEL, target, example_inputs=(CALIB[0][:1],), weight_bit_width=8, act_bit_width=8,
                             cpu="vnni" if target == "onnx" else None, progress=False)
    for key, frac in (("bops", 0.2), ("weight_bytes", 0.45)):
        assert model_cost(q, key) <= frac * model_cost(eight, key) + 1e-6, key
    x = HELD_OUT[:32]
    report = quantfx.verify(q, quantfx.lower(q, (x[:1],)), (x,))
    assert report.ok and report.max_error_lsb == 0.0, str(report)


def test_finn_lut_budget_in_luts():
    full = model_cost(EIGHT, "finn_luts")
    q = quantize(budget={"finn_luts": 0.2 * full})  # absolute: more than 1
    assert model_cost(q, "finn_luts") <= 0.2 * full
    assert sqnr(q) > 10.0


def test_finn_costs_are_finns_formulas():
    """By hand from FINN's MVAU lut_estimation / bram_estimation: MW = 144, MH = 32, W = A = B = 4, PE = SIMD = 8:
    multipliers 8 (2 ceil(8/6) - 1) 8 = 192, adder tree 8 (2 8 - 1) = 120, accumulator ceil(log2 144 + 7 +
    log2(1 + 2^-alpha) + 1) = 16, thresholds and comparators 15 x 16 = 240 each; 300 + 1.1 x 8 x 808 = 7410.
    Weight memory 144 x 32 / 64 = 72 deep, 256 bits wide: ceil(72 / 512) ceil(256 / 36) = 8 RAMB18s."""
    layer = LayerShape("c", "conv", 0, 32 * 16 * 9, 16 * 9, 32, 9, 64, False)
    assert finn_luts(layer, 4, 4, 4) == 7410 and finn_brams(layer, 4, 4, 4) == 8
    assert finn_luts(layer, 4, 4, None) == int(300 + 1.1 * 8 * (192 + 120 + 16))  # noActivation: no thresholds
    assert finn_luts(layer, 2, 2, 2) < finn_luts(layer, 4, 4, 4) < finn_luts(layer, 8, 8, 8)


def test_allocation_is_the_optimum_by_enumeration():
    """Three layers, two activation variables (one shared by two layers): the integer program's choice equals
    the best of all width combinations that fit the budget."""
    rng = np.random.default_rng(0)
    shapes = [LayerShape(f"l{i}", "conv", macs, macs // 10, 9, 8, 9, 10, False)
              for i, macs in enumerate((1000, 3000, 2000))]
    layers = [_Layer(shapes[0], None, 0, None, (8, None)), _Layer(shapes[1], None, 1, None, (8, None)),
              _Layer(shapes[2], None, 1, None, (8, None))]
    widths = [2, 4, 8]
    sens = {("w", i): {b: float(rng.random()) * (8 - b) for b in widths} for i in range(3)}
    sens.update({("a", j): {b: float(rng.random()) * (8 - b) for b in widths} for j in range(2)})
    limit = 0.3 * sum(s.macs * 64 for s in shapes)
    w_bits, a_bits, objective = allocate(layers, [[0], [1]], sens, widths, widths, {"bops": limit},
                                         [l.fixed for l in layers])
    best = min((sum(sens[("w", i)][w[i]] for i in range(3)) + sens[("a", 0)][a[0]] + sens[("a", 1)][a[1]], w, a)
               for w in itertools.product(widths, repeat=3) for a in itertools.product(widths, repeat=2)
               if sum(s.macs * w[i] * a[min(i, 1)] for i, s in enumerate(shapes)) <= limit)
    assert objective == pytest.approx(best[0], rel=1e-6)
    assert (tuple(w_bits), tuple(a_bits)) == (best[1], best[2])


def test_forced_widths_hold_and_cost_no_less():
    """allocate(force=...): a variable held to a width range takes it, the others pay for it within the budget,
    and the summed sensitivity is at least the free optimum's (the refinement's moves)."""
    shapes = [LayerShape(f"l{i}", "conv", macs, macs // 10, 9, 8, 9, 10, False)
              for i, macs in enumerate((1000, 3000, 2000))]
    layers = [_Layer(s, None, i, None, (8, None)) for i, s in enumerate(shapes)]
    widths = [2, 4, 8]
    sens = {("w", i): {2: 3.0 + i, 4: 1.0, 8: 0.0} for i in range(3)}
    sens.update({("a", j): {2: 2.0, 4: 0.5, 8: 0.0} for j in range(3)})
    limit = {"bops": 0.3 * sum(s.macs * 64 for s in shapes)}
    free = allocate(layers, [[0], [1], [2]], sens, widths, widths, limit, [l.fixed for l in layers])
    up = allocate(layers, [[0], [1], [2]], sens, widths, widths, limit, [l.fixed for l in layers],
                  {("w", 1): (8, 8)})
    assert up[0][1] == 8 and free[0][1] != 8
    assert sum(s.macs * w * a for s, w, a in zip(shapes, up[0], up[1])) <= limit["bops"]
    assert up[2] >= free[2] - 1e-9
    everything_wide = {(kind, i): (8, 8) for kind in "wa" for i in range(3)}
    assert allocate(layers, [[0], [1], [2]], sens, widths, widths, limit, [l.fixed for l in layers],
                    everything_wide) is None


def test_search_keeps_the_best_measured_model_and_leaves_the_weights(mixed):
    """The kept widths measured no worse than every other whole model the search measured, among them the
    uniform widths that fit; GPTQ trials left no rounded weights behind before the final calibration."""
    from quantfx.mixed_precision import _Evaluator, _model_layers, _uniform, choose_widths
    q = quantize(weight_rounding="nearest")
    widest = copy.deepcopy(q)  # the model the search started from, to measure its candidates again
    before = {n: m.weight.detach().clone() for n, m in q.named_modules() if isinstance(m, quantfx.nn.QuantWBIOL)}
    choice = choose_widths(q, CALIB, {"bops": 0.15}, progress=False, rounding="gptq", refine=1)
    for n, m in q.named_modules():
        if isinstance(m, quantfx.nn.QuantWBIOL):
            assert torch.equal(m.weight, before[n]) and getattr(m, "float_weight", None) is None, n
            assert not m.weight_quant.rounding_learned and not m.weight_quant.is_frozen, n
    layers, acts = _model_layers(widest, False)
    ev = _Evaluator(widest, layers, acts, CALIB, "gptq")
    uniform = _uniform(layers, acts, choice.sensitivity, [2, 3, 4, 5, 6, 8], [2, 3, 4, 5, 6, 8],
                       choice.limits, set(), 8)
    assert uniform is not None
    with quantfx.nn.exact_arithmetic(False):  # as the search measures
        assert choice.measured <= ev.whole(uniform[0], uniform[1]) * (1 + 1e-6)
        again = ev.whole(list(choice.weights.values()), list(choice.acts.values()))
    assert again == pytest.approx(choice.measured, rel=1e-6)


def test_bad_budgets_are_clear_errors():
    with pytest.raises(quantfx.QuantArgumentError, match="unknown key 'flops'.*bops"):
        quantize(budget={"flops": 0.5})
    with pytest.raises(quantfx.QuantArgumentError, match="give calibration_data too"):
        quantfx.quantize(MODEL, "finn", example_inputs=(CALIB[0],), budget={"bops": 0.5}, progress=False)
    with pytest.raises(quantfx.QuantArgumentError, match=r"no widths meet bops <= .*narrowest \(W2A2\)"):
        quantize(budget={"bops": 0.01})
    with pytest.raises(quantfx.QuantArgumentError, match="positive number"):
        parse_budget({"bops": -1})
    assert parse_budget("bops=0.25,weight_bytes=2000") == {"bops": 0.25, "weight_bytes": 2000.0}
    with pytest.raises(quantfx.QuantArgumentError, match="key=number"):
        parse_budget("bops")


def test_cli_budget(tmp_path, capsys):
    src = tmp_path / "m.py"
    src.write_text("import torch\nfrom torch import nn\n\ndef build():\n    torch.manual_seed(0)\n"
                   "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),\n"
                   "                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()\n")
    saved = tmp_path / "q.pt"
    assert cli_main(["quantize", f"{src}:build", "--input-shape", "4,3,8,8", "--calib-batches", "2",
                     "--budget", "bops=0.3", "--weight-rounding", "nearest", "--quiet", "--save", str(saved)]) == 0
    q = torch.load(saved, weights_only=False)
    assert q.notes["mixed_precision"][0].startswith("bops ")
    eight = quantfx.quantize(_cli_model(src), "finn", example_inputs=(torch.zeros(1, 3, 8, 8),), progress=False)
    assert model_cost(q, "bops") <= 0.3 * model_cost(eight, "bops") + 1e-6
    assert cli_main(["inspect", str(saved)]) == 0
    assert "mixed precision, widths chosen under a budget" in capsys.readouterr().out


def _cli_model(src):
    import importlib.util
    spec = importlib.util.spec_from_file_location("m_cli", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build()
