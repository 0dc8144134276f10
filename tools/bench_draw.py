"""Time quantfx.draw on a large quantized graph (DenseNet-sized: several hundred nodes) to SVG.

    python tools/bench_draw.py [--layers 300] [--format svg]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import quantfx
from quantfx.zoo import deep_chain


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=300)
    parser.add_argument("--format", default="svg", choices=["svg", "png", "pdf"])
    args = parser.parse_args(argv)
    q = quantfx.quantize(deep_chain(args.layers), "finn", calibration_data=[torch.randn(1, 3, 16, 16)],
                         progress=False)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        path = quantfx.draw(q, Path(d) / f"g.{args.format}")
        seconds = time.perf_counter() - t
        size = path.stat().st_size
    print(f"draw: {len(q.graph.nodes)} nodes -> {args.format} ({size / 1e6:.1f} MB) in {seconds:.2f} s")


if __name__ == "__main__":
    main()
