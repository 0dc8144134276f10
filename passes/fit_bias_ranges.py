"""fit_bias_ranges: coarsen the weight grid of each channel whose bias would not fit its integers once the input
scales are known (:mod:`quantfx.bias_range`); calibration runs it after the scales are set and after bias
correction."""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from quantfx.bias_range import fit_bias_ranges
from quantfx.pass_infra import Pass, PassResult


@dataclass(frozen=True)
class FitBiasRanges(Pass):
    """Weight scales raised where a bias needs more steps than its quantizer holds (noted in
    ``qmodel.notes['bias_range']``). Changes parameters of quantizers, not the graph."""

    name = "fit_bias_ranges"
    runs_code = False

    def call(self, gm: fx.GraphModule) -> PassResult:
        fit_bias_ranges(gm)
        return PassResult(gm, False)
