"""Render the diagram of docs/diagrams.md: a small CNN with a residual add and a skip concatenation, quantized for
finn and calibrated, drawn to docs/quantized_graph.svg.

    python tools/render_readme_diagram.py [--out docs/quantized_graph.svg]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import quantfx


class ResidualConcat(nn.Module):
    """conv-bn-relu stem, a residual block, a skip concatenation, global pool, classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.branch = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.relu2(self.conv2(self.relu1(self.conv1(x))) + x)
        z = torch.cat([y, self.branch(x)], 1)
        return self.fc(torch.flatten(self.pool(z), 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "quantized_graph.svg"),
                        help="output file; the suffix picks the format (.svg, .png, .pdf, .dot); default: %(default)s")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = ResidualConcat().eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    qmodel = quantfx.quantize(model, "finn", calibration_data=calib, progress=False)
    print(quantfx.draw(qmodel, args.out, title="ResidualConcat quantized for finn"))


if __name__ == "__main__":
    main()
