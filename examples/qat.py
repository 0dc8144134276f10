"""Quantization-aware training: 4-bit weights, activations and input lose accuracy after post-training
quantization; a few epochs of training the quantized model (straight-through estimators, learned scales)
win it back.

    python examples/qat.py [--epochs 15] [--qat-epochs 4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import quantfx

sys.path.insert(0, str(Path(__file__).parent))
from quickstart import accuracy, load_digits, train  # noqa: E402


class SmallDigitsNet(nn.Module):
    """A narrow CNN (4/8/8 channels): little redundancy, so 4-bit post-training quantization costs accuracy."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bit width")
    args = parser.parse_args(argv)
    x_train, y_train, x_test, y_test = load_digits()
    torch.manual_seed(0)
    model = train(SmallDigitsNet(), x_train, y_train, args.epochs)
    with torch.no_grad():
        float_acc = accuracy(model(x_test), y_test)
    calib = [x_train[i:i + 64] for i in range(0, 512, 64)]
    learned = {nn.ReLU: dict(act_learned_scale=True)}
    qmodel = quantfx.quantize(model, "finn", calibration_data=calib, weight_bit_width=args.bits,
                              act_bit_width=args.bits, input_bit_width=args.bits, overrides=learned,
                              progress=False)
    with torch.no_grad():
        ptq_acc = accuracy(qmodel(x_test), y_test)
    print(f"float {float_acc:.2f}%  |  PTQ {args.bits}-bit {ptq_acc:.2f}%")

    opt = torch.optim.Adam(qmodel.parameters(), lr=5e-4)
    torch.manual_seed(0)
    for epoch in range(args.qat_epochs):
        qmodel.train()
        perm = torch.randperm(len(x_train))
        for i in range(0, len(x_train), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(qmodel(x_train[idx]), y_train[idx]).backward()
            opt.step()
        qmodel.eval()
        with torch.no_grad():
            print(f"QAT epoch {epoch + 1}: {accuracy(qmodel(x_test), y_test):.2f}%")
    with torch.no_grad():
        qat_acc = accuracy(qmodel(x_test), y_test)
    print(f"float {float_acc:.2f}%  |  PTQ {args.bits}-bit {ptq_acc:.2f}%  |  QAT {args.bits}-bit {qat_acc:.2f}%")
    return float_acc, ptq_acc, qat_acc


if __name__ == "__main__":
    main()
