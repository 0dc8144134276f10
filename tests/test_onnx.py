"""onnx target (QDQ): export, checker, onnxruntime fidelity in LSBs, fusion into int8 kernels, rules."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import quantfx
from quantfx.graph import is_act_quant, is_compute
from quantfx.export import _intermediates
from quantfx.targets.onnx_qdq import ort_session, run_onnx_intermediates
from quantfx.zoo import TEST_MODELS, example_input

CALIB_BATCHES = 4


def quantized(name, target="onnx", **kwargs):
    ctor, _ = TEST_MODELS[name]
    torch.manual_seed(0)
    model = ctor().eval()
    data = [example_input(name, batch=4, seed=i) for i in range(CALIB_BATCHES)]
    return model, quantfx.quantize(model, target, calibration_data=data, progress=False, **kwargs)


@pytest.fixture(scope="module", params=sorted(TEST_MODELS))
def exported(request, tmp_path_factory):
    name = request.param
    model, q = quantized(name)
    path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
    artefact = quantfx.export(q, path, example_inputs=(example_input(name, batch=1),))
    return name, model, q, artefact, path


def test_checker_and_loads_in_onnxruntime(exported):
    name, _, _, artefact, path = exported
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [i.name for i in artefact.graph.input]
    assert artefact.ir_version <= 10


def test_onnxruntime_within_one_lsb(exported):
    name, _, q, artefact, _ = exported
    for seed in (123, 5):
        report = quantfx.verify(q, artefact, (example_input(name, batch=4, seed=seed),))
        assert report.ok and report.max_error_lsb <= 1.0 + 1e-3, str(report)


def test_every_quantizer_node_agrees_to_the_bit(exported):
    """The fake-quant model computes conv/linear accumulators exactly and requantizes them with onnxruntime's
    float32 multiplier, so every activation quantizer's output equals the integer kernels' (0 LSB), rounding
    ties included (before, unet's decoder carried a single tie flip to 2 LSB at the output)."""
    name, _, q, artefact, _ = exported
    x = example_input(name, batch=4, seed=123)
    expected = _intermediates(q, (x,))
    got = run_onnx_intermediates(artefact, (x,), list(expected))
    assert len(got) >= 4
    for node in q.graph.nodes:
        if node.name in got:
            lsb = float(node.meta["quant"].scale.reshape(-1).min())
            assert float(np.max(np.abs(expected[node.name] - got[node.name]))) / lsb < 1e-3, node.name


def test_node_occurrences(exported):
    """One QuantizeLinear per activation quantizer node (+ requantization after moves); one weight
    DequantizeLinear per quantized layer, one bias DequantizeLinear per quantized bias."""
    name, _, q, artefact, _ = exported
    ops = Counter(n.op_type for n in artefact.graph.node)
    act_nodes = sum(1 for n in q.graph.nodes if is_act_quant(q, n))
    layers = [q.get_submodule(n.target) for n in q.graph.nodes if is_compute(q, n)]
    biases = sum(1 for m in layers if m.bias is not None and m.bias_quant.is_quant_enabled)
    weight_dq = [n for n in artefact.graph.node if n.op_type == "DequantizeLinear" and n.output[0].endswith("weight")]
    bias_dq = [n for n in artefact.graph.node if n.op_type == "DequantizeLinear" and n.output[0].endswith("bias")]
    assert len(weight_dq) == len(layers)
    assert len(bias_dq) == biases
    requant = sum(1 for n in artefact.graph.node if n.op_type == "QuantizeLinear" and "_requant" in n.name)
    # a ConvTranspose with kernel == stride lowers to a 1x1 Conv, its output quantizer, and DepthToSpace
    shuffles = sum(1 for n in artefact.graph.node if n.op_type == "DepthToSpace")
    assert shuffles == {"unet": 2}.get(name, 0)
    # a strided conv over few channels requantizes its input for Pad -> SpaceToDepth (mobilenetv2's stem)
    blocks = sum(1 for n in artefact.graph.node if n.op_type == "SpaceToDepth")
    assert blocks == {"mobilenetv2": 1}.get(name, 0)
    assert ops["QuantizeLinear"] == act_nodes + requant + shuffles + blocks
    assert ops["ConvTranspose"] == 0
    weight_inits = {i.name: i for i in artefact.graph.initializer}
    for n in weight_dq:
        assert weight_inits[n.input[0]].data_type == onnx.TensorProto.INT8
    for n in bias_dq:
        assert weight_inits[n.input[0]].data_type == onnx.TensorProto.INT32


def _scale_of(model, value, producers, inits):
    """Walk back from ``value`` to the DequantizeLinear producing it; its scale initializer's value."""
    node = producers[value]
    while node.op_type != "DequantizeLinear":
        node = producers[node.input[0]]
    return onnx.numpy_helper.to_array(inits[node.input[1]])


def test_concat_and_add_inputs_have_identical_scales(exported):
    name, _, _, artefact, _ = exported
    producers = {o: n for n in artefact.graph.node for o in n.output}
    inits = {i.name: i for i in artefact.graph.initializer}
    checked = 0
    for n in artefact.graph.node:
        if n.op_type in ("Concat", "Add") and all(i in producers for i in n.input):
            scales = [_scale_of(artefact, i, producers, inits) for i in n.input]
            assert all(np.array_equal(scales[0], s) for s in scales[1:]), (n.name, scales)
            checked += 1
    expected = {"resnet": 1, "mobilenetv2": 1, "unet": 1, "densenet": 1, "inception": 1, "shufflenet": 1}
    assert checked >= expected.get(name, 0)


def test_onnxruntime_fuses_into_int8_kernels(exported, tmp_path):
    """After optimisation every Conv/Gemm runs as an integer kernel; no float Conv or Gemm remains."""
    name, _, _, artefact, _ = exported
    opt = tmp_path / "opt.onnx"
    ort_session(artefact, optimized_path=opt)
    ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    float_compute = ops["Conv"] + ops["FusedConv"] + ops["Gemm"] + ops["MatMul"] + ops["FusedGemm"] + \
        ops["ConvTranspose"]
    int_compute = ops["QLinearConv"] + ops["QGemm"] + ops["QLinearMatMul"] + ops["MatMulInteger"]
    assert float_compute == 0, dict(ops)
    assert int_compute > 0


@pytest.mark.parametrize("name", ["lenet", "resnet", "mobilenetv2", "inception", "shufflenet", "mlp"])
def test_no_float_requantization_left_after_fusion(name, tmp_path):
    """With no float layer in the model, onnxruntime's optimised graph keeps one QuantizeLinear (the input) and
    one DequantizeLinear (the output): residual adds of a ReLU output and a signed branch share a scale, so no
    requantization runs in float between the integer kernels."""
    _, q = quantized(name)
    artefact = quantfx.lower(q, (example_input(name, batch=1),))
    opt = tmp_path / "opt.onnx"
    ort_session(artefact, optimized_path=opt)
    ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert (ops["QuantizeLinear"], ops["DequantizeLinear"]) == (1, 1), dict(ops)


def test_deterministic_bytes():
    _, q1 = quantized("lenet")
    _, q2 = quantized("lenet")
    x = example_input("lenet", batch=1)
    assert quantfx.lower(q1, (x,)).SerializeToString() == quantfx.lower(q2, (x,)).SerializeToString()


def test_names_are_readable():
    _, q = quantized("resnet")
    artefact = quantfx.lower(q, (example_input("resnet", batch=1),))
    names = {n.name for n in artefact.graph.node}
    module_names = {n.target.replace(".", "_") for n in q.graph.nodes if is_compute(q, n)}
    for m in module_names:
        assert any(name.startswith(m) for name in names), m


def test_uncalibrated_export_names_the_quantizer():
    torch.manual_seed(0)
    model = TEST_MODELS["lenet"][0]().eval()
    q = quantfx.quantize(model, "onnx", example_inputs=(example_input("lenet", batch=1),))
    with pytest.raises(quantfx.CalibrationError, match=r"x_quant\.act_quant never saw data"):
        quantfx.lower(q, (example_input("lenet", batch=1),))


def test_sub_8_bit_uses_clip_between_q_and_dq():
    model, q = quantized("mlp", act_bit_width=4, weight_bit_width=4)
    artefact = quantfx.lower(q, (example_input("mlp", batch=1),))
    clips = [n for n in artefact.graph.node if n.op_type == "Clip" and n.name.endswith("_clip_Clip")]
    acts = sum(1 for n in q.graph.nodes if is_act_quant(q, n) and q.get_submodule(n.target).act_quant.bit_width < 8)
    assert len(clips) >= acts > 0
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in artefact.graph.initializer}
    for n in artefact.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0].endswith("weight"):
            w = inits[n.input[0]]
            assert w.min() >= -7 and w.max() <= 7  # 4-bit narrow range
    report = quantfx.verify(q, artefact, (example_input("mlp", batch=4, seed=5),))
    assert report.ok, str(report)


def test_target_rule_violation_names_node_and_fix():
    _, q = quantized("lenet")
    relu = next(n for n in q.graph.nodes if is_act_quant(q, n) and "relu" in n.target)
    q.get_submodule(relu.target).act_quant.rounding = "floor"
    with pytest.raises(quantfx.TargetError, match=rf"onnx: {relu.target} output quantizer rounds floor.*half_even"):
        quantfx.lower(q, (example_input("lenet", batch=1),))


def test_export_writes_file_and_verify_reads_path(tmp_path):
    _, q = quantized("mlp")
    path = tmp_path / "mlp.onnx"
    quantfx.export(q, path, example_inputs=(example_input("mlp", batch=1),))
    assert path.stat().st_size > 1000
    report = quantfx.verify(q, path, (example_input("mlp", batch=3, seed=9),))
    assert report.ok and report.outputs[0].lsb > 0


class _Upsamplers(torch.nn.Module):
    """A ConvTranspose with kernel == stride (pixel-shuffle form) and one with overlapping taps."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(4, 6, 3, stride=3)
        self.act = torch.nn.ReLU()
        self.overlap = torch.nn.ConvTranspose2d(6, 5, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        return self.overlap(self.act(self.up(x)))


def test_conv_transpose_with_kernel_equal_stride_runs_as_integer_conv(tmp_path):
    """up (k = s = 3) becomes Conv 1x1 -> Q/DQ -> DepthToSpace, which onnxruntime runs as QLinearConv on uint8;
    the overlapping one stays a ConvTranspose. Both agree with the fake-quant model to the bit."""
    torch.manual_seed(0)
    model = _Upsamplers().eval()
    q = quantfx.quantize(model, "onnx", calibration_data=[torch.randn(2, 4, 5, 5) for _ in range(3)],
                         progress=False)
    artefact = quantfx.lower(q, (torch.randn(1, 4, 5, 5),))
    onnx.checker.check_model(artefact, full_check=True)
    ops = Counter(n.op_type for n in artefact.graph.node)
    assert (ops["DepthToSpace"], ops["ConvTranspose"], ops["Conv"]) == (1, 1, 1)
    for seed in range(3):
        x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(seed))
        assert quantfx.verify(q, artefact, (x,)).max_error_lsb == 0.0
    opt = tmp_path / "opt.onnx"
    ort_session(artefact, optimized_path=opt)
    fused = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert fused["QLinearConv"] == 1 and fused["DepthToSpace"] == 1


class _Stem(torch.nn.Module):
    def __init__(self, k, s, p):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, k, stride=s, padding=p)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


@pytest.mark.parametrize("k, s, p, size, s2d", [(7, 2, 3, 32, True), (3, 2, 1, 30, True), (3, 2, 0, 31, True),
                                                (2, 2, 0, 33, False), (5, 3, 2, 33, False), (3, 1, 1, 16, False)])
def test_strided_stem_lowers_through_space_to_depth(k, s, p, size, s2d, tmp_path):
    """A strided conv over 3 channels becomes Pad -> SpaceToDepth -> a stride-1 conv over 3*s*s channels on
    the quantized input (onnxruntime's im2col of 3-channel NHWC input is slow); the integers are the same.
    Where the padded input would have to be cropped (k = s = 2 over 33 rows), 3 x s x s > 16 channels would
    result, or the stride is 1, the conv stays as it is."""
    torch.manual_seed(0)
    model = _Stem(k, s, p).eval()
    q = quantfx.quantize(model, "onnx", calibration_data=[torch.randn(2, 3, size, size) for _ in range(3)],
                         progress=False)
    artefact = quantfx.lower(q, (torch.randn(1, 3, size, size),))
    onnx.checker.check_model(artefact, full_check=True)
    ops = Counter(n.op_type for n in artefact.graph.node)
    assert ops["SpaceToDepth"] == int(s2d)
    for seed in range(3):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
        assert quantfx.verify(q, artefact, (x,)).max_error_lsb == 0.0
    opt = tmp_path / "opt.onnx"
    ort_session(artefact, optimized_path=opt)
    fused = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert fused["QLinearConv"] == 2 and (fused["QuantizeLinear"], fused["DequantizeLinear"]) == (1, 1)


@pytest.mark.parametrize("step, model, shape, op, counts", [
    ("SpaceToDepthStem", lambda: _Stem(7, 2, 3), (3, 32, 32), "SpaceToDepth", {"Conv": 2, "SpaceToDepth": 0}),
    ("PixelShuffleTaps", _Upsamplers, (4, 5, 5), "DepthToSpace", {"ConvTranspose": 2, "DepthToSpace": 0})])
def test_a_form_step_left_out_changes_the_ops_not_the_numbers(step, model, shape, op, counts, monkeypatch):
    """The onnx backend's list of steps composes its file: without one of its form steps the layer is written
    plainly (no SpaceToDepth / DepthToSpace), and the file still agrees with the fake-quant model to the bit."""
    from quantfx.targets.onnx_qdq import QDQLowering
    torch.manual_seed(0)
    q = quantfx.quantize(model().eval(), "onnx", calibration_data=[torch.randn(2, *shape) for _ in range(3)],
                         progress=False)
    full = Counter(n.op_type for n in quantfx.lower(q, (torch.randn(1, *shape),)).graph.node)
    assert full[op] == 1
    monkeypatch.setattr(QDQLowering, "steps", tuple(s for s in QDQLowering.steps if type(s).__name__ != step))
    plain = quantfx.lower(q, (torch.randn(1, *shape),))
    assert {k: Counter(n.op_type for n in plain.graph.node)[k] for k in counts} == counts
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    assert quantfx.verify(q, plain, (x,)).max_error_lsb == 0.0
