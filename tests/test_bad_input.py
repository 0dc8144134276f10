"""Bad input gets a QuantFXError that names the thing and the way out, and the user's model is never modified:
NaN/inf weights and calibration data, empty data, batches of the wrong shape, unwritable export paths, files
quantfx did not write, truncated artefacts, out-of-range bit widths."""
import onnx
import pytest
import torch

import quantfx
from quantfx.zoo import LeNet, ResNetSmall, example_input

DATA = [example_input("lenet", batch=4, seed=i) for i in range(2)]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(
        torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) if before[k].is_floating_point()
        else torch.equal(before[k], after[k]) for k in before)


def test_nan_or_inf_in_weights_names_the_parameter():
    model = LeNet().eval()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(quantfx.QuantArgumentError, match=r"quantize: parameter conv2\.weight holds 1 NaN or inf "
                                                         r"value\(s\) of 2400; fix the model's weights"):
        quantfx.quantize(model, "onnx", calibration_data=DATA, progress=False)
    assert unchanged(model, before)
    resnet = ResNetSmall().eval()
    resnet.stem[1].running_var[3] = float("inf")
    with pytest.raises(quantfx.QuantArgumentError, match=r"buffer stem\.1\.running_var holds 1 NaN or inf"):
        quantfx.quantize(resnet, "finn", example_inputs=(torch.randn(1, 3, 32, 32),))


def test_nan_in_calibration_data_names_the_batch():
    model = LeNet().eval()
    before = snapshot(model)
    bad = DATA[1].clone()
    bad[0, 0, 3, 3] = float("inf")
    with pytest.raises(quantfx.CalibrationError, match=r"calibrating: batch 1, input 0 holds 1 NaN or inf value\(s\) "
                                                       r"of 3136; .*clean or drop that batch"):
        quantfx.quantize(model, "onnx", calibration_data=[DATA[0], bad], progress=False)
    assert unchanged(model, before)


def test_empty_calibration_data():
    with pytest.raises(quantfx.QuantArgumentError, match="calibration data is empty"):
        quantfx.quantize(LeNet().eval(), "onnx", calibration_data=[], progress=False)
    with pytest.raises(quantfx.CalibrationError, match=r"calibration data is empty \(no batch ran\)"):
        quantfx.quantize(LeNet().eval(), "onnx", example_inputs=(DATA[0],), calibration_data=[], progress=False)
    q = quantfx.quantize(LeNet().eval(), "onnx", example_inputs=(DATA[0],), progress=False)
    with pytest.raises(quantfx.CalibrationError, match="no batch ran"):
        quantfx.calibrate(q, iter([]), progress=False)


def test_calibration_batch_of_the_wrong_shape_names_both_shapes():
    q = quantfx.quantize(LeNet().eval(), "onnx", example_inputs=(DATA[0],), progress=False)
    with pytest.raises(quantfx.CalibrationError,
                       match=r"calibrating: batch 1 \(input shapes \(4, 1, 32, 32\)\) does not run through the model: "
                             r"RuntimeError: .*; give batches shaped like the example inputs \(\(4, 1, 28, 28\);"):
        quantfx.calibrate(q, [DATA[0], torch.randn(4, 1, 32, 32)], progress=False)


def test_unwritable_export_path_leaves_nothing_behind(tmp_path):
    q = quantfx.quantize(LeNet().eval(), "onnx", calibration_data=DATA, progress=False)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file")
    with pytest.raises(quantfx.ExportError, match=r"export: cannot write .*not_a_dir/m\.onnx: .*; choose a path in a "
                                                  "writable directory"):
        quantfx.export(q, blocker / "m.onnx", (DATA[0][:1],))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir"]
    quantfx.export(q, tmp_path / "ok.onnx", (DATA[0][:1],))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir", "ok.onnx"]  # no partial file left


def test_verify_refuses_files_quantfx_did_not_write(tmp_path):
    model = LeNet().eval()
    q = quantfx.quantize(model, "onnx", calibration_data=DATA, progress=False)
    foreign = tmp_path / "float.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 28, 28])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 28, 28])])
    onnx.save(onnx.helper.make_model(graph, producer_name="pytorch"), str(foreign))  # a file another tool wrote
    with pytest.raises(quantfx.ExportError, match=r"verify: .*float\.onnx was not written by quantfx \(producer "
                                                  r"'pytorch'\); verify compares an artefact quantfx wrote"):
        quantfx.verify(q, foreign, DATA[0])
    ours = tmp_path / "q.onnx"
    quantfx.export(q, ours, (DATA[0][:1],))
    data = ours.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(quantfx.ExportError, match=r"verify: .*cut\.onnx cannot be read as a onnx artefact"):
        quantfx.verify(q, tmp_path / "cut.onnx", DATA[0])
    assert quantfx.verify(q, ours, DATA[0]).ok


@pytest.mark.parametrize("bits", [0, 33])
def test_bit_widths_out_of_range(bits):
    model = LeNet().eval()
    with pytest.raises(quantfx.QuantArgumentError, match=rf"weight_bit_width={bits} is outside what the target "
                                                         r"accepts \(1\.\.8\)"):
        quantfx.quantize(model, "finn", weight_bit_width=bits)
    with pytest.raises(quantfx.QuantArgumentError, match=rf"act_bit_width={bits} is outside"):
        quantfx.quantize(model, "onnx", act_bit_width=bits)
