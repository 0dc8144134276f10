"""The exception hierarchy: every error quantfx raises derives from :class:`QuantFXError`."""


class QuantFXError(Exception):
    """Base class of every quantfx error."""


class QuantArgumentError(QuantFXError, ValueError):
    """A quantizer or layer argument is outside its allowed values."""


class InputScaleRequiredError(QuantFXError, RuntimeError):
    """An external-scale bias quantizer was used without a quantized input."""


class TraceError(QuantFXError):
    """torch.fx could not trace the model."""


class CalibrationError(QuantFXError):
    """A quantizer has no statistics (it never saw data) where a scale is needed."""


class PassError(QuantFXError):
    """A pass failed; the message names the pass and the passes that already ran."""


class TargetError(QuantFXError):
    """A model breaks a rule of its target; the message names the node, the rule and the fix."""


class ExportError(QuantFXError):
    """A model cannot be lowered to its artefact."""


class DrawError(QuantFXError):
    """A diagram could not be rendered (for example graphviz's ``dot`` program is missing)."""


class ModelSpecError(QuantFXError, ValueError):
    """A model spec (timm:NAME, torchvision:NAME, transformers:PATH, model.py:build_fn) or its inputs cannot be
    used; the message names the spec and the way out."""
