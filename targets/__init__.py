"""Target profiles, lowering and rule checks (installed as ``quantfx.targets``)."""
from .profile import (
    DPU, FINN, ONNX, TORCH, TargetProfile, available_targets, get_profile, register_profile, torch_profile,
)

__all__ = ["TargetProfile", "available_targets", "get_profile", "register_profile", "torch_profile",
           "FINN", "ONNX", "TORCH", "DPU"]
from . import onnx_qdq  # noqa: E402,F401  (registers the onnx backend)
from . import finn_qonnx  # noqa: E402,F401  (registers the finn backend)
