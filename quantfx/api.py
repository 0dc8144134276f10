"""Public compiler API: ``quantize``, ``calibrate``, ``pipeline_for``, ``inspect``.

``quantize`` lives here; the rest is re-exported from the core modules that do the work, so every name stays
importable from ``quantfx.api``: pipelines (:mod:`quantfx.pipelines`), the compiled model
(:mod:`quantfx.graph_module`), calibration (:mod:`quantfx.calibration`) and tables (:mod:`quantfx.tables`)."""
from __future__ import annotations

import contextlib
import copy
import gc
import math
from typing import Optional

import torch
from torch import fx, nn

from .bias_correction import correct_bias  # noqa: F401  (re-exported)
from .calibration import (  # noqa: F401  (re-exported)
    CALIBRATION_METHODS, WEIGHT_ROUNDINGS, _as_args, _first_batch, _n_inputs, _progress, _run_batches, calibrate,
    calibration_pipeline, quantizers,
)
from .draw import dump_diagram
from .errors import QuantArgumentError, QuantFXError
# _rebuild: models pickled before QuantGraphModule moved to quantfx.graph_module name quantfx.api._rebuild
from .graph_module import QuantGraphModule, _copy_meta, _rebuild  # noqa: F401  (re-exported)
from .mixed_precision import choose_widths
from .pass_infra import Pass, PassManager, Pipeline
from .pipelines import (  # noqa: F401  (re-exported)
    _profile, _profile_opts, _split_top, annotate, bind, parse_pipeline, pipeline_for,
)
from .tables import inspect, layer_table  # noqa: F401  (re-exported)


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the block (restored after). Compiling a model allocates
    hundreds of thousands of objects, and each full collection walks every live one, so with the collector on
    compile time grows faster than the model (BENCHMARKS.md, "Compiler speed")."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of a non-empty float tensor is finite: its min and max in one pass (NaN propagates
    to both, an inf is one of them), without the mask ``isfinite(t).all()`` would build."""
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(lo) and math.isfinite(hi)


def _check_finite_state(model: nn.Module) -> None:
    """QuantArgumentError naming the first parameter or buffer holding NaN or inf: its quantizer would have no
    finite scale, and BatchNorm folding would spread it over a whole layer."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and t.numel() and not _finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise QuantArgumentError(f"quantize: {kind} {name} holds {bad} NaN or inf value(s) of {t.numel()}; "
                                         "fix the model's weights (reload the checkpoint, or find the training step "
                                         "that diverged) before quantizing")


def quantize(model: nn.Module, target="finn", example_inputs=None, calibration_data=None, *,
             weight_bit_width: Optional[int] = None, act_bit_width: Optional[int] = None,
             bias_bit_width: Optional[int] = None, input_bit_width: Optional[int] = None,
             bias_scaling: Optional[str] = None, cpu: Optional[str] = None, overrides: Optional[dict] = None,
             leaf_modules=(), concrete_args: Optional[dict] = None, capture: Optional[str] = None,
             pipeline: Optional[Pipeline] = None,
             calibration_method: str = "auto", weight_rounding: str = "auto", progress: bool = True,
             bias_correction: bool = False, equalize: Optional[bool] = None, seed: int = 0, dump_dir=None,
             on_dump=None, budget=None) -> QuantGraphModule:
    """Quantize a float model for ``target`` ('finn' | 'torch' | 'onnx' | 'dpu' or a TargetProfile).

    The model is copied (never modified); BatchNorm is folded with its running statistics, so the copy is put
    in eval mode. ``overrides`` maps module names or types to keyword overrides or ``None`` (keep float).
    With ``calibration_data`` (a DataLoader, or a list of tensors or tuples) the result is calibrated.
    ``cpu`` ('any' | 'vnni', onnx and torch): 'any' (the default) keeps every integer layer exact on x86 CPUs
    without VNNI too, whose 8-bit kernels sum products in saturating int16 pairs; 'vnni' is for deployments on
    AVX512-VNNI/AVX-VNNI x86 or ARM only, and allows full 8-bit weights.
    With ``calibration_data``, the defaults pick the grid by bit width (``calibration_method='auto'``,
    ``weight_rounding='auto'``): at 4 bits or fewer, activation scales by MSE calibration, weight scales by MSE
    search (swap_modules) and weight rounding learned on the data (AdaRound, deterministic under ``seed``);
    above, min/max ranges and round-to-nearest. Give 'minmax' / 'percentile' / 'mse' and 'nearest' / 'learned'
    (or 'gptq') to choose; ``quantfx.inspect`` lists what each layer got. ``equalize``: cross-layer equalization before
    quantization (None: off for now; pipelines.equalize_default). ``capture``: 'auto' (torch.fx symbolic tracing,
    torch.export where that fails or the traced graph does not run on the example inputs), 'fx' or 'export'
    (docs/capture.md; None: 'auto', or what a given ``pipeline``'s trace says); ``qmodel.notes['capture']`` says
    which ran and why.
    ``budget`` (with ``calibration_data``): mixed precision, each layer's weight and activation widths chosen
    (at most the widths given) to lose the least accuracy under a cost budget, ``{'bops': 0.25}`` (at most 1: a
    fraction of the 8-bit model's cost), ``{'weight_bytes': 20_000}``, ``{'finn_luts': 50_000}``; every key
    must hold (:mod:`quantfx.mixed_precision`, docs/mixed_precision.md).
    Returns a :class:`QuantGraphModule` in eval mode. Raises TraceError, QuantArgumentError, PassError."""
    if not isinstance(model, nn.Module):
        raise QuantArgumentError(f"quantize: expected an nn.Module, got {type(model).__name__}")
    if calibration_method not in CALIBRATION_METHODS:
        raise QuantArgumentError(f"quantize: calibration_method={calibration_method!r}; use one of "
                                 f"{', '.join(CALIBRATION_METHODS)}")
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise QuantArgumentError(f"quantize: weight_rounding={weight_rounding!r}; use one of "
                                 f"{', '.join(WEIGHT_ROUNDINGS)}")
    _check_finite_state(model)
    profile = _profile(target, **_profile_opts(dict(
        weight_bit_width=weight_bit_width, act_bit_width=act_bit_width, bias_bit_width=bias_bit_width,
        input_bit_width=input_bit_width, bias_scaling=bias_scaling, cpu=cpu)))
    if example_inputs is None and calibration_data is not None:
        example_inputs = _first_batch(calibration_data, model)
    if example_inputs is not None and torch.is_tensor(example_inputs):
        example_inputs = (example_inputs,)
    if pipeline is None:
        pipeline = pipeline_for(profile, equalize=equalize)
    elif equalize is not None:
        raise QuantArgumentError("quantize: equalize= chooses a pass of the default pipeline; with pipeline= given, "
                                 "add or leave out equalize_cross_layer in it instead")
    options = dict(overrides=dict(overrides) if overrides is not None else None, capture=capture,
                   leaf_modules=tuple(leaf_modules) or None, concrete_args=concrete_args,
                   example_inputs=tuple(example_inputs) if example_inputs is not None else None)
    pipeline = bind(pipeline, profile, **options)
    if dump_dir is not None and on_dump is None:
        on_dump = dump_diagram
    manager = PassManager(pipeline, dump_dir=dump_dir, on_dump=on_dump)
    with gc_paused():
        work = copy.deepcopy(model).eval()
        gm = manager.run(work, recompile=False)  # QuantGraphModule below compiles the graph once
        if not isinstance(gm, fx.GraphModule):
            raise QuantFXError("quantize: the pipeline did not produce a GraphModule (does it start with trace?)")
        qmodel = QuantGraphModule(gm, gm.graph, profile)
    _copy_meta(gm, qmodel)
    qmodel.pass_timings = manager.records
    qmodel.eval()
    if budget is not None:
        if calibration_data is None:
            raise QuantArgumentError("quantize: budget= chooses widths on the calibration data; give "
                                     "calibration_data too")
        calibrate(qmodel, calibration_data, method=calibration_method, progress=progress)
        choose_widths(qmodel, calibration_data, budget, progress=progress, rounding=weight_rounding)
    if calibration_data is not None:
        calibrate(qmodel, calibration_data, method=calibration_method, progress=progress,
                  bias_correction=bias_correction, weight_rounding=weight_rounding, seed=seed)
    elif not any(p.name == "annotate" for p in pipeline):
        annotate(qmodel)
    return qmodel


__all__ = ["QuantGraphModule", "quantize", "calibrate", "correct_bias", "pipeline_for", "parse_pipeline",
           "bind", "annotate", "inspect", "layer_table", "quantizers", "Pass"]
