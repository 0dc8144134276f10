"""Pipelines: a target's default pass pipeline (``pipeline_for``), pipelines spelled as strings
(``parse_pipeline``), binding a pipeline to a target profile and options (``bind``), and ``annotate``.

Passes are found by name in :data:`quantfx.pass_infra.PASSES` and profiles in :mod:`quantfx.profile`'s registry,
which quantfx.passes and quantfx.targets fill; nothing here imports a pass or a target."""
from __future__ import annotations

import ast
import dataclasses
from typing import Optional

from torch import fx

from .errors import QuantArgumentError
from .pass_infra import Pipeline, get_pass
from .profile import get_profile


def _profile(target, **options):
    return get_profile(target).replace(**options)


def _profile_opts(options: dict) -> dict:
    keys = ("weight_bit_width", "act_bit_width", "bias_bit_width", "input_bit_width", "bias_scaling", "cpu")
    return {k: options.get(k) for k in keys if options.get(k) is not None}


def annotate(qmodel: fx.GraphModule) -> fx.GraphModule:
    """(Re)write ``node.meta['quant']`` on every node of a compiled graph; returns it."""
    get_pass("annotate")()(qmodel)
    return qmodel


def equalize_default(profile) -> bool:
    """Whether ``equalize=None`` runs cross-layer equalization: on no target. It is opt-in (``equalize=True``)
    until it is shown to help on trained models (BENCHMARKS.md, "Cross-layer equalization by default")."""
    return False


def pipeline_for(target="finn", *, overrides: Optional[dict] = None, leaf_modules=(), concrete_args=None,
                 example_inputs=(), equalize: Optional[bool] = None, capture: str = "auto",
                 **profile_options) -> Pipeline:
    """The default pass pipeline for a target (a name or a TargetProfile); edit it and pass it to quantize.
    ``equalize``: run equalize_cross_layer after fuse_conv_bn (None: where :func:`equalize_default` says).
    ``capture``: how trace captures the model, 'auto' | 'fx' | 'export' (docs/capture.md)."""
    P = get_pass
    profile = _profile(target, **profile_options)
    overrides = dict(overrides or {})
    if equalize is None:
        equalize = equalize_default(profile)
    return Pipeline([
        P("trace")(leaf_modules=tuple(leaf_modules), concrete_args=tuple((concrete_args or {}).items()),
                   capture=capture, example_inputs=tuple(example_inputs or ())),
        P("propagate_shapes")(example_inputs=tuple(example_inputs or ())),
        P("canonicalize")(),
        P("fuse_conv_bn")(),
        *([P("equalize_cross_layer")()] if equalize else []),
        P("swap_modules")(profile=profile, overrides=overrides),
        # the accelerator's activation and average-pool constants, on recipes that state them (dpu)
        *([P("approximate_activations")(profile=profile)] if profile.recipe.activation_approx != "exact" else []),
        P("share_quantizers")(profile=profile),
        P("choose_bias_scaling")(profile=profile, overrides=overrides),
        P("quantize_products")(profile=profile, overrides=overrides),
        # softmax from an exp table, where float islands may run (finn refuses them: nothing to tabulate)
        *([P("tabulate_softmax")(profile=profile, overrides=overrides)] if profile.constraints.float_islands_allowed
          else []),
        P("annotate")(),
    ])


def parse_pipeline(text: str, target="finn", **options) -> Pipeline:
    """A pipeline spelled as a string: ``trace,canonicalize,fuse_conv_bn{},swap_modules,...``.

    Options in braces are Python literals: ``fuse_conv_bn,swap_modules`` or ``trace{leaf_modules=('a',)}``.
    Passes that take a profile/overrides/example inputs receive those of ``target``/``options``."""
    passes = []
    for item in _split_top(text):
        name, _, rest = item.strip().partition("{")
        cls = get_pass(name.strip())
        kwargs = {}
        if rest:
            if not rest.rstrip().endswith("}"):
                raise QuantArgumentError(f"pipeline: {item.strip()!r} opens '{{' without closing it")
            for pair in _split_top(rest.rstrip()[:-1]):  # one closing brace: a dict option keeps its own
                if pair.strip():
                    k, _, v = pair.partition("=")
                    kwargs[k.strip()] = ast.literal_eval(v.strip())
        passes.append(cls(**kwargs))
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
