"""The dpu recipe's calibration passes, registered by name (the recipe names them; calibration runs them):
``search_fix_positions`` (min-MSE positions judged on the network's output, :mod:`.calibrate`) and
``refine_fix_positions`` (the DPU compiler's position rules, :func:`.positions.refine`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from quantfx.pass_infra import DataPass, Pass, PassResult

from .calibrate import calibrate_positions
from .positions import REFINE_NOTE, refine


@dataclass(frozen=True)
class SearchFixPositions(DataPass):
    """Each per-tensor power-of-two quantizer's fix position chosen on the calibration data (the dpu's
    calibration methods 'auto' and 'mse'); changes quantizer scales, not the graph."""

    name = "search_fix_positions"

    def call(self, gm) -> PassResult:
        calibrate_positions(gm, self.data, self.max_batches)
        return PassResult(gm, False)


@dataclass(frozen=True)
class RefineFixPositions(Pass):
    """The DPU compiler's position rules applied to a calibrated graph's quantizers; the changes are noted in
    ``qmodel.notes['dpu.refine']``, which the dpu file's report lists."""

    name = "refine_fix_positions"
    runs_code = False

    def call(self, gm) -> PassResult:
        changes = [asdict(c) for c in refine(gm)]
        if hasattr(gm, "notes"):
            gm.notes[REFINE_NOTE] = list(gm.notes.get(REFINE_NOTE, [])) + changes
        return PassResult(gm, False)
