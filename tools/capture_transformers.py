"""Which Hugging Face transformers architectures quantfx compiles per target (capture='auto'), with SQNR against
float and quantfx.verify's max error in LSBs. Small configs, random weights (nothing downloads), each model wrapped
to return its logits tensor, calibrated on one batch of 2, verified on it.

    python tools/capture_transformers.py [--targets onnx,torch,dpu,finn] [--models bert,vit,...]

Prints a markdown table (BENCHMARKS.md, "Capture: torch.export").
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

import quantfx
from quantfx.errors import QuantFXError
from quantfx.model_specs import Logits


def _text(cls, config):
    return lambda: (cls(config), torch.randint(0, 100, (2, 16)))


def _image(cls, config, size=32, channels=3):
    return lambda: (cls(config), torch.randn(2, channels, size, size))


def models():
    import transformers as T
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return {
        "bert": _text(T.BertForSequenceClassification, T.BertConfig(vocab_size=100, max_position_embeddings=64,
                                                                     **small)),
        "distilbert": _text(T.DistilBertForSequenceClassification, T.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)),
        "gpt2": _text(T.GPT2LMHeadModel, T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2,
                                                        n_positions=64, use_cache=False, bos_token_id=0,
                                                        eos_token_id=0)),
        "vit": _image(T.ViTForImageClassification, T.ViTConfig(image_size=32, patch_size=8, num_labels=10, **small)),
        "swin": _image(T.SwinForImageClassification, T.SwinConfig(image_size=32, patch_size=4, embed_dim=16,
                                                                   depths=[1, 1], num_heads=[1, 2], window_size=4,
                                                                   num_labels=10)),
        "convnext": _image(T.ConvNextForImageClassification, T.ConvNextConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10), size=64),
        "resnet": _image(T.ResNetForImageClassification, T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10), size=64),
        "mobilevit": _image(T.MobileViTForImageClassification, T.MobileViTConfig(
            image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=10),
            size=64),
    }


def run(name, build, target):
    torch.manual_seed(0)
    model, x = build()
    model = Logits(model).eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            model(x)
        q = quantfx.quantize(model, target, example_inputs=(x,), calibration_data=[x], progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            sqnr = quantfx.sqnr(model(x), q(x))
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / ("m.pt2" if target == "torch" else "m.onnx")
            quantfx.export(q, path, (x,))
            lsb = quantfx.verify(q, path, (x,)).outputs[0].max_error_lsb
        capture = q.notes.get("capture", {})
        how = capture.get("method", "?") + (" static" if "static" in capture.get("shapes", "") else "")
        return f"ok: {sqnr:.1f} dB, {lsb:.0f} LSB, {how}, {seconds:.1f} s"
    except QuantFXError as e:
        return f"refused: {type(e).__name__}: {str(e).splitlines()[0][:110]}"
    except Exception as e:  # noqa: BLE001  (a failure to report, not to hide)
        return f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:110] if str(e) else ''}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="onnx,torch,dpu,finn")
    parser.add_argument("--models", default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    table = models()
    names = args.models.split(",") if args.models else list(table)
    targets = args.targets.split(",")
    print("| model | " + " | ".join(targets) + " |")
    print("|---" * (len(targets) + 1) + "|")
    for name in names:
        cells = [run(name, table[name], t) for t in targets]
        print(f"| {name} | " + " | ".join(c.replace("|", "/") for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
