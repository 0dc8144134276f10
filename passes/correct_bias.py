"""correct_bias: empirical bias correction on calibration data (:func:`quantfx.bias_correction.correct_bias`).
Calibration runs it with ``bias_correction=True``."""
from __future__ import annotations

from dataclasses import dataclass

from quantfx.bias_correction import correct_bias
from quantfx.pass_infra import DataPass, PassResult


@dataclass(frozen=True)
class CorrectBias(DataPass):
    """Each quantized layer's bias moved by the mean difference between its float and quantized outputs on
    ``data``; the graph is unchanged."""

    name = "correct_bias"

    def call(self, gm) -> PassResult:
        correct_bias(gm, self.data, progress=self.progress, max_batches=self.max_batches)
        return PassResult(gm, False)
