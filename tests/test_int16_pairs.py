"""The onnx artefact gives the same integers on every CPU: x86 with or without VNNI, ARM.

onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI sum products in saturating int16 pairs; elsewhere they
are exact. These tests prove the default artefact cannot tell the two apart, on whichever CPU they run: by the
rule (no pair sum of any layer can pass 32767, checked on the file) and by emulating the other CPU's arithmetic
on each integer layer of every zoo model. The emulation itself is checked against onnxruntime on this CPU."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import quantfx
from quantfx.errors import QuantArgumentError, TargetError
from quantfx.export import BACKENDS
from quantfx.targets import int16_pairs, onnx_qdq
from quantfx.targets.int16_pairs import INT16_MAX, emulate_conv2d, emulate_u8s8, pair_risks, top2_sum
from quantfx.targets.onnx_qdq import layer_checks
from quantfx.zoo import LeNet, TEST_MODELS, example_input


def test_the_issues_figures():
    # a 3x3 conv over 16 channels, input codes 255, weights 127: AVX2 gives 72 saturated pairs
    x = np.full((1, 16, 3, 3), 255)
    w = np.full((1, 16, 3, 3), 127)
    assert emulate_conv2d(x, 0, w).item() == 72 * INT16_MAX == 2_359_224
    assert emulate_conv2d(x, 0, w, saturate=False).item() == 144 * 255 * 127 == 4_663_440
    # 7-bit weights (|w| <= 63) cannot saturate: 255 * 126 <= 32767
    w63 = np.full((1, 16, 3, 3), 63)
    assert emulate_conv2d(x, 0, w63).item() == emulate_conv2d(x, 0, w63, saturate=False).item() == 144 * 255 * 63


def test_emulated_conv_is_the_convolution_when_nothing_saturates():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 8, 9, 9))
    w = rng.integers(-63, 64, (6, 4, 3, 3))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=7)
    got = emulate_conv2d(xp, 7, w, stride=(2, 2), dilation=(1, 1), groups=2)
    want = torch.nn.functional.conv2d(torch.tensor(x - 7, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                      stride=2, padding=1, groups=2).long().numpy()
    assert got.shape == (2, 6, 5, 5) and np.array_equal(got, want)
    dil = emulate_conv2d(xp, 7, w, dilation=(2, 2), groups=2, saturate=False)
    want = torch.nn.functional.conv2d(torch.tensor(x - 7, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                      padding=1, dilation=2, groups=2).long().numpy()
    assert np.array_equal(dil, want)


def test_top2_sum_is_the_worst_pair_for_any_pairing():
    w = np.array([[1, -9, 3, 8], [0, 0, 0, -2]])
    assert top2_sum(w).tolist() == [17, 2]
    rng = np.random.default_rng(1)
    for _ in range(20):  # the rule's bound holds for every order of the reduction terms
        wr = rng.integers(-128, 128, (1, 10))
        a = np.full((1, 10), 255)
        worst = np.abs(a[:, :2] * np.sort(np.abs(wr))[:, ::-1][:, :2]).sum()
        assert worst == 255 * top2_sum(wr).item()
        perm = rng.permutation(10)
        sat = emulate_u8s8(a, wr[:, perm]) != emulate_u8s8(a, wr[:, perm], saturate=False)
        assert not sat.any() or 255 * top2_sum(wr).item() > INT16_MAX


def _matmul_integer(w: np.ndarray) -> onnx.ModelProto:
    k = w.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("k", [37, 144, 300])
def test_emulation_is_what_onnxruntime_computes_on_this_cpu(k):
    """onnxruntime's u8 x s8 MatMulInteger on full-range random codes: the emulated pair sums where this CPU
    has no VNNI, the exact products where it has (or is ARM). Either way the two differ on these inputs."""
    has_dot = int16_pairs.cpu_has_int32_dot()
    if has_dot is None:
        pytest.skip("this CPU's 8-bit dot product cannot be told from /proc/cpuinfo")
    rng = np.random.default_rng(k)
    w = rng.integers(-128, 128, (k, 24)).astype(np.int8)
    x = rng.integers(0, 256, (50, k)).astype(np.uint8)
    got = onnx_qdq.ort_session(_matmul_integer(w)).run(None, {"x": x})[0]
    avx2, exact = emulate_u8s8(x, w.T), emulate_u8s8(x, w.T, saturate=False)
    assert (avx2 != exact).sum() > 100
    assert np.array_equal(got, exact if has_dot else avx2)


def _lowered(name: str, cpu: str, **kw):
    torch.manual_seed(0)
    model = TEST_MODELS[name][0]().eval()
    data = [example_input(name, batch=4, seed=i) for i in range(4)]
    q = quantfx.quantize(model, "onnx", calibration_data=data, progress=False, cpu=cpu, **kw)
    x = example_input(name, batch=4, seed=100)
    return q, quantfx.lower(q, (x[:1],)), x


@pytest.fixture(scope="module", params=sorted(TEST_MODELS))
def zoo(request):
    return request.param, _lowered(request.param, "any"), _lowered(request.param, "vnni")


def test_no_layer_of_the_default_artefact_can_saturate(zoo):
    name, (_, model, _), (_, vnni_model, _) = zoo
    risks = pair_risks(model)
    convs = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)
    assert len(risks) == convs > 0  # every integer layer is examined
    assert all(r.safe for r in risks), [r for r in risks if not r.safe]
    assert max(r.worst for r in risks) <= INT16_MAX
    # the same check on cpu='vnni' (8-bit weights) fails: the rule can tell
    assert not all(r.safe for r in pair_risks(vnni_model))


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_seven_bit_activations_with_8_bit_weights_cannot_saturate(name):
    """The other safe scheme (fbgemm's reduce_range): the rule reads the 7-bit range of every layer's input off
    the file, through the Pad and SpaceToDepth of a strided stem."""
    _, model, x = _lowered(name, "any", weight_bit_width=8, act_bit_width=7, input_bit_width=7)
    risks = pair_risks(model)
    assert risks and {r.in_code_max for r in risks} == {127} and all(r.safe for r in risks)
    assert all(c.exact for c in layer_checks(model, (x,)))


def test_default_artefact_gives_the_same_integers_with_and_without_vnni(zoo):
    """Each integer layer's accumulators on real inputs: AVX2's pair sums (emulated) equal the exact ones for the
    default file, and differ for the cpu='vnni' file, which onnxruntime then runs differently per CPU."""
    name, (q, model, x), (qv, vnni_model, xv) = zoo
    checks = layer_checks(model, (x,))
    assert checks and all(c.exact for c in checks), [c for c in checks if not c.exact]
    assert quantfx.verify(q, model, x).max_error_lsb == 0.0
    vnni_checks = layer_checks(vnni_model, (xv,))
    assert any(not c.exact for c in vnni_checks)
    # and onnxruntime on this CPU agrees with the fake-quant model exactly when its arithmetic is exact
    report = quantfx.verify(qv, vnni_model, xv)
    if int16_pairs.cpu_has_int32_dot():
        assert report.ok
    elif int16_pairs.cpu_has_int32_dot() is False:
        assert not report.ok and report.diagnosis.startswith("consistent with int16 pair saturation")


def test_diagnosis_reads_the_cpu(monkeypatch):
    q, model, x = _lowered("lenet", "vnni")
    monkeypatch.setattr(onnx_qdq, "cpu_has_int32_dot", lambda: False)
    text = onnx_qdq.diagnose(model, (x,))
    assert text.startswith("consistent with int16 pair saturation") and "conv1_Conv" in text and "cpu='any'" in text
    monkeypatch.setattr(onnx_qdq, "cpu_has_int32_dot", lambda: True)
    assert onnx_qdq.diagnose(model, (x,)).startswith("not the cause here")
    q, model, x = _lowered("lenet", "any")
    assert "not the cause" in onnx_qdq.diagnose(model, (x,))


def test_verify_reports_the_diagnosis_on_a_mismatch(monkeypatch):
    q, model, x = _lowered("lenet", "vnni")
    monkeypatch.setattr(onnx_qdq, "cpu_has_int32_dot", lambda: False)
    backend = BACKENDS["onnx"]  # a runtime that is one LSB off everywhere
    monkeypatch.setattr(backend, "run", lambda m, inputs: [o + 1.0 for o in onnx_qdq.run_onnx(m, inputs)])
    report = quantfx.verify(q, model, x)
    assert not report.ok and report.diagnosis.startswith("consistent with int16 pair saturation")
    assert "diagnosis: consistent with int16 pair saturation" in str(report)
    monkeypatch.undo()
    q, model, x = _lowered("lenet", "any")
    assert quantfx.verify(q, model, x).diagnosis is None  # ok: no diagnosis


def test_profile_refuses_8_bit_weights_for_any_cpu():
    with pytest.raises(QuantArgumentError, match=r"255 x 254 = 64770 in one int16 pair.*cpu='vnni'"):
        quantfx.quantize(LeNet().eval(), "onnx", weight_bit_width=8, progress=False)
    q = quantfx.quantize(LeNet().eval(), "onnx", cpu="vnni", progress=False)
    assert q.profile.weight_bit_width == 8 and q.profile.cpu == "vnni"
    assert quantfx.quantize(LeNet().eval(), "onnx", progress=False).profile.weight_bit_width == 7
    # 7-bit activations make full 8-bit weights safe too (the torch target's reduce_range)
    q = quantfx.quantize(LeNet().eval(), "onnx", weight_bit_width=8, act_bit_width=7, input_bit_width=7,
                         progress=False)
    assert q.profile.worst_pair() == (127, 127, 32258)
    with pytest.raises(QuantArgumentError, match="cpu='arm'; use one of"):
        quantfx.quantize(LeNet().eval(), "onnx", cpu="arm", progress=False)


def test_an_8_bit_override_is_refused_at_export_naming_the_layer():
    data = [torch.randn(4, 1, 28, 28) for _ in range(2)]
    q = quantfx.quantize(LeNet().eval(), "onnx", calibration_data=data, progress=False,
                         overrides={"fc1": dict(weight_bit_width=8)})
    with pytest.raises(TargetError, match=r"onnx: fc1 can sum 255 x \d+ = \d+ in one int16 pair.*"
                                          r"overrides=\{'fc1': dict\(weight_bit_width=7\)\}.*cpu='vnni'"):
        quantfx.lower(q, (data[0][:1],))
    q = quantfx.quantize(LeNet().eval(), "onnx", calibration_data=data, progress=False, cpu="vnni",
                         overrides={"fc1": dict(weight_bit_width=8)})
    assert any(not r.safe for r in pair_risks(quantfx.lower(q, (data[0][:1],))))


def test_the_rule_is_per_output_channel():
    """Two output channels, each with one large weight: at 8 bits each channel's top two sum to 127 + 1, safe
    (255 x 128 = 32640), though the two largest weights of the layer sum to 254. The rule looks per channel."""
    layer = torch.nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.full((2, 16), 0.01))  # integer 1 at 8 bits
        layer.weight[0, 3], layer.weight[1, 7] = 1.0, -1.0
    model = torch.nn.Sequential(layer, torch.nn.ReLU()).eval()
    data = [torch.rand(8, 16) for _ in range(2)]
    q = quantfx.quantize(model, "onnx", calibration_data=data, progress=False,
                         overrides={"0": dict(weight_bit_width=8)})
    art = quantfx.lower(q, (data[0][:1],))  # not refused
    (risk,) = pair_risks(art)
    assert (risk.in_code_max, risk.weight_top2, risk.safe) == (255, 128, True)
    assert quantfx.verify(q, art, data[1]).max_error_lsb == 0.0
    layer.weight.data[0, 4] = 1.0  # a second large weight in one channel: 255 x 254
    q = quantfx.quantize(model, "onnx", calibration_data=data, progress=False,
                         overrides={"0": dict(weight_bit_width=8)})
    with pytest.raises(TargetError, match=r"onnx: 0 can sum 255 x 254 = 64770"):
        quantfx.lower(q, (data[0][:1],))
