"""Side by side: the ways to keep onnxruntime's u8 x s8 kernels from saturating their int16 pair sums on x86 CPUs
without VNNI (quantfx.targets.int16_pairs), measured on this machine.

    python tools/compare_int16_schemes.py [--runs 60] [--size 224] [--skip-latency]

Schemes (all uint8 activations with a zero point, int8 per-channel weights, int32 bias):
  w8a8      8-bit weights, 8-bit activations: exact only on VNNI x86 and ARM (cpu='vnni')
  w7a8      7-bit weights (|w| <= 63), 8-bit activations: 255 x (63 + 63) = 32130 <= 32767
  w8a7      8-bit weights, 7-bit activations and input (codes <= 127): 127 x (127 + 127) = 32258
  u8u8      w8a8 with the weights stored as uint8 (zero point 128): u8 x u8 kernels widen before multiplying

For each: SQNR of the fake-quant model against the float model on every test model (dB, the same calibration
and held-out inputs for all), accuracy of a CNN trained on scikit-learn's digits as onnxruntime runs the
artefact and its max error against the fake-quant model there (on this CPU), how many integer layers of the
artefacts can saturate (the rule of int16_pairs, read off the files), and onnxruntime latency of a
ResNet-18-shaped model (batch 1, one thread, sessions taking turns).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import quantfx
from quantfx.targets.int16_pairs import cpu_has_int32_dot, integer_layers, pair_risks
from quantfx.targets.onnx_qdq import run_onnx
from quantfx.zoo import TEST_MODELS, example_input, resnet18_like

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = {
    "w8a8": dict(cpu="vnni", weight_bit_width=8),
    "w7a8": dict(weight_bit_width=7),
    "w8a7": dict(weight_bit_width=8, act_bit_width=7, input_bit_width=7),
    "u8u8": dict(cpu="vnni", weight_bit_width=8),
}


def as_u8u8(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same file with every int8 weight initializer of a DequantizeLinear stored as uint8 + 128, zero point
    128: the same values, run by onnxruntime's u8 x u8 kernels."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or len(node.input) < 3:
            continue
        w, z = inits[node.input[0]], inits.get(node.input[2])
        if w.data_type != onnx.TensorProto.INT8 or z is None or w.dims == []:
            continue
        wv = numpy_helper.to_array(w).astype(np.int16) + 128
        zv = numpy_helper.to_array(z).astype(np.int16) + 128
        w.CopyFrom(numpy_helper.from_array(wv.astype(np.uint8), w.name))
        z.CopyFrom(numpy_helper.from_array(zv.astype(np.uint8), z.name))
    return out


def quantize(model, calib, scheme):
    return quantfx.quantize(model, "onnx", calibration_data=calib, progress=False, **SCHEMES[scheme])


def lowered(q, x, scheme):
    art = quantfx.lower(q, (x,))
    return as_u8u8(art) if scheme == "u8u8" else art


def zoo_sqnr() -> dict:
    table = {}
    for name, (ctor, _) in TEST_MODELS.items():
        torch.manual_seed(0)
        model = ctor().eval()
        calib = [example_input(name, batch=4, seed=i) for i in range(4)]
        x = example_input(name, batch=8, seed=99)
        with torch.no_grad():
            ref = model(x)
        for scheme in SCHEMES:
            q = quantize(model, calib, scheme)
            with torch.no_grad():
                s = quantfx.sqnr(ref, q(x))
            art = lowered(q, x[:1], scheme)
            table[(name, scheme)] = (s, sum(not r.safe for r in pair_risks(art)),
                                     len(integer_layers(art, signed_weights_only=False)))
    return table


def digits_accuracy() -> dict:
    sys.path.insert(0, str(ROOT / "examples"))
    from quickstart import DigitsNet, accuracy, load_digits, train
    x_train, y_train, x_test, y_test = load_digits()
    torch.manual_seed(0)
    model = train(DigitsNet(), x_train, y_train, 15)
    calib = [x_train[i:i + 64] for i in range(0, 512, 64)]
    with torch.no_grad():
        out = {"float": (accuracy(model(x_test), y_test), None)}
    for scheme in SCHEMES:
        q = quantize(model, calib, scheme)
        art = lowered(q, x_test[:1], scheme)
        with torch.no_grad():
            fq = accuracy(q(x_test), y_test)
        lsb = quantfx.verify(q, art, (x_test,)).max_error_lsb
        out[scheme] = (fq, accuracy(run_onnx(art, (x_test,))[0], y_test), lsb)
    return out


def latency(runs: int, size: int) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_onnx import float_onnx, latencies_ms
    torch.manual_seed(0)
    model = resnet18_like().eval()
    x = torch.randn(1, 3, size, size)
    calib = [torch.randn(1, 3, size, size) for _ in range(8)]
    models = {"float": float_onnx(model, x)}
    for scheme in SCHEMES:
        models[scheme] = lowered(quantize(model, calib, scheme), x, scheme)
    return latencies_ms(models, x.numpy(), runs, threads=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import onnxruntime
    dot = cpu_has_int32_dot()
    print(f"onnxruntime {onnxruntime.__version__}; this CPU "
          f"{'multiplies 8-bit integers into int32 (VNNI or ARM)' if dot else 'has no VNNI (int16 pair sums)'}")
    schemes = list(SCHEMES)
    table = zoo_sqnr()
    print("\nSQNR of the fake-quant model vs float (dB); [layers that can saturate / integer layers]")
    print(f"{'model':12s} " + " ".join(f"{s:>14s}" for s in schemes))
    for name in TEST_MODELS:
        cells = [f"{table[(name, s)][0]:6.2f} [{table[(name, s)][1]:2d}/{table[(name, s)][2]:2d}]" for s in schemes]
        print(f"{name:12s} " + " ".join(f"{c:>14s}" for c in cells))
    mean = {s: np.mean([table[(n, s)][0] for n in TEST_MODELS]) for s in schemes}
    print(f"{'mean':12s} " + " ".join(f"{mean[s]:14.2f}" for s in schemes))

    acc = digits_accuracy()
    print(f"\ndigits accuracy (%): float {acc['float'][0]:.2f}")
    for s in schemes:
        print(f"  {s}: fake-quant {acc[s][0]:.2f}, onnxruntime {acc[s][1]:.2f} (max error {acc[s][2]:.0f} LSB)")

    if not args.skip_latency:
        ms = latency(args.runs, args.size)
        print(f"\nResNet-18 shape 1x3x{args.size}x{args.size}, one thread, median of {args.runs} runs:")
        for name, t in ms.items():
            print(f"  {name:6s} {t:8.2f} ms   {ms['float'] / t:5.2f}x vs float")


if __name__ == "__main__":
    main()
