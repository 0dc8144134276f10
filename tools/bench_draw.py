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

import quantfx
from quantfx import zoo
from quantfx.zoo import deep_chain


def DenseNet():
    """DenseNet-121's block structure (dense blocks of 6, 12, 24, 16) with few channels (graph size is what
    matters here, not FLOPs): growth 4, bn_size 2, an 8-channel 3x3 stem, for 3x32x32 inputs."""
    return zoo.DenseNet((6, 12, 24, 16), growth=4, stem=8, bn_size=2, num_classes=10, imagenet_stem=False)


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
