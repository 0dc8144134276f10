"""quantfx quick start: train a small CNN on scikit-learn's digits, quantize it for every target that has a
backend, verify each artefact in its own runtime, and compare accuracies.

    python examples/quickstart.py [--out out/quickstart] [--epochs 15] [--targets dpu finn onnx torch] [--quiet]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import quantfx
from quantfx.export import BACKENDS, backend_for


class DigitsNet(nn.Module):
    """A small CNN for 8x8 digit images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


def load_digits(seed: int = 0):
    """(x_train, y_train, x_test, y_test): 8x8 digits scaled to [0, 1], 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(x))
    return x[:n], y[:n], x[n:], y[n:]


def train(model, x, y, epochs: int, seed: int = 0, lr: float = 3e-3):
    """Adam on cross-entropy, batches of 64; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(logits, y) -> float:
    logits = torch.as_tensor(np.asarray(logits)) if not torch.is_tensor(logits) else logits
    return float((logits.argmax(1) == y).float().mean()) * 100


def quantize_and_run(model, target, calib, x_test, stem: Path, progress: bool = True, **options):
    """Quantize ``model`` for ``target`` (``options`` go to ``quantfx.quantize``), export it to ``stem`` plus the
    backend's suffix, reload the file and run it in the target's own runtime. Returns (qmodel, path, verify
    report on the first 64 test images, fake-quant logits, runtime logits on ``x_test``)."""
    qmodel = quantfx.quantize(model, target, calibration_data=calib, progress=progress, **options)
    with torch.no_grad():
        fq_logits = qmodel(x_test)
    backend = backend_for(qmodel)
    path = stem.with_name(stem.name + backend.suffix)
    quantfx.export(qmodel, path, example_inputs=(x_test[:1],))
    artefact = backend.load(path)  # the file as written, run in the target's own runtime
    report = quantfx.verify(qmodel, artefact, (x_test[:64],))
    return qmodel, path, report, fq_logits, backend.run(artefact, (x_test,))[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/quickstart", help="folder for artefacts and diagrams")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--targets", nargs="+", help="targets to quantize for (default: every target with a backend)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_train, y_train, x_test, y_test = load_digits()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = train(DigitsNet(), x_train, y_train, args.epochs)
    with torch.no_grad():
        float_acc = accuracy(model(x_test), y_test)
    print(f"trained DigitsNet in {time.perf_counter() - t0:.1f} s: float accuracy {float_acc:.2f}%")

    calib = [x_train[i:i + 64] for i in range(0, 512, 64)]
    import quantfx.targets  # noqa: F401  (registers the backends)
    rows, report_variants = [], {}
    for target in sorted(args.targets or BACKENDS):
        qmodel, path, report, fq_logits, runtime_logits = quantize_and_run(
            model, target, calib, x_test, out / f"digits_{target}", progress=not args.quiet)
        fq_acc = accuracy(fq_logits, y_test)
        if not report.ok:
            print(report)  # which node is off first, and the backend's reading of why
        runtime_acc = accuracy(runtime_logits, y_test)
        diagram = None
        try:
            diagram = quantfx.draw(qmodel, out / f"digits_{target}.svg")
        except (AttributeError, quantfx.QuantFXError) as e:
            print(f"  (no diagram for {target}: {e})")
        rows.append((target, fq_acc, runtime_acc, report.max_error_lsb, report.ok, path, diagram))
        report_variants[target] = report.variants

    print()
    print(f"{'target':8s} {'float %':>8s} {'fake-quant %':>13s} {'runtime %':>10s} {'max err (LSB)':>14s}  artefact")
    for target, fq, rt, lsb, ok, path, diagram in rows:
        print(f"{target:8s} {float_acc:8.2f} {fq:13.2f} {rt:10.2f} {lsb:14.3f}  {path}"
              + ("" if ok else "  VERIFY FAILED"))
        for run, rows_ in report_variants.get(target, {}).items():  # the torch .pt2 under torch.compile
            print(f"{'':8s} {run:>8s} {'':13s} {'':10s} {max(o.max_error_lsb for o in rows_):14.3f}")
    drawn = [str(r[6]) for r in rows if r[6] is not None]
    if drawn:
        print("diagrams: " + ", ".join(drawn))
    return rows


if __name__ == "__main__":
    main()
