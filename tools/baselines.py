"""Post-training quantization baselines for benchmarks: Brevitas and torch.ao FX, as plain functions.

Benchmark-only: Brevitas comes with ``pip install -e ".[bench]"``; quantfx itself and its tests never import
this module. Every function deep-copies the model it is given (Brevitas and torch.ao rewrite models in place)
and returns a model in eval mode to evaluate like the float one, ``out = qmodel(x)``. ``calib_batches`` is an
iterable of input tensors (or tuples of them), run once each, in order, under ``torch.no_grad()``.

Stable API (tools/bench.py and the low-bit PTQ benchmark import it; keep these signatures):

- ``torchao_ptq(model, calib_batches, w_bits=8, a_bits=8, *, backend="x86") -> nn.Module``
- ``brevitas_ptq(model, calib_batches, w_bits=8, a_bits=8) -> nn.Module``
- ``torchao_prepare(model, example_inputs, w_bits=8, a_bits=8, *, backend="x86")``,
  ``torchao_convert(prepared, w_bits=8, a_bits=8)``: the two halves of ``torchao_ptq``, for timing them
- ``brevitas_quantize(model, w_bits=8, a_bits=8)``, ``brevitas_calibrate(qmodel, calib_batches)``,
  ``brevitas_export_qonnx(qmodel, example, path)``: the steps of ``brevitas_ptq`` and its QONNX export
- ``missing(name) -> str | None``: why the package ``name`` ('brevitas', 'torch.ao') cannot be used, or None

What each uses:

torch.ao FX (``prepare_fx`` + calibration + ``convert_fx`` / fake-quant):
  * W8A8: ``get_default_qconfig_mapping(backend)`` as it is (x86: activations quint8 per tensor, affine,
    ``HistogramObserver`` with ``reduce_range=True``, i.e. codes 0..127; weights qint8 **per channel**
    symmetric, ``PerChannelMinMaxObserver``, -128..127), then ``convert_fx``: the result runs PyTorch's int8
    kernels (the engine selected by ``torch.backends.quantized.engine`` when it is called).
  * any other width (e.g. W4A4, W3A3): PyTorch's int8 kernels cannot hold narrower ranges, so the model is
    evaluated **fake-quantized**: one QConfig for every layer, activations ``FakeQuantize`` quint8 per tensor,
    affine, codes ``0..2^a-1``, observed by ``HistogramObserver`` whose L2 range search targets ``2^a`` levels
    (stock HistogramObserver searches for 256 levels whatever quant_min/quant_max say); weights
    ``FakeQuantize`` qint8 **per channel** symmetric, ``PerChannelMinMaxObserver``, codes
    ``-2^(w-1)..2^(w-1)-1``, applied to each conv/linear weight after calibration as ``convert_fx`` would
    (``prepare_fx`` leaves weights float in the forward: before 2026-12-03 these rows had float weights).
    Calibration runs with fake quantization off (observers only); evaluation with observers off and fake
    quantization on. No ``convert_fx``; the returned module is the prepared GraphModule.

Brevitas (``preprocess_for_quantize`` + ``quantize`` + ``calibration_mode``):
  * ``preprocess_for_quantize`` with its defaults (trace, BatchNorm merged into the conv, ReLU6 -> ReLU, no
    equalization), then ``brevitas.graph.quantize.quantize`` with Brevitas's default layer maps, each quantizer
    re-bit-widthed with ``.let(bit_width=...)``: weights ``Int8WeightPerTensorFloat`` (**per tensor**, narrow
    range -(2^(w-1)-1)..2^(w-1)-1, scale from the max |w|), activations ``Uint8ActPerTensorFloat`` after
    ReLU/Sigmoid and ``Int8ActPerTensorFloat`` elsewhere (input, residual adds, concats), per tensor, scale from
    the 99.999th percentile of the calibration activations (runtime statistics, averaged over batches), bias
    ``Int32Bias`` (scale = input scale x weight scale). Calibration: ``calibration_mode`` (quantization off
    while statistics are collected). Evaluated in Brevitas's fake-quant form (its QuantTensor ops).
  * Pitfall (Brevitas 0.13.4 with torch 2.13): Brevitas's backport of torch.fx names the code it generates
    ``<eval_with_key>.N`` with its own counter, as torch.fx does with another, and both register it in
    linecache; once Brevitas has traced a model, ``torch.jit.script`` of a GraphModule made later in the same
    process can compile Brevitas's source instead of its own (quantfx's torch export of mobilenetv2_like failed
    that way). tools/bench.py therefore runs Brevitas in a child process; do the same, or run Brevitas last.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn


def missing(name: str) -> Optional[str]:
    """Why ``name`` ('brevitas', 'torch.ao', 'onnxruntime.quantization') cannot be imported here, or None."""
    modules = {"brevitas": "brevitas.graph.quantize", "torch.ao": "torch.ao.quantization.quantize_fx",
               "onnxruntime.quantization": "onnxruntime.quantization"}
    try:
        __import__(modules.get(name, name))
    except ImportError as e:
        hint = ' (pip install -e ".[bench]")' if name == "brevitas" else ""
        return f"{name} is not installed or does not import: {e}{hint}"
    return None


def _as_tuple(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _run(model, calib_batches: Iterable) -> None:
    with torch.no_grad():
        for batch in calib_batches:
            model(*_as_tuple(batch))


# ---------------------------------------------------------------------------------------------- torch.ao FX


def _lowbit_qconfig_mapping(w_bits: int, a_bits: int):
    from torch.ao.quantization import FakeQuantize, QConfig, QConfigMapping
    from torch.ao.quantization.observer import HistogramObserver

    class LevelsHistogramObserver(HistogramObserver):
        """HistogramObserver whose range search minimizes L2 error for quant_max - quant_min + 1 levels."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.dst_nbins = self.quant_max - self.quant_min + 1

    act = FakeQuantize.with_args(observer=LevelsHistogramObserver, quant_min=0, quant_max=2 ** a_bits - 1,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    return QConfigMapping().set_global(QConfig(activation=act, weight=_lowbit_weight_observer(w_bits)))


def _lowbit_weight_observer(w_bits: int):
    from torch.ao.quantization.observer import PerChannelMinMaxObserver
    return PerChannelMinMaxObserver.with_args(quant_min=-2 ** (w_bits - 1), quant_max=2 ** (w_bits - 1) - 1,
                                              dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)


def _fake_quantize_weights(prepared: nn.Module, w_bits: int) -> None:
    """What ``convert_fx`` does to each weight, kept in float: ``prepare_fx`` (post-training) observes
    activations only and leaves conv/linear weights float in the prepared model's forward, so each weight is
    observed (per channel, symmetric) and fake-quantized in place here."""
    make = _lowbit_weight_observer(w_bits)
    with torch.no_grad():
        for m in prepared.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                obs = make()
                obs(m.weight)
                scale, zero_point = obs.calculate_qparams()
                m.weight.copy_(torch.fake_quantize_per_channel_affine(
                    m.weight, scale.float(), zero_point.int(), 0, obs.quant_min, obs.quant_max))


def torchao_prepare(model: nn.Module, example_inputs, w_bits: int = 8, a_bits: int = 8, *, backend: str = "x86"):
    """``prepare_fx`` on a deep copy of ``model`` (eval mode) with the QConfigMapping described in the module
    docstring: the observed GraphModule, to be run on calibration batches and then given to
    ``torchao_convert``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx
    work = copy.deepcopy(model).eval()
    if (w_bits, a_bits) == (8, 8):
        mapping = get_default_qconfig_mapping(backend)
    else:
        mapping = _lowbit_qconfig_mapping(w_bits, a_bits)
    prepared = prepare_fx(work, mapping, _as_tuple(example_inputs))
    if (w_bits, a_bits) != (8, 8):
        from torch.ao.quantization import disable_fake_quant, enable_observer
        prepared.apply(disable_fake_quant)
        prepared.apply(enable_observer)
    return prepared


def torchao_convert(prepared, w_bits: int = 8, a_bits: int = 8) -> nn.Module:
    """After calibration: ``convert_fx`` at W8A8 (int8 kernels); otherwise the prepared model switched to
    fake-quant evaluation (observers frozen)."""
    if (w_bits, a_bits) == (8, 8):
        from torch.ao.quantization.quantize_fx import convert_fx
        return convert_fx(prepared).eval()
    from torch.ao.quantization import disable_observer, enable_fake_quant
    prepared.apply(disable_observer)
    prepared.apply(enable_fake_quant)
    _fake_quantize_weights(prepared, w_bits)
    return prepared.eval()


def torchao_ptq(model: nn.Module, calib_batches, w_bits: int = 8, a_bits: int = 8, *,
                backend: str = "x86") -> nn.Module:
    """torch.ao FX post-training quantization of a copy of ``model`` calibrated on ``calib_batches`` (the first
    batch is also the example input of ``prepare_fx``). W8A8: an int8 model (``convert_fx``); other widths:
    fake-quant (module docstring)."""
    calib_batches = list(calib_batches)
    prepared = torchao_prepare(model, calib_batches[0], w_bits, a_bits, backend=backend)
    _run(prepared, calib_batches)
    return torchao_convert(prepared, w_bits, a_bits)


# ---------------------------------------------------------------------------------------------------- Brevitas


def pt2e_ptq(model: nn.Module, calib_batches) -> nn.Module:
    """torchao's PT2E flow as users run it: torch.export on the first batch, prepare_pt2e with
    X86InductorQuantizer's default config, a pass over ``calib_batches``, convert_pt2e (torchao, bench only)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    calib_batches = list(calib_batches)
    exported = torch.export.export(model, _as_tuple(calib_batches[0])).module()
    prepared = prepare_pt2e(exported, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    _run(prepared, calib_batches)
    return convert_pt2e(prepared)


def _rebit(layer_map: dict, bits: dict) -> dict:
    """A copy of a Brevitas layer map with every quantizer named in ``bits`` re-bit-widthed."""
    out = {}
    for key, value in layer_map.items():
        if value is None:
            out[key] = None
            continue
        cls, kwargs = value
        kwargs = dict(kwargs)
        for arg, width in bits.items():
            if arg in kwargs and hasattr(kwargs[arg], "let"):
                kwargs[arg] = kwargs[arg].let(bit_width=width)
        out[key] = (cls, kwargs)
    return out


def brevitas_quantize(model: nn.Module, w_bits: int = 8, a_bits: int = 8) -> nn.Module:
    """``preprocess_for_quantize`` + ``quantize`` on a deep copy of ``model``, quantizers as in the module
    docstring; not calibrated yet (``brevitas_calibrate``)."""
    from brevitas.graph import quantize as bq
    work = bq.preprocess_for_quantize(copy.deepcopy(model).eval())
    return bq.quantize(
        work,
        quant_identity_map=_rebit(bq.QUANT_IDENTITY_MAP, {"act_quant": a_bits}),
        compute_layer_map=_rebit(bq.COMPUTE_LAYER_MAP, {"weight_quant": w_bits}),
        quant_act_map=_rebit(bq.QUANT_ACT_MAP, {"act_quant": a_bits})).eval()


def brevitas_calibrate(qmodel: nn.Module, calib_batches) -> nn.Module:
    """Collect Brevitas's activation statistics over ``calib_batches`` (``calibration_mode``); returns the
    model in eval mode."""
    from brevitas.graph.calibrate import calibration_mode
    qmodel.eval()
    with calibration_mode(qmodel):
        _run(qmodel, calib_batches)
    return qmodel.eval()


def brevitas_ptq(model: nn.Module, calib_batches, w_bits: int = 8, a_bits: int = 8) -> nn.Module:
    """Brevitas post-training quantization of a copy of ``model``, calibrated on ``calib_batches``; the
    fake-quant Brevitas model (module docstring)."""
    return brevitas_calibrate(brevitas_quantize(model, w_bits, a_bits), calib_batches)


def brevitas_export_qonnx(qmodel: nn.Module, example, path) -> Path:
    """``brevitas.export.export_qonnx`` of a calibrated Brevitas model to ``path``; returns the path."""
    from brevitas.export import export_qonnx
    path = Path(path)
    with torch.no_grad():
        export_qonnx(qmodel, input_t=example, export_path=str(path))
    return path


def main(argv=None) -> int:
    """Smoke check: each baseline on a small zoo model, SQNR of its output against float."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet", help="a quantfx.zoo.TEST_MODELS name")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3], help="W=A widths to try")
    args = parser.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)  # this script only: Brevitas / torch.ao notices
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import quantfx
    from quantfx import zoo
    torch.manual_seed(0)
    model = zoo.TEST_MODELS[args.model][0]().eval()
    calib = [zoo.example_input(args.model, batch=8, seed=s) for s in range(4)]
    x = zoo.example_input(args.model, batch=16, seed=99)
    with torch.no_grad():
        ref = model(x)
    for name, fn in (("torch.ao", torchao_ptq), ("brevitas", brevitas_ptq)):
        why = missing(name)
        if why:
            print(f"{name}: skipped: {why}")
            continue
        for b in args.bits:
            with torch.no_grad():
                out = fn(model, calib, b, b)(x)
            print(f"{name:9s} W{b}A{b}: SQNR {quantfx.sqnr(ref, torch.as_tensor(out)):6.2f} dB against float")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
