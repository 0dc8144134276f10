"""The ``quantfx`` command line: quantize, verify, draw, inspect, passes.

Exit codes: 0 success; 1 a quantfx error (trace, target rule, calibration...), printed as one clear message;
2 bad arguments.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import quantfx
from quantfx.targets import torch_profile  # the CLI is an entry point: it may name a target (--engine)
from quantfx.targets.dpu import DpuReport

from .errors import ModelSpecError, QuantFXError
from .lowering import BACKENDS
from .model_specs import IMAGENET_MEAN, IMAGENET_STD, default_preprocess, load_model, timm_preprocess
from .pass_infra import PASSES, get_pass
from .profile import available_targets, get_profile
from .tables import capture_line

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line arguments (exit code 2)."""


def _shape(text: str) -> tuple:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected comma-separated integers such as 1,3,32,32")
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: dimensions must be positive")
    return dims


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def calibration_batches(source: str, shape: tuple, batches: int, seed: int = 0, loaded=None,
                        preprocess=None) -> list:
    """'random' | a .npz file (first array, split along dim 0) | a folder of .npy files | a folder of images
    (read with PIL and made tensors by ``preprocess``, grouped in batches of shape[0]). ``loaded`` (a
    model_specs.LoadedModel) draws random token ids for text models."""
    if source == "random":
        g = torch.Generator().manual_seed(seed)
        if loaded is not None:
            return [loaded.random_batch(shape, g) for _ in range(batches)]
        return [torch.randn(shape, generator=g) for _ in range(batches)]
    path = Path(source)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            arr = data[data.files[0]]
        arr = arr if np.issubdtype(arr.dtype, np.integer) else arr.astype(np.float32)
        step = shape[0]
        return [torch.from_numpy(arr[i:i + step]) for i in range(0, min(len(arr), step * batches), step)]
    if path.is_dir():
        files = sorted(path.glob("*.npy"))[:batches]
        if files:
            return [torch.from_numpy(np.load(f).astype(np.float32)) for f in files]
        images = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UsageError(f"--calib {source}: the folder has no images ({', '.join(IMAGE_SUFFIXES)}) "
                             "and no .npy files")
        return image_batches(images[:shape[0] * batches], shape, preprocess, source)
    raise UsageError(f"--calib {source!r}: use 'random', a .npz file, a folder of .npy files or a folder of "
                     "images")


def image_batches(files: list, shape: tuple, preprocess, source: str) -> list:
    """Images read with PIL, made CHW tensors by ``preprocess``, stacked in batches of shape[0] (a last,
    shorter batch is kept)."""
    from PIL import Image, UnidentifiedImageError  # optional: only image folders need Pillow
    if preprocess is None:
        raise UsageError(f"--calib {source}: a folder of images calibrates an image model; this model's input "
                         f"{shape} is not an image (give a .npz of inputs)")
    tensors = []
    for f in files:
        try:
            with Image.open(f) as image:
                tensors.append(preprocess(image.convert("RGB" if shape[1] == 3 else "L")))
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"--calib {source}: {f.name} is not a readable image ({e})") from e
    if tuple(tensors[0].shape) != tuple(shape[1:]):
        raise UsageError(f"--calib {source}: the preprocessing gives {tuple(tensors[0].shape)} per image, the "
                         f"input shape is {tuple(shape)}; give --size (with --mean/--std) to resize the images "
                         "to the input shape, or drop --input-shape to use the model's own")
    step = shape[0]
    return [torch.stack(tensors[i:i + step]) for i in range(0, len(tensors), step)]


def _load_qmodel(path: str):
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return torch.load(file, weights_only=False)
    except Exception as e:
        raise UsageError(f"{path}: not a saved quantized model ({type(e).__name__}: {e})")


def _model_and_shape(args):
    """The LoadedModel of args.model and its input shape: --input-shape, else the model's own config's."""
    loaded = load_model(args.model, weights=getattr(args, "weights", None))
    if args.input_shape:
        shape = _shape(args.input_shape)
    elif loaded.input_shape is not None:
        shape = loaded.input_shape
    else:
        raise UsageError(f"model {args.model!r}: give --input-shape (e.g. 1,3,224,224); a model.py builder does "
                         "not say its input")
    return loaded, shape


def _preprocess(args, loaded, shape):
    """The image preprocessing for --calib FOLDER: --size/--mean/--std when given, else the model's own
    (timm's data config at the input size, a transformers image processor, torchvision's weights transforms),
    else a resize to the input shape with ImageNet's mean and std."""
    if len(shape) != 4:
        return None
    if args.size is None and args.mean is None and args.std is None:
        if loaded.kind == "timm":  # timm's transform at the chosen input size, not only its default one
            return timm_preprocess(loaded.model, shape)
        if loaded.preprocess is not None:
            return loaded.preprocess
    return default_preprocess(args.size or shape[-1], _floats(args.mean, IMAGENET_MEAN, "--mean"),
                              _floats(args.std, IMAGENET_STD, "--std"))


def _floats(text, default, flag) -> tuple:
    if text is None:
        return default
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers such as 0.485,0.456,0.406")


def cmd_quantize(args) -> int:
    loaded, shape = _model_and_shape(args)
    model = loaded.model
    _say(args, f"model: {loaded.source}; input {tuple(shape)}")
    calib = calibration_batches(args.calib, shape, args.calib_batches, loaded=loaded,
                                preprocess=_preprocess(args, loaded, shape) if args.calib != "random" else None)
    example = torch.zeros(shape, dtype=loaded.input_dtype)
    pipeline = quantfx.parse_pipeline(args.pipeline, target=args.target) if args.pipeline else None
    target = args.target
    if args.engine:
        if target != "torch":
            raise UsageError(f"--engine is for --target torch, not {target}")
        target = torch_profile(args.engine)
    qmodel = quantfx.quantize(
        model, target, example_inputs=(example,), calibration_data=calib,
        weight_bit_width=args.weight_bit_width, act_bit_width=args.act_bit_width,
        bias_bit_width=args.bias_bit_width, cpu=args.cpu, pipeline=pipeline, calibration_method=args.calib_method,
        weight_rounding=args.weight_rounding, capture=args.capture, budget=args.budget,
        progress=not args.quiet, dump_dir=args.dump_dir)
    if qmodel.notes.get("capture"):
        _say(args, capture_line(qmodel.notes["capture"]))
    if args.save:
        torch.save(qmodel, args.save)
        _say(args, f"saved quantized model to {args.save}")
    if args.output:
        if args.format and args.target != "torch":
            raise UsageError(f"--format is for --target torch, not {args.target}")
        quantfx.export(qmodel, args.output, example_inputs=(example,), format=args.format)
        _say(args, f"wrote {args.target} artefact to {args.output}")
        report = quantfx.verify(qmodel, args.output, (calib[0],))
        _say(args, str(report))
        if not report.ok:
            return EXIT_ERROR
    if args.draw:
        quantfx.draw(qmodel, args.draw)
        _say(args, f"wrote diagram to {args.draw}")
    if not args.quiet:
        quantfx.inspect(qmodel)
    return EXIT_OK


def cmd_verify(args) -> int:
    qmodel = _load_qmodel(args.qmodel)
    shape = _shape(args.input_shape)
    inputs = calibration_batches(args.inputs, shape, 1, seed=1)[0]
    report = quantfx.verify(qmodel, args.artefact, (inputs,), tolerance_lsb=args.tolerance)
    print(report)
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_draw(args) -> int:
    if args.model.endswith((".pt", ".pth")):
        gm = _load_qmodel(args.model)
    else:
        gm = get_pass("trace")()(load_model(args.model).model).graph_module
    quantfx.draw(gm, args.output)
    _say(args, f"wrote diagram to {args.output}")
    return EXIT_OK


def _torch_artefact(path: str) -> bool:
    """Whether ``path`` is a torch artefact quantfx wrote (.pt2 or TorchScript: an archive holding its
    quantfx.json), as opposed to a quantized model saved with ``torch.save``."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/quantfx.json") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def cmd_inspect(args) -> int:
    if args.path.endswith(".onnx"):
        print(inspect_onnx(args.path))
    elif _torch_artefact(args.path):  # how each node of the program runs
        quantfx.inspect(BACKENDS["torch"].load(args.path))
    else:
        quantfx.inspect(_load_qmodel(args.path))
    return EXIT_OK


def inspect_onnx(path: str) -> str:
    """A per-quantizer table of an exported ONNX / QONNX model: node, op, bits, signed, scale."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{path}: no such file")
    model = onnx.load(str(file))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    rows = [("node", "op", "bits", "signed", "scale")]
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "Quant", "BipolarQuant", "Trunc", "DequantizeLinear"):
            scale = inits.get(n.input[1]) if len(n.input) > 1 else None
            s = "-" if scale is None else (f"{float(scale):.4g}" if scale.size == 1 else f"[{scale.size}]")
            bits, signed = "-", "-"
            if n.op_type == "Quant":
                bits = str(int(inits[n.input[3]])) if n.input[3] in inits else "?"
                signed = str(next((a.i for a in n.attribute if a.name == "signed"), 1) == 1)
            elif n.op_type == "BipolarQuant":
                bits, signed = "1", "True"
            elif n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
                dt = inits[n.input[2]].dtype
                bits, signed = str(dt.itemsize * 8), str(np.issubdtype(dt, np.signedinteger))
            rows.append((n.name, n.op_type, bits, signed, s))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    report = next((p.value for p in model.metadata_props if p.key == "quantfx.dpu.report"), None)
    if report is not None:  # a dpu file: every node on the DPU or the CPU, and the refine pass's changes
        text += "\n\n" + DpuReport.from_json(report).table()
    return text


def cmd_passes(args) -> int:
    print("passes:")
    for name, cls in PASSES.items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"  {name:20s} {doc}")
    print("\ndefault pipelines:")
    for t in available_targets():
        print(f"  {t:6s} {quantfx.pipeline_for(t).spell()}")
        print(f"         {get_profile(t).description}")
    return EXIT_OK


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text)


MODEL_HELP = ("path/to/model.py:build_fn (build_fn() returns the float nn.Module), timm:NAME, torchvision:NAME "
              "(random weights unless the local cache holds pretrained ones) or transformers:PATH (a local config.json "
              "or model folder)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantfx", description="Quantization compiler for PyTorch over torch.fx.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and export its artefact")
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--target", default="finn", help="finn | torch | onnx | dpu")
    q.add_argument("--input-shape", help="e.g. 1,3,32,32 (default: the model's own, for timm, torchvision and "
                                         "transformers specs)")
    q.add_argument("--weights", help="a state_dict file (torch.save) to load into the model")
    q.add_argument("--calib", default="random",
                   help="random | data.npz | folder of .npy | folder of images (default random)")
    q.add_argument("--size", type=int, help="images: resize and centre-crop to this (default: the model's own "
                                            "preprocessing where timm, torchvision or transformers define it)")
    q.add_argument("--mean", help="images: per-channel mean, e.g. 0.485,0.456,0.406 (with --size)")
    q.add_argument("--std", help="images: per-channel std, e.g. 0.229,0.224,0.225 (with --size)")
    q.add_argument("--calib-batches", type=int, default=8)
    q.add_argument("--calib-method", default="auto", choices=["auto", "minmax", "percentile", "mse"],
                   help="activation scales (auto: mse at 4 bits or fewer, minmax above)")
    q.add_argument("--weight-rounding", default="auto", choices=["auto", "nearest", "learned", "gptq"],
                   help="weight integers (auto: learned on the calibration data at 4 bits or fewer; gptq: GPTQ)")
    q.add_argument("--weight-bit-width", type=int)
    q.add_argument("--budget", help="mixed precision under a cost budget, e.g. bops=0.25 or "
                                    "finn_luts=50000,weight_bytes=20000 (<= 1: a fraction of the 8-bit model's cost)")
    q.add_argument("--act-bit-width", type=int)
    q.add_argument("--bias-bit-width", type=int)
    q.add_argument("--engine", choices=["x86", "fbgemm", "qnnpack", "onednn"], default=None,
                   help="torch target: PyTorch's quantized engine (default x86: oneDNN on VNNI CPUs, fbgemm "
                        "elsewhere, the same integers on every x86 CPU)")
    q.add_argument("--cpu", choices=["any", "vnni"],
                   help="onnx/torch: 'any' (default) is exact on every CPU; 'vnni' allows 8-bit weights, for "
                        "deployments on AVX512-VNNI/AVX-VNNI x86 or ARM only")
    q.add_argument("--capture", default="auto", choices=["auto", "fx", "export"],
                   help="how the model is captured: torch.fx symbolic tracing, torch.export, or auto (fx, export "
                        "where fx fails; docs/capture.md)")
    q.add_argument("--pipeline", help="pass pipeline spelled as a string (see `quantfx passes`)")
    q.add_argument("-o", "--output", help="artefact path (e.g. out.onnx, out.pt2)")
    q.add_argument("--format", choices=["pt2", "torchscript"], default=None,
                   help="torch target: pt2 (default, a torch.export program) or torchscript (older PyTorch)")
    q.add_argument("--save", help="also save the quantized model (torch.save) for verify/inspect/draw")
    q.add_argument("--draw", help="write a diagram of the quantized graph (.svg/.png/.pdf/.dot)")
    q.add_argument("--dump-dir", help="write the graph after every pass here")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)

    v = sub.add_parser("verify", help="run an artefact in its runtime and compare with the quantized model")
    v.add_argument("qmodel", help="a quantized model saved with `quantfx quantize --save`")
    v.add_argument("artefact")
    v.add_argument("--input-shape", required=True)
    v.add_argument("--inputs", default="random", help="random | data.npz | folder of .npy")
    v.add_argument("--tolerance", type=float, default=1.0, help="in LSBs")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("draw", help="draw a model (model.py:build_fn) or a saved quantized model (.pt)")
    d.add_argument("model", help=MODEL_HELP + ", or a saved quantized model (.pt)")
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_draw)

    i = sub.add_parser("inspect", help="per-layer table of a saved quantized model (.pt) or an exported .onnx")
    i.add_argument("path")
    i.set_defaults(func=cmd_inspect)

    ps = sub.add_parser("passes", help="list passes and the default pipeline of each target")
    ps.set_defaults(func=cmd_passes)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad arguments
    try:
        return args.func(args)
    except (UsageError, ModelSpecError) as e:
        print(f"quantfx {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except QuantFXError as e:
        print(f"quantfx {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
