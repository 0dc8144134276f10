"""Benchmark quantfx.quantize (calibration excluded): a ResNet-50-sized model, and linear scaling from a
200-layer to a 2000-layer generated model.

    python tools/bench_quantize.py [--runs 5] [--profile]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import quantfx
from quantfx.zoo import deep_chain, resnet50_like


def time_quantize(model, x, runs: int) -> tuple[float, object]:
    times, q = [], None
    for _ in range(runs):
        t = time.perf_counter()
        q = quantfx.quantize(model, "finn", example_inputs=(x,))
        times.append(time.perf_counter() - t)
    return statistics.median(times), q


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print the per-pass timings")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    r50 = resnet50_like().eval()
    t, q = time_quantize(r50, torch.randn(1, 3, 224, 224), args.runs)
    traced = len(torch.fx.symbolic_trace(r50).graph.nodes)
    rows.append(("resnet50_like", traced, len(q.graph.nodes), t, q))
    for n in (200, 2000):
        m = deep_chain(n).eval()
        t, q = time_quantize(m, torch.randn(1, 3, 16, 16), max(1, args.runs // (1 if n == 200 else 2)))
        rows.append((f"deep_chain({n})", len(torch.fx.symbolic_trace(m).graph.nodes), len(q.graph.nodes), t, q))
    print(f"{'model':16s} {'traced nodes':>12s} {'final nodes':>11s} {'quantize s':>10s}")
    for name, traced, final, t, q in rows:
        print(f"{name:16s} {traced:12d} {final:11d} {t:10.3f}")
        if args.profile:
            for r in q.pass_timings:
                print(f"    {r.name:22s} {r.seconds * 1000:8.1f} ms")
    ratio = rows[2][3] / rows[1][3]
    print(f"2000-layer / 200-layer time: {ratio:.1f}x (10x the layers; linear would be 10x)")


if __name__ == "__main__":
    main()
