"""The torch recipe's calibration pass, registered by name: ``snap_requant_grid`` (the exact-requantization grid
of the 'x86' / 'onednn' profiles, :func:`targets.torch_quantized.exact_requant_grid`)."""
from __future__ import annotations

from dataclasses import dataclass

from quantfx.pass_infra import Pass, PassResult

from .torch_quantized import exact_requant_grid


@dataclass(frozen=True)
class SnapRequantGrid(Pass):
    """After calibration, on a profile with ``exact_requant``: each conv/linear's weight scale moved up onto the
    grid that puts its requantization multiplier on multiples of 2^-15 (coarser where the bias is large), so that
    every kernel's float order gives the same integers. Changes weight quantizers, not the graph."""

    name = "snap_requant_grid"
    runs_code = False

    def call(self, gm) -> PassResult:
        exact_requant_grid(gm)
        return PassResult(gm, False)
