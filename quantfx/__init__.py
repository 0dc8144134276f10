"""quantfx: a quantization compiler for PyTorch over torch.fx."""
from .errors import (
    CalibrationError, ExportError, InputScaleRequiredError, PassError, QuantArgumentError, QuantFXError,
    TargetError, TraceError,
)
from .quant_tensor import QuantTensor
from . import quant, nn

__version__ = "0.1.0"
