"""Target profiles and backends (installed as ``quantfx.targets``); importing it registers each backend."""
from quantfx.lowering import register_backend

from . import dpu, finn_cost, finn_qonnx, onnx_qdq, torch_pt2_runtime  # noqa: F401  (finn_cost: budget keys)
from .profile import (
    DPU, FINN, ONNX, TORCH, TargetProfile, available_targets, get_profile, register_profile, torch_profile,
)

for _backend in (onnx_qdq.BACKEND, finn_qonnx.BACKEND, torch_pt2_runtime.BACKEND, dpu.BACKEND):
    register_backend(_backend)

__all__ = ["TargetProfile", "available_targets", "get_profile", "register_profile", "torch_profile",
           "FINN", "ONNX", "TORCH", "DPU"]
