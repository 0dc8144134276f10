"""SHA-256 of every artefact quantfx writes for the test models, to check that a refactoring changes no byte.

    python tools/artefact_digests.py > before.txt      # on the old code
    python tools/artefact_digests.py | diff before.txt -

Each test model (zoo.TEST_MODELS) is quantized for every target with a backend, in the default profile and in
variants that take other lowering paths (onnx cpu='vnni'; finn 4-bit weights and activations; finn with a float
bias; torch's TorchScript form beside its default .pt2 program), calibrated on fixed inputs, lowered, and the
serialized file hashed (the torch forms: their fingerprint(), the program's code and every constant).
"""
from __future__ import annotations

import argparse
import hashlib

import torch

import quantfx
import quantfx.targets  # noqa: F401  (registers the backends)
from quantfx.export import BACKENDS
from quantfx.zoo import TEST_MODELS, example_input

VARIANTS = {
    "onnx": {"default": {}, "vnni": dict(cpu="vnni")},
    "finn": {"default": {}, "w4a4": dict(weight_bit_width=4, act_bit_width=4),
             "float_bias": dict(bias_scaling="float")},
    "torch": {"default": {}, "torchscript": dict(format="torchscript")},
}


def digests(models=None):
    for name in sorted(models or TEST_MODELS):
        for target in sorted(BACKENDS):
            for variant, options in VARIANTS.get(target, {"default": {}}).items():
                torch.manual_seed(0)
                model = TEST_MODELS[name][0]().eval()
                data = [example_input(name, batch=2, seed=i) for i in range(2)]
                options = dict(options)
                form = options.pop("format", None)
                q = quantfx.quantize(model, target, calibration_data=data, progress=False, **options)
                art = quantfx.lower(q, (data[0][:1],), format=form)
                blob = art.SerializeToString(deterministic=True) if hasattr(art, "SerializeToString") else \
                    art.fingerprint() if hasattr(art, "fingerprint") else repr(art).encode()
                yield name, target, variant, hashlib.sha256(blob).hexdigest()[:16]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="test model names (default: all)")
    args = parser.parse_args(argv)
    for row in digests(args.models):
        print(" ".join(row), flush=True)


if __name__ == "__main__":
    main()
