"""The quantfx command line: subcommands, exit codes 0/1/2, messages instead of tracebacks."""
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch

from quantfx.cli import main

MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def untraceable():
        class M(nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x
                return -x
        return M()

    def shape_checked():
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)

            def forward(self, x):
                if x.shape[-1] != x.shape[-2]:  # torch.fx cannot trace this; torch.export can
                    raise ValueError("square images only")
                return self.conv(x)
        torch.manual_seed(0)
        return M()
""")


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return path


def test_quantize_exports_verifies_and_saves(model_file, tmp_path, capsys):
    out, saved = tmp_path / "m.onnx", tmp_path / "q.pt"
    rc = main(["quantize", f"{model_file}:build", "--target", "onnx", "--input-shape", "2,3,8,8",
               "-o", str(out), "--save", str(saved), "--quiet"])
    assert rc == 0
    model = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) >= 3
    assert main(["verify", str(saved), str(out), "--input-shape", "2,3,8,8"]) == 0
    assert "max error" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "QuantizeLinear" in table and "DequantizeLinear" in table
    assert main(["inspect", str(saved)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "QuantConv2d" in line or "QuantLinear" in line]
    assert len(rows) == 2


def test_weight_bit_width_and_calib_npz(model_file, tmp_path):
    import numpy as np
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype("float32"))
    saved = tmp_path / "q.pt"
    rc = main(["quantize", f"{model_file}:build", "--target", "finn", "--input-shape", "2,3,8,8",
               "--weight-bit-width", "4", "--calib", str(tmp_path / "calib.npz"), "--save", str(saved), "--quiet"])
    assert rc == 0
    q = torch.load(saved, weights_only=False)
    bits = {m.weight_quant.bit_width for m in q.modules() if hasattr(m, "weight_quant")}
    assert bits == {4}


def test_cpu_option_picks_the_onnx_weight_width(model_file, tmp_path):
    widths = {}
    for cpu in ("any", "vnni"):
        saved = tmp_path / f"q_{cpu}.pt"
        assert main(["quantize", f"{model_file}:build", "--target", "onnx", "--input-shape", "2,3,8,8",
                     "--cpu", cpu, "--save", str(saved), "--quiet"]) == 0
        q = torch.load(saved, weights_only=False)
        widths[cpu] = {m.weight_quant.bit_width for m in q.modules() if hasattr(m, "weight_quant")}
    assert widths == {"any": {7}, "vnni": {8}}


@pytest.mark.parametrize("args, code, message", [
    (["quantize", "MODEL:nope", "--input-shape", "1,3,8,8"], 2, "has no function 'nope'"),
    (["quantize", "MODEL:build", "--input-shape", "1,x,8"], 2, "comma-separated integers"),
    (["quantize", "MODEL:build", "--input-shape", "1,3,8,8", "--target", "bogus"], 1, "valid targets"),
    (["quantize", "MODEL:untraceable", "--input-shape", "1,3,8,8"], 1, "TraceError"),
    (["quantize", "MODEL:build", "--input-shape", "1,3,8,8", "--calib", "missing.npz"], 2, "--calib"),
    (["verify", "missing.pt", "a.onnx", "--input-shape", "1,3,8,8"], 2, "no such file"),
])
def test_user_errors_have_exit_codes_and_messages(model_file, capsys, args, code, message):
    args = [a.replace("MODEL", str(model_file)) for a in args]
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_capture_flag(model_file, tmp_path, capsys):
    spec = f"{model_file}:shape_checked"
    assert main(["quantize", spec, "--target", "onnx", "--input-shape", "2,3,8,8", "--capture", "fx"]) == 1
    assert "capture='export'" in capsys.readouterr().err
    out = tmp_path / "m.onnx"
    assert main(["quantize", spec, "--target", "onnx", "--input-shape", "2,3,8,8", "-o", str(out)]) == 0
    assert "capture: export (torch.fx could not trace it" in capsys.readouterr().out
    assert out.exists()


def test_bad_flag_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["quantize"])
    assert e.value.code == 2


def test_passes_lists_pipelines(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("trace", "canonicalize", "fuse_conv_bn", "swap_modules", "share_quantizers",
                 "choose_bias_scaling", "annotate"):
        assert name in out
    assert out.count("trace,propagate_shapes,canonicalize") == 4  # one default pipeline per target


def test_python_dash_m_entry_point(model_file):
    r = subprocess.run([sys.executable, "-m", "quantfx", "quantize", f"{model_file}:build", "--input-shape",
                        "1,3,8,8", "--target", "bogus"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "unknown target 'bogus'" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ model specs: timm:, torchvision:, transformers:


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Four generated RGB PNGs of different sizes, as a user's calibration folder."""
    import numpy as np
    from PIL import Image
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 50), (64, 64), (48, 80), (90, 70)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image: ignored")
    return folder


def _images(folder):
    from PIL import Image
    return [Image.open(f).convert("RGB") for f in sorted(folder.glob("*.png"))]


def test_timm_spec_builds_random_weights_with_the_input_shape_of_its_config():
    from quantfx.model_specs import load_model
    loaded = load_model("timm:test_resnet")
    assert loaded.input_shape == (1, 3, 160, 160)  # test_resnet's pretrained_cfg['input_size']
    assert "random weights" in loaded.source
    assert not loaded.model.training


@pytest.mark.parametrize("name, target", [("test_resnet", "onnx"), ("mobilenetv3_small_050", "torch")])
def test_quantize_timm_spec_calibrates_on_an_image_folder(name, target, image_folder, tmp_path):
    """The CLI's result equals quantfx.quantize on the same images preprocessed by timm's own transform (timm's
    data config at the input size), and its artefact verifies at 0 LSB."""
    import timm.data
    import quantfx
    out, saved = tmp_path / f"m.{'onnx' if target == 'onnx' else 'pt'}", tmp_path / "q.pt"
    rc = main(["quantize", f"timm:{name}", "--target", target, "--input-shape", "2,3,64,64", "--calib",
               str(image_folder), "--calib-batches", "2", "-o", str(out), "--save", str(saved), "--quiet"])
    assert rc == 0
    q = torch.load(saved, weights_only=False)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, 64, 64)},
                                                                            model=model))
    x = [transform(im) for im in _images(image_folder)]
    batches = [torch.stack(x[:2]), torch.stack(x[2:])]
    by_hand = quantfx.quantize(model, target, calibration_data=batches, progress=False)
    with torch.no_grad():
        assert torch.equal(q(batches[1]), by_hand(batches[1]))
    assert quantfx.verify(q, str(out), (batches[1],)).max_error_lsb == 0


def test_image_folder_with_size_mean_std(model_file, image_folder, tmp_path):
    """--size/--mean/--std: resize, centre-crop, scale to [0, 1], normalise; the CLI's model equals
    quantfx.quantize calibrated on those batches."""
    import quantfx
    from quantfx.cli import calibration_batches
    from quantfx.model_specs import default_preprocess
    batches = calibration_batches(str(image_folder), (2, 3, 8, 8), 2,
                                  preprocess=default_preprocess(8, (0.5,) * 3, (0.25,) * 3))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8)]
    pixels = torch.cat(batches) * 0.25 + 0.5  # un-normalised: the [0, 1] pixels of the resized images
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.std() > 0.02
    saved = tmp_path / "q.pt"
    assert main(["quantize", f"{model_file}:build", "--target", "torch", "--input-shape", "2,3,8,8", "--calib",
                 str(image_folder), "--calib-batches", "2", "--size", "8", "--mean", "0.5,0.5,0.5", "--std",
                 "0.25,0.25,0.25", "--save", str(saved), "--quiet"]) == 0
    q = torch.load(saved, weights_only=False)
    expected = quantfx.quantize(_build(model_file), "torch", calibration_data=batches, progress=False)
    x = torch.cat(batches)
    with torch.no_grad():
        assert torch.equal(q(x), expected(x))


def _build(model_file):
    namespace = {}
    exec(model_file.read_text(), namespace)
    return namespace["build"]().eval()


def test_torchvision_spec_uses_weights_from_the_local_cache_only(tmp_path, monkeypatch):
    """Random weights unless torch hub's cache holds the default weights file; nothing downloads."""
    import torchvision
    from quantfx.model_specs import load_model
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    random = load_model("torchvision:mobilenet_v3_small")
    assert "random weights" in random.source and random.input_shape == (1, 3, 224, 224)
    url = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(5)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(state, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    cached = load_model("torchvision:mobilenet_v3_small")
    assert "local cache" in cached.source
    assert all(torch.equal(cached.model.state_dict()[k], v) for k, v in state.items())


def test_weights_flag_loads_a_state_dict(tmp_path):
    import timm
    from quantfx.model_specs import load_model
    torch.manual_seed(3)
    state = timm.create_model("test_resnet").state_dict()
    torch.save(state, tmp_path / "w.pt")
    loaded = load_model("timm:test_resnet", weights=str(tmp_path / "w.pt"))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    assert "weights from" in loaded.source


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A ViT config folder with its image processor (mean/std 0.5, 32x32) and a BERT config folder."""
    import transformers
    root = tmp_path_factory.mktemp("hf")
    transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, num_labels=5).save_pretrained(root / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    transformers.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, num_labels=3
                            ).save_pretrained(root / "bert")
    return root


def test_transformers_spec_builds_from_a_config_folder(hf_folders, image_folder):
    import transformers
    from quantfx.cli import calibration_batches
    from quantfx.model_specs import load_model
    vit = load_model(f"transformers:{hf_folders / 'vit'}")
    assert vit.input_shape == (1, 3, 32, 32) and "random weights" in vit.source
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit.model(x), vit.model.model(x).logits) and vit.model(x).shape == (2, 5)
    # the folder's image processor: resize to 32x32, rescale to [0, 1], normalise with mean = std = 0.5
    batches = calibration_batches(str(image_folder), (2, 3, 32, 32), 2, loaded=vit, preprocess=vit.preprocess)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    expected = processor(images=_images(image_folder), return_tensors="pt")["pixel_values"]
    assert torch.allclose(torch.cat(batches), expected)
    bert = load_model(f"transformers:{hf_folders / 'bert' / 'config.json'}")
    assert bert.input_shape == (1, 32) and bert.input_dtype == torch.long  # max_position_embeddings < 128
    ids = calibration_batches("random", (2, 32), 3, loaded=bert)
    assert all(b.dtype == torch.long and 0 <= b.min() and b.max() < 500 for b in ids)
    with torch.no_grad():
        assert bert.model(ids[0]).shape == (2, 3)


def test_quantize_transformers_spec_end_to_end(hf_folders, image_folder, tmp_path, capsys):
    # transformers' ViT does not trace symbolically (a dtype check in ViTEmbeddings): auto captures by export
    out = tmp_path / "vit.onnx"
    assert main(["quantize", f"transformers:{hf_folders / 'vit'}", "--target", "onnx", "--calib",
                 str(image_folder), "--calib-batches", "2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "capture: export (" in text, text  # fx could not trace it: the CLI says which capture ran
    assert " 0.000 LSB" in text or "0.000 LSB" in text, text


@pytest.mark.parametrize("args, message", [
    (["quantize", "timm:resnet_nope"], "timm has no architecture 'resnet_nope'"),
    (["quantize", "timm:"], "no name after 'timm:'"),
    (["quantize", "torchvision:nope"], "torchvision has no model 'nope'"),
    (["quantize", "transformers:/no/such/folder"], "no config.json at /no/such/folder"),
    (["quantize", "timm:test_resnet", "--weights", "MISSING"], "--weights MISSING: no such file"),
    (["quantize", "timm:test_resnet", "--weights", "BADW"], "does not fit the model"),
    (["quantize", "MODEL:build"], "give --input-shape"),
    (["quantize", "BERT", "--calib", "IMAGES"], "is not an image"),
    (["quantize", "timm:test_resnet", "--input-shape", "1,3,32,32", "--calib", "IMAGES", "--size", "16"],
     "the preprocessing gives (3, 16, 16) per image"),
    (["quantize", "timm:test_resnet", "--calib", "IMAGES", "--size", "8", "--mean", "a,b"],
     "comma-separated numbers"),
])
def test_bad_model_specs_name_the_spec_and_the_way_out(args, message, model_file, image_folder, hf_folders,
                                                       tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "bad.pt")
    subst = {"MODEL": str(model_file), "IMAGES": str(image_folder), "BADW": str(tmp_path / "bad.pt"),
             "BERT": f"transformers:{hf_folders / 'bert'}"}
    args = [next((a.replace(k, v) for k, v in subst.items() if k in a), a) for a in args]
    assert main(args + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
