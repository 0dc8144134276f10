"""UNet skip concatenations: every input of each torch.cat gets one shared quantizer, so the integer
concatenation is exact. Prints the groups, checks the scales, draws the annotated graph.

    python examples/unet_concat.py [--out out/unet] [--target finn]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import quantfx
from quantfx.graph import is_cat, module_of, producer, qmeta, tensor_inputs
from quantfx.zoo import UNetSmall, example_input


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/unet")
    parser.add_argument("--target", default="finn")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = UNetSmall().eval()
    calib = [example_input("unet", batch=4, seed=i) for i in range(8)]
    qmodel = quantfx.quantize(model, args.target, calibration_data=calib, progress=False)

    groups = []
    for node in qmodel.graph.nodes:
        if not is_cat(node):
            continue
        sources = [producer(qmodel, a) for a in tensor_inputs(node)]
        quantizers = [module_of(qmodel, s).act_quant for s in sources]
        shared = all(q is quantizers[0] for q in quantizers)
        scales = [qmeta(s).scale for s in sources]
        same_scale = shared and all(torch.equal(scales[0], s) for s in scales)
        groups.append((qmeta(node).group, same_scale))
        print(f"{node.name}: inputs {[s.name for s in sources]} -> group {qmeta(node).group}, "
              f"scale {float(scales[0]):.5g}, one quantizer object: {shared}, identical scales: {same_scale}")

    x = example_input("unet", batch=2, seed=100)
    with torch.no_grad():
        y, yq = model(x), qmodel(x)
    sqnr = 10 * torch.log10(y.pow(2).mean() / (y - yq).pow(2).mean())
    print(f"SQNR of the {args.target} fake-quant UNet against float: {float(sqnr):.1f} dB")
    path = quantfx.draw(qmodel, out / "unet.svg")
    print(f"diagram: {path}")
    return groups


if __name__ == "__main__":
    main()
