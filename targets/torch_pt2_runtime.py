"""torch target, ``.pt2`` form: the program (:class:`Pt2Program`), its file, and its two runs (eager and
``torch.compile``). The default torch artefact; ``format='torchscript'`` writes targets/torch_quantized.py's.

The file is ``torch.export.save``'s archive with ``quantfx.json`` beside the program (engine, arithmetic, the
lowering report). Another Python loads it without quantfx::

    import torch, torch.ao.quantization.fx._decomposed   # registers the quantized_decomposed ops (torch does not
    ep = torch.export.load("model.pt2")                   # at import; torch._inductor imports this module too)
    y = ep.module()(x)                                    # any batch size the model allows
    torch._inductor.config.freezing = True               # read by dynamo: weights become constants
    fast = torch.compile(ep.module())

With torch 2.14, inductor folds the program's dequantize / conv / quantize patterns into oneDNN int8 kernels only
when torchao's x86 passes are registered (``import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer``);
without them it compiles the same arithmetic in float32 (targets/torch_pt2_exactness.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx

from quantfx.errors import ExportError
from quantfx.lowering import Backend

from . import torch_quantized as tq
from .torch_profile import TORCH
from .torch_pt2 import Pt2Lowering

META_FILE = "quantfx.json"
FORMAT = "pt2"


@dataclass
class Pt2Program:
    """The ``.pt2`` torch artefact: the ExportedProgram, what it was built for (``meta``: engine, arithmetic), the
    lowering report, and in memory only the plain GraphModule it was exported from (for per-node values)."""

    exported: Any  # torch.export.ExportedProgram
    meta: dict
    report: list = field(default_factory=list)
    graph_module: Optional[fx.GraphModule] = None
    node_values: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)  # lowered node name -> (scale, zero point) of its codes
    _modules: dict = field(default_factory=dict, repr=False)

    @property
    def engine(self) -> str:
        return self.meta.get("engine", "x86")

    def module(self):
        if "eager" not in self._modules:
            self._modules["eager"] = self.exported.module()
        return self._modules["eager"]

    def compiled(self):
        """``torch.compile`` (inductor) of the program, compiled on its first call, every call with
        ``torch._inductor.config.freezing`` on: dynamo reads it while tracing (weights become constants, which the
        int8 weight-prepack passes need), so ``torch.compile(options={"freezing": True})`` is not enough; and with
        ``cpp.simdlen`` set to the vector width inductor picks here (:func:`_vector_width`)."""
        if "compiled" not in self._modules:
            fn = torch.compile(self.exported.module())
            with _no_gpu_notice():  # importing inductor's ISA probe imports torch.utils.cpp_extension
                options = {"freezing": True, "cpp.simdlen": _vector_width()}

            def frozen(*inputs):
                with torch._inductor.config.patch(options), torch.no_grad(), _no_gpu_notice():
                    return fn(*inputs)

            self._modules["compiled"] = frozen
        return self._modules["compiled"]

    def __call__(self, *inputs):
        with torch.no_grad():
            return self.module()(*inputs)

    def fingerprint(self) -> bytes:
        """Bytes that change with anything the program computes: its graph, every constant, its metadata."""
        parts = [str(self.exported.graph_module.code).encode(), json.dumps(self.meta, sort_keys=True).encode()]
        for name, t in sorted(list(self.exported.state_dict.items()) + list(self.exported.constants.items())):
            if torch.is_tensor(t):
                parts += [name.encode(), str(t.dtype).encode(), t.detach().contiguous().numpy().tobytes()]
        return b"\0".join(parts)

    def fallbacks(self) -> list:
        return [r for r in self.report if r["how"] == "float"]

    table = tq.TorchProgram.table


def _vector_width() -> int:
    """The vector width in bits of the instruction set inductor generates C++ for in this process (AVX512: 512, AVX2:
    256, none: 0), which ``ATEN_CPU_CAPABILITY`` can hold below the CPU's. Passed as ``cpp.simdlen`` it enters the
    key of inductor's FX graph cache; torch 2.14's key does not otherwise hold it, so a process capped at AVX2 loads
    a graph cached by an AVX512 process on the same cache directory: its kernels step 16 floats at a time over
    8-float AVX2 vectors (``Vectorized<float>::loadu(p, 16)`` into 8 lanes), leaving half of each buffer unwritten
    (the compiled .pt2 off by hundreds of LSB or more while the eager program is exact; tests/test_torch_isa.py)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa  # inductor loads slowly: only when compiling
    return pick_vec_isa().bit_width()


class _NoGpuNotice(logging.Filter):
    """Drops the notice torch.utils.cpp_extension logs when inductor first imports it on a machine without a GPU
    toolkit ('No CUDA runtime is found, using CUDA_HOME=...'): true, and nothing to do with a CPU program."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("No CUDA runtime is found", "No ROCm runtime is found"))


@contextlib.contextmanager
def _no_gpu_notice():
    """While compiling: torch.utils.cpp_extension's logger without :class:`_NoGpuNotice`'s notice."""
    logger, notice = logging.getLogger("torch.utils.cpp_extension"), _NoGpuNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _arithmetic(profile) -> dict:
    return {"requant": profile.requant, "exact_requant": bool(profile.exact_requant),
            "activations": "uint8 codes, quantized_decomposed per tensor", "weights": "int8 per channel constants",
            "torch": torch.__version__}


def _export(gm: fx.GraphModule, example_inputs: tuple):
    """``torch.export`` of the plain GraphModule, the batch dimension of every input dynamic where the model
    allows it (traced at batch 2: export specialises a size of 1)."""
    traced = tuple(torch.cat([t, t]) if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == 1 else t
                   for t in example_inputs)
    dims = tuple({0: torch.export.Dim.AUTO} if torch.is_tensor(t) and t.dim() > 0 else None for t in traced)
    try:
        with torch.no_grad():
            return torch.export.export(gm, traced, dynamic_shapes=dims, strict=False)
    except Exception as e:  # noqa: BLE001  (torch.export raises many kinds; said with its first line)
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(f"torch: torch.export of the lowered program failed ({type(e).__name__}: {first}); "
                          "export with format='torchscript' meanwhile") from e


def lower(qmodel, example_inputs) -> Pt2Program:
    lowering = Pt2Lowering(qmodel, example_inputs, profile=TORCH)
    gm = lowering.lower()
    profile = lowering.profile or TORCH
    meta = {"producer": "quantfx", "format": FORMAT, "engine": lowering.engine, "arithmetic": _arithmetic(profile)}
    return Pt2Program(_export(gm, example_inputs), meta, lowering.report, gm, dict(lowering.node_values),
                      dict(lowering.grids))


def save(program: Pt2Program, path) -> None:
    meta = dict(program.meta, report=program.report)
    torch.export.save(program.exported, str(path), extra_files={META_FILE: json.dumps(meta)})


def _archive_kind(path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile as e:
        raise ExportError(f"{path} is neither a .pt2 nor a TorchScript archive ({e})") from e
    return FORMAT if any(n.endswith("/archive_format") or n == "archive_format" for n in names) else "torchscript"


def load(path):
    """A saved torch artefact: a :class:`Pt2Program` from a ``.pt2`` file, a TorchProgram from a TorchScript one."""
    if _archive_kind(path) == "torchscript":
        return tq.load_program(path)
    extra = {META_FILE: ""}
    ep = torch.export.load(str(path), extra_files=extra)
    meta = json.loads(extra[META_FILE]) if extra[META_FILE] else {}
    if meta.get("producer") != "quantfx":
        raise ExportError(f"{path} was not written by quantfx (no {META_FILE} in the archive)")
    return Pt2Program(ep, {k: v for k, v in meta.items() if k != "report"}, meta.get("report", []))


def check(program) -> Optional[str]:
    if isinstance(program, (Pt2Program, tq.TorchProgram)):
        return None
    return f"is a {type(program).__name__}, not a quantfx torch program"


def _numpy(out) -> list:
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    return [o.detach().numpy() for o in out]


def run(program, inputs) -> list:
    if isinstance(program, tq.TorchProgram):
        return tq.run_program(program, inputs)
    with torch.no_grad():
        return _numpy(program.module()(*inputs))


def run_compiled(program, inputs) -> Optional[list]:
    """The program under ``torch.compile`` (inductor, freezing); None for a TorchScript program."""
    if not isinstance(program, Pt2Program):
        return None
    with torch.no_grad():
        return _numpy(program.compiled()(*inputs))


def run_intermediates(program, inputs, fx_names) -> dict:
    if isinstance(program, tq.TorchProgram):
        return tq.run_program_intermediates(program, inputs, fx_names)
    if program.graph_module is None:
        raise ExportError("torch: intermediate values need the program as lowered (quantfx.lower), not a loaded file")
    wanted = {program.node_values[n]: n for n in fx_names if n in program.node_values}
    grids, values = program.grids, {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted and torch.is_tensor(out):
                value = out.float()
                if not out.is_floating_point() and n.name in grids:
                    s, zp = grids[n.name]
                    value = (value - zp) * s
                values[wanted[n.name]] = value.detach().numpy()
            return out

    with torch.no_grad():
        Recorder(program.graph_module).run(*inputs)
    return values


TORCHSCRIPT = tq.BACKEND
BACKEND = Backend(
    name="torch", lower=lower, save=save, load=load, run=run, run_with_intermediates=run_intermediates,
    suffix=".pt2", check=check,
    variants={"compiled": run_compiled}, formats={"torchscript": TORCHSCRIPT})
