"""Pass infrastructure: ``Pass``, ``PassResult``, ``Pipeline``, ``PassManager`` and the pass registry ``PASSES``.

A pass is ``call(gm) -> PassResult(graph_module, modified)`` wrapped by optional ``requires(gm)`` /
``ensures(gm)`` checks. A plain function ``gm -> gm | PassResult`` is accepted too. The manager recompiles
at most once per pass (never per node; once for a run of passes that do not run the code), lints the graph after
each pass, times each pass, and re-raises a failure as :class:`quantfx.PassError` naming the pass and the passes
that already ran. Built-in passes use this same API.

``PASSES`` maps a pass name to its class. The built-in passes (``quantfx.passes``) register themselves in it when
quantfx is imported; the core finds passes there by name (pipelines spelled as strings, the default pipeline,
``annotate``) and never imports a pass.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Union

from torch import fx

from .errors import PassError, QuantArgumentError, QuantFXError


class PassResult(NamedTuple):
    graph_module: Any
    modified: bool


@dataclass(frozen=True)
class Pass:
    """Base of graph passes. Subclasses are frozen dataclasses: a ``name`` and options as fields."""

    name: ClassVar[str] = "pass"
    #: whether the pass runs the GraphModule's generated code (``gm(...)``, ``gm.forward``, ``gm.code``): before
    #: such a pass the manager recompiles what earlier passes changed in the graph. Passes that read and edit the
    #: graph only (every built-in one) set it False, and the manager then recompiles once after them.
    runs_code: ClassVar[bool] = True

    def requires(self, gm) -> None:
        """Raise if ``gm`` is not a valid input of this pass."""

    def ensures(self, gm) -> None:
        """Raise if the pass's output breaks its contract."""

    def call(self, gm) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        self.ensures(result.graph_module)
        return result

    def spell(self) -> str:
        """The pass as a pipeline string element: ``name`` or ``name{opt=value,...}`` for non-default options.

        The target profile and example inputs are not spelled: a pipeline string is bound to a target."""
        opts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.init or not f.repr or f.name in ("profile", "example_inputs"):
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                opts.append(f"{f.name}={value!r}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


@dataclass(frozen=True)
class DataPass(Pass):
    """Base of the passes that calibration runs (the post-calibration stage): they read calibration data.
    ``data`` and ``progress`` are not spelled (a pipeline string is bound to its data by
    ``quantfx.calibration.calibration_pipeline``)."""

    data: Any = dataclasses.field(default=None, repr=False, compare=False)
    max_batches: Optional[int] = None
    progress: bool = dataclasses.field(default=False, repr=False, compare=False)
    seed: int = 0
    needs_data: ClassVar[bool] = True

    def requires(self, gm) -> None:
        if self.needs_data and self.data is None:
            raise QuantArgumentError(f"{self.name} needs calibration data (it runs in quantfx.calibrate, which "
                                     "gives it the data)")


class FunctionPass(Pass):
    """Wraps a plain function ``gm -> gm | PassResult``."""

    def __init__(self, fn: Callable, name: Optional[str] = None):
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "_name", name or getattr(fn, "__name__", "function_pass"))

    @property
    def name(self):  # type: ignore[override]
        return self._name

    def call(self, gm) -> PassResult:
        out = self.fn(gm)
        if isinstance(out, PassResult):
            return out
        if out is None:
            return PassResult(gm, True)
        return PassResult(out, True)

    def spell(self) -> str:
        return self._name

    def __repr__(self):
        return f"FunctionPass({self._name})"


def as_pass(p) -> Pass:
    if isinstance(p, Pass):
        return p
    if callable(p):
        return FunctionPass(p)
    raise QuantFXError(f"pipeline: {p!r} is neither a Pass nor a function gm -> gm")


#: pass name -> Pass class, filled by ``register_pass`` (the built-in passes: by quantfx.passes on import)
PASSES: dict[str, type] = {}


def register_pass(cls: type) -> type:
    """Make a Pass class findable by its ``name`` (in pipelines spelled as strings); returns it."""
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type:
    """The registered Pass class called ``name``. Raises QuantArgumentError naming the known passes."""
    if name not in PASSES:
        raise QuantArgumentError(f"pipeline: unknown pass {name!r}; known passes: {', '.join(PASSES)}")
    return PASSES[name]


class Pipeline:
    """An editable, printable list of passes."""

    def __init__(self, passes=()):
        self.passes: list[Pass] = [as_pass(p) for p in passes]

    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def _index(self, name: str) -> int:
        for i, p in enumerate(self.passes):
            if p.name == name:
                return i
        raise QuantFXError(f"pipeline has no pass named {name!r}; it has: {', '.join(self.names())}")

    def insert_after(self, name: str, p) -> "Pipeline":
        self.passes.insert(self._index(name) + 1, as_pass(p))
        return self

    def insert_before(self, name: str, p) -> "Pipeline":
        self.passes.insert(self._index(name), as_pass(p))
        return self

    def replace(self, name: str, p) -> "Pipeline":
        self.passes[self._index(name)] = as_pass(p)
        return self

    def remove(self, name: str) -> "Pipeline":
        del self.passes[self._index(name)]
        return self

    def append(self, p) -> "Pipeline":
        self.passes.append(as_pass(p))
        return self

    def spell(self) -> str:
        return ",".join(p.spell() for p in self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __len__(self):
        return len(self.passes)

    def __str__(self):
        return self.spell()

    def __repr__(self):
        return f"Pipeline({self.spell()})"


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool


class PassManager:
    """Runs a pipeline. The first pass may take an ``nn.Module`` (trace); later ones take a GraphModule."""

    def __init__(self, pipeline: Union[Pipeline, list], dump_dir: Optional[Union[str, Path]] = None,
                 check: bool = True, on_dump: Optional[Callable] = None):
        self.pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline(pipeline)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.check = check
        self.on_dump = on_dump
        self.records: list[PassRecord] = []

    def run(self, gm, recompile: bool = True):
        """Run the pipeline on ``gm``. A GraphModule is recompiled once after a run of passes that changed its
        graph (before a pass that ``runs_code``, before a dump, at the end), not after each of them; the time
        goes to the pass before it. ``recompile=False`` leaves the last recompilation out, for a caller that
        builds a new GraphModule on the returned graph at once (its code is then stale)."""
        self.records = []
        done: list[str] = []
        stale = False  # the graph changed since gm's code was generated
        for i, p in enumerate(self.pipeline):
            if stale and p.runs_code:
                self._recompile(gm)
                stale = False
            start = time.perf_counter()
            try:
                result = p(gm)
                gm = result.graph_module
                if isinstance(gm, fx.GraphModule) and result.modified:
                    stale = True
                if self.check and isinstance(gm, fx.GraphModule):
                    gm.graph.lint()
            except PassError:
                raise
            except QuantFXError as e:
                # User-facing errors keep their type; the message gains where it happened.
                e.args = (f"{e.args[0] if e.args else e} [in pass {p.name!r}; passes run before it: "
                          f"{', '.join(done) or 'none'}]",) + tuple(e.args[1:])
                raise
            except Exception as e:
                raise PassError(f"pass {p.name!r} failed: {type(e).__name__}: {e} "
                                f"(passes run before it: {', '.join(done) or 'none'})") from e
            self.records.append(PassRecord(p.name, time.perf_counter() - start, result.modified))
            done.append(p.name)
            if self.dump_dir is not None and isinstance(gm, fx.GraphModule):
                if stale:
                    self._recompile(gm)
                    stale = False
                self._dump(gm, i, p.name)
        if stale and recompile:
            self._recompile(gm)
        return gm

    def _recompile(self, gm) -> None:
        start = time.perf_counter()
        try:
            gm.recompile()
        except Exception as e:
            raise PassError(f"recompiling the graph after pass {self.records[-1].name!r} failed: "
                            f"{type(e).__name__}: {e}") from e
        self.records[-1].seconds += time.perf_counter() - start

    def _dump(self, gm, index: int, name: str) -> None:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        stem = self.dump_dir / f"{index:02d}_{name}"
        stem.with_suffix(".txt").write_text(gm.graph.python_code("self").src + "\n\n" + str(gm.graph))
        if self.on_dump is not None:
            self.on_dump(gm, stem)

    def timings(self) -> str:
        return "\n".join(f"{r.name:24s} {r.seconds * 1000:8.2f} ms{'' if r.modified else '  (no change)'}"
                         for r in self.records)
