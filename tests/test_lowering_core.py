"""The target-neutral lowering core and the rule checker: rules are profile data (a new profile states its rules,
checked before anything is written), the integers of external and internal biases, the backend registry, and
lowering leaving the user's graph metadata alone."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import quantfx
from quantfx import rules
from quantfx.graph import is_act_quant, is_compute, module_of
from quantfx.lowering import BACKENDS, Backend, Lowering, backend_for, register_backend
from quantfx.targets import DPU, FINN
from quantfx.zoo import LeNet, ResNetSmall, example_input

ROOT = Path(__file__).resolve().parents[1]
DATA = [example_input("lenet", batch=4, seed=i) for i in range(2)]


def lenet(target, **kw):
    torch.manual_seed(0)
    return quantfx.quantize(LeNet().eval(), target, calibration_data=DATA, progress=False, **kw)


def test_every_profile_field_is_read():
    """No scheme, recipe or constraint field that nothing reads: each is used outside its definition."""
    from quantfx.profile import Constraints, Recipe, Scheme
    sources = "\n".join(p.read_text() for folder in ("quantfx", "passes", "targets") for p in (ROOT / folder).rglob(
        "*.py") if p.name != "profile.py" or p.parent.name == "dpu")
    sources += (ROOT / "quantfx" / "profile.py").read_text().split("def __post_init__", 1)[1]
    unread = [f.name for part in (Scheme, Recipe, Constraints) for f in dataclasses.fields(part)
              if not re.search(rf"\b\w+\.{f.name}\b", sources)]
    assert unread == []


def test_a_profile_states_its_rules_and_the_checker_applies_them():
    q = lenet("finn")
    assert rules.violations(q, FINN) == []
    # the same graph against the DPU's rules: float scales, per-channel nothing, external biases
    found = rules.violations(q, DPU)
    texts = [f"{v.node} {v.message}" for v in found]
    assert any(re.match(r"x_quant output quantizer has a float scale; the DPU needs power-of-two scales", t)
               for t in texts), texts
    assert any(re.match(r"conv1 bias is scaled external; the DPU takes a bias with its own scale", t) for t in texts)
    order = [n.target for n in q.graph.nodes if n.op == "call_module"]
    assert [order.index(v.node) for v in found] == sorted(order.index(v.node) for v in found)  # graph order
    # a new rule is a field: a profile that takes 4-bit activations at most
    tight = FINN.replace(act_bit_range=(1, 4), runtime="MyAccel", act_bit_width=4, input_bit_width=4)
    with pytest.raises(quantfx.TargetError, match=r"^finn: x_quant output quantizer is 8-bit; MyAccel takes at most "
                                                  r"4 bits here \(use act_bit_width <= 4\)"):
        rules.check(q, tight)


def test_rules_run_before_anything_is_written(tmp_path, monkeypatch):
    q = lenet("finn")
    relu = next(n for n in q.graph.nodes if is_act_quant(q, n) and "relu" in n.target)
    module_of(q, relu).act_quant.bit_width = 10
    called = []
    monkeypatch.setattr(Lowering, "propagate_shapes", lambda self: called.append(1))
    with pytest.raises(quantfx.TargetError, match=f"finn: {relu.target} output quantizer is 10-bit"):
        quantfx.export(q, tmp_path / "m.onnx")
    assert called == [] and not (tmp_path / "m.onnx").exists()


def test_model_for_another_target_is_checked_against_that_targets_profile():
    q = lenet("finn")  # unsigned-after-ReLU, symmetric: passes onnx's rules except weight widths
    with pytest.raises(quantfx.TargetError, match=r"^onnx: conv1 can sum .* in one int16 pair of onnxruntime"):
        quantfx.lower(q, (DATA[0][:1],), target="onnx")


def test_bias_integers_external_and_internal():
    for target in ("onnx", "dpu"):
        q = lenet(target)
        node, layer = next((n, module_of(q, n)) for n in q.graph.nodes if is_compute(q, n))
        low = Lowering(q, (DATA[0][:1],))
        ints, scale = low.bias_ints(layer, low.input_scale(node))
        q(DATA[0])  # the layer's own quantized bias, for its last input
        qb = layer.quant_bias()
        assert torch.equal(ints.to(torch.float32) * scale, qb.value), target
        if target == "dpu":  # the bias's own (power-of-two) scale, not input scale x weight scale
            assert scale.numel() == 1 and float(torch.log2(scale)) == int(torch.log2(scale))
            assert not torch.equal(scale, layer.acc_scale(low.input_scale(node), layer.quant_weight_scale()))


def test_lowering_keeps_the_users_shapes():
    torch.manual_seed(0)
    q = quantfx.quantize(ResNetSmall().eval(), "onnx", calibration_data=[torch.randn(8, 3, 32, 32)], progress=False)
    before = {n.name: tuple(n.meta["tensor_meta"].shape) for n in q.graph.nodes if "tensor_meta" in n.meta}
    model = quantfx.lower(q, (torch.randn(1, 3, 32, 32),))
    after = {n.name: tuple(n.meta["tensor_meta"].shape) for n in q.graph.nodes if "tensor_meta" in n.meta}
    assert after == before and before["x"] == (8, 3, 32, 32)
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3


def test_backend_registry_and_suffix(tmp_path):
    assert {"onnx", "finn"} <= set(BACKENDS) and backend_for(lenet("onnx")).name == "onnx"
    with pytest.raises(quantfx.QuantArgumentError, match="no backend for target 'nope'; available: "):
        backend_for(None, "nope")
    q = lenet("onnx")
    quantfx.export(q, tmp_path / "model", (DATA[0][:1],))
    assert (tmp_path / "model.onnx").exists()
    saved = dict(BACKENDS)
    try:  # a backend is one registration
        register_backend(Backend("toy", lower=lambda m, x: "artefact", save=lambda a, p: Path(p).write_text(a),
                                 load=lambda p: Path(p).read_text(), run=lambda a, x: [], suffix=".txt"))
        quantfx.export(q, tmp_path / "toy", (DATA[0][:1],), target="toy")
        assert (tmp_path / "toy.txt").read_text() == "artefact"
    finally:
        BACKENDS.clear()
        BACKENDS.update(saved)
