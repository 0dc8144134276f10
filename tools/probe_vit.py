"""ViT numerics (issue 27): SQNR against float of quantfx on every target and of torchao's PT2E flow
(X86InductorQuantizer: inputs and weights of linear/conv quantized, LayerNorm, softmax, GELU and adds left
float) on torchvision ViTs with random weights (the zero-initialised head given random weights, so the output is
not identically 0), and with ``--nodes`` the SQNR of every node of the compiled graph against the same graph
run in float (``quantfx.weight_rounding.float_view``): where the error enters.

    python tools/probe_vit.py                      # small ViT (32x32, patch 8, 2 layers, width 64)
    python tools/probe_vit.py --model vit_b_16     # 224x224, 3 calibration batches of 2 (minutes on 2 cores)
    python tools/probe_vit.py --nodes --targets onnx

torchao is a benchmark-only dependency (``pip install torchao==0.18.0``); quantfx never imports it.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import fx

import quantfx
from quantfx.weight_rounding import float_view


def build(name: str):
    from torchvision.models import vit_b_16
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    if name == "vit_b_16":
        model, size = vit_b_16(weights=None), 224
    else:
        model, size = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                        mlp_dim=128, num_classes=10), 32
    with torch.no_grad():
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    model.eval()
    data = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    test = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(99))
    return model, data, test


def pt2e(model, data, test) -> float:
    import baselines
    converted = baselines.pt2e_ptq(model, data)
    with torch.no_grad():
        out = torch.cat([converted(t) for t in test.split(len(data[0]))])  # exported for the batch size
        return float(quantfx.sqnr(model(test), out))


def node_values(gm, x) -> dict:
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            v = getattr(out, "value", out)
            if torch.is_tensor(v) and v.is_floating_point():
                values[n.name] = v.detach().clone()
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def per_node(q, test) -> None:
    got = node_values(q, test)
    with float_view(q):
        ref = node_values(q, test)
    for n in q.graph.nodes:
        if n.name in got and n.name in ref and got[n.name].shape == ref[n.name].shape:
            print(f"  {n.name:50s} {float(quantfx.sqnr(ref[n.name], got[n.name])):6.1f} dB  "
                  f"|x|max {float(ref[n.name].abs().max()):8.3g}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", choices=["small", "vit_b_16"])
    ap.add_argument("--targets", nargs="*", default=["onnx", "torch", "finn", "dpu"])
    ap.add_argument("--nodes", action="store_true", help="SQNR of every node against the float view")
    ap.add_argument("--no-pt2e", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    model, data, test = build(args.model)
    print(f"{args.model}: calibration 3 batches of 2, test batch of 4")
    for target in args.targets:
        t0 = time.perf_counter()
        try:
            q = quantfx.quantize(model, target, calibration_data=data, progress=False)
            with torch.no_grad():
                db = float(quantfx.sqnr(model(test), q(test)))
            lsb = quantfx.verify(q, quantfx.lower(q, (test[:1],)), test[:2]).max_error_lsb
            print(f"quantfx {target:6s} {db:6.1f} dB  verify {lsb} LSB  ({time.perf_counter() - t0:.0f} s)")
            if args.nodes:
                per_node(q, test)
        except quantfx.QuantFXError as e:
            print(f"quantfx {target:6s} refused: {str(e)[:200]}")
    if not args.no_pt2e:
        t0 = time.perf_counter()
        print(f"PT2E x86  {pt2e(model, data, test):6.1f} dB  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
