"""Model registry: built-in names, or ``package.module:function`` for a user's own model.

``build_model`` calls a factory the way its signature asks: the classes count always, under
``num_classes`` or the name given as ``kwargs["classes_arg"]`` ('' for a factory without one); the
input channels (as ``in_channels`` or ``in_chans``) and the image size (as ``image_size``,
``input_size`` or ``img_size``) only when the factory names such a parameter (a ``**kwargs``
catch-all gets neither: it may forward them to code that rejects them). Whatever a factory does
wrong (raises, fails to import, returns something that is not an ``nn.Module``) is one line naming
the factory. ``probe_model`` runs the built model once before any training. Nothing here imports
torch at import time: importing the registry must stay light.
"""
from __future__ import annotations

import importlib
import inspect

from edgerun.errors import brief
from pipeline.errors import PipelineError

# name -> "module:function", imported on demand.
BUILTIN = {
    "simple_cnn": "pipeline.models.cnn:SimpleCNN",
    "resnet_small": "pipeline.models.zoo:ResNetSmall",
    "mobilenetv2_small": "pipeline.models.zoo:MobileNetV2Small",
    "vit_small": "pipeline.models.zoo:ViTSmall",
    "vit_tower": "pipeline.models.tower:VisionTower",
    "vit_mha": "pipeline.models.coverage:ViTMHA",
    "convnext_small": "pipeline.models.coverage:ConvNeXtSmall",
    "mobilenetv3_small": "pipeline.models.coverage:MobileNetV3Small",
    "regnet_small": "pipeline.models.coverage:RegNetSmall",
    "densenet_small": "pipeline.models.coverage:DenseNetSmall",
    "yolo_c2f_small": "pipeline.models.coverage:YoloC2fSmall",
}
CHANNEL_ARGS = ("in_channels", "in_chans")
SIZE_ARGS = ("image_size", "input_size", "img_size")


def resolve_factory(spec: str):
    """A callable from a built-in name or ``package.module:function``."""
    target = BUILTIN.get(spec, spec)
    if not isinstance(spec, str) or ":" not in target:
        raise PipelineError(f"model: unknown model {spec!r}; built-in: {', '.join(sorted(BUILTIN))}, "
                            "or give model.factory='package.module:function'")
    mod_name, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except (Exception, SystemExit) as e:  # a user's module can fail at import in any way
        raise PipelineError(f"model.factory: cannot import module {mod_name!r} for {spec} ({brief(e)})") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise PipelineError(f"model.factory: {mod_name!r} has no callable {attr!r}")
    return fn


def _parameters(fn) -> tuple[set[str], bool] | None:
    """(named keyword-capable parameters, has **kwargs), or None when the signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def _size_value(image_size):
    """A square (h, h) is passed as h: the usual factory takes one int."""
    if isinstance(image_size, (tuple, list)):
        size = tuple(int(v) for v in image_size)
        return size[0] if len(size) == 2 and size[0] == size[1] else size
    return image_size


def factory_arguments(fn, spec: str, *, num_classes, in_channels=None, image_size=None,
                      kwargs: dict | None = None) -> dict:
    """The keyword arguments ``build_model`` passes to ``fn`` (see the module docstring)."""
    kwargs = dict(kwargs or {})
    classes_arg = kwargs.pop("classes_arg", "num_classes")
    if not isinstance(classes_arg, str):
        raise PipelineError(f"model.kwargs.classes_arg: expected the name of {spec}'s classes argument "
                            f"(a string, '' for none), got {classes_arg!r}")
    sig = _parameters(fn)
    named, catch_all = sig if sig is not None else (set(), True)
    args = {}
    if classes_arg:
        if sig is not None and classes_arg not in named and not catch_all:
            raise PipelineError(f"model.factory: {spec} has no parameter {classes_arg!r} for the number of classes "
                                f"(its parameters: {', '.join(sorted(named)) or 'none'}); set model.kwargs.classes_arg "
                                "to the name it uses, or to '' if it takes none")
        args[classes_arg] = num_classes
    for names, value in ((CHANNEL_ARGS, in_channels), (SIZE_ARGS, _size_value(image_size))):
        accepted = [n for n in names if n in named]
        if value is not None and accepted and accepted[0] not in kwargs:
            args[accepted[0]] = value
    if sig is not None and not catch_all:
        unknown = sorted(k for k in kwargs if k not in named)
        if unknown:
            raise PipelineError(f"model.kwargs: {spec} has no parameter {unknown[0]!r} "
                                f"(its parameters: {', '.join(sorted(named)) or 'none'})")
    return {**args, **kwargs}  # the user's own kwargs win over what is derived from the data


def build_model(spec: str, *, num_classes: int, in_channels: int | None = None, image_size=None,
                kwargs: dict | None = None, **legacy):
    """Build ``spec`` (a built-in name or ``package.module:function``).

    ``image_size`` is an int or (H, W). ``kwargs`` are the user's model.kwargs (``classes_arg`` renames
    the classes argument). ``legacy``: the older call ``build_model(spec, **kwargs)``, whose extra keys
    are model kwargs.
    """
    import torch.nn as nn

    fn = resolve_factory(spec)
    args = factory_arguments(fn, spec, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                             kwargs={**legacy, **(kwargs or {})})
    try:
        model = fn(**args)
    except (Exception, SystemExit) as e:  # anything a user's factory raises is the user's to fix
        raise PipelineError(f"model.factory: {spec}({', '.join(f'{k}={v!r}' for k, v in args.items())}) "
                            f"raised {brief(e)}") from None
    if not isinstance(model, nn.Module):
        raise PipelineError(f"model.factory: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# ------------------------------------------------------------------------------------------- probing
def forward_named(model, x, what: str):
    """``model(x)``; a failure is one line naming the innermost module that was running when it failed."""
    names = {m: n for n, m in model.named_modules()}
    running: list = []
    hooks = []

    def enter(mod, _inp):
        running.append(mod)

    def leave(mod, _inp, _out):
        running.pop()

    for m in names:
        hooks.append(m.register_forward_pre_hook(enter))
        hooks.append(m.register_forward_hook(leave))
    try:
        return model(x)
    except Exception as e:  # noqa: BLE001 - any error inside a user's forward is reported, not raised raw
        mod = running[-1] if running else model
        where = f"in {names.get(mod) or 'the top module'} ({type(mod).__name__})"
        raise PipelineError(f"{what} {where}: {brief(e)}") from None
    finally:
        for h in hooks:
            h.remove()


def probe_model(model, channels: int, size, num_classes: int, batch: int = 2, *, name: str | None = None):
    """Run one forward on zeros [batch, channels, H, W]; refuse (one line) a model that fails or whose
    logits are not [batch, num_classes]. Returns the output. Training mode is restored afterwards."""
    import torch

    label = name or type(model).__name__
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.zeros(batch, channels, h, w)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = forward_named(model, x, f"model: {label} fails on zeros of shape {list(x.shape)}")
    finally:
        model.train(was_training)
    logits = out[-1] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(logits, torch.Tensor):
        raise PipelineError(f"model: {label} returned {type(logits).__name__} for an input of shape {list(x.shape)}; "
                            "expected a logits tensor (or a tuple ending with one)")
    if tuple(logits.shape) != (batch, num_classes):
        raise PipelineError(f"model: {label} gives logits of shape {list(logits.shape)} for an input of shape "
                            f"{list(x.shape)}; expected [{batch}, {num_classes}] (model.num_classes = {num_classes})")
    if not bool(torch.isfinite(logits).all()):   # training on it would only end at a chance-level gate
        raise PipelineError(f"model: {label} gives non-finite logits (NaN or inf) for zeros of shape "
                            f"{list(x.shape)}: check its initialisation or model.weights")
    return out
