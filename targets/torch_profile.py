"""The torch target's profile (PyTorch's quantized engines) and :func:`torch_profile` for each engine."""
from __future__ import annotations

from quantfx import quant as Q
from quantfx.errors import QuantArgumentError
from quantfx.profile import Constraints, Recipe, Scheme, TargetProfile, register_profile

ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")  # PyTorch's quantized engines


class Int8WeightPerChannelFullRange(Q.Int8WeightPerChannelFloat):
    """int8 per-channel symmetric weights over the full range [-128, 127] (PyTorch qint8)."""
    narrow_range = False


class Uint8ActPerTensorPo2AsymEven(Q.Uint8ActPerTensorFloatAsym):
    """8-bit unsigned activations with a power-of-two scale and an even zero point (the torch target's 'x86'
    profile: its requantizations are exact in float32, whichever kernel computes them)."""
    scale_type = "po2"
    even_zero_point = True


TORCH = register_profile(TargetProfile(
    name="torch",
    scheme=Scheme(weight_quant=Int8WeightPerChannelFullRange, act_quant=Uint8ActPerTensorPo2AsymEven,
                  act_quant_unsigned=Uint8ActPerTensorPo2AsymEven, bias_scaling="external", bias_bit_width=32,
                  weight_bit_width=7, requant="multiplier_float_bias", exact_requant=True),
    recipe=Recipe(avgpool="requant", add_reads_layer_output=True, after_calibration=("snap_requant_grid",)),
    constraints=Constraints(
        weight_bit_range=(7, 8), act_bit_range=(7, 8), zero_point_allowed=True, pair_kernels=True,
        runtime="PyTorch's quantized engine", weight_signed=True, act_rounding=("half_even",),
        bias_modes_allowed=("external",)),
    options={"engine": "x86"},
    description="PyTorch quantized ops on the x86 engine: int8 per-channel weights with 7-bit magnitudes "
                "(|w| <= 64) and full 8-bit quint8 activations with power-of-two scales and even zero points, "
                "so that no int16 pair sum of the AVX2 kernels saturates (255 x 128 <= 32767) and fbgemm and "
                "oneDNN, which the engine picks by CPU, compute every requantization exactly; 8-bit weights on "
                "qnnpack"))


def torch_profile(engine: str = "x86") -> TargetProfile:
    """The torch profile for a quantized engine: 7-bit weights (|w| <= 64) and 8-bit activations on
    x86/fbgemm/onednn, whose AVX2 kernels sum u8 x s8 products in saturating int16 pairs (255 x (64 + 64) =
    32640 fits, so the kernel's own quint8 output range is the model's and no clamp is needed); 8-bit weights
    on qnnpack, whose kernels take u8 x u8 products into int32. 8-bit weights on 7-bit activations (the
    default before W7A8, ``weight_bit_width=8, act_bit_width=7, input_bit_width=7``) fit too, at the
    price of a quantized clamp after every layer (BENCHMARKS.md: the torch target).

    'x86' (the default) is PyTorch's x86 engine: fbgemm kernels on CPUs without AVX512-VNNI (and off Linux),
    oneDNN convolutions on Linux CPUs with it. Their requantizations round in other float orders (fbgemm
    ``rne(fl(acc + b) x m) + zp``, oneDNN ``rne(fl(fl(acc x s) + b) x (1 / s_out) + zp)``), so the profile makes
    every step exact (``exact_requant``): power-of-two activation scales, even zero points, and after calibration
    each weight scale on the grid that puts the layer's multiplier on multiples of 2^-15; then both compute the
    exact rational and its rounding, on every x86 CPU. 'fbgemm' keeps float activation scales (more SQNR against
    float: BENCHMARKS.md, "torch: power-of-two activation scales") and runs fbgemm everywhere, slower than oneDNN on
    VNNI CPUs. 'onednn' takes x86's exact scheme on oneDNN everywhere, its fake-quant model in oneDNN's float
    order (``requant='float_bias'``; on the exact grid every order gives the same integers). x86 and onednn take
    PT2E's residual recipe (``add_reads_layer_output``: an add reads its conv's float output, which inductor fuses
    into ``qconv2d_pointwise.binary``); fbgemm and qnnpack requantize the conv before the add (docs/torch_pt2.md)."""
    if engine not in ENGINES:
        raise QuantArgumentError(f"torch target: engine={engine!r}; use one of {', '.join(ENGINES)}")
    # onednn computes exact requantizations too: modelling its float order alone (float activation scales) left
    # its 1x1 convolutions parting at rare ties at W7A8 and its AVX2 kernels parting from its AVX512 ones
    w_bits, a_bits = {"qnnpack": (8, 8)}.get(engine, (7, 8))
    exact = engine in ("x86", "onednn")
    act = TORCH.act_quant if exact else Q.Uint8ActPerTensorFloatAsym
    return TORCH.replace(weight_bit_width=w_bits, act_bit_width=a_bits, input_bit_width=a_bits,
                         act_quant=act, act_quant_unsigned=act, exact_requant=exact,
                         add_reads_layer_output=exact,
                         after_calibration=("snap_requant_grid",) if exact else (),
                         pair_kernels=engine != "qnnpack",
                         requant={"qnnpack": "inverse_multiplier", "onednn": "float_bias"}.get(
                             engine, "multiplier_float_bias"),
                         options={"engine": engine})
