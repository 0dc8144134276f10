"""Target profiles, in three parts (as torch.ao keeps QConfigMapping apart from BackendConfig):

- :class:`Scheme`: what the model is quantized to: quantizer specs, bit widths, bias scaling, how a
  requantization is computed;
- :class:`Recipe`: which passes run and with what options: how average pools and residual adds are
  quantized, fixed-point activation constants, the calibration method a pass computes, the passes calibration
  runs last;
- :class:`Constraints`: what the runtime accepts, the data :mod:`quantfx.rules` checks a compiled graph against
  before lowering (bit ranges, signedness, zero points, rounding modes, FINN's structural rules, the int16 pair
  rule, and read-only analyses a target adds, such as the DPU compiler's position rules).

:class:`TargetProfile` names the three; the registry (:func:`register_profile`, :func:`get_profile`) is filled
by the targets package when quantfx is imported (each target registers its profile from its own files)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import QuantArgumentError
from . import quant as Q
from .rules import INT16_MAX, code_max

BIAS_MODES = ("external", "internal", "float")
AVGPOOL_MODES = ("trunc", "requant")
ADD_GRIDS = ("scale", "quantizer")
REQUANT_MODES = ("float", "multiplier", "inverse_multiplier", "float_bias", "multiplier_float_bias")
CPU_MODES = ("any", "vnni")
ROUNDINGS = ("half_even", "floor", "half_up")
ACTIVATION_APPROX = ("exact", "fixed_point")


@dataclass(frozen=True)
class Scheme:
    """What the model is quantized to. ``weight_quant``/``act_quant``/``act_quant_unsigned`` are quantizer spec
    classes; the ``*_bit_width`` fields override their bit widths."""

    weight_quant: type
    act_quant: type  # signed activations (identity requantization, add/cat groups, inputs)
    act_quant_unsigned: type  # after ReLU / ReLU6 / Sigmoid
    weight_bit_width: int = 8
    act_bit_width: int = 8
    input_bit_width: int = 8
    # weight_bit_width per cpu mode (Constraints.cpu) where it differs from weight_bit_width
    cpu_weight_bit_width: tuple = ()
    bias_scaling: str = "external"
    bias_bit_width: int = 32
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
    # every conv/linear requantization exact in float32, so that kernels computing it in other float orders
    # (fbgemm: rne((acc + b) x m) + zp; oneDNN: rne((acc x s + b) x 1/s_out + zp)) give the same integers:
    # power-of-two activation scales, even zero points, each weight scale on the grid that puts the multiplier
    # on multiples of 2^-15 (the recipe's post-calibration pass snap_requant_grid puts it there)
    exact_requant: bool = False


@dataclass(frozen=True)
class Recipe:
    """Which passes run and how: the compile stage's options and the calibration stage's passes."""

    # average pools: "trunc" sums and truncates to the output width (QuantAvgPool2d); "requant" requantizes
    avgpool: str = "trunc"
    # residual-add inputs of different kinds (a ReLU output and a signed branch): "scale" shares their scale and
    # each keeps its sign and zero point (no requantizer); "quantizer" puts them on one grid (FINN's AddStreams
    # needs identical input datatypes), requantizing the ReLU-side edge
    add_grid: str = "scale"
    # a residual add reads a conv/linear's float output (accumulator x scale + bias) without requantizing it: the
    # add's other input keeps its own grid and the quantizer after the add is the one rounding (oneDNN's conv with
    # a sum post-op, PT2E's qconv2d_pointwise.binary). False: every add input is requantized onto a shared grid
    add_reads_layer_output: bool = False
    # "fixed_point": the pass approximate_activations computes LeakyReLU fused into the layer or add before it
    # (one quantizer, at its output: swap_modules) with its slope in 1/256, hard-sigmoid/swish with 2731/2^14,
    # average pools of non-power-of-two areas as sum x k/2^n (the DPU's fixed-point constants); "exact": as written
    activation_approx: str = "exact"
    # calibration method -> the registered pass that computes it (the observers then collect max statistics):
    # (("mse", "search_fix_positions"),) for a power-of-two target searching positions by min-MSE
    scale_search: tuple = ()
    # registered passes calibration runs last, on the calibrated, annotated model, in order
    after_calibration: tuple = ()


@dataclass(frozen=True)
class Constraints:
    """What the runtime accepts: read by the one rule checker (:mod:`quantfx.rules`) before lowering."""

    weight_bit_range: tuple = (2, 8)
    act_bit_range: tuple = (2, 8)
    power_of_two: bool = False  # every quantizer's scale a power of two
    per_channel_weights_allowed: bool = True
    act_per_channel_allowed: bool = False
    zero_point_allowed: bool = False
    runtime: str = ""  # who sets the rules, as messages name it ("FINN", "onnxruntime"); default: the name
    weight_signed: Optional[bool] = None  # weights must be signed (True) or unsigned (False); None: either
    act_rounding: tuple = ROUNDINGS  # rounding modes of activation quantizers the runtime reproduces
    quant_rounding: tuple = ROUNDINGS  # of weight and bias quantizers and truncating pools
    half_up_signed_ok: bool = True  # False: 'half_up' only on unsigned grids (QONNX rounds ties away from 0)
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
    # the runtime's 8-bit kernels sum u8 x s8 products in pairs into a saturating int16 on x86 CPUs without VNNI
    # (onnxruntime's MLAS, fbgemm): quantfx.rules checks the pair sums
    pair_kernels: bool = False
    # which CPUs the artefact must be exact on, where pair_kernels: "any" (x86 with or without VNNI, ARM), so no
    # pair sum may leave int16; "vnni" trusts every deployment CPU to multiply into int32 (AVX512-VNNI, AVX-VNNI,
    # ARM), which lets 8-bit weights meet 8-bit activations
    cpu: str = "any"
    # read-only analyses of a compiled graph, ``fn(gm) -> [(node, message)]`` (message: "<what>; <rule> (<way
    # out>)"), for rules that are not one quantizer's or one node's (the DPU compiler's shift ranges)
    analyses: tuple = field(default=(), compare=False)


_PARTS = {"scheme": Scheme, "recipe": Recipe, "constraints": Constraints}
_FIELD_PART = {f.name: part for part, cls in _PARTS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class TargetProfile:
    """A target: its name, quantization :class:`Scheme`, pass :class:`Recipe` and runtime :class:`Constraints`.

    ``options`` holds what only the target's lowering reads (the torch target's quantized engine). The parts'
    fields are also readable on the profile itself (``profile.weight_bit_width``), and :meth:`replace` takes them
    by name."""

    name: str
    scheme: Scheme
    recipe: Recipe = Recipe()
    constraints: Constraints = Constraints()
    description: str = ""
    options: dict = field(default_factory=dict, hash=False, compare=False)

    def __getattr__(self, attr):
        # only reached for names that are not the profile's own fields: a part's field, read through
        part = _FIELD_PART.get(attr)
        if part is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")
        return getattr(object.__getattribute__(self, part), attr)

    def __post_init__(self):
        where = f"target {self.name!r}"
        if not self.constraints.runtime:
            object.__setattr__(self, "constraints", dataclasses.replace(self.constraints, runtime=self.name))
        s, r, c = self.scheme, self.recipe, self.constraints
        for what, value, allowed in (("bias_scaling", s.bias_scaling, BIAS_MODES),
                                     ("requant", s.requant, REQUANT_MODES), ("cpu", c.cpu, CPU_MODES),
                                     ("add_grid", r.add_grid, ADD_GRIDS),
                                     ("activation_approx", r.activation_approx, ACTIVATION_APPROX),
                                     ("avgpool", r.avgpool, AVGPOOL_MODES)):
            if value not in allowed:
                raise QuantArgumentError(f"{where}: {what}={value!r}; use one of {allowed}")
        for attr, rng in (("weight_bit_width", c.weight_bit_range), ("act_bit_width", c.act_bit_range),
                          ("input_bit_width", c.act_bit_range)):
            v = getattr(s, attr)
            if isinstance(v, bool) or not isinstance(v, int) or not rng[0] <= v <= rng[1]:
                raise QuantArgumentError(
                    f"{where}: {attr}={v!r} is outside what the target accepts ({rng[0]}..{rng[1]})")
        if s.bias_bit_width not in (8, 16, 32):
            raise QuantArgumentError(f"{where}: bias_bit_width={s.bias_bit_width!r}; use 8, 16 or 32")
        self._check_pairs(where)

    def worst_pair(self) -> tuple[int, int, int]:
        """(largest activation code, largest weight magnitude, their worst pair sum) of the profile's default
        widths, as a u8 x s8 kernel sees them (int16_pairs.code_max)."""
        s = self.scheme

        def rng(spec, bits):
            return Q.functional.int_range(bits, spec.signed, spec.narrow_range)

        a_max = max(code_max(*rng(q, bits)) for q, bits in (
            (s.act_quant, s.act_bit_width), (s.act_quant_unsigned, s.act_bit_width),
            (s.act_quant, s.input_bit_width)))
        lo, hi = rng(s.weight_quant, s.weight_bit_width)
        w_max = max(-lo, hi)
        return a_max, w_max, a_max * 2 * w_max

    def _check_pairs(self, where: str) -> None:
        if not self.constraints.pair_kernels or self.constraints.cpu != "any":
            return
        a_max, w_max, worst = self.worst_pair()
        if worst > INT16_MAX:
            s = self.scheme
            raise QuantArgumentError(
                f"{where}: {s.weight_bit_width}-bit weights (|w| <= {w_max}) on {s.act_bit_width}-bit "
                f"activations (codes <= {a_max}) can sum to {a_max} x {2 * w_max} = {worst} in one int16 pair of "
                f"the runtime's 8-bit kernels on x86 CPUs without VNNI (limit {INT16_MAX}), so the artefact would "
                "give other integers there. Use weight_bit_width <= 7 or act_bit_width and input_bit_width <= 7, "
                "or cpu='vnni' if every CPU it will run on has AVX512-VNNI/AVX-VNNI or is ARM")

    def replace(self, **changes) -> "TargetProfile":
        """A copy with ``changes`` (validated), given by field name, a part's or the profile's own; ``None``
        values are ignored. A new ``cpu`` brings that mode's weight width (``cpu_weight_bit_width``) unless
        ``weight_bit_width`` is given too."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "cpu" in changes and "weight_bit_width" not in changes:
            by_cpu = dict(self.scheme.cpu_weight_bit_width)
            if changes["cpu"] in by_cpu:
                changes["weight_bit_width"] = by_cpu[changes["cpu"]]
        if not changes:
            return self
        own = {k: v for k, v in changes.items() if k not in _FIELD_PART}
        unknown = [k for k in own if k not in {f.name for f in dataclasses.fields(self)}]
        if unknown:
            raise QuantArgumentError(f"target {self.name!r}: no profile field {', '.join(unknown)}")
        for part in _PARTS:
            mine = {k: v for k, v in changes.items() if _FIELD_PART.get(k) == part}
            if mine:
                own[part] = dataclasses.replace(own.get(part, getattr(self, part)), **mine)
        return dataclasses.replace(self, **own)


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


__all__ = ["Scheme", "Recipe", "Constraints", "TargetProfile", "register_profile", "available_targets",
           "get_profile"]
