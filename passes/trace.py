"""trace: capture an ``nn.Module`` as a ``torch.fx.GraphModule``.

``capture='fx'`` traces symbolically (the user's module structure is kept); ``'export'`` captures with
``torch.export`` on the example inputs and lifts the aten graph to torch-level calls (passes/capture_export.py);
``'auto'`` (the default) traces symbolically and captures by export when that fails, when the traced graph does
not run on the example inputs, or when it calls ``nn.MultiheadAttention`` (run whole in float otherwise). Which capture ran and why is recorded in ``gm.notes['capture']`` (the compiled
model's ``notes``, shown by ``quantfx.inspect``)."""
from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from quantfx.errors import QuantArgumentError, TraceError
from quantfx.nn import QuantAct, QuantWBIOL
from quantfx.nn.pool import _TruncAvgPool
from quantfx.pass_infra import Pass, PassResult

from .capture_export import capture_program

CAPTURES = ("auto", "fx", "export")
NOTE = "capture"  # gm.notes key: {'method': 'fx' | 'export', 'why': ...}


class QuantFXTracer(fx.Tracer):
    """Keeps quantfx layers and user-chosen modules (by type or qualified name) as leaves."""

    def __init__(self, leaf_modules=()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantWBIOL, QuantAct, _TruncAvgPool)) or isinstance(m, self.leaf_types) or \
                qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> str:
    """'file:line in fn: code' of the deepest frame outside torch (where the user's model failed)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename
              and "/quantfx/" not in f.filename and "/passes/" not in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


def unfilled_defaults(model: nn.Module, given: int) -> dict:
    """The forward arguments the inputs do not fill whose defaults are not tensors (``attn_mask=None``,
    ``is_causal=False`` of timm's ViT), fixed at those defaults. Traced as inputs, each became a placeholder
    that got an input quantizer, and calibration crashed on its None ("'NoneType' object has no attribute
    'detach'"); fixed, ``if attn_mask is not None`` takes the branch the model runs. ``given``: how many
    positional inputs the user passes (0 when unknown: the parameters without a default are the inputs)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not given:
        given = sum(1 for p in positional if p.default is p.empty)
    filled = {p.name for p in positional[:given]}
    return {p.name: p.default for p in params if p.name not in filled
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and (p.default is None or isinstance(p.default, (bool, int, float, str)))}


@dataclass(frozen=True)
class Trace(Pass):
    """nn.Module -> GraphModule. ``capture``: 'auto' | 'fx' | 'export' (see the module docstring);
    ``leaf_modules``: types or qualified names not traced into (fx); ``concrete_args``: forward arguments fixed
    at trace time (fx; e.g. flags that select a branch); ``example_inputs``: what export captures on, and what
    'auto' runs the symbolically traced graph on to check it."""

    name = "trace"
    runs_code = False  # reads and edits the graph only
    leaf_modules: tuple = ()
    concrete_args: tuple = ()  # ((name, value), ...) so the pass stays hashable
    capture: str = "auto"
    example_inputs: tuple = field(default=(), compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.capture not in CAPTURES:
            raise QuantArgumentError(f"trace: capture={self.capture!r}; use one of {', '.join(CAPTURES)}")

    def call(self, model) -> PassResult:
        if isinstance(model, fx.GraphModule):
            return PassResult(model, False)
        if not isinstance(model, nn.Module):
            raise TraceError(f"trace: expected an nn.Module, got {type(model).__name__}")
        if self.capture == "export":
            return PassResult(self._export(model, "capture='export' was asked for"), True)
        try:
            gm = self._symbolic(model)
        except TraceError as e:
            if self.capture == "fx" or not self.example_inputs:
                raise
            cause = e.__cause__ or e
            why = f"torch.fx could not trace it ({type(cause).__name__}: {_first_line(cause)} at {_user_frame(cause)})"
            return PassResult(self._export(model, why), True)
        if self.capture == "auto" and self.example_inputs:
            try:
                with torch.no_grad():
                    gm(*self.example_inputs)
            except Exception as e:  # noqa: BLE001  (whatever the traced code raises, export gets a chance)
                why = f"the fx-traced graph failed on the example inputs ({type(e).__name__}: {_first_line(e)})"
                return PassResult(self._export(model, why), True)
        whole = _attention_modules(gm) if self.capture == "auto" and self.example_inputs else []
        if whole:
            why = (f"torch.fx keeps {whole[0]} (nn.MultiheadAttention) whole, a float island with its projections "
                   "unquantized; export exposes them as linears")
            try:
                return PassResult(self._export(model, why), True)
            except TraceError:
                pass  # the fx graph stands
        why = "capture='fx' was asked for" if self.capture == "fx" else \
            "torch.fx traced it" + ("" if self.example_inputs else " (no example inputs to check it on)")
        gm.notes = {NOTE: {"method": "fx", "why": why}}
        return PassResult(gm, True)

    def _symbolic(self, model) -> fx.GraphModule:
        tracer = QuantFXTracer(self.leaf_modules)
        concrete = {**unfilled_defaults(model, len(self.example_inputs)), **dict(self.concrete_args)}
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception as e:
            raise TraceError(
                f"trace: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}) at "
                f"{_user_frame(e)}. Data-dependent control flow and unsupported Python cannot be traced: mark "
                "the submodule that contains it as a leaf (quantize(..., leaf_modules=[MyBlock] or "
                "['name.of.block'])), fix the branch with concrete_args={'flag': value}, or capture with "
                "torch.export (capture='export', with example_inputs)") from e
        return fx.GraphModule(tracer.root, graph, type(model).__name__)

    def _export(self, model, why: str) -> fx.GraphModule:
        if not self.example_inputs:
            raise TraceError(f"trace: capture by torch.export needs example inputs ({why}); pass "
                             "example_inputs= or calibration_data= to quantize")
        if self.leaf_modules or self.concrete_args:
            raise TraceError("trace: leaf_modules and concrete_args apply to symbolic tracing only; with "
                             f"capture={self.capture!r} ({why}) leave them out or use capture='fx'")
        try:
            gm, shapes = capture_program(model, self.example_inputs)
        except TraceError as e:
            if self.capture == "auto":
                e.args = (f"{e.args[0]} (it was tried because {why})",)
            raise
        gm.notes = {NOTE: {"method": "export", "why": why, "shapes": shapes}}
        return gm


def _attention_modules(gm: fx.GraphModule) -> list:
    """Paths of the ``nn.MultiheadAttention`` modules the fx graph calls. Each would run whole in float (its input
    and output projections unquantized, and in eval PyTorch's fused kernel, whose float rounding neither the
    .pt2 program nor onnxruntime repeats: vit_b_16 verified at 3 and 4 LSB); under torch.export its linears are
    raised to quantized Linears and only the attention itself stays float."""
    return [n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
