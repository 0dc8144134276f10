"""Quantize, export and verify timm and torchvision models (random weights) on every target and print, per
model and target, the outcome: SQNR against float, the verified max error in LSB, or the error and the stage
it happened at (a raw exception, not a QuantFXError, is marked RAW). The models are the failure classes of
issue 27 (zero-initialised residual branches, ViT calibration, missing lowerings, stochastic depth).

    python tools/probe_timm.py                         # all models, all targets
    python tools/probe_timm.py resnet18 --targets onnx torch
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

# name -> (builder spec, input side): small inputs where the model allows
MODELS = {
    "resnet18": ("timm", {}, 64),
    "resnet50": ("timm", {}, 64),
    "regnetx_002": ("timm", {}, 64),
    "regnety_002": ("timm", {}, 64),
    "vit_tiny_patch16_224": ("timm", {"img_size": 64}, 64),
    "deit_tiny_patch16_224": ("timm", {"img_size": 64}, 64),
    "swin_tiny_patch4_window7_224": ("timm", {"img_size": 64, "window_size": 4}, 64),
    "levit_128s": ("timm", {"img_size": 64}, 64),
    "efficientformer_l1": ("timm", {"img_size": 64}, 64),
    "hrnet_w18_small": ("timm", {}, 64),
    "edgenext_xx_small": ("timm", {}, 64),
    "tv_efficientnet_b0": ("torchvision", {}, 64),
    "tv_convnext_tiny": ("torchvision", {}, 64),
}


def build(name):
    import torch
    source, kwargs, side = MODELS[name]
    torch.manual_seed(0)
    if source == "timm":
        import timm
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        import torchvision
        model = getattr(torchvision.models, name.removeprefix("tv_"))(weights=None, **kwargs)
    return model.eval(), side


def probe(name: str, target: str, batches: int = 3, batch: int = 2) -> str:
    import torch
    import quantfx
    model, side = build(name)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(batch, 3, side, side, generator=gen) for _ in range(batches)]
    test = torch.randn(batch, 3, side, side, generator=gen)
    stage = "quantize"
    try:
        q = quantfx.quantize(model, target, calibration_data=data, progress=False)
        with torch.no_grad():
            db = quantfx.sqnr(model(test), q(test))
        stage = "export"
        with tempfile.TemporaryDirectory() as tmp:
            path = quantfx.export(q, Path(tmp) / f"{name}.{target}", (test[:1],))
            stage = "verify"
            report = quantfx.verify(q, path, test)
        return f"{name:30s} {target:5s} ok: SQNR {db:5.1f} dB, max error {report.max_error_lsb:.3f} LSB"
    except quantfx.QuantFXError as e:
        return f"{name:30s} {target:5s} {type(e).__name__} at {stage}: {str(e)[:300]}"
    except Exception as e:  # noqa: BLE001  (a raw exception is what this probe reports)
        return f"{name:30s} {target:5s} RAW {type(e).__name__} at {stage}: {str(e)[:300]}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="model", help=f"default: all of {', '.join(MODELS)}")
    parser.add_argument("--targets", nargs="+", default=["onnx", "torch", "finn", "dpu"])
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.models or MODELS:
            for target in args.targets:
                print(probe(name, target), flush=True)


if __name__ == "__main__":
    main()
