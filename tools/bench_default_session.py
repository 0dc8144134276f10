"""SQNR against float of every test-zoo model's artefacts in onnxruntime's default session (what
``onnxruntime.InferenceSession(path)`` runs: ORT_ENABLE_ALL) and with every graph optimization off, beside the
quantized model's own, for the dpu file, its fast form and the onnx target's file (issue 28).

    python tools/bench_default_session.py [model ...] [--targets dpu fast onnx]

Run with PYTHONPATH (and the editable install's mapping) on another tree for its "before" figures.
"""
from __future__ import annotations

import argparse

import onnxruntime as ort
import torch

import quantfx
from quantfx.targets import dpu
from quantfx.targets.onnx_base import feed
from quantfx.zoo import TEST_MODELS, example_input


TARGETS = {"dpu": "dpu file", "fast": "dpu fast form", "onnx": "onnx file"}


def run(model, x, level=None):
    opts = ort.SessionOptions()
    if level is not None:
        opts.graph_optimization_level = level
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, feed(model.graph.input, (x,)))[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="test model names (default: all)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    args = parser.parse_args(argv)
    print(f"onnxruntime {ort.__version__}; SQNR against float, dB: model / default session / no optimization")
    print("| model | " + " | ".join(TARGETS[t] for t in args.targets) + " |")
    print("|---" * (len(args.targets) + 1) + "|")
    for name in args.models or sorted(TEST_MODELS):
        torch.manual_seed(0)
        model = TEST_MODELS[name][0]().eval()
        data = [example_input(name, batch=2, seed=i) for i in range(3)]
        x = example_input(name, batch=2, seed=123)
        with torch.no_grad():
            ref = model(x)
        compiled, cells = {}, []
        for target in args.targets:
            kind = "dpu" if target == "fast" else target
            if kind not in compiled:
                compiled[kind] = quantfx.quantize(model, kind, calibration_data=data, progress=False)
            q = compiled[kind]
            art = dpu.fast_form(q, (x[:1],)) if target == "fast" else quantfx.lower(q, (x[:1],))
            with torch.no_grad():
                own = quantfx.sqnr(ref, q(x))
            cells.append(f"{own:.1f} / {quantfx.sqnr(ref, run(art, x)):.1f} / "
                         f"{quantfx.sqnr(ref, run(art, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
