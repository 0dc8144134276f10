"""round_weights: choose each quantized layer's weight integers on calibration data instead of rounding to
nearest: 'learned' (AdaRound, :func:`quantfx.weight_rounding.adaround`) or 'gptq' (:func:`quantfx.gptq.gptq`).
Calibration runs it when ``weight_rounding`` asks for it."""
from __future__ import annotations

from dataclasses import dataclass

from quantfx.errors import QuantArgumentError
from quantfx.gptq import gptq
from quantfx.pass_infra import DataPass, PassResult
from quantfx.weight_rounding import adaround

METHODS = ("learned", "gptq")


@dataclass(frozen=True)
class RoundWeights(DataPass):
    """Weight integers chosen on ``data`` layer by layer (``method`` 'learned' | 'gptq'); deterministic under
    ``seed``. Writes the chosen integers into the weights; the graph is unchanged."""

    name = "round_weights"
    method: str = "learned"

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantArgumentError(f"round_weights: method={self.method!r}; use one of {', '.join(METHODS)}")

    def call(self, gm) -> PassResult:
        if self.method == "learned":
            adaround(gm, self.data, progress=self.progress, max_batches=self.max_batches, seed=self.seed)
        else:
            gptq(gm, self.data, progress=self.progress, max_batches=self.max_batches)
        return PassResult(gm, False)
