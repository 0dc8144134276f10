"""Quantize every test model for each target with a backend, export it, run it in its own runtime and print
the max error against the fake-quant model in LSBs (the fidelity table of docs/verification.md).

    python tools/verify_zoo.py [--batch 4] [--seed 123]
"""
from __future__ import annotations

import argparse

import torch

from quantfx.export import BACKENDS
from quantfx.zoo import TEST_MODELS, example_input


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    import quantfx.targets  # noqa: F401
    targets = sorted(BACKENDS)
    print(f"{'model':12s} " + " ".join(f"{t + ' (LSB)':>11s}" for t in targets))
    table = {}
    for name, (ctor, _) in TEST_MODELS.items():
        cells = []
        for target in targets:
            torch.manual_seed(0)
            data = [example_input(name, batch=4, seed=i) for i in range(4)]
            q = quantfx.quantize(ctor().eval(), target, calibration_data=data, progress=False)
            artefact = quantfx.lower(q, (example_input(name, batch=1),))
            report = quantfx.verify(q, artefact, (example_input(name, batch=args.batch, seed=args.seed),))
            table[(name, target)] = report.max_error_lsb
            cells.append(f"{report.max_error_lsb:11.3f}")
        print(f"{name:12s} " + " ".join(cells))
    return table


if __name__ == "__main__":
    main()
