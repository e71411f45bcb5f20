"""Model registry: built-in names, or ``package.module:function`` for a user's own model."""
from __future__ import annotations

import importlib

from pipeline.errors import PipelineError

# name -> "module:function", imported on demand so `pipeline infer` never pulls in torch.
BUILTIN = {
    "simple_cnn": "pipeline.models.cnn:SimpleCNN",
    "resnet_small": "pipeline.models.zoo:ResNetSmall",
    "mobilenetv2_small": "pipeline.models.zoo:MobileNetV2Small",
    "vit_small": "pipeline.models.zoo:ViTSmall",
    "vit_tower": "pipeline.models.tower:VisionTower",
}


def resolve_factory(spec: str):
    """A callable from a built-in name or ``package.module:function``."""
    target = BUILTIN.get(spec, spec)
    if ":" not in target:
        raise PipelineError(f"model: unknown model {spec!r}; built-in: {', '.join(sorted(BUILTIN))}, "
                            "or give model.factory='package.module:function'")
    mod_name, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise PipelineError(f"model.factory: cannot import module {mod_name!r} ({e})") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise PipelineError(f"model.factory: {mod_name!r} has no callable {attr!r}")
    return fn


def build_model(spec: str, **kwargs):
    fn = resolve_factory(spec)
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise PipelineError(f"model: {spec} rejected its arguments {sorted(kwargs)}: {e}") from None
