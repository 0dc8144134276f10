"""The compiler passes (installed as ``quantfx.passes``); one ``verb_noun.py`` per pass.

Importing this package registers every pass below in the core's registry (``quantfx.pass_infra.PASSES``, by
name); ``import quantfx`` does it, so the core finds passes by name and never imports one."""
from quantfx.pass_infra import PASSES, register_pass

from .annotate import Annotate
from .approximate_activations import ApproximateActivations
from .canonicalize import Canonicalize
from .choose_bias_scaling import ChooseBiasScaling
from .correct_bias import CorrectBias
from .equalize_cross_layer import EqualizeCrossLayer
from .fit_bias_ranges import FitBiasRanges
from .fuse_conv_bn import FuseConvBN
from .propagate_shapes import PropagateShapes
from .quantize_products import QuantizeProducts
from .raise_modules import RaiseModules
from .round_weights import RoundWeights
from .share_quantizers import ShareQuantizers
from .swap_modules import SwapModules
from .tabulate_softmax import TabulateSoftmax
from .trace import Trace

for _cls in (Trace, PropagateShapes, Canonicalize, FuseConvBN, SwapModules, ShareQuantizers, ChooseBiasScaling,
             Annotate, ApproximateActivations, EqualizeCrossLayer, QuantizeProducts,
             RaiseModules, FitBiasRanges, RoundWeights, CorrectBias, TabulateSoftmax):
    register_pass(_cls)
del _cls

#: pass name -> class, for pipelines spelled as strings (``trace,canonicalize,fuse_conv_bn,...``): the core's
#: registry itself, so a pass registered with quantfx.pass_infra.register_pass is listed here too
REGISTRY = PASSES

__all__ = ["Annotate", "ApproximateActivations", "Canonicalize", "ChooseBiasScaling", "CorrectBias",
           "EqualizeCrossLayer", "FitBiasRanges", "FuseConvBN", "PropagateShapes", "QuantizeProducts", "RaiseModules",
           "RoundWeights", "ShareQuantizers", "SwapModules", "TabulateSoftmax", "Trace", "REGISTRY"]
