"""Quantized layers: ``quantfx.nn.QuantConv2d`` and friends."""
from .base import exact_arithmetic
from .act import QuantAct, QuantHardTanh, QuantIdentity, QuantLeakyReLU, QuantReLU, QuantSigmoid
from .product import PRODUCT_OPS, QuantProduct
from .softmax import QuantSoftmax
from .pool import QuantAdaptiveAvgPool2d, QuantAvgPool2d, adaptive_window
from .wbiol import (
    QUANT_LAYER_FOR, build_from_state, float_layer_kwargs, QuantConv1d, QuantConv2d, QuantConv3d,
    QuantConvTranspose1d, QuantConvTranspose2d, QuantLinear, QuantWBIOL,
)

__all__ = [name for name in dir() if not name.startswith("_")]
