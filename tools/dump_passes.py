"""Quantize a model and write its graph (text and diagram) after every pass, to see what each pass changed.

    python tools/dump_passes.py path/to/model.py:build_fn --input-shape 1,3,32,32 [--target finn] [-o dumps/]
    python tools/dump_passes.py zoo:resnet --target onnx -o dumps/resnet

``zoo:NAME`` takes a model from quantfx.zoo.TEST_MODELS (its input shape is known).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import quantfx
from quantfx.cli import _shape
from quantfx.model_specs import load_builder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="path/to/model.py:build_fn or zoo:NAME")
    parser.add_argument("--input-shape", help="e.g. 1,3,32,32 (not needed for zoo:NAME)")
    parser.add_argument("--target", default="finn")
    parser.add_argument("-o", "--out", default="dumps")
    args = parser.parse_args(argv)
    if args.model.startswith("zoo:"):
        from quantfx.zoo import TEST_MODELS
        ctor, shape = TEST_MODELS[args.model[4:]]
        model = ctor().eval()
        shape = _shape(args.input_shape) if args.input_shape else shape
    else:
        if not args.input_shape:
            parser.error("--input-shape is required for a model file")
        model, shape = load_builder(args.model), _shape(args.input_shape)
    out = Path(args.out)
    qmodel = quantfx.quantize(model, args.target, calibration_data=[torch.randn(shape)], dump_dir=out,
                              progress=False)
    for record in qmodel.pass_timings:
        print(f"{record.name:22s} {record.seconds * 1000:8.1f} ms  {'modified' if record.modified else 'unchanged'}")
    files = sorted(out.iterdir())
    print(f"wrote {len(files)} files to {out}/ (one .txt and one .svg per pass)")
    return files


if __name__ == "__main__":
    main()
