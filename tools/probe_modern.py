"""Quantize, lower and verify the modern-block models of tests/modern_models.py (issue 16) on every target and
print, per model and target, the outcome: the verified max error and the SQNR against float, or the error.

    python tools/probe_modern.py                  # all models, all targets
    python tools/probe_modern.py vit_sdpa --targets onnx torch
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MODELS = ("mbconv", "convnext", "vit_matmul", "vit_sdpa", "activations")


def build(name):
    import modern_models as mm
    return {"mbconv": mm.MBConv, "convnext": mm.ConvNeXtBlock, "vit_matmul": lambda: mm.ViTBlock(attention="matmul"),
            "vit_sdpa": lambda: mm.ViTBlock(attention="sdpa"), "activations": mm.Activations}[name]()


def probe(name: str, target: str, seed: int = 0) -> str:
    import torch
    import quantfx
    from modern_models import calibration
    torch.manual_seed(seed)
    model = build(name).eval()
    data = calibration(shape=(4, 3, 8, 8) if name == "activations" else (4, 3, 16, 16), seed=seed)
    stage = "quantize"
    try:
        q = quantfx.quantize(model, target, calibration_data=data, progress=False)
        stage = "lower"
        artefact = quantfx.lower(q, (data[0][:1],))
        stage = "verify"
        report = quantfx.verify(q, artefact, data[1])
        with torch.no_grad():
            db = quantfx.sqnr(model(data[1]), q(data[1]))
        return f"{name:11s} {target:5s} ok: max error {report.max_error_lsb:.3f} LSB, SQNR {db:.1f} dB"
    except quantfx.QuantFXError as e:
        return f"{name:11s} {target:5s} {type(e).__name__} at {stage}: {e}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # checked below: argparse (3.11) checks a nargs='*' positional's default, even [], against choices as one value
    parser.add_argument("models", nargs="*", metavar="model",
                        help=f"models to probe (default: all of {', '.join(MODELS)})")
    parser.add_argument("--targets", nargs="+", default=["finn", "onnx", "torch", "dpu"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.models or list(MODELS):
            for target in args.targets:
                lines.append(probe(name, target, args.seed))
                print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
