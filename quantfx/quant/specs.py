"""Quantizer specs: plain classes whose attributes describe a quantizer.

A spec is never instantiated. Subclass one to change an attribute::

    class MyWeightQuant(Int8WeightPerTensorFloat):
        bit_width = 4

and give it to a layer (``QuantConv2d(..., weight_quant=MyWeightQuant)``). Layer keyword arguments with the
slot's prefix (``weight_bit_width=4``) override the spec; a keyword always wins.
"""
from __future__ import annotations

import math

from ..errors import QuantArgumentError

KINDS = ("weight", "act", "bias")
SCALE_TYPES = ("float", "po2")
ZERO_POINT_TYPES = ("symmetric", "asymmetric")
ROUNDINGS = ("half_even", "half_up", "floor")
SCALE_STATS = ("max", "percentile", "mse")
BIAS_SCALINGS = ("external", "internal")
MAX_BIT_WIDTH = 32
# at this many bits or fewer, the compiler's automatic choices switch to the low-bit recipe: weight scales by MSE
# search, activation scales by MSE calibration, weight rounding learned on calibration data (quantfx.quantize)
LOW_BIT_WIDTH = 4


def is_low_bit(bit_width: int) -> bool:
    """Whether a quantizer of ``bit_width`` bits gets the low-bit recipe (2..LOW_BIT_WIDTH; 1-bit is bipolar)."""
    return 1 < bit_width <= LOW_BIT_WIDTH


class QuantSpec:
    """Base spec. Every attribute here is a field a subclass or a keyword may override."""

    kind = "act"
    bit_width = 8
    signed = True
    narrow_range = False
    scale_type = "float"
    # the scale rounded up to a multiple of this power of two (a weight scale on the grid that makes its layer's
    # requantization multiplier exact: set per layer by the torch target's 'x86' profile); None: no grid
    scale_step = None
    scaling_per_output_channel = False
    channel_axis = None  # None: 0 for weights, 1 for activations
    zero_point_type = "symmetric"
    # an asymmetric zero point rounded to an even integer: then rounding half to even before adding it or after
    # gives the same integer (PyTorch's fbgemm adds it after, oneDNN before)
    even_zero_point = False
    rounding = "half_even"
    scale_stat = "max"
    percentile = 99.99
    learned_scale = False
    fixed_scale = None  # a fixed scale (float > 0) instead of statistics
    bias_scaling = "internal"  # bias only
    momentum = 0.1  # running-statistics momentum in training mode


FIELDS = tuple(
    name for name in vars(QuantSpec) if not name.startswith("_")
)


def resolve(spec, overrides: dict, where: str = "quantizer") -> dict:
    """Merge ``spec`` attributes and keyword ``overrides`` (keywords win); validate; return the field dict."""
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise QuantArgumentError(
            f"{where}: unknown quantizer argument(s) {unknown}; allowed: {', '.join(FIELDS)}")
    fields = {name: overrides.get(name, getattr(spec, name, getattr(QuantSpec, name))) for name in FIELDS}
    validate(fields, where)
    return fields


def _choice(fields, name, allowed, where):
    if fields[name] not in allowed:
        raise QuantArgumentError(
            f"{where}: {name}={fields[name]!r} is not allowed; use one of {', '.join(map(repr, allowed))}")


def validate(f: dict, where: str = "quantizer") -> None:
    bw = f["bit_width"]
    if isinstance(bw, bool) or not isinstance(bw, int) or not 1 <= bw <= MAX_BIT_WIDTH:
        raise QuantArgumentError(
            f"{where}: bit_width={bw!r} is not allowed; use an integer from 1 to {MAX_BIT_WIDTH}")
    _choice(f, "kind", KINDS, where)
    _choice(f, "scale_type", SCALE_TYPES, where)
    _choice(f, "zero_point_type", ZERO_POINT_TYPES, where)
    _choice(f, "rounding", ROUNDINGS, where)
    _choice(f, "scale_stat", SCALE_STATS, where)
    _choice(f, "bias_scaling", BIAS_SCALINGS, where)
    step = f["scale_step"]
    if step is not None and (isinstance(step, bool) or not isinstance(step, float) or not step > 0
                             or step != 2.0 ** round(math.log2(step))):
        raise QuantArgumentError(f"{where}: scale_step={step!r} is not allowed; use None or a power of two")
    for name in ("signed", "narrow_range", "scaling_per_output_channel", "learned_scale", "even_zero_point"):
        if not isinstance(f[name], bool):
            raise QuantArgumentError(f"{where}: {name}={f[name]!r} is not allowed; use True or False")
    ax = f["channel_axis"]
    if ax is not None and (isinstance(ax, bool) or not isinstance(ax, int)):
        raise QuantArgumentError(f"{where}: channel_axis={ax!r} is not allowed; use None or an integer axis")
    mom = f["momentum"]
    if isinstance(mom, bool) or not isinstance(mom, (int, float)) or not 0.0 < mom <= 1.0:
        raise QuantArgumentError(f"{where}: momentum={mom!r} is not allowed; use a number in (0, 1]")
    fs = f["fixed_scale"]
    if fs is not None and (isinstance(fs, bool) or not isinstance(fs, (int, float)) or not fs > 0):
        raise QuantArgumentError(
            f"{where}: fixed_scale={fs!r} is not allowed; a fixed scale must be a positive number")
    if not 0.0 < float(f["percentile"]) <= 100.0:
        raise QuantArgumentError(f"{where}: percentile={f['percentile']!r} must be in (0, 100]")
    if bw == 1 and not f["signed"]:
        raise QuantArgumentError(f"{where}: bit_width=1 is bipolar (+-scale) and must be signed=True")
    if f["zero_point_type"] == "asymmetric" and f["kind"] != "act":
        raise QuantArgumentError(
            f"{where}: zero_point_type='asymmetric' is allowed for activations only; use 'symmetric'")


# --- weights -------------------------------------------------------------------------------------------


class Int8WeightPerTensorFloat(QuantSpec):
    """8-bit signed narrow-range weights, one float scale per tensor (scale = max|w| / 127)."""
    kind = "weight"
    narrow_range = True


class Int8WeightPerChannelFloat(Int8WeightPerTensorFloat):
    """8-bit signed narrow-range weights, one float scale per output channel."""
    scaling_per_output_channel = True


class Int8WeightPerTensorFixedPoint(Int8WeightPerTensorFloat):
    """8-bit signed narrow-range weights, one power-of-two scale per tensor."""
    scale_type = "po2"


class Int8WeightPerChannelFixedPoint(Int8WeightPerChannelFloat):
    """8-bit signed narrow-range weights, one power-of-two scale per output channel."""
    scale_type = "po2"


# --- activations ---------------------------------------------------------------------------------------


class Int8ActPerTensorFloat(QuantSpec):
    """8-bit signed activations, float scale from statistics."""
    kind = "act"


class Uint8ActPerTensorFloat(Int8ActPerTensorFloat):
    """8-bit unsigned activations (after ReLU), float scale."""
    signed = False


class Int8ActPerTensorFixedPoint(Int8ActPerTensorFloat):
    """8-bit signed activations, power-of-two scale."""
    scale_type = "po2"


class Uint8ActPerTensorFixedPoint(Uint8ActPerTensorFloat):
    """8-bit unsigned activations, power-of-two scale."""
    scale_type = "po2"


class Uint8ActPerTensorFloatAsym(Uint8ActPerTensorFloat):
    """8-bit unsigned activations with a zero point (ONNX / PyTorch style)."""
    zero_point_type = "asymmetric"


# --- biases --------------------------------------------------------------------------------------------


class Int8Bias(QuantSpec):
    """8-bit bias with external scale: scale = input scale x weight scale."""
    kind = "bias"
    bias_scaling = "external"


class Int16Bias(Int8Bias):
    """16-bit bias with external scale."""
    bit_width = 16


class Int32Bias(Int8Bias):
    """32-bit bias with external scale (the ONNX / FINN / PyTorch convention)."""
    bit_width = 32


class Int8BiasPerTensorFloatInternalScaling(QuantSpec):
    """8-bit bias with its own float scale (no input scale needed)."""
    kind = "bias"
    bias_scaling = "internal"


class Int8BiasPerTensorFixedPointInternalScaling(Int8BiasPerTensorFloatInternalScaling):
    """8-bit bias with its own power-of-two scale (the DPU convention)."""
    scale_type = "po2"


class Int16BiasPerTensorFixedPointInternalScaling(Int8BiasPerTensorFixedPointInternalScaling):
    """16-bit bias with its own power-of-two scale."""
    bit_width = 16
