"""ProfilePass: the base of passes that read a target profile (swap_modules, share_quantizers,
choose_bias_scaling); it owns the one way they create requantizers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import fx

from quantfx.errors import QuantArgumentError
from quantfx.graph import insert_module_after, unique_name
from quantfx.nn import QuantIdentity
from quantfx.pass_infra import Pass


@dataclass(frozen=True)
class ProfilePass(Pass):
    """A pass with a ``profile`` option (a TargetProfile, given by the pipeline)."""

    profile: Any = None
    needs_profile: ClassVar[bool] = True

    def requires(self, gm) -> None:
        if self.needs_profile and self.profile is None:
            raise QuantArgumentError(f"{self.name} needs a target profile (build the pipeline with "
                                     "quantfx.pipeline_for(target) or pass target= to quantize)")

    def identity(self, bits: int | None = None) -> QuantIdentity:
        """A requantizer with the profile's signed activation quantizer."""
        if self.profile is None:
            return QuantIdentity()
        return QuantIdentity(act_quant=self.profile.act_quant, bit_width=bits or self.profile.act_bit_width)

    def requantize(self, gm: fx.GraphModule, node: fx.Node, name: str, taken: set, users=None,
                   bits: int | None = None) -> fx.Node:
        """Insert a requantizer after ``node`` (for ``users``, default all), named after ``name``."""
        return insert_module_after(gm, node, self.identity(bits), unique_name(gm, name, taken), users=users)
