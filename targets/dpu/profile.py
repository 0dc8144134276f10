"""The dpu target's profile: 8-bit power-of-two (fix position) quantization as the Xilinx DPU computes it."""
from quantfx import quant as Q
from quantfx.profile import Constraints, Recipe, Scheme, TargetProfile, register_profile

from .positions import position_problems


class Int8ActPerTensorFixedPointDpuRound(Q.Int8ActPerTensorFixedPoint):
    """int8 power-of-two activations rounded as the DPU rounds them: ties up (Vitis AI's DPU_ROUND, the
    round mode of non-constant fix tensors in XIR; vart's ``dpu_round_float``: std::round for x >= 0, ceil on
    negative ties)."""
    rounding = "half_up"


DPU = register_profile(TargetProfile(
    name="dpu",
    scheme=Scheme(weight_quant=Q.Int8WeightPerTensorFixedPoint, act_quant=Int8ActPerTensorFixedPointDpuRound,
                  act_quant_unsigned=Int8ActPerTensorFixedPointDpuRound, bias_scaling="internal", bias_bit_width=8),
    # calibration 'auto' / 'mse' search fix positions by min-MSE (AMD Quark's MinMSE, judged on the output);
    # the compiler's position rules are applied last, so the calibrated model computes what the file will
    recipe=Recipe(avgpool="requant", activation_approx="fixed_point",
                  scale_search=(("auto", "search_fix_positions"), ("mse", "search_fix_positions")),
                  after_calibration=("refine_fix_positions",)),
    constraints=Constraints(
        weight_bit_range=(8, 8), act_bit_range=(8, 8), power_of_two=True, per_channel_weights_allowed=False,
        runtime="the DPU", weight_signed=True, bias_modes_allowed=("internal",), analyses=(position_problems,)),
    description="Xilinx DPU: 8-bit signed symmetric per-tensor, power-of-two scales everywhere, internal "
                "8-bit bias, concat inputs/outputs share one position"))
