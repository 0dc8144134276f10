"""Benchmark the onnx (QDQ) target: onnxruntime latency of the int8 artefact against the float model and
against onnxruntime.quantization.quantize_static on the same float model; export time.

    python tools/bench_onnx.py [--model resnet18_like] [--runs 30] [--threads 1]

Prints a table; the figures in BENCHMARKS.md come from this script. onnxruntime's quantizer is used here
only as the point of comparison.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import quantfx
from quantfx import zoo
from quantfx.targets.onnx_base import OnnxLowering
from quantfx.targets.onnx_qdq import ort_session


def float_onnx(model, x) -> onnx.ModelProto:
    """The float model (BatchNorm folded) lowered with quantfx's ONNX walk, no quantizers."""
    from quantfx.passes import Canonicalize, FuseConvBN, Trace
    gm = Trace()(model).graph_module
    gm = Canonicalize()(gm).graph_module
    gm = FuseConvBN()(gm).graph_module
    gm.recompile()
    return OnnxLowering(gm, (x,)).lower()


def latencies_ms(models: dict, x: np.ndarray, runs: int, threads: int, rounds: int = 20) -> dict:
    """Median latency of each model. The sessions take turns (``rounds`` rounds of runs/rounds timed calls
    each), so a change in machine speed during the measurement hits every model alike; each turn starts with
    one untimed call, so no timed call pays for the cache the other session left behind."""
    sessions = {name: ort_session(m, threads=threads) for name, m in models.items()}
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    times = {name: [] for name in sessions}
    for name, sess in sessions.items():
        for _ in range(5):
            sess.run(None, feeds[name])
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, sess in sessions.items():
            sess.run(None, feeds[name])
            for _ in range(per_round):
                t = time.perf_counter()
                sess.run(None, feeds[name])
                times[name].append((time.perf_counter() - t) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ort_static(float_model: onnx.ModelProto, calib: list, workdir: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{float_model.graph.input[0].name: c} for c in calib])

        def get_next(self):
            return next(self.it, None)

    src, pre, dst = workdir / "float.onnx", workdir / "pre.onnx", workdir / "ort_int8.onnx"
    onnx.save(float_model, str(src))
    quant_pre_process(str(src), str(pre))
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(dst))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_like", help="a quantfx.zoo constructor name")
    parser.add_argument("--size", type=int, default=224, help="input height/width")
    parser.add_argument("--runs", type=int, default=60, help="timed runs per model, in 5 interleaved rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib", type=int, default=8, help="calibration batches (batch 1)")
    parser.add_argument("--no-ort-quantizer", action="store_true", help="skip onnxruntime's quantize_static")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = getattr(zoo, args.model)().eval()
    x = torch.randn(1, 3, args.size, args.size)
    calib = [torch.randn(1, 3, args.size, args.size) for _ in range(args.calib)]

    t = time.perf_counter()
    qmodel = quantfx.quantize(model, "onnx", calibration_data=calib, progress=False)
    t_quantize = time.perf_counter() - t
    t = time.perf_counter()
    int8 = quantfx.lower(qmodel, (x,))
    t_export = time.perf_counter() - t
    f32 = float_onnx(model, x)
    xn = x.numpy()
    models = {"float (quantfx lowering)": f32, "int8 quantfx QDQ": int8}
    if not args.no_ort_quantizer:
        with tempfile.TemporaryDirectory() as d:
            models["int8 onnxruntime quantize_static"] = ort_static(f32, [c.numpy() for c in calib], Path(d))
    rows = list(latencies_ms(models, xn, args.runs, args.threads).items())
    report = quantfx.verify(qmodel, int8, (x,))

    t50 = {}
    if args.model != "resnet50_like":
        m50 = zoo.resnet50_like().eval()
        x50 = torch.randn(1, 3, 224, 224)
        for target in ("onnx", "finn"):
            q50 = quantfx.quantize(m50, target, calibration_data=[x50], progress=False)
            quantfx.lower(q50, (x50,))  # warm up imports
            times = []
            for _ in range(3):
                t = time.perf_counter()
                quantfx.lower(q50, (x50,))
                times.append(time.perf_counter() - t)
            t50[target] = min(times)

    ort_version = __import__("onnxruntime").__version__
    print(f"model {args.model}, input 1x3x{args.size}x{args.size}, onnxruntime {ort_version}, "
          f"{args.threads} thread(s), median of {args.runs} runs")
    base = rows[0][1]
    for name, ms in rows:
        print(f"  {name:34s} {ms:8.2f} ms   {base / ms:5.2f}x vs float")
    print(f"  quantize (incl. calibration of {args.calib} batches): {t_quantize:.2f} s; "
          f"lower to ONNX: {t_export:.3f} s")
    print(f"  verify: max error {report.max_error_lsb:.3f} LSB ({'ok' if report.ok else 'FAILED'})")
    for target, t in t50.items():
        print(f"  lower resnet50_like for {target}: {t:.3f} s")


if __name__ == "__main__":
    main()
