"""Time quantfx.draw on large quantized graphs: a DenseNet-121-shaped model (dense blocks of 6, 12, 24, 16
layers, every layer reading the concatenation of all earlier ones: ~500 nodes, ~1000 edges, long skip edges)
and a deep conv chain with residual adds (~800 nodes). One dot process lays out each graph.

    python tools/bench_draw.py [--format svg] [--chain-layers 300] [--repeat 3]

Prints one line per graph: nodes, edges, output size, best and median wall time of ``quantfx.draw``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import quantfx
from quantfx.zoo import deep_chain


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3 on the concatenation of every earlier feature map (torchvision's shape)."""

    def __init__(self, cin: int, growth: int, bn_size: int = 2):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseNet(nn.Module):
    """DenseNet-121's block structure with few channels (graph size is what matters here, not FLOPs)."""

    def __init__(self, blocks=(6, 12, 24, 16), growth: int = 4, stem: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
        c = stem
        for i, n in enumerate(blocks):
            self.blocks.append(nn.ModuleList(DenseLayer(c + j * growth, growth) for j in range(n)))
            c += n * growth
            if i < len(blocks) - 1:
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                                      nn.AvgPool2d(2)))
                c //= 2
        self.norm, self.relu = nn.BatchNorm2d(c), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            features = [x]
            for layer in block:
                features.append(layer(features))
            x = torch.cat(features, 1)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return self.fc(torch.flatten(self.pool(self.relu(self.norm(x))), 1))


def bench(name: str, qmodel, fmt: str, repeat: int) -> str:
    times = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeat):
            start = time.perf_counter()
            path = quantfx.draw(qmodel, Path(d) / f"g.{fmt}")
            times.append(time.perf_counter() - start)
        size = path.stat().st_size
    nodes = list(qmodel.graph.nodes)
    edges = sum(len(n.all_input_nodes) for n in nodes)
    return (f"{name:22s} {len(nodes):4d} nodes {edges:5d} edges -> {fmt} {size / 1e6:5.2f} MB  "
            f"best {min(times):5.2f} s  median {statistics.median(times):5.2f} s  ({repeat} runs)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="svg", choices=["svg", "png", "pdf"])
    parser.add_argument("--chain-layers", type=int, default=300, help="conv layers of the deep chain")
    parser.add_argument("--repeat", type=int, default=3, help="draws per graph")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dense = quantfx.quantize(DenseNet().eval(), "finn", calibration_data=[torch.randn(1, 3, 32, 32)],
                             progress=False)
    chain = quantfx.quantize(deep_chain(args.chain_layers), "finn", calibration_data=[torch.randn(1, 3, 16, 16)],
                             progress=False)
    print(bench("densenet121-shaped", dense, args.format, args.repeat))
    print(bench(f"deep_chain({args.chain_layers})", chain, args.format, args.repeat))


if __name__ == "__main__":
    main()
