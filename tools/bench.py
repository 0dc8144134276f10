"""Side-by-side benchmark of quantfx against Brevitas, torch.ao FX and onnxruntime's quantizer (issue 14):
compile time, scaling with depth, inference latency, accuracy on the quick start's digits CNN, and peak memory.

    python tools/bench.py [--quick] [--sections compile,scaling,inference,accuracy,memory] [--runs N] [--threads N]

Brevitas, torch.ao and onnxruntime's quantizer are benchmark-only comparisons (``pip install -e ".[bench]"``);
a comparison whose package is missing is skipped, and the script says which and why. quantfx never imports them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "examples"))

SECTIONS = ("compile", "scaling", "inference", "accuracy", "memory")


def parse_sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs and smaller inputs: a few minutes")
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS),
                        help=f"comma-separated, from {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for compile-time sections")
    args = parser.parse_args(argv)
    raise NotImplementedError("sections are being written")


if __name__ == "__main__":
    raise SystemExit(main())
