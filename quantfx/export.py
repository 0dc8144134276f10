"""Public backend API shared by every target: ``lower``, ``export`` and ``verify``. The Backend contract and its
registry live in the lowering core (quantfx.lowering) and are re-exported here."""
from __future__ import annotations


import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import fx

from .errors import ExportError, QuantArgumentError, QuantFXError
from .graph import is_act_quant, qmeta
from .lowering import BACKENDS, Backend, backend_for, lower_with, register_backend


def lower(qmodel: fx.GraphModule, example_inputs=None, target: Optional[str] = None, format: Optional[str] = None):
    """The artefact for the model's target (or ``target``), in memory (an ``onnx.ModelProto`` for
    onnx/finn/dpu), in the target's default form or ``format`` (torch: 'pt2', the default, or 'torchscript').
    Raises TargetError for a rule the model breaks and CalibrationError for a quantizer that never saw data."""
    return lower_with(backend_for(qmodel, target, format).lower, qmodel, example_inputs)


def export(qmodel: fx.GraphModule, path: Union[str, Path], example_inputs=None, target: Optional[str] = None,
           format: Optional[str] = None):
    """Write the artefact for the model's target to ``path`` (the backend's suffix added when it has none) and
    return it. ``format``: the artefact's form where a target has several (torch: 'pt2', the default, a
    ``torch.export`` program; 'torchscript' for PyTorch versions before torch.export)."""
    backend = backend_for(qmodel, target, format)
    artefact = lower(qmodel, example_inputs, target, format)
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(backend.suffix)
    # written next to its place and moved there whole: a failed write leaves no half-written artefact behind
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")  # the suffix kept: torch.export checks it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backend.save(artefact, tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ExportError(f"export: cannot write {path}: {e.strerror or e}; choose a path in a writable "
                          "directory") from e
    return artefact


@dataclass
class OutputReport:
    name: str
    max_abs_error: float
    lsb: float
    max_error_lsb: float


@dataclass
class VerifyReport:
    """Max error of each artefact output against the fake-quant model, in units of that output's step."""

    target: str
    outputs: list = field(default_factory=list)
    tolerance_lsb: float = 1.0
    worst_node: Optional[str] = None
    worst_node_error_lsb: Optional[float] = None
    diagnosis: Optional[str] = None  # the backend's reading of a mismatch (e.g. CPU arithmetic), when it fails
    # other runs of the same artefact (torch .pt2: 'compiled', under torch.compile): name -> its OutputReports
    variants: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        # 1e-3 LSB of slack: an error of exactly one step can come out as 1.0000001 in float32
        return all(o.max_error_lsb <= self.tolerance_lsb + 1e-3
                   for o in self.outputs + [o for rows in self.variants.values() for o in rows])

    def variant_error_lsb(self, name: str) -> float:
        """The largest error of run ``name`` (e.g. 'compiled') over its outputs, in LSBs."""
        return max((o.max_error_lsb for o in self.variants[name]), default=0.0)

    @property
    def max_error_lsb(self) -> float:
        return max((o.max_error_lsb for o in self.outputs), default=0.0)

    def __str__(self):
        lines = [f"verify[{self.target}]: {'ok' if self.ok else 'FAILED'} (tolerance {self.tolerance_lsb} LSB)"]
        runs = [("", self.outputs)] + [(f"[{k}] ", v) for k, v in self.variants.items()]
        for prefix, rows in runs:
            for o in rows:
                lines.append(f"  {prefix}{o.name}: max error {o.max_error_lsb:.3f} LSB ({o.max_abs_error:.3g}, "
                             f"LSB {o.lsb:.3g})")
        if self.worst_node:
            lines.append(f"  first node off by more than the tolerance: {self.worst_node} "
                         f"({self.worst_node_error_lsb:.2f} LSB)")
        if self.diagnosis:
            lines.append(f"  diagnosis: {self.diagnosis}")
        return "\n".join(lines)


def _lsb(node: fx.Node) -> float:
    meta = qmeta(node)
    if meta.scale is None:
        return float("nan")
    return float(meta.scale.reshape(-1).min())


def _intermediates(qmodel, inputs) -> dict:
    """fx node name -> value of every activation-quantizer node (the integer-grid points of the graph)."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if is_act_quant(qmodel, n) and torch.is_tensor(out):
                values[n.name] = out.detach().numpy()
            return out

    with torch.no_grad():
        Recorder(qmodel).run(*inputs)
    return values


def verify(qmodel: fx.GraphModule, artefact_or_path, inputs, target: Optional[str] = None,
           tolerance_lsb: float = 1.0, variants: bool = True) -> VerifyReport:
    """Run the artefact in its own runtime and compare each output with the fake-quant model; with
    ``variants``, also its backend's other runs (torch .pt2: under ``torch.compile``, in ``report.variants``).

    Returns a VerifyReport: max error per output in LSBs of that output's quantization step, ``ok`` when all
    are within ``tolerance_lsb``, and when not, the first activation-quantizer node that is off."""
    backend = backend_for(qmodel, target)
    where = str(artefact_or_path) if isinstance(artefact_or_path, (str, Path)) else "the artefact"
    if isinstance(artefact_or_path, (str, Path)):
        try:
            artefact = backend.load(Path(artefact_or_path))
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise ExportError(f"verify: {where} cannot be read as a {backend.name} artefact ({type(e).__name__}: "
                              f"{first}); pass the file quantfx.export wrote") from e
    else:
        artefact = artefact_or_path
    problem = backend.check(artefact) if backend.check is not None else None
    if problem:
        raise ExportError(f"verify: {where} {problem}; verify compares an artefact quantfx wrote "
                          "(quantfx.export(qmodel, path)) with the model it was lowered from")
    inputs = (inputs,) if torch.is_tensor(inputs) else tuple(inputs)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            expected = qmodel(*inputs)
    finally:
        qmodel.train(was_training)
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    try:
        got = backend.run(artefact, inputs)
    except QuantFXError:
        raise
    except Exception as e:  # the runtime refused the artefact: say which runtime and what, not a raw error
        raise ExportError(f"verify: {backend.name}'s runtime cannot run {where} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); lower the model again with quantfx.export, "
                          "and report the model if it still fails") from e
    out_node = next(n for n in qmodel.graph.nodes if n.op == "output")
    results = out_node.args[0] if isinstance(out_node.args[0], (list, tuple)) else [out_node.args[0]]
    report = VerifyReport(backend.name, tolerance_lsb=tolerance_lsb)
    report.outputs = _compare(expected, got, results)
    for name, run in (backend.variants.items() if variants else ()):
        try:
            got = run(artefact, inputs)
        except QuantFXError:
            raise
        except Exception as e:  # e.g. inductor refusing a kernel: name the run, not a raw compiler trace
            raise ExportError(f"verify: {backend.name}'s {name} run of {where} failed ({type(e).__name__}: "
                              f"{_gist(e)}); the eager run is checked without it by "
                              "quantfx.verify(..., variants=False); report the model") from e
        if got is not None:
            report.variants[name] = _compare(expected, got, results)
    if not report.ok and backend.run_with_intermediates is not None:
        _find_worst(qmodel, artefact, inputs, backend, report)
    if not report.ok and backend.diagnose is not None:
        report.diagnosis = backend.diagnose(artefact, inputs)
    return report


def _gist(e: BaseException) -> str:
    """The line of an exception message that says what went wrong: the first ``SomethingError: ...`` line (a
    compiler wraps the cause in lines of advice), else the first line; cut to 300 characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    said = next((line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)), lines[0] if lines else "")
    return said[:300]


def _compare(expected, got, results) -> list:
    rows = []
    for e, g, r in zip(expected, got, results):
        err = float(np.max(np.abs(e.detach().numpy() - g))) if e.numel() else 0.0
        lsb = _lsb(r)
        rows.append(OutputReport(r.name if len(results) > 1 else "output", err, lsb,
                                 err / lsb if lsb == lsb and lsb > 0 else float("inf") if err else 0.0))
    return rows


def _find_worst(qmodel, artefact, inputs, backend, report) -> None:
    expected = _intermediates(qmodel, inputs)
    try:
        got = backend.run_with_intermediates(artefact, inputs, list(expected))
    except QuantFXError:
        return
    for node in qmodel.graph.nodes:
        if node.name in got and node.name in expected:
            err = float(np.max(np.abs(expected[node.name] - got[node.name])))
            lsb = _lsb(node)
            if lsb > 0 and err / lsb > report.tolerance_lsb + 1e-3:
                report.worst_node, report.worst_node_error_lsb = node.name, err / lsb
                return


__all__ = ["Backend", "BACKENDS", "register_backend", "lower", "lower_with", "export", "verify", "VerifyReport",
           "OutputReport"]
