"""Bring your own VLM, LLaVA's layout: your vision tower, a projector, and your decoder folder.

    [model]
    pretrained = "my/llama"                   # a Hugging Face decoder folder whose tokenizer holds <image>
    [vlm]
    tower_factory = "mypkg.vision:tower"      # package.module:function returning the tower (the contract below)
    tower = { width = 64 }                    # its keyword arguments
    tower_weights = "ckpt/tower.safetensors"  # optional: safetensors or a torch state_dict, loaded strictly
    projector_weights = "ckpt/proj.pt"        # optional: else random, trained by VILA's step 1

The tower contract (what the VLM, the exporter and the runtime read of it):
  * ``encode(pixels)``: normalised pixels [n, in_channels, H, W] -> tokens [n, num_tokens, dim];
  * ``num_tokens`` (int), ``in_channels`` (1 or 3), ``image_size`` (int, or [H, W]);
  * ``mean`` and ``std``: the pixel normalisation (one value, or one per channel, on pixels scaled to [0, 1]).
``dim`` is read from ``encode``'s output on a zero image; the projector maps it to the decoder's hidden size.
Every way a part can be wrong is one PipelineError line naming the key: a factory that does not import, is not
callable or raises, a tower without part of the contract or whose ``encode`` gives another shape, weights with
a missing, unexpected or reshaped key, a tokenizer without ``<image>``.

What is not done with your parts, and refused rather than skipped (config_check calls ``check_config``): the
stand-ins' pre-training (``vlm.tower_epochs`` with your tower or its weights, ``vlm.text_steps`` with your
decoder) and pruning a tower that is not pipeline.models.tower.VisionTower (``vlm.vision_macs`` < 1: the tower
pruner knows that tower's attention and widths; your decoder is pruned as the embedded one is).
"""
from __future__ import annotations

import functools
import json
import math

from pipeline.errors import PipelineError

IMAGE = "<image>"
CONTRACT = ("encode", "num_tokens", "in_channels", "image_size", "mean", "std")


def is_byo_tower(cfg) -> bool:
    return bool(cfg.vlm.tower_factory or cfg.vlm.tower_weights)


def check_config(cfg, bad) -> None:
    """The BYO rules a config must meet before anything runs (no user code imported here)."""
    v = cfg.vlm
    if cfg.model.weights:
        bad("model.weights: a VLM's decoder comes from model.pretrained (a Hugging Face folder), its tower's "
            "weights from vlm.tower_weights")
    if v.tower_factory and (v.tower_factory.count(":") != 1 or not all(v.tower_factory.split(":"))):
        bad(f"vlm.tower_factory = {v.tower_factory!r}: expected package.module:function")
    if is_byo_tower(cfg) and v.tower_epochs > 0:
        bad(f"vlm.tower_epochs = {v.tower_epochs}: your tower (vlm.tower_factory / vlm.tower_weights) is not "
            "pre-trained on MNIST's classes here; set vlm.tower_epochs = 0")
    if cfg.model.pretrained and v.text_steps > 0:
        bad(f"vlm.text_steps = {v.text_steps}: your decoder (model.pretrained) is not pre-trained on the text-only "
            "records here; set vlm.text_steps = 0")
    if v.tower_factory and v.vision_macs < 1:
        bad(f"vlm.vision_macs = {v.vision_macs}: the tower pruner knows only pipeline.models.tower.VisionTower, "
            f"not {v.tower_factory}; set vlm.vision_macs = 1 (the decoder is still pruned by prune.ratio)")
    for key in ("tower_weights", "projector_weights"):
        value = getattr(v, key)
        if value:
            from pipeline.data import resolve_root
            if not resolve_root(value).is_file():
                bad(f"vlm.{key}: {resolve_root(value)} is not a file")


# ---------------------------------------------------------------- the tower

def _call_factory(spec: str, kwargs: dict):
    from pipeline.models import resolve_factory
    try:
        fn = resolve_factory(spec)
    except PipelineError as e:
        raise PipelineError(str(e).replace("model.factory", "vlm.tower_factory")) from None
    try:
        return fn(**kwargs)
    except Exception as e:   # the user's code can fail in any way; one line naming it
        from edgerun.errors import brief
        raise PipelineError(f"vlm.tower_factory: {spec}(**vlm.tower) raised {brief(e)}") from None


def tower_facts(tower, where: str) -> dict:
    """The contract checked on a built tower: {channels, image_size [H, W], mean, std, num_tokens, dim}."""
    import torch
    import torch.nn as nn
    if not isinstance(tower, nn.Module):
        raise PipelineError(f"{where}: returned a {type(tower).__name__}, expected a torch.nn.Module")
    missing = [a for a in CONTRACT if not hasattr(tower, a)]
    if missing:
        raise PipelineError(f"{where}: the tower {type(tower).__name__} has no {', '.join(missing)}; a tower "
                            f"has {', '.join(CONTRACT)} (pipeline/vlm/byo.py)")
    if not callable(tower.encode):
        raise PipelineError(f"{where}: the tower's encode is not callable")
    from export.vlm import tower_input  # the one reading of a tower's input facts (the exporter's)
    try:
        facts, tokens = tower_input(tower), int(tower.num_tokens)
        channels, size, mean, std = facts["channels"], facts["image_size"], facts["mean"], facts["std"]
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{where}: in_channels, num_tokens, image_size, mean and std must be numbers ({e})") \
            from None
    if channels not in (1, 3) or len(size) != 2 or min(size) < 1 or tokens < 1:
        raise PipelineError(f"{where}: in_channels {channels} (1 or 3), image_size {size}, num_tokens {tokens}")
    if len(mean) not in (1, channels) or len(std) != len(mean) or min(std) <= 0 \
            or not all(math.isfinite(x) for x in mean + std):
        raise PipelineError(f"{where}: mean {mean} / std {std}: one value or one per channel, std > 0")
    was = tower.training
    tower.eval()
    try:
        with torch.no_grad():
            out = tower.encode(torch.zeros(1, channels, *size))
    except Exception as e:
        from edgerun.errors import brief
        raise PipelineError(f"{where}: encode on a zero image [1, {channels}, {size[0]}, {size[1]}] raised "
                            f"{brief(e)}") from None
    finally:
        tower.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != (1, tokens):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PipelineError(f"{where}: encode gave {shape} for one image, expected [1, num_tokens {tokens}, dim]")
    return {"channels": channels, "image_size": size, "mean": mean, "std": std, "num_tokens": tokens,
            "dim": int(out.shape[-1])}


def build_tower(factory: str, kwargs: dict):
    """(tower, facts) from ``factory(**kwargs)``, its contract checked."""
    tower = _call_factory(factory, dict(kwargs))
    return tower, tower_facts(tower, f"vlm.tower_factory {factory}")


@functools.lru_cache(maxsize=4)
def _input_of(factory: str, kwargs_json: str) -> tuple:
    facts = build_tower(factory, json.loads(kwargs_json))[1]
    return tuple(facts["image_size"]), facts["channels"]


def tower_input(cfg) -> tuple[tuple[int, int], int] | None:
    """((H, W), channels) of your tower (how the run's images are read), None for the embedded tower."""
    v = cfg.vlm
    return _input_of(v.tower_factory, json.dumps(v.tower, sort_keys=True)) if v.tower_factory else None


def load_strict(module, path: str, key: str) -> None:
    """``path``'s weights (modelio.read_state_dict) into ``module``; a missing, unexpected or reshaped key is one
    line naming it."""
    from pipeline.data import resolve_root
    from pipeline.modelio import fit_report, read_state_dict
    path = resolve_root(path)
    state, own = read_state_dict(path, key), module.state_dict()
    report = fit_report(own, state)
    for kind in ("missing", "unexpected"):
        if report[kind]:
            raise PipelineError(f"{key}: {path} does not fit {type(module).__name__}: {len(report[kind])} {kind} "
                                f"keys, first {report[kind][0]!r}")
    if report["reshaped"]:
        k = report["reshaped"][0]
        raise PipelineError(f"{key}: {path}: {k} is {list(state[k].shape)}, the {type(module).__name__} has "
                            f"{list(own[k].shape)}")
    module.load_state_dict(state)


# ---------------------------------------------------------------- the decoder

def load_decoder(folder: str):
    """(decoder, tokenizer, image token id) of your Hugging Face folder; its tokenizer must hold <image>."""
    from pipeline.data import resolve_root
    from pipeline.llm import lm
    d = resolve_root(folder)
    decoder, tok = lm.load_model(d)
    image_id = tok.token_to_id(IMAGE)
    if image_id is None:
        raise PipelineError(f"model.pretrained: {d / 'tokenizer.json'} has no {IMAGE} token; a VLM's decoder "
                            f"folder needs the image placeholder (add {IMAGE} as a special token, resize the "
                            "embeddings and save the folder again)")
    ids = tok.encode(f"a {IMAGE} b", add_special_tokens=False).ids
    if ids.count(image_id) != 1:
        raise PipelineError(f"model.pretrained: {d / 'tokenizer.json'} does not encode {IMAGE} as its one token "
                            f"{image_id} inside a prompt (make {IMAGE} a special token)")
    return decoder, tok, int(image_id)


# ---------------------------------------------------------------- the VLM

def build(cfg, tok=None, image_id: int | None = None):
    """(vlm, tok, recipe) with your parts where the config names them, the embedded ones elsewhere: the decoder
    from model.pretrained (else built from model.kwargs for ``tok``), the tower from vlm.tower_factory (else
    VisionTower(**vlm.tower)), the projector random or from vlm.projector_weights."""
    from pipeline.models.tower import VisionTower
    from pipeline.models.vlm import TOWER_DEFAULT, VLM, build_projector
    v = cfg.vlm
    if cfg.model.pretrained:
        decoder, tok, image_id = load_decoder(cfg.model.pretrained)
    else:
        from pipeline.models.decoder import build_decoder
        from pipeline.textdata import special_ids
        decoder = build_decoder(tok.get_vocab_size(), special=special_ids(tok), seed=cfg.run.seed,
                                **cfg.model.kwargs)
    import torch
    torch.manual_seed(cfg.run.seed)
    if v.tower_factory:
        vision, facts = build_tower(v.tower_factory, v.tower)
        recipe = {"tower": dict(v.tower), "tower_factory": v.tower_factory, "projector": v.projector}
    else:
        recipe = {"tower": {**TOWER_DEFAULT, **v.tower}, "projector": v.projector}
        vision = VisionTower(**recipe["tower"])
        facts = {"dim": recipe["tower"]["dim"]}
    if v.tower_weights:
        load_strict(vision, v.tower_weights, "vlm.tower_weights")
    hidden = decoder.config.hidden_size
    projector = build_projector(v.projector, facts["dim"], hidden)
    if v.projector_weights:
        try:
            load_strict(projector, v.projector_weights, "vlm.projector_weights")
        except PipelineError as e:
            raise PipelineError(f"{e} (a {v.projector} projector from the tower's dim {facts['dim']} to the "
                                f"decoder's hidden size {hidden})") from None
    return VLM(vision, projector, decoder, image_id), tok, recipe
