"""dpu target: power-of-two XINT8 QDQ ONNX for AMD/Xilinx DPUs.

``profile`` (the dpu profile), ``lowering`` (the lowering and the steps it lists, runtime forms and report
access), ``steps`` (those steps), ``arch`` (DPU architectures as data and the legality analysis), ``positions``
(the DPU compiler's position rules: the refine on a graph's quantizers, the read-only check of a graph, the
checker of a file), ``calibrate`` (min-MSE fix positions), ``passes`` (the recipe's calibration passes,
registered here)."""
from quantfx.pass_infra import register_pass

from .arch import ARCHS, DEFAULT_ARCH, DpuArch, DpuReport, Placement, get_arch, legality  # noqa: F401
from .lowering import (  # noqa: F401
    BACKEND, FORM_KEY, FIX_POSITIONS_KEY, REPORT_KEY, DpuLowering, diagnose, dpu_round_form, dpu_session, fast_form,
    fix_positions, float_sum_risks, report, run_dpu, run_dpu_intermediates,
)
from .passes import RefineFixPositions, SearchFixPositions
from .positions import REFINE_NOTE, check_file, fix_pos, refine, position_problems  # noqa: F401
from .profile import DPU, Int8ActPerTensorFixedPointDpuRound  # noqa: F401

for _cls in (SearchFixPositions, RefineFixPositions):
    register_pass(_cls)
del _cls

__all__ = ["DPU", "DpuLowering", "BACKEND", "report", "fix_positions", "fast_form", "dpu_session", "run_dpu",
           "check_file", "refine", "position_problems", "dpu_round_form", "float_sum_risks", "legality", "ARCHS"]
