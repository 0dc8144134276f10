"""Modern blocks (issue 16) on every target: an MBConv block with a squeeze-excitation gate and SiLU, a
ConvNeXt-like block (depthwise 7x7, LayerNorm over channels through permute, Linear-GELU-Linear, residual), a
ViT-like encoder block (patch embedding, class token cat, positional-embedding add, LayerNorm, attention spelled
with @ and softmax, or F.scaled_dot_product_attention, GELU MLP), each quantized at 8 bits (calibrated on random
data), lowered and run in the target's runtime.

onnx, torch, dpu: every quantized tensor (each activation quantizer's output) of the artefact equals the
fake-quant model's to the bit, and every float island's value agrees within float32 tolerance. finn: a
TargetError naming the node and the rule, before anything is written. Products of two tensors (the SE gate,
attention's matmuls) run on the accumulator grid (QuantProduct). SQNR against the float model, measured on this
machine (dB, 8 bits, batch of 4 random images, seed 0):

| block | onnx | torch | dpu | finn |
|---|---|---|---|---|
| MBConv + SE + SiLU | 44.6 | 40.2 | 27.0 | TargetError (SiLU float island) |
| ConvNeXt-like | 37.7 | 34.0 | 32.9 | TargetError (LayerNorm float island) |
| ViT-like, matmul + softmax | 32.9 | 28.3 | 32.6 | TargetError (LayerNorm float island) |
| ViT-like, SDPA | 32.6 | 28.0 | 31.0 | TargetError (LayerNorm float island) |

The bounds below are those figures less 3 dB (torch measured at W8A7 on fbgemm, before its W7A8 default; dpu power-of-two scales).
"""
import copy
import operator
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import quantfx
from quantfx.graph import is_act_quant, is_add, is_product, qmeta
from quantfx.lowering import BACKENDS
from quantfx.tables import float_islands
from quantfx.targets import dpu
from quantfx.targets.onnx_base import file_float_islands, node_values

from modern_models import Activations, ConvNeXtBlock, MBConv, ViTBlock, calibration

MODELS = {
    "mbconv": MBConv,
    "convnext": ConvNeXtBlock,
    "vit_matmul": lambda: ViTBlock(attention="matmul"),
    "vit_sdpa": lambda: ViTBlock(attention="sdpa"),
}
# measured SQNR (dB) less 3 dB: see the module docstring
SQNR_BOUND = {
    ("mbconv", "onnx"): 41.6, ("mbconv", "torch"): 37.2, ("mbconv", "dpu"): 24.0,
    ("convnext", "onnx"): 34.7, ("convnext", "torch"): 31.0, ("convnext", "dpu"): 29.9,
    ("vit_matmul", "onnx"): 29.9, ("vit_matmul", "torch"): 25.3, ("vit_matmul", "dpu"): 29.6,
    ("vit_sdpa", "onnx"): 29.6, ("vit_sdpa", "torch"): 25.0, ("vit_sdpa", "dpu"): 28.0,
}
# what finn refuses first in each model: (node, op)
FINN_REFUSAL = {"mbconv": ("stem_2", "SiLU"), "convnext": ("norm", "LayerNorm"), "vit_matmul": ("norm1", "LayerNorm"),
                "vit_sdpa": ("norm1", "LayerNorm")}


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():  # TorchScript and qonnx warn about shapes and deprecated APIs
        warnings.simplefilter("ignore")
        yield


def _quantize(name, target, **kwargs):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    data = calibration()
    return model, quantfx.quantize(model, target, calibration_data=data, progress=False, **kwargs), data


def _all_values(q, x) -> dict:
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if torch.is_tensor(out):
                values[n.name] = out.detach().numpy()
            return out

    with torch.no_grad():
        Recorder(q).run(x)
    return values


def assert_bit_exact(q, artefact, x):
    """Every activation quantizer's output of ``artefact`` at 0 LSB from the fake-quant model's; every float
    island within float32 tolerance. Returns (quantized tensors checked, float islands checked)."""
    backend = BACKENDS[q.profile.name]
    quantized = [n for n in q.graph.nodes if is_act_quant(q, n) and qmeta(n).scale is not None]
    islands = [r["node"] for r in float_islands(q)]
    expected = _all_values(q, x)
    got = backend.run_with_intermediates(artefact, (x,), [n.name for n in quantized] + islands)
    for n in quantized:
        assert n.name in got, f"{n.name}: not in the artefact"
        lsb = float(qmeta(n).scale.reshape(-1).min())
        off = np.abs(got[n.name] - expected[n.name]) / lsb
        assert off.max() == 0, f"{n.name}: {int((off > 0).sum())} of {off.size} values off, up to {off.max()} LSB"
    seen = [i for i in islands if i in got]
    for name in seen:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5 * np.abs(expected[name]).max(),
                                   err_msg=f"float island {name}")
    return len(quantized), len(seen)


@pytest.mark.parametrize("target", ["onnx", "torch", "dpu"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_block_verifies_bit_exact_with_its_sqnr(name, target):
    model, q, data = _quantize(name, target)
    x = data[1]
    artefact = quantfx.lower(q, (data[0][:1],))
    report = quantfx.verify(q, artefact, x)
    assert report.ok and report.max_error_lsb == 0.0, str(report)
    n_quant, n_islands = assert_bit_exact(q, artefact, x)
    assert n_quant >= 10 and n_islands >= 1
    with torch.no_grad():
        db = quantfx.sqnr(model(x), q(x))
    assert db > SQNR_BOUND[(name, target)], f"{name} on {target}: SQNR {db:.1f} dB"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_finn_refuses_float_islands_naming_node_and_rule(name, tmp_path):
    _, q, data = _quantize(name, "finn")
    node, op = FINN_REFUSAL[name]
    path = tmp_path / "m.onnx"
    with pytest.raises(quantfx.TargetError) as e:
        quantfx.export(q, path, example_inputs=(data[0][:1],))
    message = str(e.value)
    assert isinstance(e.value, quantfx.QuantFXError)
    assert f"finn: {node} ({op})" in message and "float island" in message and \
        "FINN builds integer layers and thresholds" in message and "'onnx', 'torch' or 'dpu'" in message, message
    assert not path.exists()  # refused before anything is written


class GatedConv(nn.Module):
    """A squeeze-excitation gate with ReLU and sigmoid only: nothing but the product for finn to refuse."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))


def test_finn_refuses_a_product_of_two_activations():
    torch.manual_seed(0)
    data = calibration()
    q = quantfx.quantize(GatedConv().eval(), "finn", calibration_data=data, progress=False)
    with pytest.raises(quantfx.TargetError, match=r"finn: mul multiplies two quantized tensors \(mul of .*FINN has "
                                                  r"no layer for a product of two activations.*'onnx', 'torch' or "
                                                  r"'dpu'"):
        quantfx.lower(q, (data[0][:1],))


@pytest.mark.parametrize("target", ["onnx", "torch", "dpu"])
def test_gate_product_is_exact_on_the_accumulator_grid(target):
    """The SE gate's product: both operands quantized, the product's grid s_a x s_b (zero point 0), the integers
    exact, then requantized by an activation quantizer."""
    torch.manual_seed(0)
    data = calibration()
    q = quantfx.quantize(GatedConv().eval(), target, calibration_data=data, progress=False)
    (prod,) = [n for n in q.graph.nodes if is_product(q, n)]
    a, b, meta = qmeta(prod.args[0]), qmeta(prod.args[1]), qmeta(prod)
    assert meta.kind == "acc" and float(meta.zero_point) == 0
    assert float(meta.scale) == float(a.scale.float() * b.scale.float())
    assert all(is_act_quant(q, u) for u in prod.users) or prod.users == {}
    x = data[1]
    values = _all_values(q, x)
    ia = np.round(values[prod.args[0].name] / float(a.scale)).astype(np.int64)  # operands' (q - zp)
    ib = np.round(values[prod.args[1].name] / float(b.scale)).astype(np.int64)
    acc = ia * ib  # the exact integer product
    assert np.abs(acc).max() > 1000
    # the product's value is float32(acc) x float32(s_a s_b): the integers times the grid's scale
    assert np.array_equal(values[prod.name], acc.astype(np.float32) * np.float32(meta.scale))
    artefact = quantfx.lower(q, (data[0][:1],))
    assert assert_bit_exact(q, artefact, x)[0] >= 4


def test_torch_report_and_inspect_list_float_islands_with_reasons(capsys):
    _, q, data = _quantize("convnext", "torch")
    text = quantfx.inspect(q)
    assert "float islands" in text
    for node, op in (("norm", "LayerNorm"), ("act", "GELU")):
        assert any(line.split()[:2] == [node, op] for line in text.splitlines()), text
    program = quantfx.lower(q, (data[0][:1],))
    rows = {r["node"]: r for r in program.report}
    assert rows["norm"]["how"] == "float" and rows["act"]["how"] == "float"


def test_onnx_file_lists_its_float_islands_and_runs_them_between_dq_and_q():
    _, q, data = _quantize("vit_sdpa", "onnx")
    model = quantfx.lower(q, (data[0][:1],))
    islands = {r["node"]: r for r in file_float_islands(model)}
    assert {"norm1", "norm2", "norm", "act"} <= set(islands), islands
    (softmax,) = [r for r in islands.values() if r["op"] == "QuantSoftmax"]  # the attention's, from its table
    assert softmax["node"].startswith("scaled_dot_product_attention_weights") and "table" in softmax["why"]
    text = quantfx.inspect(model)
    assert text.startswith("float islands of the file") and "norm1" in text and "LayerNorm" in text
    by_output = {o: n for n in model.graph.node for o in n.output}
    names = node_values(model)
    # GELU's output is requantized (Q/DQ) right after it, and its input is a dequantized tensor
    gelu = by_output[names["act"]]
    readers = [n for n in model.graph.node if names["act"] in n.input]
    assert [n.op_type for n in readers] == ["QuantizeLinear"], [n.op_type for n in readers]
    assert gelu.op_type == "Mul"


def test_dpu_report_puts_float_islands_and_products_on_the_cpu():
    _, q, data = _quantize("mbconv", "dpu")
    rep = dpu.report(quantfx.lower(q, (data[0][:1],)))
    rows = {p.node: p for p in rep.nodes}
    assert rows["stem_2"].device == "CPU" and "float island" in rows["stem_2"].rule
    (mul,) = [p for p in rep.nodes if p.op == "elementwise-mul"]
    assert mul.device == "CPU" and "product of two tensors" in mul.rule
    assert rows["stem_0"].device == "DPU"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantize_leaves_the_model_unchanged(name):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    ref = copy.deepcopy(model).eval()(calibration()[0])
    quantfx.quantize(model, "onnx", calibration_data=calibration(), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(model.eval()(calibration()[0]), ref)
    assert not any(isinstance(m, quantfx.nn.QuantProduct) for m in model.modules())


def test_override_keeps_a_product_float():
    torch.manual_seed(0)
    data = calibration()
    q = quantfx.quantize(GatedConv().eval(), "onnx", calibration_data=data, progress=False,
                         overrides={"mul": None})
    assert not any(is_product(q, n) for n in q.graph.nodes)
    assert any(r["node"] == "mul" for r in float_islands(q))
    with pytest.raises(quantfx.QuantArgumentError, match="did you mean 'mul'"):
        quantfx.quantize(GatedConv().eval(), "onnx", calibration_data=data, progress=False, overrides={"mull": None})


ACTIVATIONS_SQNR_BOUND = {"onnx": 42.6, "torch": 35.3, "dpu": 43.1}  # measured 45.6 / 38.3 / 46.1 dB, less 3


@pytest.mark.parametrize("target", ["onnx", "torch", "dpu"])
def test_activations_norms_softmax_and_mha_as_float_islands(target):
    """Hardswish, Hardsigmoid, Mish, PReLU, LeakyReLU, GELU (tanh), ELU, SiLU, Tanh, F.gelu/silu/hardswish,
    GroupNorm, softmax and nn.MultiheadAttention between quantized convs: each a float island (dpu: Hardswish,
    Hardsigmoid and LeakyReLU in the DPU's own arithmetic instead), the convs integer, every quantized tensor
    exact."""
    torch.manual_seed(0)
    model = Activations().eval()
    data = calibration(shape=(4, 3, 8, 8))
    q = quantfx.quantize(model, target, calibration_data=data, progress=False, capture="fx")
    ops = {r["op"] for r in float_islands(q)}
    expected = {"Mish", "PReLU", "GELU", "ELU", "SiLU", "Tanh", "GroupNorm", "QuantSoftmax", "MultiheadAttention",
                "gelu", "silu", "mean"} | (set() if target == "dpu" else {"Hardswish", "Hardsigmoid", "LeakyReLU",
                                                                             "hardswish"})
    assert expected <= ops, expected - ops
    artefact = quantfx.lower(q, (data[0][:1],))
    assert quantfx.verify(q, artefact, data[1]).max_error_lsb == 0.0
    assert assert_bit_exact(q, artefact, data[1])[0] >= 16  # the residual adds run in float (float_islands)
    with torch.no_grad():
        db = quantfx.sqnr(model(data[1]), q(data[1]))
    assert db > ACTIVATIONS_SQNR_BOUND[target], f"{target}: SQNR {db:.1f} dB"


def test_finn_takes_monotonic_float_islands():
    """LeakyReLU, PReLU, ELU, Tanh, Hardsigmoid before a quantizer are thresholds for FINN: not refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.1), nn.Conv2d(8, 8, 3), nn.Tanh(), nn.Conv2d(8, 4, 3),
                          nn.Hardsigmoid()).eval()
    data = calibration()
    q = quantfx.quantize(model, "finn", calibration_data=data, progress=False)
    assert {r["op"] for r in float_islands(q)} == {"LeakyReLU", "Tanh", "Hardsigmoid"}
    assert quantfx.verify(q, quantfx.lower(q, (data[0][:1],)), data[1]).max_error_lsb == 0.0


class DropPath(nn.Module):
    """Stochastic depth as timm and torchvision write it: identity unless training."""

    def __init__(self, p=0.2):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.drop_path = DropPath()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return x + self.drop(self.drop_path(self.body(x)))


@pytest.mark.parametrize("target", ["finn", "onnx", "torch", "dpu"])
def test_stochastic_depth_and_dropout_are_identity_in_eval(target):
    torch.manual_seed(0)
    data = calibration()
    model = Residual().train()  # quantize evaluates a copy: the random branch is not traced
    q = quantfx.quantize(model, target, calibration_data=data, progress=False)
    assert not [n for n in q.graph.nodes if "drop" in n.name or n.target in (torch.rand, operator.mul)]
    assert quantfx.verify(q, quantfx.lower(q, (data[0][:1],)), data[1]).max_error_lsb == 0.0
    assert model.training  # the user's model keeps its mode


@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_class_token_cat_is_integer_and_the_residual_stream_float(target):
    """The class token and patches share the cat's grid; the adds of the residual stream (the position
    embedding's, each block's), read only by LayerNorms and by each other, stay float (as PT2E keeps them), so
    tokens of different magnitudes are not rounded on one 8-bit grid before each LayerNorm."""
    _, q, data = _quantize("vit_matmul", target)
    nodes = {n.name: n for n in q.graph.nodes}
    cat, adds = nodes["cat"], [n for n in q.graph.nodes if is_add(n)]
    assert qmeta(cat).kind == "act" and qmeta(cat.args[0][0]).group == qmeta(cat.args[0][1]).group is not None
    assert [qmeta(a).kind for a in adds] == ["float"] * 3
    assert {r["node"] for r in float_islands(q) if "residual" in r["why"]} == {a.name for a in adds}
    assert not is_act_quant(q, nodes["add"].args[1])  # the position embedding is added in float
    if target == "torch":
        rows = {r["node"]: r for r in quantfx.lower(q, (data[0][:1],), format="torchscript").report}
        assert rows["cat"]["runs_as"] == "quantized cat" and rows["add"]["runs_as"] != "quantized::add"
        rows = {r["node"]: r for r in quantfx.lower(q, (data[0][:1],)).report}  # the .pt2 program: on codes
        assert rows["cat"]["runs_as"] == "quantized cat" and rows["add"]["runs_as"] != "dq, dq -> add -> q"


class LayerScale(nn.Module):
    """ConvNeXt's layer scale: a product with a parameter, a scaling by a constant rather than a gate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(1e-3, 2.0, 8).reshape(8, 1, 1))
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.conv(x) * self.gamma)


@pytest.mark.parametrize("target", ["finn", "onnx", "torch", "dpu"])
def test_layer_scale_by_a_parameter_is_not_a_product_of_activations(target):
    torch.manual_seed(0)
    data = calibration()
    q = quantfx.quantize(LayerScale().eval(), target, calibration_data=data, progress=False)
    assert not any(is_product(q, n) for n in q.graph.nodes) and not float_islands(q)
    assert quantfx.verify(q, quantfx.lower(q, (data[0][:1],)), data[1]).max_error_lsb == 0.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_linear_over_tokens_is_exact_on_onnx(seed):
    """A Linear over tokens (rank-3 input) is written Reshape -> Gemm -> Reshape so onnxruntime adds the bias in the
    accumulator: as MatMul -> Add (bias in float after MatMulIntegerToFloat) seed 2 put 1 of fc1_quant's 4352
    values 1 LSB off."""
    torch.manual_seed(seed)
    model = ViTBlock().eval()
    data = calibration(seed=seed)
    q = quantfx.quantize(model, "onnx", calibration_data=data, progress=False)
    artefact = quantfx.lower(q, (data[0][:1],))
    assert sum(n.op_type == "Gemm" for n in artefact.graph.node) == 5  # qkv, proj, fc1, fc2, head
    assert assert_bit_exact(q, artefact, data[1])[0] >= 16  # the residual adds run in float (float_islands)


@pytest.mark.parametrize("target, floor", [("onnx", 12.0), ("torch", 23.0)])
def test_torchvision_vit_keeps_its_class_token(target, floor):
    """torchvision's ViT at random init: the class token is the position embedding alone (std 0.02) while the
    patch tokens reach 3.5; on one 8-bit grid before each LayerNorm it was rounded away (9.0 dB on onnx, 9.1 on
    torch; the head reads only that token). The residual stream stays float: 13.5 and 24.4 dB (onnx's output
    quantizer, calibrated on 6 images, clips the test logits: its accumulator is at 30.6 dB; tools/probe_vit.py).
    capture='auto' takes torch.export here (nn.MultiheadAttention would run whole in float): 13.4 and 25.0 dB.
    Export runs the attention's functional form: its projections become Linears named ``<attention>.in_proj`` and
    ``<attention>.out_proj`` (not the attention's own path, where the swap failed on state that did not fit), and
    the export's unflatten and squeeze of the packed q/k/v lower with the batch dynamic (lowered at 1, run at 4)."""
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10).eval()
    with torch.no_grad():
        nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised: the output would be identically 0
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    test = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    q = quantfx.quantize(model, target, calibration_data=data, progress=False)
    with torch.no_grad():
        snr = quantfx.sqnr(model(test), q(test))
    assert snr > floor, snr
    assert q.notes["capture"]["method"] == "export" and "MultiheadAttention" in q.notes["capture"]["why"]
    linears = {n.target for n in q.graph.nodes if n.op == "call_module" and type(q.get_submodule(n.target)).__name__
               == "QuantLinear"}
    assert {f"encoder.layers.encoder_layer_{i}.self_attention.{p}" for i in (0, 1) for p in ("in_proj", "out_proj")} \
        <= linears and len(linears) == 9  # 2 x (in_proj, out_proj, mlp.0, mlp.3) + head
    assert len([r for r in float_islands(q) if "residual" in r["why"]]) == 5  # position embedding's, 2 per block
    assert quantfx.verify(q, quantfx.lower(q, (test[:1],)), test).max_error_lsb == 0.0


def test_softmax_of_a_quantized_input_is_the_same_in_any_summation_order():
    """QuantSoftmax (passes/tabulate_softmax.py) sums integers below 2^24, so its float32 result does not depend
    on the order a runtime sums a row in (a float softmax's does: the 1 LSB of the seed-2 ViT block on onnx);
    over ViT-B/16's 197 tokens it stays within 2^-15 of the float softmax."""
    from quantfx.nn import QuantSoftmax
    from quantfx.quant import Quantizer
    from quantfx.quant.specs import Int8ActPerTensorFloat
    torch.manual_seed(0)
    q = Quantizer(Int8ActPerTensorFloat, fixed_scale=0.05).eval()
    x = q(torch.randn(2, 4, 197, 197) * 3)
    m = QuantSoftmax(-1).eval()
    y = m(x, input_quantizer=q)
    order = torch.randperm(197)
    assert torch.equal(m(x[..., order], input_quantizer=q), y[..., order])  # bit for bit
    assert float((y - torch.softmax(x, -1)).abs().max()) < 2 ** -15
    assert torch.equal(m.train()(x, input_quantizer=q), torch.softmax(x, -1))  # training: the float softmax


def test_attention_runs_its_products_on_integers_and_its_softmax_from_a_table():
    """F.scaled_dot_product_attention without a mask is spelled matmul -> scale -> softmax -> matmul
    (canonicalize), so its two products are QuantProducts and its softmax a QuantSoftmax: 0 LSB on onnx where the
    fused float kernel, summed in another order than onnxruntime's, left values 1 LSB off (vit_b_16: 5 LSB)."""
    _, q, data = _quantize("vit_sdpa", "onnx")
    modules = [type(q.get_submodule(n.target)).__name__ for n in q.graph.nodes if n.op == "call_module"]
    assert modules.count("QuantProduct") == 2 and modules.count("QuantSoftmax") == 1
    assert not any(n.target is F.scaled_dot_product_attention for n in q.graph.nodes)
    model = quantfx.lower(q, (data[0][:1],))
    assert sum(n.op_type == "Gather" and "exp_table" in n.input[0] for n in model.graph.node) == 1
    assert not any(n.op_type in ("Softmax", "Exp") for n in model.graph.node)
    assert quantfx.verify(q, model, data[1]).max_error_lsb == 0.0
