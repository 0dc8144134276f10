"""Low-bit post-training quantization benchmark (issue 15): accuracy of each exported artefact in its own
runtime against torch.ao FX PTQ and Brevitas PTQ of the same float model with the same calibration data, and
output SQNR against float on the test zoo per method.

    python tools/bench_ptq.py [--tasks digits,digits_res] [--targets finn,onnx,torch,dpu]
                              [--widths 8/8,4/4,3/3,2/4,2/2] [--zoo [--zoo-widths 4/4,3/3]] [--resnet18]
                              [--resnet18-roundings auto,gptq] [--threads 1]
    python tools/bench_ptq.py --rounding-table [--tasks ...] [--rounding-widths 4/4,3/3] [--resnet18 ...]

Tasks: models trained here from packaged data (scikit-learn's digits, 8x8 images, 80/20 split, seed 0):
``digits`` is the quick start's DigitsNet (15 epochs), ``digits_res`` a small residual CNN (two residual blocks,
20 epochs). Calibration: the first 512 training images in batches of 64, for every tool. Accuracy: on the 360
held-out test images (one image = 0.28 points).

quantfx rows run ``quantfx.quantize(model, target, calibration_data=calib, weight_bit_width=w,
act_bit_width=a)`` with its defaults (at 4 bits or fewer: per-channel weight scales by MSE search, MSE
activation calibration, learned weight rounding), export the artefact, reload it and run it in the target's
runtime (qonnx for finn, onnxruntime for onnx); the verify column is the largest error against the fake-quant
model, in LSBs, on 64 test images. The onnx row at 8/8 uses ``cpu='vnni'`` (8-bit weights; exact on VNNI and ARM
CPUs only), at other widths the default. torch (W8A7, fbgemm) and dpu (W8A8, power-of-two) are 8-bit targets:
they appear in the 8/8 rows only, with their profile's widths. ``minmax`` rows are the old defaults for comparison: per-tensor
min/max weight scales, min/max activation calibration, round-to-nearest.

torch.ao FX and Brevitas (benchmark-only, ``pip install -e ".[bench]"``) are described in tools/baselines.py:
torch.ao at 8/8 runs its int8 kernels, at other widths fake-quant; Brevitas runs fake-quant. A missing package
skips its rows, with the reason printed.
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
from torch import nn  # noqa: E402

import quantfx  # noqa: E402
from quantfx.zoo import TEST_MODELS, example_input  # noqa: E402

import baselines  # noqa: E402
import quickstart  # noqa: E402


class DigitsResNet(nn.Module):
    """A small residual CNN for 8x8 digits: stem, two residual blocks (the second strided), pool, linear."""

    def __init__(self, width: int = 16):
        super().__init__()

        def cbr(cin, cout, stride=1, relu=True):
            layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
            return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)

        self.stem = cbr(1, width)
        self.b1 = nn.Sequential(cbr(width, width), cbr(width, width, relu=False))
        self.b2 = nn.Sequential(cbr(width, 2 * width, 2), cbr(2 * width, 2 * width, relu=False))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), nn.BatchNorm2d(2 * width))
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu1(x + self.b1(x))
        x = self.relu2(self.down(x) + self.b2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


TASKS = {"digits": (quickstart.DigitsNet, 15), "digits_res": (DigitsResNet, 20)}
MINMAX = dict(calibration_method="minmax", weight_rounding="nearest")


def minmax_overrides(bits: int) -> dict:
    """The old defaults: per-tensor weight scales from the max |w|."""
    fields = dict(weight_scaling_per_output_channel=False, weight_scale_stat="max", weight_bit_width=bits)
    return {nn.Conv2d: fields, nn.Linear: fields}


def trained(task: str):
    cls, epochs = TASKS[task]
    x_train, y_train, x_test, y_test = quickstart.load_digits()
    torch.manual_seed(0)
    model = quickstart.train(cls(), x_train, y_train, epochs)
    calib = [x_train[i:i + 64] for i in range(0, 512, 64)]
    return model, calib, x_test, y_test


def target_options(target: str, w: int, a: int):
    """quantize options for ``target`` at W``w``A``a``, or None where the target takes other widths only: torch
    and dpu are 8-bit targets, run at their profile's widths in the 8/8 row (torch: 7-bit activations on fbgemm)."""
    if target in ("torch", "dpu"):
        return {} if (w, a) == (8, 8) else None
    options = dict(weight_bit_width=w, act_bit_width=a)
    if target == "onnx" and (w, a) == (8, 8):
        options["cpu"] = "vnni"
    return options


def quantfx_row(model, target, calib, x_test, y_test, w, a, out_dir, method) -> tuple:
    options = target_options(target, w, a)
    if method == "minmax":
        options.update(MINMAX, overrides=minmax_overrides(w))
    start = time.perf_counter()
    qmodel, _, report, _, logits = quickstart.quantize_and_run(
        model, target, calib, x_test, Path(out_dir) / f"{target}_{w}{a}_{method}", progress=False, **options)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        sqnr = float(quantfx.sqnr(model(x_test), torch.as_tensor(logits)))
    return quickstart.accuracy(logits, y_test), sqnr, report.max_error_lsb, seconds


def baseline_row(kind, model, calib, x_test, y_test, w, a):
    fn = baselines.torchao_ptq if kind == "torch.ao" else baselines.brevitas_ptq
    start = time.perf_counter()
    qmodel = fn(model, calib, w, a)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = qmodel(x_test)
        sqnr = float(quantfx.sqnr(model(x_test), logits))
    return quickstart.accuracy(logits, y_test), sqnr, None, seconds


def accuracy_table(tasks, targets, widths, out_dir) -> None:
    skipped = {k: baselines.missing(k) for k in ("torch.ao", "brevitas")}
    for kind, why in skipped.items():
        if why:
            print(f"skipped {kind}: {why}")
    for task in tasks:
        model, calib, x_test, y_test = trained(task)
        with torch.no_grad():
            float_acc = quickstart.accuracy(model(x_test), y_test)
        print(f"\n{task}: float {float_acc:.2f}%  (accuracy % in each runtime / SQNR dB against float / verify "
              "LSB / seconds)")
        print(f"{'W/A':5s} {'tool':18s} {'acc %':>7s} {'vs float':>8s} {'SQNR dB':>8s} {'LSB':>5s} {'s':>6s}")
        for w, a in widths:
            rows = []
            for target in targets:
                if target_options(target, w, a) is None:
                    continue
                for method in ("default", "minmax") if target in ("finn", "onnx") else ("default",):
                    rows.append((f"quantfx {target} {method}",
                                 quantfx_row(model, target, calib, x_test, y_test, w, a, out_dir, method)))
            for kind in ("torch.ao", "brevitas"):
                if not skipped[kind]:
                    rows.append((kind, baseline_row(kind, model, calib, x_test, y_test, w, a)))
            for name, (acc, sqnr, lsb, seconds) in rows:
                lsb_text = "-" if lsb is None else f"{lsb:.0f}"
                print(f"{w}/{a:<3d} {name:18s} {acc:7.2f} {acc - float_acc:+8.2f} {sqnr:8.2f} {lsb_text:>5s} "
                      f"{seconds:6.1f}", flush=True)


ZOO_METHODS = {
    "minmax": dict(MINMAX, per_tensor=True),
    "+per-channel": dict(MINMAX),
    "+mse act": dict(calibration_method="auto", weight_rounding="nearest"),
    "+mse weights": dict(calibration_method="auto", weight_rounding="nearest", weight_mse=True),
    "+learned rounding": dict(weight_mse=True),
    "+bias correction": dict(weight_mse=True, bias_correction=True),
    "+equalization": dict(weight_mse=True, equalize=True),
    "gptq instead": dict(weight_mse=True, weight_rounding="gptq"),
}


def zoo_case(name: str):
    """(model with seed-0 random weights, 4 random calibration batches of 16, 32 other random inputs)."""
    ctor, _ = TEST_MODELS[name]
    torch.manual_seed(0)
    model = ctor().eval()
    return model, [example_input(name, batch=16, seed=i) for i in range(4)], example_input(name, batch=32, seed=99)


def zoo_table(widths, target="finn", methods=None) -> None:
    """SQNR (dB) against float of every test-zoo model per method (``methods``: labels of ZOO_METHODS, default
    all), each row adding one step to the one above (the last two of those each add theirs to '+learned
    rounding'; 'gptq instead' is '+learned rounding' with GPTQ instead), and the row's CPU seconds."""
    for w, a in widths:
        print(f"\nSQNR dB against float, test zoo, {target} W{w}A{a} (calibration: 4 random batches of 16; "
              "evaluation: 32 other random inputs)")
        names = sorted(TEST_MODELS)
        print(f"{'method':18s} " + " ".join(f"{n[:10]:>10s}" for n in names) + f" {'CPU s':>7s}")
        for label, spec in ZOO_METHODS.items():
            if methods is not None and label not in methods:
                continue
            spec = dict(spec)
            cpu = time.process_time()
            per_tensor, weight_mse = spec.pop("per_tensor", False), spec.pop("weight_mse", False)
            cells = []
            for name in names:
                model, calib, x = zoo_case(name)
                fields = {} if weight_mse else dict(weight_scale_stat="max")
                if per_tensor:
                    fields["weight_scaling_per_output_channel"] = False
                overrides = {t: dict(fields) for t in (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)} \
                    if fields else None
                q = quantfx.quantize(model, target, calibration_data=calib, weight_bit_width=w, act_bit_width=a,
                                     overrides=overrides, progress=False, **spec)
                with torch.no_grad():
                    cells.append(float(quantfx.sqnr(model(x), q(x))))
            print(f"{label:18s} " + " ".join(f"{c:10.2f}" for c in cells) + f" {time.process_time() - cpu:7.1f}",
                  flush=True)


def resnet18_time(batches: int = 8, batch: int = 8, roundings=("auto",)) -> None:
    """Seconds to quantize and calibrate a ResNet-18-sized model at W8A8 and at W4A4 with each weight rounding
    ('auto' is learned rounding at 4 bits), with the load average beside each (the machine may be shared)."""
    import os
    from quantfx.zoo import resnet18_like
    torch.manual_seed(0)
    model = resnet18_like().eval()
    calib = [torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(batches)]
    held_out = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(batches))
    with torch.no_grad():
        reference = model(held_out)
    for w, a, rounding in [(8, 8, "auto")] + [(4, 4, r) for r in roundings]:
        start, cpu = time.perf_counter(), time.process_time()
        q = quantfx.quantize(model, "finn", calibration_data=calib, weight_bit_width=w, act_bit_width=a,
                             weight_rounding=rounding, progress=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        with torch.no_grad():
            sqnr = float(quantfx.sqnr(reference, q(held_out)))
        # on a shared machine the process's CPU time (all its threads) says more than the wall time
        print(f"resnet18_like, {batches} batches of {batch}x3x224x224, finn W{w}A{a} rounding {rounding}: "
              f"{seconds:.1f} s, CPU {cpu:.1f} s (threads: {torch.get_num_threads()}, load average "
              f"{os.getloadavg()[0]:.1f}); SQNR {sqnr:.2f} dB on another batch of 8", flush=True)


def rounding_table(tasks, widths, roundings) -> None:
    """Accuracy (fake-quant, 360 test images) and seconds of quantize(finn) per weight rounding, the rest of the
    defaults kept (per-channel MSE weight scales, MSE activation calibration at 4 bits or fewer)."""
    import os
    for task in tasks:
        model, calib, x_test, y_test = trained(task)
        with torch.no_grad():
            float_acc = quickstart.accuracy(model(x_test), y_test)
        print(f"\n{task}: float {float_acc:.2f}%, finn, by weight rounding (load average "
              f"{os.getloadavg()[0]:.1f})")
        print(f"{'W/A':5s} {'rounding':9s} {'acc %':>7s} {'vs float':>8s} {'SQNR dB':>8s} {'s':>7s}")
        for w, a in widths:
            for rounding in roundings:
                start = time.perf_counter()
                q = quantfx.quantize(model, "finn", calibration_data=calib, weight_bit_width=w, act_bit_width=a,
                                     weight_rounding=rounding, progress=False)
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    logits = q(x_test)
                    sqnr = float(quantfx.sqnr(model(x_test), logits))
                acc = quickstart.accuracy(logits, y_test)
                print(f"{w}/{a:<3d} {rounding:9s} {acc:7.2f} {acc - float_acc:+8.2f} {sqnr:8.2f} {seconds:7.1f}",
                      flush=True)


def parse_widths(text: str) -> list[tuple[int, int]]:
    """'8/8,4/4' -> [(8, 8), (4, 4)]."""
    return [tuple(int(v) for v in item.split("/")) for item in text.split(",") if item]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="digits,digits_res")
    parser.add_argument("--targets", default="finn,onnx,torch,dpu")
    parser.add_argument("--widths", default="8/8,4/4,3/3,2/4,2/2")
    parser.add_argument("--zoo", action="store_true", help="also the per-method SQNR table on the test zoo")
    parser.add_argument("--zoo-widths", default="4/4,3/3", help="widths of the zoo table")
    parser.add_argument("--zoo-methods", default=None,
                        help="rows of the zoo table, e.g. '+learned rounding' (comma-separated; default all)")
    parser.add_argument("--resnet18", action="store_true", help="also time calibration of a ResNet-18 shape")
    parser.add_argument("--resnet18-roundings", default="auto",
                        help="weight roundings timed at W4A4 on the ResNet-18 shape (e.g. gptq,learned)")
    parser.add_argument("--rounding-table", action="store_true",
                        help="only the table of nearest / gptq / learned rounding per task and width")
    parser.add_argument("--rounding-widths", default="4/4,3/3")
    parser.add_argument("--roundings", default="nearest,gptq,learned", help="weight roundings of --rounding-table")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = parse_widths(args.widths)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.rounding_table:
        rounding_table(tasks, parse_widths(args.rounding_widths), [r for r in args.roundings.split(",") if r])
        if args.resnet18:
            resnet18_time(roundings=args.resnet18_roundings.split(","))
        return 0
    with tempfile.TemporaryDirectory() as out_dir:
        accuracy_table(tasks, [t for t in args.targets.split(",") if t], widths, out_dir)
    if args.zoo:
        zoo_table(parse_widths(args.zoo_widths),
                  methods=args.zoo_methods.split(",") if args.zoo_methods else None)
    if args.resnet18:
        resnet18_time(roundings=args.resnet18_roundings.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
