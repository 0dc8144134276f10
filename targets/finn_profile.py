"""The finn target's profile: QONNX for FINN."""
from quantfx import quant as Q
from quantfx.profile import Constraints, Recipe, Scheme, TargetProfile, register_profile

FINN = register_profile(TargetProfile(
    name="finn",
    scheme=Scheme(weight_quant=Q.Int8WeightPerChannelFloat, act_quant=Q.Int8ActPerTensorFloat,
                  act_quant_unsigned=Q.Uint8ActPerTensorFloat, bias_scaling="external", bias_bit_width=32),
    recipe=Recipe(avgpool="trunc", add_grid="quantizer"),
    constraints=Constraints(
        weight_bit_range=(1, 8), act_bit_range=(1, 8), runtime="FINN", half_up_signed_ok=False,
        bias_modes_allowed=("external",), unsigned_after_relu=True, weight_quantizer_per_layer=True,
        add_same_datatype=True, tensor_products_allowed=False, float_islands_allowed=False),
    description="QONNX for FINN: 1-8 bit weights (one scale per output channel) and activations, zero point 0, "
                "unsigned activations after ReLU, external 32-bit or float bias"))
