"""quantfx: a quantization compiler for PyTorch over torch.fx.

``quantfx.quantize(model, target='finn')`` traces a float model, runs the pass pipeline and returns a
quantized ``GraphModule``; ``quantfx.calibrate`` fixes activation scales; ``quantfx.inspect`` prints a
per-layer table.
"""
from .errors import (
    CalibrationError, DrawError, ExportError, InputScaleRequiredError, ModelSpecError, PassError, QuantArgumentError,
    QuantFXError, TargetError, TraceError,
)
from .quant_tensor import QuantTensor
from .graph import QMeta
from .pass_infra import FunctionPass, Pass, PassManager, PassResult, Pipeline
from . import quant, nn
# importing quantfx.passes registers the built-in passes in quantfx.pass_infra.PASSES, where the core finds
# them by name (it never imports a pass)
from . import passes  # noqa: F401
from .api import (
    QuantGraphModule, annotate, bind, calibrate, correct_bias, inspect, layer_table, parse_pipeline,
    pipeline_for, quantize, quantizers,
)

from .export import export, lower, verify, VerifyReport
from .draw import draw
from .metrics import sqnr
from .weight_rounding import adaround

# importing quantfx.targets registers the target profiles and backends in the core's registries (the profile
# registry, quantfx.lowering.BACKENDS): last, since they build on everything above
from . import targets  # noqa: E402,F401

__version__ = "0.1.0"
