"""annotate: every edge carries QMeta; accumulator, add and cat widths; inspect's table."""
import io
import math
from collections import Counter

import pytest
import torch

import quantfx
from quantfx.graph import (
    META_KEY, is_act_quant, is_add, is_cat, is_compute, is_tensor_node, module_of, qmeta, tensor_inputs,
)
from quantfx.quant import functional as qf
from quantfx.zoo import TEST_MODELS, example_input


def calibrated(name, target="finn"):
    torch.manual_seed(0)
    data = [example_input(name, batch=2, seed=i) for i in range(3)]
    return quantfx.quantize(TEST_MODELS[name][0]().eval(), target, calibration_data=data, progress=False)


@pytest.mark.parametrize("target", ["finn", "onnx", "torch", "dpu"])
def test_every_tensor_node_is_annotated(target):
    floats = Counter()
    for name in sorted(TEST_MODELS):
        q = calibrated(name, target)
        for node in q.graph.nodes:
            assert META_KEY in node.meta, (name, node.name)
            if node.op in ("placeholder", "output") or not is_tensor_node(node):
                continue
            meta = qmeta(node)
            if meta.is_quantized:
                assert meta.scale is not None and meta.bit_width >= 2, (name, node.name)
            else:  # float only where nothing can fold or quantize it (see below)
                floats[type(q.get_submodule(node.target)).__name__ if node.op == "call_module" else str(node.target)] += 1
    # densenet's pre-activation BatchNorms follow a cat or the input, not a conv, so they stay float; targets
    # that requantize after average pooling (avgpool='requant') keep the pool itself float
    pools = {"finn": {}, "onnx": {"AvgPool2d": 1, "AdaptiveAvgPool2d": 5}}
    # the torch profile's residual adds read their conv's float output (add_reads_layer_output): the add is float
    # until the quantizer after it (resnet's 3, mobilenetv2's 4)
    adds = {"torch": {"<built-in function add>": 7}}
    assert floats == Counter({"BatchNorm2d": 5, **pools.get(target, pools["onnx"]), **adds.get(target, {})})


def test_accumulator_add_and_cat_widths():
    q = calibrated("inception")
    for node in q.graph.nodes:
        if is_compute(q, node):
            m = module_of(q, node)
            inp = qmeta(node.args[0])
            acc = qf.accumulator_bit_width(inp.bit_width, m.weight_quant.bit_width, m.weight_quant.narrow_range,
                                           m.weight[0].numel())
            assert qmeta(node).bit_width == max(acc, 32) + 1  # external 32-bit bias
            assert torch.allclose(qmeta(node).scale, inp.scale * m.quant_weight_scale())
        if is_cat(node):
            out, ins = qmeta(node), [qmeta(a) for a in tensor_inputs(node)]
            assert len(ins) == 4
            for m in ins:  # a cat of one shared grid is that grid
                assert (out.kind, out.bit_width, out.signed, out.group) == (m.kind, m.bit_width, m.signed, m.group)
                assert torch.equal(out.scale, m.scale) and torch.equal(out.zero_point, m.zero_point)
    adds = 0
    for name in ("resnet", "mobilenetv2"):
        q = calibrated(name)
        for node in q.graph.nodes:
            if is_add(node):
                out, ins = qmeta(node), [qmeta(a) for a in tensor_inputs(node)]
                assert [m.bit_width for m in ins] == [8, 8] and out.bit_width == 9 and out.kind == "acc"
                assert torch.equal(out.scale, ins[0].scale) and out.group == ins[0].group is not None
                adds += 1
    assert adds == 3 + 4


def test_trunc_pool_meta():
    q = calibrated("densenet")
    pools = [n for n in q.graph.nodes
             if n.op == "call_module" and type(q.get_submodule(n.target)).__name__.startswith("QuantA")]
    assert len(pools) == 2
    for node in pools:
        meta, inp = qmeta(node), qmeta(node.args[0])
        k = math.prod(q.get_submodule(node.target)._kernel(torch.empty(node.args[0].meta["tensor_meta"].shape)))
        shift = max(inp.bit_width + math.ceil(math.log2(k)) - meta.bit_width, 0)
        assert meta.kind == "trunc" and torch.allclose(meta.scale, inp.scale * 2 ** shift / k)


def test_inspect_table():
    q = calibrated("resnet")
    out = io.StringIO()
    text = quantfx.inspect(q, file=out)
    rows = quantfx.layer_table(q)
    expected = sum(1 for n in q.graph.nodes if is_compute(q, n) or is_act_quant(q, n) or is_add(n) or is_cat(n)) \
        + sum(1 for n in q.graph.nodes if n.op == "call_module" and type(q.get_submodule(n.target)).__name__
              == "QuantAdaptiveAvgPool2d")
    assert len(rows) == expected
    # header, rule, rows, and how it was captured
    assert len(text.splitlines()) == expected + 3 and out.getvalue().strip() == text.strip()
    assert text.splitlines()[-1] == "capture: fx (torch.fx traced it)"
    header = text.splitlines()[0].split()
    assert header == ["name", "op", "weight_bits", "act_bits", "bias", "scale", "acc_bits", "group", "method"]
    assert any(r["group"] == "share_group_0" for r in rows)
    by_name = {n.target if n.op == "call_module" else n.name: n for n in q.graph.nodes}
    compute = [r for r in rows if r["op"].startswith("QuantConv") or r["op"] == "QuantLinear"]
    assert len(compute) == 10
    for r in compute:
        assert (r["weight_bits"], r["bias"]) == (8, "32 external")
        assert r["acc_bits"] == qmeta(by_name[r["name"]]).bit_width > 32
        assert r["name"] in text
        assert r["method"] == "per-channel max"  # finn's 8-bit weights: a scale per output channel, from the range
    assert {r["method"] for r in rows if r["op"] == "QuantReLU"} == {"max"}  # 8-bit activations: min/max


def test_add_of_a_scale_group_counts_both_integer_ranges():
    """UINT8 (a ReLU output, [0, 255]) + INT8 ([-128, 127]) on one scale: the sum spans [-128, 382], a signed
    10-bit accumulator whose zero point is the sum of the inputs' zero points."""
    from quantfx.targets import FINN
    torch.manual_seed(0)
    model = TEST_MODELS["resnet"][0]().eval()
    q = quantfx.quantize(model, FINN.replace(add_grid="scale"), progress=False,
                         calibration_data=[example_input("resnet", batch=2, seed=0)])
    mixed = [n for n in q.graph.nodes if is_add(n) and len({qmeta(a).signed for a in tensor_inputs(n)}) == 2]
    assert mixed
    for node in mixed:
        meta = qmeta(node)
        assert (meta.kind, meta.bit_width, meta.signed) == ("acc", 10, True)
        assert torch.equal(meta.zero_point, sum(qmeta(a).zero_point for a in tensor_inputs(node)))
        assert len({float(qmeta(a).scale) for a in tensor_inputs(node)}) == 1
