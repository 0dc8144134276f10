"""annotate: every edge carries QMeta; accumulator, add and cat widths; inspect's table."""
import io
import math

import torch

import quantfx
from quantfx.graph import META_KEY, is_act_quant, is_add, is_cat, is_compute, module_of, qmeta, tensor_inputs
from quantfx.quant import functional as qf
from quantfx.zoo import TEST_MODELS, example_input


def calibrated(name, target="finn"):
    torch.manual_seed(0)
    data = [example_input(name, batch=2, seed=i) for i in range(3)]
    return quantfx.quantize(TEST_MODELS[name][0]().eval(), target, calibration_data=data, progress=False)


def test_every_tensor_node_is_annotated():
    q = calibrated("resnet")
    for node in q.graph.nodes:
        assert META_KEY in node.meta, node.name
        if node.op not in ("placeholder", "output"):
            meta = qmeta(node)
            assert meta.is_quantized, node.name  # the whole resnet is quantized
            assert meta.scale is not None


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
            ins = [qmeta(a) for a in tensor_inputs(node)]
            assert qmeta(node).bit_width == ins[0].bit_width and torch.equal(qmeta(node).scale, ins[0].scale)
    q = calibrated("resnet")
    for node in q.graph.nodes:
        if is_add(node):
            ins = [qmeta(a) for a in tensor_inputs(node)]
            assert qmeta(node).bit_width == max(m.bit_width for m in ins) + 1 and qmeta(node).kind == "acc"


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
    assert len(text.splitlines()) == expected + 2 and out.getvalue().strip() == text.strip()
    header = text.splitlines()[0].split()
    assert header == ["name", "op", "weight_bits", "act_bits", "bias", "scale", "acc_bits", "group"]
    assert any(r["group"] == "share_group_0" for r in rows)
