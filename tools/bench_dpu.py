"""Benchmark the dpu target: accuracy of the quick start's digits CNN (float, fake-quant, the dpu file in
onnxruntime), its fidelity in LSB, and onnxruntime latency of the dpu file's two forms against the float model.

    python tools/bench_dpu.py [--runs 200] [--threads 1] [--resnet] [--zoo] [--search [MODEL ...]]

Forms: the dpu file as the verification runs it (QDQ fusion off: float kernels on dequantized values, exact on
every CPU), and the onnxruntime-fast form (int32 biases: onnxruntime fuses QLinearConv/QGemm; exact where no
int16 pair sum can saturate, or on VNNI/ARM CPUs). The figures in BENCHMARKS.md come from this script.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tools"))

import quantfx  # noqa: E402
from quantfx.targets import dpu  # noqa: E402
from quantfx.targets.int16_pairs import cpu_has_int32_dot, pair_risks  # noqa: E402
from quantfx.targets.onnx_qdq import ort_session  # noqa: E402


def median_ms(sessions: dict, x: np.ndarray, runs: int, rounds: int = 20) -> dict:
    """Median latency per session; the sessions take turns so a change in machine speed hits all alike."""
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    times = {k: [] for k in sessions}
    for k, s in sessions.items():
        for _ in range(5):
            s.run(None, feeds[k])
    for _ in range(rounds):
        for k, s in sessions.items():
            s.run(None, feeds[k])
            for _ in range(max(1, runs // rounds)):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def forms(model, qmodel, x, threads: int) -> dict:
    from bench_onnx import float_onnx
    art = quantfx.lower(qmodel, (x[:1],), target="dpu")
    fast = dpu.fast_form(qmodel, (x[:1],))
    return {"float": ort_session(float_onnx(model, x[:1]), threads=threads),
            "dpu (verification form)": dpu.dpu_session(art, threads=threads),
            "dpu fast form": dpu.dpu_session(fast, threads=threads)}, art, fast


def digits(args):
    import quickstart as qs
    x_tr, y_tr, x_te, y_te = qs.load_digits()
    torch.manual_seed(0)
    model = qs.train(qs.DigitsNet(), x_tr, y_tr, 15)
    with torch.no_grad():
        float_acc = qs.accuracy(model(x_te), y_te)
    calib = [x_tr[i:i + 64] for i in range(0, 512, 64)]
    q = quantfx.quantize(model, "dpu", calibration_data=calib, progress=False)
    sessions, art, fast = forms(model, q, x_te, args.threads)
    with torch.no_grad():
        fq_acc = qs.accuracy(q(x_te), y_te)
    rt = qs.accuracy(dpu.run_dpu(art, (x_te,))[0], y_te)
    fast_acc = qs.accuracy(dpu.run_dpu(fast, (x_te,))[0], y_te)
    report = quantfx.verify(q, art, (x_te,))
    fast_report = quantfx.verify(q, fast, (x_te,), target="dpu")
    risky = sum(1 for r in pair_risks(fast) if not r.safe)
    print(f"digits CNN ({len(x_te)} test images): float {float_acc:.2f}%, dpu fake-quant {fq_acc:.2f}%, dpu file in "
          f"onnxruntime {rt:.2f}% ({rt - float_acc:+.2f} points), max error {report.max_error_lsb:.0f} LSB; fast "
          f"form {fast_acc:.2f}%, max error {fast_report.max_error_lsb:.0f} LSB ({risky} layer(s) can saturate an "
          f"int16 pair; this CPU {'has' if cpu_has_int32_dot() else 'has no'} VNNI)")
    q_max = quantfx.quantize(model, "dpu", calibration_data=calib, calibration_method="minmax", progress=False)
    art_max = quantfx.lower(q_max, (x_te[:1],), target="dpu")
    max_acc = qs.accuracy(dpu.run_dpu(art_max, (x_te,))[0], y_te)
    print(f"  with max-based positions (calibration_method='minmax'): dpu file in onnxruntime {max_acc:.2f}%, "
          f"max error {quantfx.verify(q_max, art_max, (x_te,)).max_error_lsb:.0f} LSB")
    print(f"  refine changes: {len(dpu.report(art).refine)}; DPU report: {len(dpu.report(art).on('DPU'))} nodes on "
          f"the DPU, {len(dpu.report(art).on('CPU'))} on the CPU")
    for batch in (1, 64):
        xb = x_te[:batch].numpy()
        ms = median_ms(sessions, xb, args.runs)
        print(f"  batch {batch}: " + ", ".join(f"{k} {v:.3f} ms ({ms['float'] / v:.2f}x float)" for k, v in ms.items()))


def resnet(args):
    from quantfx import zoo
    torch.manual_seed(0)
    model = zoo.resnet18_like().eval()
    x = torch.randn(1, 3, 224, 224)
    q = quantfx.quantize(model, "dpu", calibration_data=[torch.randn(1, 3, 224, 224) for _ in range(2)],
                         progress=False)
    t = time.perf_counter()
    sessions, art, _ = forms(model, q, x, args.threads)
    from quantfx.targets.dpu.positions import check_file
    static = [p for p in check_file(art) if "2^24" in p]
    print(f"resnet18_like 1x3x224x224 (lower + fast form: {time.perf_counter() - t:.2f} s): verify "
          f"{quantfx.verify(q, art, (x,)).max_error_lsb:.0f} LSB; {len(static)} layer(s) past the static 2^24 "
          f"bound, {len(dpu.float_sum_risks(q, (x,)))} on this input")
    ms = median_ms(sessions, x.numpy(), max(20, args.runs // 10))
    print("  " + ", ".join(f"{k} {v:.2f} ms ({ms['float'] / v:.2f}x float)" for k, v in ms.items()))


def zoo_positions(args):
    """Output SQNR against float per test-zoo model (64 held-out inputs: 4 batches of 16, seeds 99-102;
    calibrated on 3 batches of 4) with max-based positions, Quark's per-tensor MinMSE alone, and the default."""
    from quantfx.targets.dpu.calibrate import local_positions
    from quantfx.targets.dpu.positions import refine
    from quantfx.zoo import TEST_MODELS, example_input
    print("output SQNR against float, dB (64 held-out inputs): model, max positions, per-tensor MinMSE, default")
    for name in sorted(TEST_MODELS):
        torch.manual_seed(0)
        model = TEST_MODELS[name][0]().eval()
        data = [example_input(name, batch=4, seed=i) for i in range(3)]
        x = torch.cat([example_input(name, batch=16, seed=s) for s in (99, 100, 101, 102)])
        by_max = quantfx.quantize(model, "dpu", calibration_data=data, calibration_method="minmax", progress=False)
        local = quantfx.quantize(model, "dpu", calibration_data=data, calibration_method="minmax", progress=False)
        local_positions(local, data)
        refine(local)
        default = quantfx.quantize(model, "dpu", calibration_data=data, progress=False)
        with torch.no_grad():
            ref = model(x)
            row = [float(quantfx.sqnr(ref, q(x))) for q in (by_max, local, default)]
        print(f"  {name:12s} " + "  ".join(f"{v:6.2f}" for v in row) + f"  ({row[2] - row[0]:+.2f})")


SEARCH_MODELS = ("regnet_x_400mf", "mobilenet_v3_small", "convnext_tiny", "efficientnet_b0", "vit_b_16")


def search_speed(models):
    """Time of ``quantize(model, 'dpu')`` with the default position search against calibration_method='minmax'
    (wall and this process's CPU seconds: the machine is shared), torchvision models with random weights,
    224 x 224, 3 calibration batches of 2 (issue 28), and each one's output SQNR against float on 4 held-out
    inputs (seed 123). Run it against another tree (PYTHONPATH) for the before column."""
    import os
    import torchvision
    import quantfx.targets.dpu.calibrate as search
    trials = [0]
    judge = search._OutputError.__call__

    def counted(self, *a, **k):
        trials[0] += 1
        return judge(self, *a, **k)
    search._OutputError.__call__ = counted
    print(f"position search, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} at start")
    print("| model | minmax: wall s / CPU s / SQNR dB | default: wall s / CPU s / SQNR dB / trials | CPU ratio |")
    print("|---|---|---|---|")
    for name in models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        data = [torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(123))
        with torch.no_grad():
            ref = model(x)
        cells, cpu = [], []
        for method in ("minmax", "auto"):
            trials[0] = 0
            wall, proc = time.perf_counter(), time.process_time()
            q = quantfx.quantize(model, "dpu", calibration_data=data, calibration_method=method, progress=False)
            wall, proc = time.perf_counter() - wall, time.process_time() - proc
            with torch.no_grad():
                db = float(quantfx.sqnr(ref, q(x)))
            cpu.append(proc)
            cells.append(f"{wall:.1f} / {proc:.1f} / {db:.2f}" + (f" / {trials[0]}" if method == "auto" else ""))
        print(f"| {name} | " + " | ".join(cells) + f" | {cpu[1] / cpu[0]:.1f}x |  (load {os.getloadavg()[0]:.1f})",
              flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resnet", action="store_true", help="also time a ResNet-18 shape")
    parser.add_argument("--zoo", action="store_true", help="also the fix-position SQNR table of the test zoo")
    parser.add_argument("--search", nargs="*", metavar="MODEL", help="only the position search's time against "
                        f"minmax on torchvision models (default: {' '.join(SEARCH_MODELS)})")
    args = parser.parse_args(argv)
    if args.search is not None:
        torch.set_num_threads(args.threads)
        search_speed(args.search or SEARCH_MODELS)
        return
    import onnxruntime
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), median of {args.runs} runs")
    torch.set_num_threads(args.threads)
    digits(args)
    if args.resnet:
        resnet(args)
    if args.zoo:
        zoo_positions(args)


if __name__ == "__main__":
    main()
