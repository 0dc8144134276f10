"""finn target (QONNX): export, checker, qonnx cleanup + execution within 1 LSB, node occurrences, equal
Concat/Add input scales, QCDQ conversion run by onnxruntime, one TargetError per FINN rule."""
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import quantfx
from quantfx.graph import is_act_quant, is_compute, is_trunc_pool
from quantfx.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Quantizer, Uint8ActPerTensorFloatAsym
from quantfx.zoo import TEST_MODELS, example_input

pytest.importorskip("qonnx", reason="the finn extra (qonnx) is not installed")
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.util.cleanup import cleanup_model  # noqa: E402

from quantfx.targets.finn_qonnx import DOMAIN, run_qonnx, to_qcdq  # noqa: E402
from quantfx.targets.onnx_qdq import node_values, ort_session, run_onnx  # noqa: E402

# Measured max error (LSB) of qonnx's execute_onnx against the fake-quant model: 0 on every model below, on
# 13 inputs each (batch 4, seeds 0..11 and 123; tools/verify_zoo.py). QCDQ through onnxruntime: 0 unfused, at
# most 1 LSB with fused int8 kernels.


# -- small models built here ------------------------------------------------------------------------------


def small_cnn():
    """LeNet-like: conv-relu x2, AvgPool2d(2), 1x1 conv, AdaptiveAvgPool2d(1), linear (two Trunc pools)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.relu0 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv1, self.relu1 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.relu0(self.stem(x))
        y = self.conv2(self.relu1(self.conv1(x)))
        return self.head(self.relu2(x + y))


class CatBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.ra = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.b, self.rb = nn.Conv2d(3, 6, 1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        return self.head(self.pool(torch.cat([self.ra(self.a(x)), self.rb(self.b(x))], 1)))


def _seeded(cls):
    def build():
        torch.manual_seed(0)
        return cls().eval()
    return build


SMALL = {"small_cnn": small_cnn, "residual": _seeded(Residual), "cat": _seeded(CatBlock)}
ALL = sorted(TEST_MODELS) + sorted(SMALL)


def model_input(name, batch, seed):
    if name in SMALL:
        return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return example_input(name, batch=batch, seed=seed)


def quantized(name, target="finn", **kwargs):
    torch.manual_seed(0)
    model = SMALL[name]() if name in SMALL else TEST_MODELS[name][0]().eval()
    data = [model_input(name, 4, i) for i in range(4)]
    return quantfx.quantize(model, target, calibration_data=data, progress=False, **kwargs)


def output_lsb(q) -> float:
    out = next(n for n in q.graph.nodes if n.op == "output").args[0]
    return float(out.meta["quant"].scale.reshape(-1).min())


@pytest.fixture(scope="module", params=ALL)
def exported(request, tmp_path_factory):
    name = request.param
    q = quantized(name)
    path = tmp_path_factory.mktemp("finn") / f"{name}.onnx"
    artefact = quantfx.export(q, path, example_inputs=(model_input(name, 1, 0),))
    return name, q, artefact, path


# -- fidelity ---------------------------------------------------------------------------------------------


def test_checker_and_qonnx_execution_to_the_bit(exported):
    """Integer layers run as float32 convolutions of integers, which are exact, so qonnx computes what the
    fake-quant model computes: 0 LSB (before, qonnx convolved the dequantized floats and UNet's decoder spread a
    float32 rounding tie to 2 LSB)."""
    name, q, artefact, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10 and {o.domain: o.version for o in model.opset_import} == {"": 13, DOMAIN: 1}
    for batch, seed in ((2, 50), (4, 123)):
        report = quantfx.verify(q, path, (model_input(name, batch, seed),))
        assert report.max_error_lsb == 0.0, str(report)


@pytest.mark.parametrize("name", ["unet", "resnet", "densenet"])
def test_every_activation_agrees_to_the_bit(name):
    """Every value qonnx computes for an fx node (activations, accumulators, pools, concatenations) equals the
    fake-quant model's, including those held only as integers in the file."""
    from quantfx.export import _intermediates, backend_for
    q = quantized(name)
    artefact = quantfx.lower(q, (model_input(name, 1, 0),))
    held_as_ints = sum(isinstance(v, dict) for v in node_values(artefact).values())
    assert held_as_ints >= 1
    x = model_input(name, 4, 123)
    expected = _intermediates(q, (x,))
    got = backend_for(q).run_with_intermediates(artefact, (x,), list(expected))
    assert len(got) >= 8
    for node in q.graph.nodes:
        if node.name in got:
            assert np.array_equal(expected[node.name], got[node.name]), node.name


def test_qcdq_conversion_agrees_in_onnxruntime(exported):
    """Every model converts (32-bit bias Quants folded to floats, Trunc as standard ops); onnxruntime runs it
    unfused exactly like qonnx, and with its fused int8 kernels within 1 LSB."""
    name, q, artefact, _ = exported
    qcdq = to_qcdq(artefact)
    onnx.checker.check_model(qcdq, full_check=True)
    ops = Counter(n.op_type for n in qcdq.graph.node)
    assert not any(n.domain == DOMAIN for n in qcdq.graph.node)
    acts = sum(1 for n in q.graph.nodes if is_act_quant(q, n))
    assert ops["QuantizeLinear"] == acts + sum(1 for n in q.graph.nodes if is_compute(q, n))
    assert ops["Floor"] == sum(1 for n in q.graph.nodes if is_trunc_pool(q, n))
    x = model_input(name, 1, 7)
    want = run_qonnx(artefact, (x,))[0]
    unfused = ort_session(qcdq, optimize=False).run(None, {qcdq.graph.input[0].name: x.numpy()})[0]
    fused = run_onnx(qcdq, (x,))[0]
    lsb = output_lsb(q)
    assert np.max(np.abs(unfused - want)) / lsb <= 1.0 + 1e-3
    assert np.max(np.abs(fused - want)) / lsb <= 1.0 + 1e-3


# -- structure --------------------------------------------------------------------------------------------


def test_node_occurrences_survive_cleanup(exported):
    name, q, artefact, path = exported
    ops = Counter(n.op_type for n in artefact.graph.node if n.domain == DOMAIN)
    acts = sum(1 for n in q.graph.nodes if is_act_quant(q, n))
    layers = [q.get_submodule(n.target) for n in q.graph.nodes if is_compute(q, n)]
    biases = sum(1 for m in layers if m.bias is not None and m.bias_quant.is_quant_enabled)
    assert ops["Quant"] == acts + len(layers) + biases
    assert ops["Trunc"] == sum(1 for n in q.graph.nodes if is_trunc_pool(q, n))
    assert ops["BipolarQuant"] == 0
    assert all(n.domain in ("", DOMAIN) for n in artefact.graph.node)
    cleaned = cleanup_model(ModelWrapper(str(path)))
    assert Counter(n.op_type for n in cleaned.graph.node if n.domain == DOMAIN) == ops
    if name == "small_cnn":
        assert ops == {"Quant": 7 + 4 + 4, "Trunc": 2}  # 7: input, 3 ReLUs, 2 requantized pools, output
    elif name == "residual":
        assert ops == {"Quant": 7 + 4 + 4}  # input, 3 ReLUs, head output, relu0 and conv2 requantized for the add


# ops through which a value keeps its producer's quantization grid
_SAME_GRID = {"Reshape", "Flatten", "Transpose", "MaxPool", "Slice", "Split", "Squeeze", "Unsqueeze", "Identity",
              "Concat", "DepthToSpace", "Pad"}


def _grid_of(value, producers, inits):
    """(scale, bit width, signed) of the grid ``value`` lies on, walking back through ops that only move values
    to the Quant that made it. Activations are integer Quants (scale 1) after ``Div(scale)`` (and the Relu/Clip
    of the activation); a ``Mul`` on the way turns the integers back into values and must use that scale."""
    def arr(name):
        return numpy_helper.to_array(inits[name])
    node, mul_scale = producers[value], None
    while node.op_type != "Quant":
        if node.op_type == "Mul" and mul_scale is None:
            mul_scale = arr(node.input[1])
        else:
            assert node.op_type in _SAME_GRID, f"{value} comes from {node.op_type} {node.name}, not from a Quant"
        node = producers[node.input[0]]
    scale = arr(node.input[1])
    assert scale.size == 1 and float(scale) == 1.0, f"{node.name}: activation Quant with scale {scale}"
    pre = producers[node.input[0]]
    while pre.op_type in ("Relu", "Clip"):
        pre = producers[pre.input[0]]
    assert pre.op_type == "Div", f"{node.name}: integer Quant after {pre.op_type}, not after Div(scale)"
    scale = arr(pre.input[1])
    assert mul_scale is None or np.array_equal(mul_scale, scale), (value, mul_scale, scale)
    signed = next(a.i for a in node.attribute if a.name == "signed")
    return scale, float(arr(node.input[3])), signed


def test_concat_and_add_inputs_share_scales(exported):
    name, _, artefact, _ = exported
    producers = {o: n for n in artefact.graph.node for o in n.output}
    inits = {i.name: i for i in artefact.graph.initializer}
    checked = 0
    for n in artefact.graph.node:
        if n.op_type in ("Concat", "Add") and not any(i in inits for i in n.input):
            grids = [_grid_of(i, producers, inits) for i in n.input]
            for scale, bits, signed in grids[1:]:
                assert np.array_equal(scale, grids[0][0]) and (bits, signed) == grids[0][1:], \
                    f"{n.name}: {grids}"
            checked += 1
    assert checked == {"resnet": 3, "mobilenetv2": 4, "unet": 2, "densenet": 4, "inception": 1,
                       "shufflenet": 1, "residual": 1, "cat": 1}.get(name, 0)


# -- what FINN's frontend (ConvertQONNXtoFINN, Streamline) needs; FINN itself is not on PyPI -----------------


def test_forms_finns_frontend_takes(exported):
    """The patterns FINN's frontend converts, read off its source: an unsigned activation Quant right after a
    Relu (its Relu handler; any other predecessor goes to the identity handler, which takes signed Quants
    only); zero points 0; bias Quants with 1-d scale and zero point (ExtractBiasFromConv reshapes them onto
    the channel axis and fails on 0-d ones); convolutions with explicit kernel_shape/strides/group/pads
    (LowerConvsToMatMul reads them); per-channel scales of integer layers as [1, C, 1, 1] Muls; every integer
    tensor annotated with its FINN datatype (the Trunc of a pool after a channel shuffle is typed from it)."""
    name, _, artefact, _ = exported
    inits = {i.name: numpy_helper.to_array(i) for i in artefact.graph.initializer}
    producers = {o: n for n in artefact.graph.node for o in n.output}
    annotated = {a.tensor_name: a.quant_parameter_tensor_names[0].value
                 for a in artefact.graph.quantization_annotation}
    acts = 0
    for n in artefact.graph.node:
        if n.op_type == "Quant" and n.input[0] not in inits:
            acts += 1
            signed = next(a.i for a in n.attribute if a.name == "signed")
            bits = int(inits[n.input[3]])
            if not signed:
                assert producers[n.input[0]].op_type == "Relu", f"{n.name}: unsigned after " \
                    f"{producers[n.input[0]].op_type}"
            assert annotated[n.output[0]] == f"{'INT' if signed else 'UINT'}{bits}"
        if n.op_type == "Quant":
            assert not inits[n.input[2]].any()
        if n.op_type in ("Conv", "ConvTranspose"):
            attrs = {a.name for a in n.attribute}
            assert {"kernel_shape", "strides", "group"} <= attrs and ("pads" in attrs or "auto_pad" in attrs)
            if len(n.input) > 2:
                bias_quant = producers[n.input[2]]
                assert inits[bias_quant.input[1]].ndim == 1 and inits[bias_quant.input[2]].ndim == 1
        if n.op_type == "Mul" and n.input[0].endswith("_acc"):
            scale = inits[n.input[1]]
            assert scale.ndim == 0 or (scale.shape[1] == scale.size and scale.ndim in (2, 4)), (n.name, scale.shape)
    assert acts >= 3
    for tensor, dtype in annotated.items():  # integer tensors only, of an activation's type
        assert tensor in producers and dtype[:3] in ("INT", "UIN", "BIP"), tensor


def test_relu6_clip_kept_only_where_it_clips():
    """ReLU6 whose quantizer tops out at 6 (calibrated): the clip is the quantizer's own, the file says
    Relu -> Quant. A fixed scale reaching past 6 keeps the Clip (FINN cannot take it; qonnx agrees either way)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Conv2d(4, 4, 1)).eval()
    data = [4 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    x = 4 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    for overrides, clips in (({}, 0), ({nn.ReLU6: {"fixed_scale": 0.05}}, 1)):
        q = quantfx.quantize(model, "finn", calibration_data=data, progress=False, overrides=overrides)
        artefact = quantfx.lower(q, (x[:1],))
        ops = Counter(n.op_type for n in artefact.graph.node)
        assert (ops["Clip"], ops["Relu"]) == (clips, 1 - clips)
        assert quantfx.verify(q, artefact, (x,)).max_error_lsb == 0.0


def test_hardtanh_clip_dropped_before_a_sign_quantizer():
    """HardTanh(-1, 1) before a 1-bit sign quantizer: the clip changes no integer, so the file has none (FINN's
    streamlining cannot absorb the bias add before a Clip); integer layers read the BipolarQuant's +-1."""
    bits = 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardtanh(), nn.Conv2d(8, 8, 3), nn.Hardtanh(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    data = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    q = quantfx.quantize(model, "finn", calibration_data=data, progress=False,
                         overrides={nn.Hardtanh: {"act_bit_width": bits}})
    artefact = quantfx.lower(q, (x[:1],))
    ops = Counter(n.op_type for n in artefact.graph.node)
    assert ops["Clip"] == 0 and ops["BipolarQuant"] == 2
    assert all(n.input[0].endswith("_int") for n in artefact.graph.node if n.op_type in ("Conv", "Gemm"))
    assert quantfx.verify(q, artefact, (x,)).max_error_lsb == 0.0


def test_sigmoid_output_quantized_after_a_relu():
    """A sigmoid's unsigned quantizer follows a Relu in the file (a no-op on sigmoid outputs): FINN's frontend
    takes an unsigned Quant only right after a Relu. Every unsigned Quant of the file is after a Relu."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 4, 1)).eval()
    data = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    q = quantfx.quantize(model, "finn", calibration_data=data, progress=False)
    artefact = quantfx.lower(q, (x[:1],))
    producers = {o: n for n in artefact.graph.node for o in n.output}
    unsigned = [n for n in artefact.graph.node if n.op_type == "Quant"
                and not next(a.i for a in n.attribute if a.name == "signed")]
    assert len(unsigned) == 1 and producers[unsigned[0].input[0]].op_type == "Relu"
    assert [n.op_type for n in artefact.graph.node if n.op_type in ("Sigmoid", "Div", "Relu")] == \
        ["Div", "Sigmoid", "Div", "Relu", "Div"]
    assert quantfx.verify(q, artefact, (x,)).max_error_lsb == 0.0


# -- widths, pools, per-channel weights -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [(4, 4), (2, 3), (1, 4)])
def test_low_bit_widths(bits):
    w, a = bits
    q = quantized("small_cnn", weight_bit_width=w, act_bit_width=a)
    x = model_input("small_cnn", 2, 99)
    artefact = quantfx.lower(q, (x[:1],))
    ops = Counter(n.op_type for n in artefact.graph.node)
    assert ops["Trunc"] == 2
    assert ops["BipolarQuant"] == (4 if w == 1 else 0)  # one per weight tensor
    assert ops["Quant"] == 7 + 4 + (0 if w == 1 else 4)  # activations + biases (+ weights)
    inits = {i.name: numpy_helper.to_array(i) for i in artefact.graph.initializer}
    act_bits = {n.output[0]: float(inits[n.input[3]]) for n in artefact.graph.node
                if n.op_type == "Quant" and "weight" not in n.name and "bias" not in n.name}
    assert act_bits.pop("input_1_quant_int") == 8.0 and set(act_bits.values()) == {float(a)}  # input_bit_width 8
    report = quantfx.verify(q, artefact, (x,))
    assert report.max_error_lsb <= 1.0 + 1e-3, str(report)
    qcdq = to_qcdq(artefact)
    got, want = run_onnx(qcdq, (x[:1],))[0], run_qonnx(artefact, (x[:1],))[0]
    assert np.max(np.abs(got - want)) / output_lsb(q) <= 1.0 + 1e-3


@pytest.mark.parametrize("pool", [nn.AvgPool2d(3, 1, 1), nn.AvgPool2d(3, 2), nn.AvgPool2d(2, 1),
                                  nn.AdaptiveAvgPool2d(2)], ids=["k3_pad1", "k3_s2", "k2_s1", "adaptive2"])
def test_trunc_pools_are_exact(pool):
    """K = 9 (not a power of two), padding (counted in the sum, like torch), overlapping windows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(4, 4, 1)).eval()
    q = quantfx.quantize(model, "finn", progress=False,
                         calibration_data=[torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i))
                                           for i in range(2)])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    artefact = quantfx.lower(q, (x[:1],))
    assert Counter(n.op_type for n in artefact.graph.node)["Trunc"] == 1
    report = quantfx.verify(q, artefact, (x,))
    assert report.max_error_lsb == 0.0, str(report)


@pytest.mark.parametrize("bias_scaling", [None, "float"], ids=["integer_layers", "float_bias"])
def test_per_channel_weights_broadcast_on_the_output_channel_axis(bias_scaling):
    """Integer layers take integer weights (Quant scale 1) and put the per-channel scale in the Mul after them,
    shaped [1, C, 1, 1]; layers with a float bias keep float weights whose Quant scale broadcasts on the
    output-channel axis of the weight (axis 1 for the transposed conv)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(6, 5, 2, 2), nn.ReLU(),
                          nn.Conv2d(5, 4, 1)).eval()
    q = quantfx.quantize(model, "finn", progress=False, bias_scaling=bias_scaling, overrides={
        nn.Conv2d: {"weight_quant": Int8WeightPerChannelFloat},
        nn.ConvTranspose2d: {"weight_quant": Int8WeightPerChannelFloat}},
        calibration_data=[torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    artefact = quantfx.lower(q, (x[:1],))
    inits = {i.name: numpy_helper.to_array(i) for i in artefact.graph.initializer}
    shapes = {n.name: inits[n.input[1]].shape for n in artefact.graph.node if "weight" in n.name}
    qcdq = to_qcdq(artefact)
    axes = sorted(a.i for n in qcdq.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
    if bias_scaling is None:
        assert shapes == {"0_weight_Quant": (), "2_weight_Quant": (), "4_weight_Quant": ()}
        muls = {n.name: inits[n.input[1]].shape for n in artefact.graph.node
                if n.op_type == "Mul" and n.input[0].endswith("_acc")}
        assert muls == {"_0_Mul": (1, 6, 1, 1), "_2_Mul": (1, 5, 1, 1), "_4_Mul": (1, 4, 1, 1)}
        assert axes == []
    else:
        assert shapes == {"0_weight_Quant": (6, 1, 1, 1), "2_weight_Quant": (1, 5, 1, 1),
                          "4_weight_Quant": (4, 1, 1, 1)}
        assert axes == [0, 0, 1]  # the conv weights on axis 0, the transposed conv's on axis 1
    assert quantfx.verify(q, artefact, (x,)).max_error_lsb == 0.0
    got, want = run_onnx(qcdq, (x[:1],))[0], run_qonnx(artefact, (x[:1],))[0]
    assert np.max(np.abs(got - want)) / output_lsb(q) <= 1.0 + 1e-3


def test_float_bias_is_allowed():
    q = quantized("small_cnn", bias_scaling="float")
    layers = [q.get_submodule(n.target) for n in q.graph.nodes if is_compute(q, n)]
    assert sum(m.bias_quant.is_quant_enabled for m in layers) == 0
    x = model_input("small_cnn", 2, 1)
    artefact = quantfx.lower(q, (x[:1],))
    # 5 activations (no requantizer after the pools: a float bias needs no input scale) + 4 weights
    assert Counter(n.op_type for n in artefact.graph.node)["Quant"] == 5 + 4
    report = quantfx.verify(q, artefact, (x,))
    assert report.max_error_lsb <= 1.0 + 1e-3, str(report)


def test_unsigned_half_up_rounding_is_exact():
    """quantfx's half_up is floor(x + 0.5); qonnx's HALF_UP rounds ties away from zero: equal on unsigned grids."""
    q = quantized("small_cnn")
    relus = [n for n in q.graph.nodes if is_act_quant(q, n) and type(q.get_submodule(n.target)).__name__ == "QuantReLU"]
    for n in relus:
        q.get_submodule(n.target).act_quant.rounding = "half_up"
    x = model_input("small_cnn", 2, 4)
    artefact = quantfx.lower(q, (x[:1],))
    modes = Counter(a.s for n in artefact.graph.node if n.op_type == "Quant" for a in n.attribute
                    if a.name == "rounding_mode")
    assert modes[b"HALF_UP"] == len(relus) == 3
    assert quantfx.verify(q, artefact, (x,)).max_error_lsb == 0.0
    with pytest.raises(quantfx.ExportError, match="rounds HALF_UP; QuantToQCDQ would round it half to even"):
        to_qcdq(artefact)


# -- rules ------------------------------------------------------------------------------------------------


def _first(q, kind):
    return next(n for n in q.graph.nodes if is_act_quant(q, n) and type(q.get_submodule(n.target)).__name__ == kind)


def _lower(q):
    return quantfx.lower(q, (model_input("small_cnn", 1, 0),))


def test_rule_relu_must_be_unsigned():
    q = quantized("small_cnn")
    relu = _first(q, "QuantReLU")
    m = q.get_submodule(relu.target)
    m.act_quant = Quantizer(Int8ActPerTensorFloat)
    m.act_quant.stat, m.act_quant.calibrated = torch.tensor([-1.0, 1.0]), torch.tensor(True)
    with pytest.raises(quantfx.TargetError, match=rf"^finn: {relu.target} output quantizer is signed; FINN needs "
                                                  r"unsigned activations after ReLU \(use Uint8ActPerTensorFloat"):
        _lower(q)


def test_rule_zero_point_zero():
    q = quantized("small_cnn")
    relu = _first(q, "QuantReLU")
    q.get_submodule(relu.target).act_quant = Quantizer(Uint8ActPerTensorFloatAsym)
    with pytest.raises(quantfx.TargetError, match=rf"^finn: {relu.target} output quantizer has a zero point "
                                                  r"\(asymmetric\); FINN needs zero point 0"):
        _lower(q)


def test_rule_identity_signed():
    q = quantized("small_cnn")
    ident = _first(q, "QuantIdentity")
    q.get_submodule(ident.target).act_quant.signed = False
    with pytest.raises(quantfx.TargetError, match=rf"^finn: {ident.target} output quantizer is unsigned; FINN "
                                                  "needs signed identity activations"):
        _lower(q)


def test_rule_relu_not_narrow():
    q = quantized("small_cnn")
    relu = _first(q, "QuantReLU")
    q.get_submodule(relu.target).act_quant.narrow_range = True
    with pytest.raises(quantfx.TargetError, match=rf"^finn: {relu.target} output quantizer is narrow-range"):
        _lower(q)


def test_rule_activation_bits_at_most_8():
    q = quantized("small_cnn")
    relu = _first(q, "QuantReLU")
    q.get_submodule(relu.target).act_quant.bit_width = 10
    with pytest.raises(quantfx.TargetError, match=rf"^finn: {relu.target} output quantizer is 10-bit; FINN takes "
                                                  "at most 8 bits here"):
        _lower(q)


def test_rule_weight_bits_at_most_8():
    q = quantized("small_cnn")
    conv = next(n for n in q.graph.nodes if is_compute(q, n))
    q.get_submodule(conv.target).weight_quant.bit_width = 9
    with pytest.raises(quantfx.TargetError, match=rf"^finn: {conv.target} weight quantizer is 9-bit; FINN takes "
                                                  "at most 8 bits"):
        _lower(q)


def test_rule_weight_quantizer_feeds_one_node():
    q = quantized("small_cnn")
    convs = [n for n in q.graph.nodes if is_compute(q, n)]
    q.get_submodule(convs[1].target).weight_quant = q.get_submodule(convs[0].target).weight_quant
    with pytest.raises(quantfx.TargetError, match=rf"^finn: one weight quantizer feeds {convs[0].target}, "
                                                  rf"{convs[1].target}; FINN needs a weight quantizer per layer"):
        _lower(q)


def test_rule_signed_half_up_rounding():
    q = quantized("small_cnn")
    ident = _first(q, "QuantIdentity")
    q.get_submodule(ident.target).act_quant.rounding = "half_up"
    with pytest.raises(quantfx.TargetError, match=rf"^finn: {ident.target} output quantizer is signed and rounds "
                                                  "'half_up'"):
        _lower(q)


def test_uncalibrated_export_is_an_error_naming_the_quantizer(tmp_path):
    q = quantfx.quantize(small_cnn(), "finn", example_inputs=(model_input("small_cnn", 1, 0),))
    with pytest.raises(quantfx.CalibrationError, match=r"quantizer input_1_quant\.act_quant never saw data"):
        quantfx.export(q, tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()


# -- files and runtime ------------------------------------------------------------------------------------


def test_deterministic_bytes(tmp_path):
    x = model_input("small_cnn", 1, 0)
    quantfx.export(quantized("small_cnn"), tmp_path / "a.onnx", (x,))
    quantfx.export(quantized("small_cnn"), tmp_path / "b.onnx", (x,))
    a, b = (tmp_path / "a.onnx").read_bytes(), (tmp_path / "b.onnx").read_bytes()
    assert len(a) > 1000 and a == b


def test_verify_names_the_first_node_off():
    q = quantized("small_cnn")
    x = model_input("small_cnn", 1, 2)
    artefact = quantfx.lower(q, (x,))
    relu = _first(q, "QuantReLU")
    quant = next(n for n in artefact.graph.node if n.op_type == "Quant" and n.output[0] == relu.name + "_int")
    bits = next(i for i in artefact.graph.initializer if i.name == quant.input[3])
    bits.CopyFrom(numpy_helper.from_array(np.float32(2), bits.name))  # the first ReLU now clips at 3 LSB
    report = quantfx.verify(q, artefact, (x,))
    assert not report.ok and report.max_error_lsb > 1.0
    assert report.worst_node == relu.name and report.worst_node_error_lsb > 1.0


def test_missing_qonnx_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "qonnx.core.onnx_exec", None)  # makes the import fail
    q = quantized("mlp")
    artefact = quantfx.lower(q, (model_input("mlp", 1, 0),))
    with pytest.raises(quantfx.QuantFXError, match=r"pip install 'quantfx\[finn\]'"):
        run_qonnx(artefact, (model_input("mlp", 1, 0),))


def test_rule_add_inputs_need_identical_datatypes():
    """A profile that shares only the scale across a residual add (add_grid='scale', the onnx default) leaves a
    UINT8 ReLU output and an INT8 branch on one Add; FINN's AddStreams would skip it."""
    from quantfx.targets import FINN
    q = quantized("residual", target=FINN.replace(add_grid="scale"))
    add = next(n for n in q.graph.nodes if n.op == "call_function" and "add" in n.name)
    with pytest.raises(quantfx.TargetError, match=rf"^finn: {add.name} adds INT8, UINT8 inputs; FINN's AddStreams "
                                                  r"needs identical input datatypes \(quantize with the finn "
                                                  "profile's add_grid='quantizer'"):
        quantfx.lower(q, (model_input("residual", 1, 0),))
    assert quantfx.lower(quantized("residual"), (model_input("residual", 1, 0),)) is not None
