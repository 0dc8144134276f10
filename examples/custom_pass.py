"""A user pass in the pipeline: keep the first and last compute layers at 8-bit weights when the rest of
the network is quantized to 4 bits (first/last layers are the most sensitive).

    python examples/custom_pass.py [--epochs 15]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import quantfx
from quantfx.graph import is_compute, module_of

sys.path.insert(0, str(Path(__file__).parent))
from quickstart import DigitsNet, accuracy, load_digits, train  # noqa: E402


@dataclass(frozen=True)
class KeepEdgesAt8Bits(quantfx.Pass):
    """Give the first and last quantized compute layers 8-bit weights."""

    name = "keep_edges_at_8_bits"
    bit_width: int = 8

    def call(self, gm):
        layers = [n for n in gm.graph.nodes if is_compute(gm, n)]
        for node in {layers[0], layers[-1]} if layers else ():
            layer = module_of(gm, node)
            layer.weight_quant = layer.weight_quant.clone_spec(bit_width=self.bit_width)
        return quantfx.PassResult(gm, bool(layers))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    x_train, y_train, x_test, y_test = load_digits()
    torch.manual_seed(0)
    model = train(DigitsNet(), x_train, y_train, args.epochs)
    calib = [x_train[i:i + 64] for i in range(0, 512, 64)]
    with torch.no_grad():
        float_acc = accuracy(model(x_test), y_test)

    plain = quantfx.quantize(model, "finn", calibration_data=calib, weight_bit_width=3, act_bit_width=4,
                             progress=False)
    pipeline = quantfx.pipeline_for("finn")
    pipeline.insert_after("swap_modules", KeepEdgesAt8Bits())
    print("pipeline:", pipeline)
    edges8 = quantfx.quantize(model, "finn", calibration_data=calib, weight_bit_width=3, act_bit_width=4,
                              pipeline=pipeline, progress=False)
    bits = [module_of(edges8, n).weight_quant.bit_width for n in edges8.graph.nodes if is_compute(edges8, n)]
    with torch.no_grad():
        acc_plain, acc_edges = accuracy(plain(x_test), y_test), accuracy(edges8(x_test), y_test)
    print(f"weight bit widths with the pass: {bits}")
    print(f"float {float_acc:.2f}% | 3-bit weights everywhere {acc_plain:.2f}% | "
          f"first/last layer at 8 bits {acc_edges:.2f}%")
    return float_acc, acc_plain, acc_edges, bits


if __name__ == "__main__":
    main()
