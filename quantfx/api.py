"""Public compiler API: ``quantize``, ``calibrate``, ``pipeline_for``, ``inspect``."""
from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import gc
import sys
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .errors import QuantArgumentError, QuantFXError
from .graph import META_KEY, fmt_scale, is_act_quant, is_add, is_cat, is_compute, is_trunc_pool, module_of, qmeta
from .pass_infra import Pass, PassManager, Pipeline
from .quant import Quantizer
from .quant_tensor import value_of

CALIBRATION_METHODS = {"minmax": "max", "max": "max", "percentile": "percentile", "mse": "mse"}


def _targets():
    from . import targets  # quantfx.targets (the top-level targets/ folder)
    return targets


def _passes():
    from . import passes
    return passes


class QuantGraphModule(fx.GraphModule):
    """A quantized GraphModule that remembers its target profile; picklable and deep-copyable."""

    def __init__(self, root, graph, profile=None, class_name: str = "QuantGraphModule"):
        super().__init__(root, graph, class_name)
        self.profile = profile if profile is not None else getattr(root, "profile", None)

    def __reduce__(self):
        fn, args = super().__reduce__()
        # node.meta is not pickled; shapes are kept so annotate can size average-pool windows again
        # (without memory_format, which torch.save cannot pickle)
        shapes = {n.name: n.meta["tensor_meta"]._replace(memory_format=None) for n in self.graph.nodes
                  if isinstance(n.meta.get("tensor_meta"), TensorMetadata)}
        return (_rebuild, (fn, args, self.profile, shapes))

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)  # torch rebuilds a plain GraphModule: wrap it again
        out = QuantGraphModule(res, res.graph, self.profile)
        _copy_meta(self, out)
        return out


def _copy_meta(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    for a, b in zip(src.graph.nodes, dst.graph.nodes):
        b.meta.update(a.meta)


def _rebuild(fn, args, profile, shapes=None):
    gm = fn(*args)
    out = QuantGraphModule(gm, gm.graph, profile)
    for node in out.graph.nodes:
        if shapes and node.name in shapes:
            node.meta["tensor_meta"] = shapes[node.name]
    annotate(out)
    return out


def annotate(qmodel: fx.GraphModule) -> fx.GraphModule:
    """(Re)write ``node.meta['quant']`` on every node of a compiled graph; returns it."""
    _passes().Annotate()(qmodel)
    return qmodel


# -- pipelines ----------------------------------------------------------------------------------------


def pipeline_for(target="finn", *, overrides: Optional[dict] = None, leaf_modules=(), concrete_args=None,
                 example_inputs=(), **profile_options) -> Pipeline:
    """The default pass pipeline for a target (a name or a TargetProfile); edit it and pass it to quantize."""
    P = _passes()
    profile = _profile(target, **profile_options)
    overrides = dict(overrides or {})
    return Pipeline([
        P.Trace(leaf_modules=tuple(leaf_modules), concrete_args=tuple((concrete_args or {}).items())),
        P.PropagateShapes(example_inputs=tuple(example_inputs or ())),
        P.Canonicalize(),
        P.FuseConvBN(),
        P.SwapModules(profile=profile, overrides=overrides),
        P.ShareQuantizers(profile=profile),
        P.ChooseBiasScaling(profile=profile, overrides=overrides),
        P.Annotate(),
    ])


def parse_pipeline(text: str, target="finn", **options) -> Pipeline:
    """A pipeline spelled as a string: ``trace,canonicalize,fuse_conv_bn{},swap_modules,...``.

    Options in braces are Python literals: ``fuse_conv_bn,swap_modules`` or ``trace{leaf_modules=('a',)}``.
    Passes that take a profile/overrides/example inputs receive those of ``target``/``options``."""
    registry = _passes().REGISTRY
    passes = []
    for item in _split_top(text):
        name, _, rest = item.strip().partition("{")
        name = name.strip()
        if name not in registry:
            raise QuantArgumentError(f"pipeline: unknown pass {name!r}; known passes: {', '.join(registry)}")
        kwargs = {}
        if rest:
            for pair in _split_top(rest.rstrip("}")):
                if pair.strip():
                    k, _, v = pair.partition("=")
                    kwargs[k.strip()] = ast.literal_eval(v.strip())
        passes.append(registry[name](**kwargs))
    return bind(Pipeline(passes), _profile(target, **_profile_opts(options)), **options)


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{([":
            depth += 1
        elif ch in "})]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def _profile_opts(options: dict) -> dict:
    keys = ("weight_bit_width", "act_bit_width", "bias_bit_width", "input_bit_width", "bias_scaling", "cpu")
    return {k: options.get(k) for k in keys if options.get(k) is not None}


def bind(pipeline: Pipeline, profile, **options) -> Pipeline:
    """Give every pass that has a ``profile`` (or ``overrides``, ``example_inputs``, ...) field these values."""
    values = {"profile": profile, **{k: v for k, v in options.items() if v is not None}}
    if "concrete_args" in values and isinstance(values["concrete_args"], dict):
        values["concrete_args"] = tuple(values["concrete_args"].items())
    for key in ("leaf_modules", "example_inputs"):
        if key in values:
            values[key] = tuple(values[key])
    out = []
    for p in pipeline:
        if dataclasses.is_dataclass(p):
            names = {f.name for f in dataclasses.fields(p)}
            changes = {k: v for k, v in values.items() if k in names}
            p = dataclasses.replace(p, **changes) if changes else p
        out.append(p)
    return Pipeline(out)


def _profile(target, **options):
    profile = _targets().get_profile(target)
    return profile.replace(**options)


# -- quantize -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the block (restored after). Compiling a model allocates
    hundreds of thousands of objects, and each full collection walks every live one: for a 2000-layer model
    the collector made quantize 14% slower and grow 11.5x from 200 layers instead of 9.4x."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def quantize(model: nn.Module, target="finn", example_inputs=None, calibration_data=None, *,
             weight_bit_width: Optional[int] = None, act_bit_width: Optional[int] = None,
             bias_bit_width: Optional[int] = None, input_bit_width: Optional[int] = None,
             bias_scaling: Optional[str] = None, cpu: Optional[str] = None, overrides: Optional[dict] = None,
             leaf_modules=(), concrete_args: Optional[dict] = None, pipeline: Optional[Pipeline] = None,
             calibration_method: str = "minmax", progress: bool = True, bias_correction: bool = False,
             dump_dir=None, on_dump=None) -> QuantGraphModule:
    """Quantize a float model for ``target`` ('finn' | 'torch' | 'onnx' | 'dpu' or a TargetProfile).

    The model is copied (never modified); BatchNorm is folded with its running statistics, so the copy is put
    in eval mode. ``overrides`` maps module names or types to keyword overrides or ``None`` (keep float).
    With ``calibration_data`` (a DataLoader, or a list of tensors or tuples) the result is calibrated.
    ``cpu`` ('any' | 'vnni', onnx and torch): 'any' (the default) keeps every integer layer exact on x86 CPUs
    without VNNI too, whose 8-bit kernels sum products in saturating int16 pairs; 'vnni' is for deployments on
    AVX512-VNNI/AVX-VNNI x86 or ARM only, and allows full 8-bit weights.
    Returns a :class:`QuantGraphModule` in eval mode. Raises TraceError, QuantArgumentError, PassError."""
    if not isinstance(model, nn.Module):
        raise QuantArgumentError(f"quantize: expected an nn.Module, got {type(model).__name__}")
    if calibration_method not in CALIBRATION_METHODS:
        raise QuantArgumentError(f"quantize: calibration_method={calibration_method!r}; use one of "
                                 f"{', '.join(CALIBRATION_METHODS)}")
    profile = _profile(target, **_profile_opts(dict(
        weight_bit_width=weight_bit_width, act_bit_width=act_bit_width, bias_bit_width=bias_bit_width,
        input_bit_width=input_bit_width, bias_scaling=bias_scaling, cpu=cpu)))
    if example_inputs is None and calibration_data is not None:
        example_inputs = _first_batch(calibration_data, model)
    if example_inputs is not None and torch.is_tensor(example_inputs):
        example_inputs = (example_inputs,)
    if pipeline is None:
        pipeline = pipeline_for(profile)
    options = dict(overrides=dict(overrides) if overrides is not None else None,
                   leaf_modules=tuple(leaf_modules) or None, concrete_args=concrete_args,
                   example_inputs=tuple(example_inputs) if example_inputs is not None else None)
    pipeline = bind(pipeline, profile, **options)
    if dump_dir is not None and on_dump is None:
        from .draw import dump_diagram
        on_dump = dump_diagram
    manager = PassManager(pipeline, dump_dir=dump_dir, on_dump=on_dump)
    with gc_paused():
        work = copy.deepcopy(model).eval()
        gm = manager.run(work)
        if not isinstance(gm, fx.GraphModule):
            raise QuantFXError("quantize: the pipeline did not produce a GraphModule (does it start with trace?)")
        qmodel = QuantGraphModule(gm, gm.graph, profile)
    _copy_meta(gm, qmodel)
    qmodel.pass_timings = manager.records
    qmodel.eval()
    if calibration_data is not None:
        calibrate(qmodel, calibration_data, method=calibration_method, progress=progress,
                  bias_correction=bias_correction)
    elif not any(p.name == "annotate" for p in pipeline):
        annotate(qmodel)
    return qmodel


# -- calibration --------------------------------------------------------------------------------------


def _n_inputs(model) -> int:
    if isinstance(model, fx.GraphModule):
        return sum(1 for n in model.graph.nodes if n.op == "placeholder")
    import inspect as _inspect
    params = [p for p in _inspect.signature(model.forward).parameters.values()
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


def calibrate(qmodel: nn.Module, data: Iterable, method: str = "minmax", progress: bool = True,
              bias_correction: bool = False, max_batches: Optional[int] = None) -> nn.Module:
    """Run ``data`` through ``qmodel`` in observer mode and fix every activation scale.

    ``method``: 'minmax' | 'percentile' | 'mse'. Quantization is bypassed while observing (float statistics).
    A quantizer that saw no data stays uncalibrated; exporting then names it. Returns ``qmodel``."""
    if method not in CALIBRATION_METHODS:
        raise QuantArgumentError(f"calibrate: method={method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    stat = CALIBRATION_METHODS[method]
    qs = quantizers(qmodel)
    was_training = qmodel.training
    qmodel.eval()
    for q in qs:
        if q.kind == "act":
            q.begin_calibration(stat)
        else:
            q.calibrating = True
    try:
        # a pipeline without propagate_shapes left no shapes: annotate needs them to size average-pool windows
        record = isinstance(qmodel, fx.GraphModule) and \
            any("tensor_meta" not in n.meta for n in qmodel.graph.nodes if n.op == "placeholder")
        _run_batches(qmodel, data, progress, "calibrating", max_batches, record_shapes=record)
    finally:
        for q in qs:
            if q.kind == "act":
                q.end_calibration()
            else:
                q.calibrating = False
    if bias_correction:
        correct_bias(qmodel, data, progress=progress, max_batches=max_batches)
    if isinstance(qmodel, fx.GraphModule):
        annotate(qmodel)
    qmodel.train(was_training)
    return qmodel


def _run_batches(model, data, progress: bool, desc: str, max_batches: Optional[int],
                 record_shapes: bool = False) -> None:
    """Run every batch of ``data`` (up to ``max_batches``) through ``model`` without gradients; with
    ``record_shapes`` the first batch also records each node's ``tensor_meta`` (torch.fx ShapeProp)."""
    n_in = _n_inputs(model)
    with torch.no_grad():
        for i, batch in enumerate(_progress(data, progress, desc)):
            if max_batches is not None and i >= max_batches:
                break
            if record_shapes and i == 0:
                ShapeProp(model).propagate(*_as_args(batch, n_in))
            else:
                model(*_as_args(batch, n_in))


def _progress(data, enabled: bool, desc: str):
    if not enabled:
        return data
    from tqdm.auto import tqdm
    total = len(data) if hasattr(data, "__len__") else None
    return tqdm(data, desc=desc, total=total, leave=False, file=sys.stderr)


def correct_bias(qmodel: nn.Module, data: Iterable, progress: bool = True,
                 max_batches: Optional[int] = None) -> nn.Module:
    """Empirical bias correction: add to each quantized layer's bias the mean per-channel difference between
    its output with float weights and with quantized weights, on the same (quantized) inputs."""
    from .nn import QuantWBIOL
    layers = [m for m in qmodel.modules() if isinstance(m, QuantWBIOL) and m.bias is not None
              and m.weight_quant.is_quant_enabled]
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(layer, args, _out):
        x = value_of(args[0])
        diff = layer.inner_forward(x, layer.weight, None) - \
            layer.inner_forward(x, value_of(layer.quant_weight()), None)
        axis = layer.out_channel_axis % diff.dim()
        dims = [d for d in range(diff.dim()) if d != axis]
        sums[id(layer)] = sums.get(id(layer), 0) + diff.mean(dims)
        counts[id(layer)] = counts.get(id(layer), 0) + 1

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        _run_batches(qmodel, data, progress, "bias correction", max_batches)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for m in layers:
            if id(m) in sums:
                m.bias.add_(sums[id(m)] / counts[id(m)])
    return qmodel


# -- inspection ---------------------------------------------------------------------------------------


def layer_table(qmodel: fx.GraphModule) -> list[dict[str, Any]]:
    """One row per quantized layer / quantizer / add / cat: name, op, weight/act/bias bits, scale, acc, group."""
    rows = []
    for node in qmodel.graph.nodes:
        meta = node.meta.get(META_KEY)
        if meta is None:
            continue
        row = None
        if is_compute(qmodel, node):
            m = module_of(qmodel, node)
            bq = m.bias_quant
            row = dict(name=node.target, op=type(m).__name__,
                       weight_bits=m.weight_quant.bit_width if m.weight_quant.is_quant_enabled else None,
                       act_bits=qmeta(node.args[0]).bit_width,
                       bias=(f"{bq.bit_width} {bq.bias_scaling}" if bq.is_quant_enabled
                             else ("float" if m.bias is not None else None)),
                       scale=fmt_scale(meta.scale), acc_bits=meta.bit_width, group=None)
        elif is_act_quant(qmodel, node):
            m = module_of(qmodel, node)
            row = dict(name=node.target, op=type(m).__name__, weight_bits=None,
                       act_bits=f"{'int' if meta.signed else 'uint'}{meta.bit_width}", bias=None,
                       scale=fmt_scale(meta.scale), acc_bits=None, group=meta.group)
        elif is_trunc_pool(qmodel, node):
            row = dict(name=node.target, op=type(module_of(qmodel, node)).__name__, weight_bits=None,
                       act_bits=meta.bit_width, bias=None, scale=fmt_scale(meta.scale), acc_bits=None,
                       group=None)
        elif is_add(node) or is_cat(node):
            row = dict(name=node.name, op="add" if is_add(node) else "cat", weight_bits=None,
                       act_bits=meta.bit_width if is_cat(node) else None, bias=None, scale=fmt_scale(meta.scale),
                       acc_bits=meta.bit_width if is_add(node) else None, group=meta.group)
        if row is not None:
            rows.append(row)
    return rows


def inspect(qmodel: fx.GraphModule, file=None) -> str:
    """Print (and return) a per-layer table: name, op, weight/act/bias bits, scale, accumulator, group."""
    rows = layer_table(qmodel)
    cols = ["name", "op", "weight_bits", "act_bits", "bias", "scale", "acc_bits", "group"]
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, file=file or sys.stdout)
    return text


__all__ = ["QuantGraphModule", "quantize", "calibrate", "correct_bias", "pipeline_for", "parse_pipeline",
           "bind", "annotate", "inspect", "layer_table", "quantizers", "Pass"]
