"""Models named by a spec string, as the command line takes them: ``timm:NAME``, ``torchvision:NAME``,
``transformers:PATH`` (a config.json or a model folder) and ``path/to/model.py:build_fn``.

``load_model(spec, weights=None) -> LoadedModel``: the float model in eval mode (random weights drawn with
seed 0), the input shape and dtype its own
config gives (or None), and the preprocessing of an image (a PIL image -> a CHW float tensor) where the model's
library defines one. Nothing is downloaded: timm and torchvision use pretrained weights only when the local cache
already holds them (``source`` says which), transformers builds from the config with random weights unless the
folder holds weights. timm, torchvision and transformers are imported only for their own specs.
Raises ModelSpecError (a QuantFXError) naming the spec and the way out.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .errors import ModelSpecError

TEXT_LENGTH = 128  # tokens of a text model's example input, at most its max_position_embeddings
AUDIO_SAMPLES = 16000  # one second at 16 kHz: a raw-waveform audio model's example input
PREFIXES = ("timm", "torchvision", "transformers")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    model: nn.Module
    input_shape: Optional[tuple]  # batch first, batch 1; None when only the user can say
    input_dtype: torch.dtype = torch.float32
    vocab_size: Optional[int] = None  # integer token inputs: random calibration ids are drawn below this
    preprocess: Optional[Callable] = None  # PIL image -> CHW float tensor, the model's own preprocessing
    source: str = ""  # what was built, and where its weights came from
    kind: str = "builder"  # 'timm' | 'torchvision' | 'transformers' | 'builder' (a model.py:build_fn)

    def random_batch(self, shape: tuple, generator: torch.Generator) -> torch.Tensor:
        """A random input of ``shape``: token ids below vocab_size for text models, N(0, 1) otherwise."""
        if self.input_dtype == torch.long:
            return torch.randint(0, self.vocab_size, shape, generator=generator)
        return torch.randn(shape, generator=generator)


class Logits(nn.Module):
    """A transformers model that returns its logits tensor (not a ModelOutput), so it quantizes and exports
    like any single-output model. Positional inputs are passed through (input_ids, pixel_values, input_values
    or input_features, whichever the model takes first)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out[0]


def is_spec(text: str) -> bool:
    return text.split(":", 1)[0] in PREFIXES


def load_model(spec: str, weights: Optional[str] = None) -> LoadedModel:
    """The model named by ``spec`` (module docstring), with ``weights`` (a state_dict file) loaded if given."""
    kind, _, name = spec.partition(":")
    if kind in PREFIXES and not name:
        raise ModelSpecError(f"model {spec!r}: no name after '{kind}:'; write e.g. timm:resnet18, "
                             "torchvision:mobilenet_v3_small or transformers:path/to/config_folder")
    # random weights drawn under seed 0, so the same spec gives the same model every time; the caller's
    # random state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "timm":
            loaded = _timm(spec, name, pretrained=weights is None)
        elif kind == "torchvision":
            loaded = _torchvision(spec, name, pretrained=weights is None)
        elif kind == "transformers":
            loaded = _transformers(spec, name)
        else:
            loaded = LoadedModel(load_builder(spec), None, source=spec)
    if weights is not None:
        _load_weights(spec, loaded, weights)
    loaded.model.eval()
    return loaded


def load_builder(spec: str) -> nn.Module:
    """'path/to/model.py:build_fn' -> the model that build_fn() returns."""
    path, _, fn = spec.rpartition(":")
    if not path or not fn:
        raise ModelSpecError(f"model {spec!r}: expected path/to/model.py:build_fn, timm:NAME, torchvision:NAME "
                             "or transformers:PATH")
    file = Path(path)
    if not file.is_file():
        raise ModelSpecError(f"model {spec!r}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.parent.resolve()))
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    if not hasattr(module, fn):
        raise ModelSpecError(f"model {spec!r}: {path} has no function {fn!r}")
    model = getattr(module, fn)()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model {spec!r}: {fn}() returned {type(model).__name__}, not an nn.Module")
    return model


def _import(spec: str, package: str):
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ModelSpecError(f"model {spec!r}: {package} does not import ({e}); pip install {package}") from e


def _load_weights(spec: str, loaded: LoadedModel, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise ModelSpecError(f"model {spec!r}: --weights {path}: no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelSpecError(f"model {spec!r}: --weights {path} is not a state_dict saved with torch.save "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    target = loaded.model.model if isinstance(loaded.model, Logits) else loaded.model
    try:
        target.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelSpecError(f"model {spec!r}: --weights {path} does not fit the model ({first}); save the "
                             f"state_dict of the same architecture (model.state_dict())") from e
    loaded.source += f", weights from {path}"


# ----------------------------------------------------------------------------------------------------- timm


def _timm(spec: str, name: str, pretrained: bool) -> LoadedModel:
    timm = _import(spec, "timm")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ModelSpecError(f"model {spec!r}: timm has no architecture {name!r}"
                             + (f"; close names: {', '.join(close)}" if close else "")
                             + " (timm.list_models() lists them)")
    cached = _timm_cached_file(name) if pretrained else None
    if cached is not None:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(cached)))
        source = f"timm {name}, pretrained weights from the local cache {cached}"
    else:
        model = timm.create_model(name, pretrained=False)
        source = f"timm {name}, random weights"
    shape = (1,) + tuple(timm.data.resolve_data_config({}, model=model)["input_size"])
    return LoadedModel(model, shape, preprocess=timm_preprocess(model, shape), source=source, kind="timm")


def timm_preprocess(model: nn.Module, shape: tuple):
    """timm's evaluation transform for ``model`` (its pretrained_cfg: interpolation, crop, mean, std) at the
    input size ``shape`` (batch first)."""
    import timm.data  # optional: timm models only
    cfg = timm.data.resolve_data_config({"input_size": tuple(shape[1:])}, model=model)
    return timm.data.create_transform(**cfg)


def _timm_cached_file(name: str) -> Optional[Path]:
    """The file of ``name``'s default pretrained weights if the Hugging Face or torch hub cache holds it."""
    import timm  # optional: timm models only
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache  # optional: comes with timm
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in ("open_clip_model.safetensors", "model.safetensors", "pytorch_model.bin"):
            if filename.startswith("open_clip") and cfg.hf_hub_filename is None:
                continue
            hit = try_to_load_from_cache(repo, cfg.hf_hub_filename or filename, revision=revision or None)
            if isinstance(hit, str):
                return Path(hit)
    if cfg.url:
        return _hub_checkpoint(cfg.url)
    return None


def _hub_checkpoint(url: str) -> Optional[Path]:
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
    return file if file.is_file() else None


# ---------------------------------------------------------------------------------------------- torchvision


def _torchvision(spec: str, name: str, pretrained: bool) -> LoadedModel:
    models = _import(spec, "torchvision.models")
    if name not in models.list_models():
        raise ModelSpecError(f"model {spec!r}: torchvision has no model {name!r}; torchvision.models.list_models() "
                             "lists them")
    builder = models.get_model_builder(name)
    try:
        default = models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        default = None
    cached = _hub_checkpoint(default.url) if pretrained and default is not None else None
    model = builder(weights=None)
    source = f"torchvision {name}, random weights"
    if cached is not None:
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
        source = f"torchvision {name}, pretrained weights from the local cache {cached}"
    preprocess, shape = None, None
    if default is not None:
        preprocess = default.transforms()  # builds the transform only; downloads nothing
        crop = getattr(preprocess, "crop_size", None)
        if crop:
            size = crop[0] if isinstance(crop, (list, tuple)) else crop
            shape = (1, 3, int(size), int(size))
        preprocess = _tensor_first(preprocess)
    return LoadedModel(model, shape, preprocess=preprocess, source=source, kind="torchvision")


def _tensor_first(transform):
    """torchvision's weights transforms take tensors: a PIL image is converted first."""
    from torchvision.transforms.functional import pil_to_tensor  # optional: torchvision models only
    return lambda image: transform(pil_to_tensor(image))


# ---------------------------------------------------------------------------------------------- transformers


@contextmanager
def _offline():
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _transformers(spec: str, name: str) -> LoadedModel:
    path = Path(name)
    folder = path.parent if path.is_file() and path.name.endswith(".json") else path
    if not (folder / "config.json").is_file():
        raise ModelSpecError(f"model {spec!r}: no config.json at {name}; give a local model folder (as saved by "
                             "save_pretrained) or its config.json (nothing is downloaded)")
    transformers = _import(spec, "transformers")
    with _offline():
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        has_weights = any((folder / f).is_file() for f in
                          ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))
        model = None
        for cls in _transformers_classes(transformers, config):
            try:
                if has_weights:
                    model = cls.from_pretrained(str(folder), local_files_only=True)
                else:
                    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
                break
            except (ValueError, KeyError):
                continue
        if model is None:
            raise ModelSpecError(f"model {spec!r}: no classification or language-model head for model_type "
                                 f"{config.model_type!r}; set 'architectures' in config.json to the class to build")
        preprocess = _image_processor(folder, transformers)
    if getattr(config, "use_cache", None):
        model.config.use_cache = False  # logits only, no key/value cache outputs
    shape, dtype, vocab = transformers_input(config)
    source = f"transformers {type(model).__name__} from {folder}, " + ("its weights" if has_weights else
                                                                        "random weights")
    return LoadedModel(Logits(model), shape, dtype, vocab, preprocess, source, kind="transformers")


def _transformers_classes(transformers, config) -> list:
    named = [getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)]
    autos = [getattr(transformers, a) for a in (
        "AutoModelForImageClassification", "AutoModelForAudioClassification", "AutoModelForSequenceClassification",
        "AutoModelForCausalLM")]
    return named + autos


def transformers_input(config) -> tuple:
    """(shape with batch 1, dtype, vocab size) of a transformers model's first input, read from its config:
    images from image_size/num_channels, spectrograms from num_mel_bins, waveforms for wav2vec2-like models,
    token ids otherwise."""
    image = getattr(config, "image_size", None)
    if image is not None and hasattr(config, "num_channels"):
        h, w = (image, image) if isinstance(image, int) else tuple(image)
        return (1, config.num_channels, h, w), torch.float32, None
    if hasattr(config, "max_source_positions") and hasattr(config, "num_mel_bins"):  # whisper: conv stride 2
        return (1, config.num_mel_bins, 2 * config.max_source_positions), torch.float32, None
    if hasattr(config, "max_length") and hasattr(config, "num_mel_bins"):  # audio spectrogram transformer
        return (1, config.max_length, config.num_mel_bins), torch.float32, None
    if hasattr(config, "conv_dim"):  # wav2vec2, hubert, wavlm: raw audio
        return (1, AUDIO_SAMPLES), torch.float32, None
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    length = min(TEXT_LENGTH, positions) if positions else TEXT_LENGTH
    return (1, length), torch.long, config.vocab_size


def _image_processor(folder: Path, transformers):
    if not (folder / "preprocessor_config.json").is_file():
        return None
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    return lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]


def default_preprocess(size: int, mean, std):
    """Resize the short side to ``size``, centre-crop ``size`` x ``size``, scale to [0, 1], normalise."""
    from torchvision import transforms  # optional: image preprocessing only
    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])
