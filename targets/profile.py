"""Target profiles: frozen dataclasses saying what each backend accepts, registered by name."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from quantfx.errors import QuantArgumentError
from quantfx import quant as Q
from quantfx.rules import INT16_MAX, code_max

BIAS_MODES = ("external", "internal", "float")
AVGPOOL_MODES = ("trunc", "requant")
ADD_GRIDS = ("scale", "quantizer")
REQUANT_MODES = ("float", "multiplier", "inverse_multiplier", "float_bias", "multiplier_float_bias")
CPU_MODES = ("any", "vnni")
ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")  # PyTorch's quantized engines (torch target)
ROUNDINGS = ("half_even", "floor", "half_up")
ACTIVATION_APPROX = ("exact", "dpu")


@dataclass(frozen=True)
class TargetProfile:
    """What a target accepts. Passes read it; before lowering, :mod:`quantfx.rules` checks the compiled graph
    against its rule fields (every field below is read by a pass or by the rule checker).

    ``weight_quant``/``act_quant``/``act_quant_unsigned`` are quantizer spec classes; ``*_bit_width`` fields
    override their bit widths and must lie in the allowed ranges."""

    name: str
    weight_quant: type
    act_quant: type  # signed activations (identity requantization, add/cat groups, inputs)
    act_quant_unsigned: type  # after ReLU / ReLU6 / Sigmoid
    bias_scaling: str = "external"
    bias_bit_width: int = 32
    avgpool: str = "trunc"
    weight_bit_width: int = 8
    act_bit_width: int = 8
    input_bit_width: int = 8
    weight_bit_range: tuple = (2, 8)
    act_bit_range: tuple = (2, 8)
    power_of_two: bool = False
    per_channel_weights_allowed: bool = True
    zero_point_allowed: bool = False
    # residual-add inputs of different kinds (a ReLU output and a signed branch): "scale" shares their scale and
    # each keeps its sign and zero point (no requantizer); "quantizer" puts them on one grid (FINN's AddStreams
    # needs identical input datatypes), requantizing the ReLU-side edge
    add_grid: str = "scale"
    # a residual add reads a conv/linear's float output (accumulator x scale + bias) without requantizing it: the
    # add's other input keeps its own grid and the quantizer after the add is the one rounding (oneDNN's conv with
    # a sum post-op, PT2E's qconv2d_pointwise.binary). False: every add input is requantized onto a shared grid
    add_reads_layer_output: bool = False
    # how the runtime turns a conv/linear accumulator into the next activation's integers: "float" divides the
    # float result by the output scale (qonnx's Quant); "multiplier" scales the exact integer accumulator by
    # one float32 multiplier, in_scale x w_scale / out_scale (onnxruntime's QLinearConv/QGemm; PyTorch's fbgemm too,
    # given the float bias whose float32 quotient by in_scale x w_scale is nearest the bias integer).
    # "inverse_multiplier": the same with m = (in_scale x w_scale) x float32(1 / out_scale) (PyTorch's qnnpack).
    # "float_bias": rne(((acc - b_int) x s_acc + b) x float32(1 / out_scale) + zp) in float32 steps, the bias b
    # added in float after scaling (oneDNN, PyTorch's onednn engine)
    # "multiplier_float_bias": "multiplier" with the bias added as fbgemm adds its float bias b, as the float32
    # quotient fl(b / s_acc) (PyTorch's fbgemm engine): rne(fl(fl(acc - b_int) + fl(b / s_acc)) x m) + zp, which
    # is "multiplier" where the quotient is the bias integer, and parts from it by about an ulp elsewhere
    # With these the fake-quant model computes the same way in eval mode, so the artefact agrees to the bit.
    requant: str = "float"
    # the runtime's 8-bit kernels sum u8 x s8 products in pairs into a saturating int16 on x86 CPUs without VNNI
    # (onnxruntime's MLAS, fbgemm): quantfx.targets.int16_pairs
    pair_kernels: bool = False
    # which CPUs the artefact must be exact on, where pair_kernels: "any" (x86 with or without VNNI, ARM), so no
    # pair sum may leave int16 (checked when profiling and at export); "vnni" trusts every deployment CPU to
    # multiply into int32 (AVX512-VNNI, AVX-VNNI, ARM), which lets 8-bit weights meet 8-bit activations
    cpu: str = "any"
    # weight_bit_width per cpu mode where it differs from weight_bit_width (replace(cpu=...) takes it)
    cpu_weight_bit_width: tuple = ()
    # -- rules (quantfx.rules): what the runtime takes, beyond the bit ranges, zero_point_allowed,
    # per_channel_weights_allowed and power_of_two above
    runtime: str = ""  # who sets the rules, as messages name it ("FINN", "onnxruntime"); default: the name
    weight_signed: Optional[bool] = None  # weights must be signed (True) or unsigned (False); None: either
    act_rounding: tuple = ROUNDINGS  # rounding modes of activation quantizers the runtime reproduces
    quant_rounding: tuple = ROUNDINGS  # of weight and bias quantizers and truncating pools
    half_up_signed_ok: bool = True  # False: 'half_up' only on unsigned grids (QONNX rounds ties away from 0)
    act_per_channel_allowed: bool = False
    bias_modes_allowed: tuple = BIAS_MODES  # bias scaling modes of a quantized bias (a float bias: "float")
    unsigned_after_relu: bool = False  # ReLU/Sigmoid outputs unsigned and not narrow, identity outputs signed
    weight_quantizer_per_layer: bool = False  # no weight quantizer shared by two layers (or two calls)
    add_same_datatype: bool = False  # the inputs of an add have one bit width and sign
    # a product of two quantized tensors (QuantProduct: SE gates, attention matmuls) on the accumulator grid
    tensor_products_allowed: bool = True
    # float islands (quantfx.classify.float_island: SiLU, GELU, LayerNorm, softmax, attention, ...) run in float
    # between a dequantization and a requantization; False: only monotonic ones (a quantizer after them is a
    # threshold), the others are refused
    float_islands_allowed: bool = True
    # every conv/linear requantization exact in float32, so that kernels computing it in other float orders
    # (fbgemm: rne((acc + b) x m) + zp; oneDNN: rne((acc x s + b) x 1/s_out + zp)) give the same integers:
    # power-of-two activation scales, even zero points, each weight scale on the grid that puts the multiplier
    # on multiples of 2^-15 (set after calibration; targets/torch_quantized.exact_requant_grid). PyTorch's 'x86'
    # engine runs oneDNN convolutions on CPUs with AVX512-VNNI and fbgemm elsewhere
    exact_requant: bool = False
    # "dpu": LeakyReLU fused into the layer or add before it (one quantizer, at its output: swap_modules) with
    # its slope in 1/256, hard-sigmoid/swish with 2731/2^14, average pools of non-power-of-two areas as
    # sum x k/2^n, as the DPU computes them (passes/approximate_activations.py); "exact": as written
    activation_approx: str = "exact"
    description: str = ""
    options: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        where = f"target {self.name!r}"
        if not self.runtime:
            object.__setattr__(self, "runtime", self.name)
        if self.bias_scaling not in BIAS_MODES:
            raise QuantArgumentError(f"{where}: bias_scaling={self.bias_scaling!r}; use one of {BIAS_MODES}")
        if self.requant not in REQUANT_MODES:
            raise QuantArgumentError(f"{where}: requant={self.requant!r}; use one of {REQUANT_MODES}")
        if self.cpu not in CPU_MODES:
            raise QuantArgumentError(f"{where}: cpu={self.cpu!r}; use one of {CPU_MODES}")
        if self.add_grid not in ADD_GRIDS:
            raise QuantArgumentError(f"{where}: add_grid={self.add_grid!r}; use one of {ADD_GRIDS}")
        if self.activation_approx not in ACTIVATION_APPROX:
            raise QuantArgumentError(f"{where}: activation_approx={self.activation_approx!r}; use one of "
                                     f"{ACTIVATION_APPROX}")
        if self.avgpool not in AVGPOOL_MODES:
            raise QuantArgumentError(f"{where}: avgpool={self.avgpool!r}; use one of {AVGPOOL_MODES}")
        for attr, rng in (("weight_bit_width", self.weight_bit_range), ("act_bit_width", self.act_bit_range),
                          ("input_bit_width", self.act_bit_range)):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, int) or not rng[0] <= v <= rng[1]:
                raise QuantArgumentError(
                    f"{where}: {attr}={v!r} is outside what the target accepts ({rng[0]}..{rng[1]})")
        if self.bias_bit_width not in (8, 16, 32):
            raise QuantArgumentError(f"{where}: bias_bit_width={self.bias_bit_width!r}; use 8, 16 or 32")
        self._check_pairs(where)

    def worst_pair(self) -> tuple[int, int, int]:
        """(largest activation code, largest weight magnitude, their worst pair sum) of the profile's default
        widths, as a u8 x s8 kernel sees them (int16_pairs.code_max)."""
        def rng(spec, bits):
            return Q.functional.int_range(bits, spec.signed, spec.narrow_range)

        a_max = max(code_max(*rng(q, bits)) for q, bits in (
            (self.act_quant, self.act_bit_width), (self.act_quant_unsigned, self.act_bit_width),
            (self.act_quant, self.input_bit_width)))
        lo, hi = rng(self.weight_quant, self.weight_bit_width)
        w_max = max(-lo, hi)
        return a_max, w_max, a_max * 2 * w_max

    def _check_pairs(self, where: str) -> None:
        if not self.pair_kernels or self.cpu != "any":
            return
        a_max, w_max, worst = self.worst_pair()
        if worst > INT16_MAX:
            raise QuantArgumentError(
                f"{where}: {self.weight_bit_width}-bit weights (|w| <= {w_max}) on {self.act_bit_width}-bit "
                f"activations (codes <= {a_max}) can sum to {a_max} x {2 * w_max} = {worst} in one int16 pair of "
                f"the runtime's 8-bit kernels on x86 CPUs without VNNI (limit {INT16_MAX}), so the artefact would "
                "give other integers there. Use weight_bit_width <= 7 or act_bit_width and input_bit_width <= 7, "
                "or cpu='vnni' if every CPU it will run on has AVX512-VNNI/AVX-VNNI or is ARM")

    def replace(self, **changes) -> "TargetProfile":
        """A copy with ``changes`` (validated); ``None`` values are ignored. A new ``cpu`` brings that mode's
        weight width (``cpu_weight_bit_width``) unless ``weight_bit_width`` is given too."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "cpu" in changes and "weight_bit_width" not in changes:
            by_cpu = dict(self.cpu_weight_bit_width)
            if changes["cpu"] in by_cpu:
                changes["weight_bit_width"] = by_cpu[changes["cpu"]]
        return dataclasses.replace(self, **changes) if changes else self



_REGISTRY: dict[str, TargetProfile] = {}


def register_profile(profile: TargetProfile) -> TargetProfile:
    _REGISTRY[profile.name] = profile
    return profile


def available_targets() -> list[str]:
    return sorted(_REGISTRY)


def get_profile(target) -> TargetProfile:
    """A registered profile by name, or ``target`` itself if it is a TargetProfile."""
    if isinstance(target, TargetProfile):
        return target
    if target not in _REGISTRY:
        raise QuantArgumentError(
            f"unknown target {target!r}; valid targets: {', '.join(available_targets())}")
    return _REGISTRY[target]


FINN = register_profile(TargetProfile(
    name="finn", weight_quant=Q.Int8WeightPerChannelFloat, act_quant=Q.Int8ActPerTensorFloat,
    act_quant_unsigned=Q.Uint8ActPerTensorFloat, bias_scaling="external", bias_bit_width=32,
    avgpool="trunc", weight_bit_range=(1, 8), act_bit_range=(1, 8), add_grid="quantizer",
    runtime="FINN", half_up_signed_ok=False, bias_modes_allowed=("external",), unsigned_after_relu=True,
    weight_quantizer_per_layer=True, add_same_datatype=True, tensor_products_allowed=False,
    float_islands_allowed=False,
    description="QONNX for FINN: 1-8 bit weights (one scale per output channel) and activations, zero point 0, "
                "unsigned activations after ReLU, external 32-bit or float bias"))

ONNX = register_profile(TargetProfile(
    name="onnx", weight_quant=Q.Int8WeightPerChannelFloat, act_quant=Q.Uint8ActPerTensorFloatAsym,
    act_quant_unsigned=Q.Uint8ActPerTensorFloatAsym, bias_scaling="external", bias_bit_width=32,
    avgpool="requant", weight_bit_range=(2, 8), act_bit_range=(2, 8), zero_point_allowed=True,
    requant="multiplier", pair_kernels=True, weight_bit_width=7, cpu_weight_bit_width=(("any", 7), ("vnni", 8)),
    runtime="onnxruntime", weight_signed=True, act_rounding=("half_even",), bias_modes_allowed=("external",),
    description="standard ONNX QDQ for onnxruntime: int8 per-channel weights (axis 0; 7-bit magnitudes so no "
                "int16 pair sum saturates on x86 without VNNI, 8-bit with cpu='vnni'), uint8 activations with "
                "zero point, int32 external bias"))


class Int8WeightPerChannelFullRange(Q.Int8WeightPerChannelFloat):
    """int8 per-channel symmetric weights over the full range [-128, 127] (PyTorch qint8)."""
    narrow_range = False


class Uint8ActPerTensorPo2AsymEven(Q.Uint8ActPerTensorFloatAsym):
    """8-bit unsigned activations with a power-of-two scale and an even zero point (the torch target's 'x86'
    profile: its requantizations are exact in float32, whichever kernel computes them)."""
    scale_type = "po2"
    even_zero_point = True


TORCH = register_profile(TargetProfile(
    name="torch", weight_quant=Int8WeightPerChannelFullRange,
    act_quant=Uint8ActPerTensorPo2AsymEven, act_quant_unsigned=Uint8ActPerTensorPo2AsymEven,
    bias_scaling="external", bias_bit_width=32,
    avgpool="requant", weight_bit_width=7, weight_bit_range=(7, 8), act_bit_range=(7, 8),
    zero_point_allowed=True, pair_kernels=True, requant="multiplier_float_bias", exact_requant=True,
    add_reads_layer_output=True, options={"engine": "x86"},
    runtime="PyTorch's quantized engine", weight_signed=True, act_rounding=("half_even",),
    bias_modes_allowed=("external",),
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
    exact rational and its rounding, on every x86 CPU. 'fbgemm' keeps float activation scales (1.4 dB more SQNR
    on the ResNet-18 benchmark model, 3.4 dB on MobileNetV2) and runs fbgemm everywhere, slower than oneDNN on
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
    return dataclasses.replace(TORCH, weight_bit_width=w_bits, act_bit_width=a_bits, input_bit_width=a_bits,
                               act_quant=act, act_quant_unsigned=act, exact_requant=exact,
                               add_reads_layer_output=exact,
                               pair_kernels=engine != "qnnpack",
                               requant={"qnnpack": "inverse_multiplier", "onednn": "float_bias"}.get(
                                   engine, "multiplier_float_bias"),
                               options={"engine": engine})


class Int8ActPerTensorFixedPointDpuRound(Q.Int8ActPerTensorFixedPoint):
    """int8 power-of-two activations rounded as the DPU rounds them: ties up (Vitis AI's DPU_ROUND, the
    round mode of non-constant fix tensors in XIR; vart's ``dpu_round_float``: std::round for x >= 0, ceil on
    negative ties)."""
    rounding = "half_up"


DPU = register_profile(TargetProfile(
    name="dpu", weight_quant=Q.Int8WeightPerTensorFixedPoint, act_quant=Int8ActPerTensorFixedPointDpuRound,
    act_quant_unsigned=Int8ActPerTensorFixedPointDpuRound, bias_scaling="internal", bias_bit_width=8,
    avgpool="requant", weight_bit_range=(8, 8), act_bit_range=(8, 8), power_of_two=True,
    per_channel_weights_allowed=False, runtime="the DPU", weight_signed=True, bias_modes_allowed=("internal",),
    activation_approx="dpu",
    description="Xilinx DPU: 8-bit signed symmetric per-tensor, power-of-two scales everywhere, internal "
                "8-bit bias, concat inputs/outputs share one position"))
