"""Quantizers: specs (plain classes), the ``Quantizer`` module and the integer arithmetic."""
from .quantizer import Quantizer, ScaleGroup, make_quantizer
from .specs import (
    FIELDS, LOW_BIT_WIDTH, QuantSpec, is_low_bit,
    Int8WeightPerTensorFloat, Int8WeightPerChannelFloat, Int8WeightPerTensorFixedPoint,
    Int8WeightPerChannelFixedPoint,
    Int8ActPerTensorFloat, Uint8ActPerTensorFloat, Int8ActPerTensorFixedPoint, Uint8ActPerTensorFixedPoint,
    Uint8ActPerTensorFloatAsym,
    Int8Bias, Int16Bias, Int32Bias,
    Int8BiasPerTensorFloatInternalScaling, Int8BiasPerTensorFixedPointInternalScaling,
    Int16BiasPerTensorFixedPointInternalScaling,
)
from . import functional

__all__ = [name for name in dir() if not name.startswith("_")]
