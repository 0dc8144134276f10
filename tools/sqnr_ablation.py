"""Where a model's 8-bit SQNR goes, beside torchao's PT2E anchor (issue 27): one JSON line per model.

    python tools/sqnr_ablation.py --models resnet10t mobilenetv2_035 --targets onnx onnx@vnni torch dpu

The model, its calibration batches and its held-out batch are tools/coverage.py's own (build, inputs: batch 2,
two N(0, 1) calibration batches, seed 1000 held out), so the figures sit beside the coverage table. Per model:
PT2E's SQNR (X86InductorQuantizer, HistogramObserver activations; benchmark-only, tools/baselines.py) and the
count of its quantize/dequantize nodes; per quantfx target (``TARGET@CPU`` passes ``cpu=``) the SQNR at each
``calibration_method``, the number of distinct quantizers of each kind, and an ablation of the 'auto' model:
only one kind of quantizer (act / weight / bias) quantizing, the others passing their float input on with their
scale; and the activation quantizers that cost the most alone (each the only one quantizing). The ablations run
the plain float fake quantization (``exact_arithmetic(False)``: equal to the exact model but for rounding ties,
within 0.3 dB on these models), so their 'auto' figure may part from coverage.py's by that much.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import coverage  # noqa: E402  (tools/coverage.py: the builders and inputs of the table)

METHODS = ("auto", "percentile", "mse")


def setup(model_id: str):
    model, shape, dtype = coverage.build(model_id, coverage.SMALL_INPUT)
    calib = [coverage.inputs(shape, dtype, seed) for seed in range(2)]
    x = coverage.inputs(shape, dtype, 1000)
    coverage._reinit_head_if_zero(model, x)
    with torch.no_grad():
        ref = model(x)
    return model, calib, x, ref


def _float_through(q):
    """Make quantizer ``q`` pass its input on unrounded (keeping its scale for the layers that read it);
    returns the method to put back."""
    orig = q.quantize

    def through(x, *args, **kwargs):
        _, scale, zero_point = orig(x, *args, **kwargs)
        return x, scale, zero_point
    q.quantize = through
    return orig


def _sqnr(qmodel, x, ref) -> float:
    import quantfx
    from quantfx.nn.base import exact_arithmetic
    with torch.no_grad(), exact_arithmetic(False):
        return quantfx.sqnr(ref, qmodel(x))


def ablation(qmodel, x, ref) -> dict:
    from quantfx.calibration import quantizers
    kinds: dict = {}
    for q in quantizers(qmodel):
        kinds.setdefault(q.kind, []).append(q)
    out = {"quantizers": {k: len(v) for k, v in kinds.items()}}
    for kind in kinds:
        saved = [(q, _float_through(q)) for k, qs in kinds.items() if k != kind for q in qs]
        out[f"only_{kind}"] = _sqnr(qmodel, x, ref)
        for q, orig in saved:
            q.quantize = orig
    saved = {id(q): (q, _float_through(q)) for qs in kinds.values() for q in qs}
    alone = []
    for q in kinds.get("act", []):
        q.quantize = saved[id(q)][1]
        alone.append((round(_sqnr(qmodel, x, ref), 1), q.qname))
        _float_through(q)
    for q, orig in saved.values():
        q.quantize = orig
    out["act_alone_worst"] = sorted(alone)[:6]
    return out


def run(model_id: str, targets) -> dict:
    import quantfx
    import baselines
    model, calib, x, ref = setup(model_id)
    out = {"model": model_id}
    pt2e = baselines.pt2e_ptq(model, calib)
    with torch.no_grad():
        out["pt2e"] = quantfx.sqnr(ref, pt2e(x))
    out["pt2e_nodes"] = dict(Counter(str(n.target).split(".")[-2] for n in pt2e.graph.nodes
                                     if n.op == "call_function" and "quantize" in str(n.target)))
    for spec in targets:
        target, _, cpu = spec.partition("@")
        for method in METHODS:
            try:
                q = quantfx.quantize(model, target, example_inputs=(calib[0],), calibration_data=calib,
                                     progress=False, calibration_method=method, **({"cpu": cpu} if cpu else {}))
            except quantfx.QuantFXError as e:
                out[f"{spec}/{method}"] = f"refused: {type(e).__name__}: {str(e)[:200]}"
                continue
            out[f"{spec}/{method}"] = _sqnr(q, x, ref)
            if method == "auto":
                out[f"{spec}/ablation"] = ablation(q, x, ref)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="timm names (or coverage.py model ids)")
    p.add_argument("--targets", nargs="+", default=["onnx", "onnx@vnni", "torch", "dpu"])
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for m in args.models:
        print(json.dumps(run(m if ":" in m else f"timm:{m}", args.targets)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
