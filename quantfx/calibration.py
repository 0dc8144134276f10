"""Calibration: ``calibrate`` (observe data, fix every activation scale, then run the post-calibration passes of
``calibration_pipeline``) and the helpers that feed batches to a model."""
from __future__ import annotations

import inspect
import sys
from typing import Iterable, Optional

import torch
from torch import fx, nn

from .errors import CalibrationError, QuantArgumentError, QuantFXError
from .nn import QuantWBIOL
from .pass_infra import PassManager, Pipeline, get_pass
from .pipelines import bind
from .quant import Quantizer, is_low_bit
from .quant.quantizer import _distributed
from .shapes import record_shapes as record_shapes_of

CALIBRATION_METHODS = {"auto": None, "minmax": "max", "max": "max", "percentile": "percentile", "mse": "mse"}
WEIGHT_ROUNDINGS = ("auto", "nearest", "learned", "gptq")


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after the layer of interest needs to run);
    :func:`_run_batches` counts the batch as run."""


def auto_stat(q: Quantizer) -> str:
    """The statistic method 'auto' gives an activation quantizer: MSE search at low widths (4 bits or fewer),
    where clipping outliers costs less than a coarse grid for everything else; the range (min/max) above."""
    return "mse" if is_low_bit(q.bit_width) else "max"


def learned_rounding_default(qmodel: nn.Module) -> bool:
    """Whether weight_rounding='auto' learns the rounding: some quantized layer has low-bit weights."""
    return any(is_low_bit(m.weight_quant.bit_width) for m in qmodel.modules()
               if isinstance(m, QuantWBIOL) and m.weight_quant.is_quant_enabled)


def _n_inputs(model) -> int:
    if isinstance(model, fx.GraphModule):
        return sum(1 for n in model.graph.nodes if n.op == "placeholder")
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return max(1, len(params))


def _as_args(batch, n_inputs: int) -> tuple:
    if torch.is_tensor(batch):
        return (batch,)
    if isinstance(batch, dict):
        raise QuantArgumentError("calibration data: dict batches are not supported; yield tensors or tuples")
    if isinstance(batch, (list, tuple)):
        return tuple(batch[:n_inputs])
    raise QuantArgumentError(f"calibration data: a batch must be a tensor or a tuple, got {type(batch).__name__}")


def _first_batch(data, model) -> tuple:
    for batch in data:
        return _as_args(batch, _n_inputs(model))
    raise QuantArgumentError("calibration data is empty")


def quantizers(model: nn.Module, kind: Optional[str] = None) -> list[Quantizer]:
    """The distinct enabled quantizers of a model (shared ones once), optionally of one kind."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, Quantizer) and m.is_quant_enabled and id(m) not in seen and \
                (kind is None or m.kind == kind):
            seen.add(id(m))
            out.append(m)
    return out


def calibration_pipeline(qmodel: nn.Module, method: str = "auto", weight_rounding: str = "nearest",
                         bias_correction: bool = False) -> Pipeline:
    """The passes :func:`calibrate` runs once the observers have seen the data, in order: the scale search the
    profile's recipe names for ``method`` (dpu: fix positions by min-MSE), ``fit_bias_ranges``, ``round_weights``
    (per ``weight_rounding``), ``correct_bias`` (then ``fit_bias_ranges`` again), ``annotate``, and the recipe's
    post-calibration passes (dpu: the compiler's position rules; torch x86: the exact-requantization grid).
    Passes are found by name in the pass registry (unbound: :func:`calibrate` gives them the data)."""
    recipe = _recipe(qmodel)
    graph = isinstance(qmodel, fx.GraphModule)
    names = []
    search = dict(recipe.scale_search).get(method) if recipe is not None else None
    if search is not None:
        names.append(search)
    if graph:  # the weight grid first: learned rounding and bias correction work on the grid it leaves
        names.append("fit_bias_ranges")
    rounding = weight_rounding
    if weight_rounding == "auto":
        rounding = "learned" if learned_rounding_default(qmodel) else "nearest"
    passes = [get_pass(n)() for n in names]
    if rounding != "nearest":
        passes.append(get_pass("round_weights")(method=rounding))
    if bias_correction:
        passes.append(get_pass("correct_bias")())
        if graph:
            passes.append(get_pass("fit_bias_ranges")())  # a corrected bias may have grown past its range
    if graph:
        passes.append(get_pass("annotate")())
        passes += [get_pass(n)() for n in (recipe.after_calibration if recipe is not None else ())]
    return Pipeline(passes)


def _recipe(qmodel):
    """The recipe of a compiled model's profile, or None (a plain module)."""
    profile = getattr(qmodel, "profile", None) if isinstance(qmodel, fx.GraphModule) else None
    return profile.recipe if profile is not None else None


def calibrate(qmodel: nn.Module, data: Iterable, method: str = "auto", progress: bool = True,
              bias_correction: bool = False, max_batches: Optional[int] = None, weight_rounding: str = "nearest",
              seed: int = 0) -> nn.Module:
    """Run ``data`` through ``qmodel`` in observer mode and fix every activation scale, then run the passes of
    :func:`calibration_pipeline` on it.

    ``method``: 'auto' (the default: 'mse' for activations of 4 bits or fewer, 'minmax' above) | 'minmax' |
    'percentile' | 'mse'. Quantization is bypassed while observing (float statistics).
    A profile's recipe may compute a method with a pass of its own (``scale_search``: the dpu's 'mse' searches
    power-of-two positions as AMD Quark's MinMSE does); the observers then collect plain max statistics.
    ``weight_rounding``: 'nearest' (the default here), 'learned' (AdaRound, :mod:`quantfx.weight_rounding`:
    each weight integer up or down, chosen on ``data`` layer by layer; deterministic under ``seed``), 'gptq'
    (:mod:`quantfx.gptq`: column by column, each column's error spread over the rest through the inputs'
    Hessian; one pass over ``data``, much faster than 'learned' on large layers), or 'auto'
    ('learned' where some layer has weights of 4 bits or fewer). Then ``bias_correction``.
    A quantizer that saw no data stays uncalibrated; exporting then names it. Returns ``qmodel``."""
    if method is None:
        method = "auto"
    if method not in CALIBRATION_METHODS:
        raise QuantArgumentError(f"calibrate: method={method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise QuantArgumentError(f"calibrate: weight_rounding={weight_rounding!r}; use one of "
                                 f"{', '.join(WEIGHT_ROUNDINGS)}")
    recipe = _recipe(qmodel)
    searched = recipe is not None and method in dict(recipe.scale_search)
    stat = "max" if searched else CALIBRATION_METHODS[method]
    qs = quantizers(qmodel)
    was_training = qmodel.training
    qmodel.eval()
    for q in qs:
        if q.kind == "act":
            q.begin_calibration(stat or auto_stat(q))
        else:
            q.calibrating = True
    try:
        # the first batch records the shapes a later lowering needs (quantfx.shapes); a pipeline without
        # propagate_shapes left none in the graph, and annotate needs them to size average-pool windows
        graph = isinstance(qmodel, fx.GraphModule)
        keep = graph and any("tensor_meta" not in n.meta for n in qmodel.graph.nodes if n.op == "placeholder")
        numbered = _numbered(data, qs) if _distributed() is not None else data
        ran = _run_batches(qmodel, numbered, progress, "calibrating", max_batches, record_shapes=graph,
                           keep_meta=keep)
    finally:
        for q in qs:
            if q.kind == "act":
                q.end_calibration()
            else:
                q.calibrating = False
    if ran == 0:
        raise CalibrationError("calibrating: the calibration data is empty (no batch ran), so no activation "
                               "quantizer has a scale; give at least one batch")
    stage = calibration_pipeline(qmodel, method, weight_rounding, bias_correction)
    stage = bind(stage, getattr(qmodel, "profile", None), data=data, max_batches=max_batches, progress=progress,
                 seed=seed)
    PassManager(stage).run(qmodel)
    qmodel.train(was_training)
    return qmodel


def _numbered(data, qs):
    """``data``, each activation quantizer told the index of the batch it observes next (under
    torch.distributed, ranks combine averaged statistics in batch order: Quantizer._reduce_calibration)."""
    for i, batch in enumerate(data):
        for q in qs:
            if q.kind == "act" and q._calib is not None:
                q._calib["batch"] = i
        yield batch


def _run_batches(model, data, progress: bool, desc: str, max_batches: Optional[int],
                 record_shapes: bool = False, keep_meta: bool = False) -> int:
    """Run every batch of ``data`` (up to ``max_batches``) through ``model`` without gradients; with
    ``record_shapes`` the first batch also records the model's shapes (:func:`quantfx.shapes.record_shapes`;
    into each node's ``tensor_meta`` too with ``keep_meta``). Returns how many batches ran. A batch holding NaN
    or inf, or one the model cannot run, is a CalibrationError naming it."""
    n_in = _n_inputs(model)
    ran = 0
    with torch.no_grad():
        for i, batch in enumerate(_progress(data, progress, desc)):
            if max_batches is not None and i >= max_batches:
                break
            args = _as_args(batch, n_in)
            _check_finite(args, i, desc)
            try:
                if record_shapes and i == 0:
                    record_shapes_of(model, args, keep_meta=keep_meta)
                else:
                    model(*args)
            except StopForward:
                pass
            except QuantFXError:
                raise
            except Exception as e:
                raise CalibrationError(
                    f"{desc}: batch {i} (input shapes {_shapes(args)}) does not run through the model: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; give batches shaped like the "
                    f"example inputs{_expected(model)}") from e
            ran += 1
    return ran


def _shapes(args) -> str:
    return ", ".join(str(tuple(a.shape)) if torch.is_tensor(a) else type(a).__name__ for a in args)


def _expected(model) -> str:
    if not isinstance(model, fx.GraphModule):
        return ""
    metas = [n.meta.get("tensor_meta") for n in model.graph.nodes if n.op == "placeholder"]
    if not metas or any(m is None for m in metas):
        return ""
    return " (" + ", ".join(str(tuple(m.shape)) for m in metas) + "; the batch size may differ)"


def _check_finite(args, index: int, desc: str) -> None:
    for k, a in enumerate(args):
        if torch.is_tensor(a) and a.is_floating_point() and not bool(torch.isfinite(a).all()):
            bad = int((~torch.isfinite(a)).sum())
            raise CalibrationError(f"{desc}: batch {index}, input {k} holds {bad} NaN or inf value(s) of "
                                   f"{a.numel()}; a quantizer that saw them would get no finite scale (clean or drop "
                                   "that batch)")


def _progress(data, enabled: bool, desc: str):
    if not enabled:
        return data
    from tqdm.auto import tqdm  # third-party, loaded only when a progress bar is shown
    total = len(data) if hasattr(data, "__len__") else None
    # disable=None: no bar when stderr is not a terminal (a log, a pipe, CI), where its redraws would be left as
    # lines of text; on a terminal leave=False clears it once the loop ends
    return tqdm(data, desc=desc, total=total, leave=False, file=sys.stderr, disable=None)
