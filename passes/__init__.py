"""The compiler passes (installed as ``quantfx.passes``); one ``verb_noun.py`` per pass."""
from .annotate import Annotate
from .canonicalize import Canonicalize
from .choose_bias_scaling import ChooseBiasScaling
from .fuse_conv_bn import FuseConvBN
from .propagate_shapes import PropagateShapes
from .share_quantizers import ShareQuantizers
from .swap_modules import SwapModules
from .trace import Trace

#: pass name -> class, for pipelines spelled as strings (``trace,canonicalize,fuse_conv_bn,...``)
REGISTRY = {cls.name: cls for cls in (Trace, PropagateShapes, Canonicalize, FuseConvBN, SwapModules,
                                      ShareQuantizers, ChooseBiasScaling, Annotate)}

__all__ = ["Annotate", "Canonicalize", "ChooseBiasScaling", "FuseConvBN", "PropagateShapes", "ShareQuantizers",
           "SwapModules", "Trace", "REGISTRY"]
