"""The shape record (quantfx.shapes): calibration records the shapes a lowering needs, a lowering reuses them
only while their key holds, and anything that could change a shape makes it run the model again."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import quantfx
from quantfx import shapes, zoo

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def compiled(target="finn"):
    torch.manual_seed(0)
    return quantfx.quantize(zoo.ResNetSmall().eval(), target, calibration_data=[X], progress=False)


def runs_of(q, fn) -> int:
    """How many times ``fn()`` runs the model's first conv."""
    conv = next(m for m in q.modules() if isinstance(m, quantfx.nn.QuantConv2d))
    calls = []
    handle = conv.register_forward_hook(lambda *a: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("target", ["finn", "onnx", "torch", "dpu"])
def test_calibration_records_the_shapes_export_uses(target, tmp_path):
    q = compiled(target)
    record = shapes.recorded_shapes(q, (X,))
    assert record is not None
    assert tuple(record.tensor_meta[next(n.name for n in q.graph.nodes if n.op == "output")].shape) == (2, 10)
    # the recorded shapes are what a run gives
    fresh = shapes.record_shapes(q, (X,))
    assert {k: v.shape for k, v in fresh.tensor_meta.items() if hasattr(v, "shape")} == \
        {k: v.shape for k, v in record.tensor_meta.items() if hasattr(v, "shape")}
    assert runs_of(q, lambda: quantfx.lower(q, (X,))) == 0  # no run of the model for shapes
    path = tmp_path / "m"
    quantfx.export(q, path, example_inputs=(X,))
    report = quantfx.verify(q, next(tmp_path.iterdir()), (X,))
    assert report.ok and report.max_error_lsb == 0.0, str(report)


def test_other_input_shapes_run_the_model_and_lower_for_them():
    q = compiled()
    x = torch.randn(1, 3, 16, 16)
    assert shapes.recorded_shapes(q, (x,)) is None
    assert runs_of(q, lambda: quantfx.lower(q, (x,))) == 1
    artefact = quantfx.lower(q, (x,))
    dims = [d.dim_value for d in artefact.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 16, 16]
    record = shapes.recorded_shapes(q, (x,))
    assert record is not None  # kept for the next lowering with these inputs
    conv = next(n.name for n in q.graph.nodes if isinstance(q.get_submodule(n.target) if n.op == "call_module"
                                                            else None, quantfx.nn.QuantConv2d))
    assert tuple(record.tensor_meta[conv].shape) == (1, 16, 16, 16)  # a layer's QuantTensor output, these inputs


def test_a_bad_calibration_batch_prints_no_fx_traceback(capfd):
    torch.manual_seed(0)
    with pytest.raises(quantfx.CalibrationError, match="batch 0"):
        quantfx.quantize(zoo.ResNetSmall().eval(), "finn", example_inputs=X,
                         calibration_data=[torch.randn(2, 5, 32, 32)], progress=False)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ShapeProp" not in err, err


def test_a_changed_layer_or_graph_invalidates_the_record():
    q = compiled()
    conv = next(m for m in q.modules() if isinstance(m, quantfx.nn.QuantConv2d))
    conv.stride = (2, 2)  # configuration: extra_repr
    assert shapes.recorded_shapes(q, (X,)) is None
    conv.stride = (1, 1)
    assert shapes.recorded_shapes(q, (X,)) is not None
    conv.weight = nn.Parameter(conv.weight.detach()[:8].clone())  # an own parameter of another shape
    assert shapes.recorded_shapes(q, (X,)) is None

    q = compiled()
    out = next(n for n in q.graph.nodes if n.op == "output")
    with q.graph.inserting_before(out):
        flat = q.graph.call_function(torch.flatten, (out.args[0],))
    out.args = (flat,)
    assert shapes.recorded_shapes(q, (X,)) is None  # the graph changed, recompiled or not
    q.recompile()
    assert shapes.recorded_shapes(q, (X,)) is None
    artefact = quantfx.lower(q, (X,))
    dims = [d.dim_value for d in artefact.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [20]  # torch.flatten of the [2, 10] logits: the shapes of the edited graph


def test_the_record_is_not_copied_pickled_or_saved_with_the_model(tmp_path):
    q = compiled()
    assert shapes.recorded_shapes(copy.deepcopy(q), (X,)) is None  # other modules: a copy runs again
    buf = io.BytesIO()
    torch.save(q, buf)  # TensorMetadata's memory_format would not pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert shapes.recorded_shapes(loaded, (X,)) is None
    with torch.no_grad():
        assert torch.equal(loaded(X), q(X))
