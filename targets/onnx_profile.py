"""The onnx target's profile: standard QDQ ONNX for onnxruntime."""
from quantfx import quant as Q
from quantfx.profile import Constraints, Recipe, Scheme, TargetProfile, register_profile

ONNX = register_profile(TargetProfile(
    name="onnx",
    scheme=Scheme(weight_quant=Q.Int8WeightPerChannelFloat, act_quant=Q.Uint8ActPerTensorFloatAsym,
                  act_quant_unsigned=Q.Uint8ActPerTensorFloatAsym, bias_scaling="external", bias_bit_width=32,
                  weight_bit_width=7, cpu_weight_bit_width=(("any", 7), ("vnni", 8)), requant="multiplier"),
    recipe=Recipe(avgpool="requant"),
    constraints=Constraints(
        weight_bit_range=(2, 8), act_bit_range=(2, 8), zero_point_allowed=True, pair_kernels=True,
        runtime="onnxruntime", weight_signed=True, act_rounding=("half_even",), bias_modes_allowed=("external",)),
    description="standard ONNX QDQ for onnxruntime: int8 per-channel weights (axis 0; 7-bit magnitudes so no "
                "int16 pair sum saturates on x86 without VNNI, 8-bit with cpu='vnni'), uint8 activations with "
                "zero point, int32 external bias"))
