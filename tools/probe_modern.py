"""Issue 16 probe: quantize, lower and verify the modern-block models of tests/modern_models.py on every target
and print what happens (python tools/probe_modern.py)."""
import sys, traceback, torch, quantfx
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from modern_models import *
torch.manual_seed(0)
models = {"mbconv": MBConv, "convnext": ConvNeXtBlock, "vit_matmul": lambda: ViTBlock(attention="matmul"),
          "vit_sdpa": lambda: ViTBlock(attention="sdpa")}
for name, ctor in models.items():
    for target in ["finn", "onnx", "torch", "dpu"]:
        torch.manual_seed(0)
        m = ctor().eval()
        data = calibration()
        stage = "quantize"
        try:
            q = quantfx.quantize(m, target, calibration_data=data, progress=False)
            stage = "lower"
            art = quantfx.lower(q, (data[0][:1],))
            stage = "verify"
            r = quantfx.verify(q, art, data[1])
            print(f"{name:10s} {target:5s} OK err={r.max_error_lsb:.3f} sqnr={quantfx.sqnr(m(data[1]), q(data[1])):.1f}")
        except Exception as e:
            print(f"{name:10s} {target:5s} FAIL at {stage}: {type(e).__name__}: {str(e)[:300]}")
