"""Mixed precision against uniform widths at the same cost (issue 30): a Pareto table per model.

    python tools/bench_mixed.py [--tasks digits,digits_res] [--uniform 8/8,4/4,3/3,2/2] [--keys bops,finn_luts]
                                [--zoo [--zoo-models lenet,...]] [--rounding gptq] [--threads N]
    python tools/bench_mixed.py --sensitivity [--tasks ...]    (measured against Hessian-trace sensitivity)

For each digits model (tools/bench_ptq.py trains them: scikit-learn's digits, 8x8 images; DigitsNet 15 epochs,
DigitsResNet 20 epochs; calibration: the first 512 training images in batches of 64; accuracy on the 360
held-out test images) and each uniform width WxAx: the uniform finn model's accuracy and cost, then the mixed
precision model with ``budget={key: that cost}`` (absolute, so it may spend no more than the uniform model does),
for each budget key. Every row uses the same weight rounding (``--rounding``, GPTQ by default) and the default
calibration, so the rows differ in widths only. The mixed rows are exported, reloaded and run in qonnx; the
verify column is the largest error against the fake-quant model in LSBs on 64 test images. With ``--zoo``: the
output SQNR (dB) against float of test-zoo models, uniform against mixed at the same BOPs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

import quantfx  # noqa: E402
from quantfx.mixed_precision import model_cost  # noqa: E402
from quantfx.zoo import TEST_MODELS  # noqa: E402

import bench_ptq  # noqa: E402
import quickstart  # noqa: E402


def widths_text(q) -> str:
    """'W8,4,4,8 A8,4,3,8': weight widths of the layers, then their input activation widths, in graph order."""
    rows = [r for r in quantfx.layer_table(q) if r["weight_bits"] is not None]
    return "W" + ",".join(str(r["weight_bits"]) for r in rows) + " A" + ",".join(str(r["act_bits"]) for r in rows)


def digits_table(tasks, uniform, keys, rounding, out_dir) -> None:
    for task in tasks:
        model, calib, x_test, y_test = bench_ptq.trained(task)
        with torch.no_grad():
            float_acc = quickstart.accuracy(model(x_test), y_test)
        print(f"\n{task}: float {float_acc:.2f}%  (finn, weight rounding {rounding}; cost as a fraction of W8A8)")
        print(f"{'model':22s} {'key':10s} {'cost':>7s} {'acc %':>7s} {'vs float':>8s} {'LSB':>4s} {'s':>6s}  widths")
        for w, a in uniform:
            start = time.perf_counter()
            q = quantfx.quantize(model, "finn", calibration_data=calib, weight_bit_width=w, act_bit_width=a,
                                 weight_rounding=rounding, progress=False)
            uniform_seconds = time.perf_counter() - start
            with torch.no_grad():
                acc = quickstart.accuracy(q(x_test), y_test)
            eight = quantfx.quantize(model, "finn", example_inputs=(x_test[:1],), progress=False)
            for key in keys:
                cost = model_cost(q, key)
                frac = cost / model_cost(eight, key)
                print(f"{'uniform W%dA%d' % (w, a):22s} {key:10s} {frac:7.3f} {acc:7.2f} {acc - float_acc:+8.2f} "
                      f"{'':>4s} {uniform_seconds:6.1f}  {widths_text(q)}", flush=True)
                if (w, a) == (8, 8):
                    continue
                start = time.perf_counter()
                qm, _, report, _, logits = quickstart.quantize_and_run(
                    model, "finn", calib, x_test, Path(out_dir) / f"{task}_{w}{a}_{key}", progress=False,
                    budget={key: cost}, weight_rounding=rounding)
                seconds = time.perf_counter() - start
                acc_m = quickstart.accuracy(logits, y_test)
                print(f"{'  mixed, same ' + key:22s} {key:10s} {model_cost(qm, key) / model_cost(eight, key):7.3f} "
                      f"{acc_m:7.2f} {acc_m - float_acc:+8.2f} {report.max_error_lsb:4.0f} {seconds:6.1f}  "
                      f"{widths_text(qm)}", flush=True)


def zoo_table(models, uniform, rounding) -> None:
    print(f"\nSQNR dB against float, test zoo, finn, weight rounding {rounding} (calibration: 4 random batches of "
          "16; evaluation: 32 other random inputs); mixed at the uniform model's BOPs")
    print(f"{'model':16s} " + " ".join(f"{'W%dA%d' % wa:>8s} {'mixed':>8s}" for wa in uniform))
    for name in models:
        model, calib, x = bench_ptq.zoo_case(name)
        cells = []
        for w, a in uniform:
            q = quantfx.quantize(model, "finn", calibration_data=calib, weight_bit_width=w, act_bit_width=a,
                                 weight_rounding=rounding, progress=False)
            qm = quantfx.quantize(model, "finn", calibration_data=calib, budget={"bops": model_cost(q, "bops")},
                                  weight_rounding=rounding, progress=False)
            with torch.no_grad():
                ref = model(x)
                cells += [float(quantfx.sqnr(ref, q(x))), float(quantfx.sqnr(ref, qm(x)))]
        print(f"{name[:16]:16s} " + " ".join(f"{c:8.2f}" for c in cells), flush=True)


def hessian_trace_estimate(qmodel, layers, widths, batches, draws: int = 8, eps: float = 1e-3) -> dict:
    """HAWQ-V2's estimate of each layer's sensitivity, (tr H / n) ||Q_b(W) - W||^2, H the Gauss-Newton Hessian of
    the output MSE against float with respect to the layer's n weights; tr H by Hutchinson's estimator with
    Rademacher vectors v, v^T H v ~ mean((f(W + eps v) - f(W))^2) / eps^2, on the float view."""
    from quantfx.mixed_precision import _kept, _outputs, set_weight_bits
    from quantfx.weight_rounding import float_view
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, layer in enumerate(layers):
        w = layer.module.weight
        with float_view(qmodel):
            base = _outputs(qmodel, batches)
            traces = []
            for _ in range(draws):
                v = torch.randint(0, 2, w.shape, generator=gen).float() * 2 - 1
                with torch.no_grad():
                    w.add_(eps * v)
                    traces.append(float((_outputs(qmodel, batches) - base).pow(2).mean()) / eps ** 2)
                    w.sub_(eps * v)
        trace = sum(traces) / draws
        q = layer.module.weight_quant
        for bits in widths:
            with _kept([q]), torch.no_grad():
                set_weight_bits(q, bits, q.scale_stat)
                delta = float((q(w) - w).pow(2).sum())
            out[("w", i)] = {**out.get(("w", i), {}), bits: trace / w.numel() * delta}
    return out


def sensitivity_table(tasks, configs: int = 24) -> None:
    """Which sensitivity predicts the output error of mixed weight widths better: the measured one (each layer
    alone lowered) or HAWQ's Hessian-trace estimate. On random weight-width assignments (activations 8-bit) of
    the calibrated 8-bit model, Spearman's rank correlation between each method's summed prediction and the
    measured output MSE against float on the calibration data."""
    import random
    from scipy.stats import spearmanr
    from quantfx.mixed_precision import WIDTHS, _kept, _model_layers, _outputs, sensitivities, set_weight_bits
    from quantfx.nn import exact_arithmetic
    from quantfx.weight_rounding import float_view
    print("\nsensitivity: Spearman rank correlation of predicted and measured output MSE over "
          f"{configs} random weight-width assignments (widths {WIDTHS}, activations 8-bit)")
    for task in tasks:
        model, calib, _, _ = bench_ptq.trained(task)
        q = quantfx.quantize(model, "finn", calibration_data=calib, weight_rounding="nearest", progress=False)
        layers, _ = _model_layers(q, False)
        batches = calib[:4]
        with exact_arithmetic(False):
            measured = sensitivities(q, layers, [], list(WIDTHS), [], batches)
            hessian = hessian_trace_estimate(q, layers, WIDTHS, batches)
            with float_view(q):
                ref = _outputs(q, batches)
            rng = random.Random(0)
            actual, by_measured, by_hessian = [], [], []
            for _ in range(configs):
                bits = [rng.choice(WIDTHS) for _ in layers]
                qs = [l.module.weight_quant for l in layers]
                with _kept(qs):
                    for wq, b in zip(qs, bits):
                        set_weight_bits(wq, b, wq.scale_stat)
                    actual.append(float((_outputs(q, batches) - ref).pow(2).mean()))
                by_measured.append(sum(measured[("w", i)][b] for i, b in enumerate(bits)))
                by_hessian.append(sum(hessian[("w", i)][b] for i, b in enumerate(bits)))
        rho_m = spearmanr(by_measured, actual).statistic
        rho_h = spearmanr(by_hessian, actual).statistic
        print(f"{task:12s} measured (one layer lowered) {rho_m:.3f}   Hessian trace (HAWQ-V2) {rho_h:.3f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="digits,digits_res")
    parser.add_argument("--uniform", default="8/8,4/4,3/3,2/2")
    parser.add_argument("--keys", default="bops,finn_luts")
    parser.add_argument("--rounding", default="gptq", choices=["nearest", "gptq", "learned"])
    parser.add_argument("--zoo", action="store_true")
    parser.add_argument("--zoo-models", default=None, help="comma-separated test-zoo names (default: all)")
    parser.add_argument("--zoo-uniform", default="4/4,3/3")
    parser.add_argument("--sensitivity", action="store_true",
                        help="only the comparison of measured and Hessian-trace sensitivities")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import os
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    tasks = [t for t in args.tasks.split(",") if t]
    if args.sensitivity:
        sensitivity_table(tasks)
        return 0
    with tempfile.TemporaryDirectory() as out_dir:
        digits_table(tasks, bench_ptq.parse_widths(args.uniform), [k for k in args.keys.split(",") if k], args.rounding,
                     out_dir)
    if args.zoo:
        models = args.zoo_models.split(",") if args.zoo_models else sorted(TEST_MODELS)
        zoo_table(models, bench_ptq.parse_widths(args.zoo_uniform), args.rounding)
    print(f"load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
