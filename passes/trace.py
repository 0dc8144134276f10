"""trace: symbolic-trace an ``nn.Module`` into a ``torch.fx.GraphModule``."""
from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass, field

import torch

from torch import fx, nn

from quantfx.errors import TraceError
from quantfx.nn import QuantAct, QuantWBIOL
from quantfx.nn.pool import _TruncAvgPool
from quantfx.pass_infra import Pass, PassResult


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
    """nn.Module -> GraphModule. ``leaf_modules``: types or qualified names not traced into;
    ``concrete_args``: forward arguments fixed at trace time (e.g. flags that select a branch)."""

    name = "trace"
    runs_code = False  # reads and edits the graph only
    leaf_modules: tuple = ()
    concrete_args: tuple = ()  # ((name, value), ...) so the pass stays hashable
    example_inputs: tuple = field(default=(), compare=False, hash=False, repr=False)

    def call(self, model) -> PassResult:
        if isinstance(model, fx.GraphModule):
            return PassResult(model, False)
        if not isinstance(model, nn.Module):
            raise TraceError(f"trace: expected an nn.Module, got {type(model).__name__}")
        tracer = QuantFXTracer(self.leaf_modules)
        concrete = {**unfilled_defaults(model, len(self.example_inputs)), **dict(self.concrete_args)}
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception as e:
            raise TraceError(
                f"trace: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}) at "
                f"{_user_frame(e)}. Data-dependent control flow and unsupported Python cannot be traced: mark "
                "the submodule that contains it as a leaf (quantize(..., leaf_modules=[MyBlock] or "
                "['name.of.block'])) or fix the branch with concrete_args={'flag': value}") from e
        name = type(model).__name__
        return PassResult(fx.GraphModule(tracer.root, graph, name), True)
