"""Target profiles and backends (installed as ``quantfx.targets``). Importing it registers, in the core's
registries, each target's profile (``quantfx.profile``), backend (``quantfx.lowering.BACKENDS``) and the passes
its recipe names (``quantfx.pass_infra.PASSES``); ``import quantfx`` does it last."""
from quantfx.lowering import register_backend
from quantfx.pass_infra import register_pass
from quantfx.profile import TargetProfile, available_targets, get_profile, register_profile

from . import dpu, finn_cost, finn_qonnx, onnx_qdq, torch_pt2_runtime  # noqa: F401  (finn_cost: budget keys)
from .dpu import DPU
from .finn_profile import FINN
from .onnx_profile import ONNX
from .torch_profile import TORCH, torch_profile
from .torch_passes import SnapRequantGrid

for _backend in (onnx_qdq.BACKEND, finn_qonnx.BACKEND, torch_pt2_runtime.BACKEND, dpu.BACKEND):
    register_backend(_backend)
register_pass(SnapRequantGrid)
del _backend

__all__ = ["TargetProfile", "available_targets", "get_profile", "register_profile", "torch_profile",
           "FINN", "ONNX", "TORCH", "DPU"]
