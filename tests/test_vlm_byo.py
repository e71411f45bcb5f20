"""Bring your own VLM (pipeline/vlm/byo.py): your tower factory and weights, a projector, your decoder folder.

Fast: the parts load as given (steps = 0 leaves them as they are), and every bad part or rule is refused in one
line. End to end (e2e): the tiny random parts through every VLM stage; the bundle's runtime answers as the
pipeline did. Random weights answer nonsense: accuracy gates warn here, parity is what is checked."""
import json

import numpy as np
import pytest
import torch
from conftest import one_line
from tiny_byo_vlm import decoder_folder, tower, tower_weights

import pipeline
from pipeline.errors import PipelineError

COUNTS = "{caption=40, digit=40, two_image=40, few_shot=40, text=40}"
TEST_COUNTS = "{caption=0, digit=4, two_image=4, few_shot=4, text=4}"


def overrides(folder, weights, **more):
    base = {"model.pretrained": str(folder), "vlm.tower_factory": "tiny_byo_vlm:tower",
            "vlm.tower_weights": str(weights),
            "vlm.tower_epochs": 0, "vlm.text_steps": 0, "vlm.vision_macs": 1, "vlm.train_counts": COUNTS,
            "vlm.test_counts": TEST_COUNTS, "vlm.step1_steps": 0, "vlm.step2_steps": 0, "vlm.step3_steps": 0,
            "vlm.batch_size": 16, "decoder.max_new_tokens": 3, "baseline.gate": "off", **more}
    return [f"{k}={v}" if not isinstance(v, str) or v.startswith("{") else f"{k}={json.dumps(v)}"
            for k, v in base.items()]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    return decoder_folder(root / "llama"), tower_weights(root / "tower.safetensors"), root


def load(args):
    from pipeline.config import load_config
    return load_config("configs/vila-mnist.toml", args)


@pytest.mark.heavy
def test_steps_zero_keeps_the_loaded_parts_as_they_are(parts, tmp_path, one_thread):
    from safetensors.torch import load_file

    from pipeline.vlm import io
    folder, weights, _ = parts
    result = pipeline.run("configs/vila-mnist.toml", overrides(folder, weights), runs=tmp_path / "runs",
                          run_name="byo", until="baseline", log=lambda m: None)
    assert result.passed, result.message
    m = result.records[0].metrics
    assert m["loaded"] == {"decoder": str(folder), "tower": "tiny_byo_vlm:tower", "tower_weights": str(weights)}
    assert m["steps"] == [] and m["pretrain"] == {} and m["next_token_agreement"] == 100.0
    vlm, tok = io.load_vlm(result.run_dir / "01_baseline" / io.MODEL_DIR)
    assert type(vlm.vision).__name__ == "PatchTower" and vlm.projector.in_features == 24
    for k, v in load_file(str(weights)).items():   # the tower is the file's, untouched by the baseline
        assert torch.equal(vlm.vision.state_dict()[k], v)
    from pipeline.models.decoder import load_pretrained
    given, _ = load_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(given.state_dict().values(), vlm.decoder.state_dict().values(),
                                                  strict=True))
    assert vlm.image_token_id == tok.token_to_id("<image>")


def test_the_embedded_vlm_baseline_reads_only_what_it_declares(tmp_path, one_thread):
    """No part brought: the baseline builds the embedded parts (its declared keys hold for this path too)."""
    args = [f"vlm.train_counts={COUNTS}", f"vlm.test_counts={TEST_COUNTS}", "vlm.tower_epochs=0", "vlm.text_steps=0",
            "vlm.step1_steps=0", "vlm.step2_steps=0", "vlm.step3_steps=0", "baseline.gate=off",
            "model.kwargs={hidden_size = 64, num_hidden_layers = 1, intermediate_size = 128, num_attention_heads = 1, "
            "num_key_value_heads = 1, head_dim = 64}", "decoder.max_new_tokens=2"]
    result = pipeline.run("configs/vila-mnist.toml", args, runs=tmp_path / "runs", run_name="own", until="baseline",
                          log=lambda m: None)
    assert result.passed, result.message
    assert result.records[0].metrics["loaded"] == {} and result.records[0].metrics["params_by_part"]["decoder"] > 0


def test_the_tower_decides_the_images_and_their_normalisation(parts, one_thread):
    from export.vlm import tower_input
    from pipeline.vlm.io import VLMRunData
    folder, weights, _ = parts
    cfg = load(overrides(folder, weights))
    data = VLMRunData(cfg).data
    assert data.train_images.shape[1:] == (3, 28, 28)   # MNIST's grey repeated into the tower's RGB
    assert (data.train_images[:, 0] == data.train_images[:, 2]).all()
    assert tower_input(tower()) == {"channels": 3, "image_size": [28, 28], "mean": [0.5] * 3, "std": [0.25] * 3}


def refused(args, *words):
    with pytest.raises(PipelineError) as e:
        load(args)
    line = one_line(e.value)
    assert all(w in line for w in words), line


def test_what_would_be_silently_ignored_is_refused_at_load(parts):
    folder, weights, _ = parts
    refused(overrides(folder, weights, **{"vlm.tower_epochs": 1}), "vlm.tower_epochs", "set vlm.tower_epochs = 0")
    refused(overrides(folder, weights, **{"vlm.text_steps": 10}), "vlm.text_steps", "set vlm.text_steps = 0")
    refused(overrides(folder, weights, **{"vlm.vision_macs": 0.5}), "vlm.vision_macs", "VisionTower")
    refused(overrides(folder, weights, **{"vlm.tower_factory": "nodots"}), "vlm.tower_factory",
            "package.module:function")
    refused(overrides(folder, weights, **{"vlm.projector_weights": "/nonexistent/p.pt"}), "vlm.projector_weights",
            "not a file")
    refused(overrides(folder, weights, **{"model.weights": str(weights)}), "model.weights")
    load(overrides(folder, weights))   # the same config without them loads


def build(parts, **more):
    """byo.build on a loaded config: where every part is checked."""
    from pipeline.vlm import byo
    folder, weights, _ = parts
    return byo.build(load(overrides(folder, weights, **more)))


@pytest.mark.parametrize("factory, words", [
    ("no_such_module_xyz:tower", ("vlm.tower_factory", "cannot import")),
    ("tiny_byo_vlm:nothing", ("vlm.tower_factory", "no callable 'nothing'")),
    ("tiny_byo_vlm:raises", ("vlm.tower_factory", "raised", "no GPU here")),
    ("tiny_byo_vlm:not_a_module", ("returned a int", "nn.Module")),
    ("tiny_byo_vlm:no_encode", ("has no encode, num_tokens",)),
    ("tiny_byo_vlm:flat", ("encode gave [1, 24]", "expected [1, num_tokens 16, dim]")),
])
def test_a_bad_tower_factory_is_one_line(parts, factory, words, one_thread):
    with pytest.raises(PipelineError) as e:
        build(parts, **{"vlm.tower_factory": factory, "vlm.tower_weights": ""})
    line = one_line(e.value)
    assert all(w in line for w in words), line


def test_weights_that_do_not_fit_are_one_line(parts, one_thread):
    _, _, root = parts
    other = tower_weights(root / "wide.pt", dim=32)      # a torch state_dict of another width
    with pytest.raises(PipelineError) as e:
        build(parts, **{"vlm.tower_weights": str(other)})
    line = one_line(e.value)
    assert "vlm.tower_weights" in line and "embed.bias is [32], the PatchTower has [24]" in line
    state = tower().state_dict()
    state.pop("pos")
    torch.save(state, root / "missing.pt")
    with pytest.raises(PipelineError) as e:
        build(parts, **{"vlm.tower_weights": str(root / "missing.pt")})
    assert "1 missing keys, first 'pos'" in one_line(e.value)
    torch.save({**tower().state_dict(), "extra": torch.zeros(1)}, root / "extra.pt")
    with pytest.raises(PipelineError) as e:
        build(parts, **{"vlm.tower_weights": str(root / "extra.pt")})
    assert "1 unexpected keys, first 'extra'" in one_line(e.value)
    torch.save(torch.nn.Linear(24, 64).state_dict(), root / "proj.pt")   # the decoder's hidden size is 128
    with pytest.raises(PipelineError) as e:
        build(parts, **{"vlm.projector_weights": str(root / "proj.pt")})
    assert "vlm.projector_weights" in one_line(e.value) and "hidden size 128" in one_line(e.value)
    torch.save(torch.nn.Linear(24, 128).state_dict(), root / "proj_ok.pt")
    vlm, _, _ = build(parts, **{"vlm.projector_weights": str(root / "proj_ok.pt")})
    assert torch.equal(vlm.projector.weight, torch.load(root / "proj_ok.pt")["weight"])


def test_weights_are_read_as_model_weights_are(parts, one_thread):
    """The one reader (modelio.read_state_dict): NaN weights refused as a checkpoint's are, and a torch file gives
    the same tensors as the safetensors file it was saved from."""
    from safetensors.torch import load_file
    _, weights, root = parts
    state = load_file(str(weights))
    torch.save(state, root / "tower.pt")
    for path in (weights, root / "tower.pt"):
        vlm, _, _ = build(parts, **{"vlm.tower_weights": str(path)})
        assert all(torch.equal(v, vlm.vision.state_dict()[k]) for k, v in state.items())
    state = {k: v.clone() for k, v in state.items()}
    next(v for v in state.values() if v.is_floating_point())[0] = float("nan")
    torch.save(state, root / "nan.pt")
    with pytest.raises(PipelineError) as e:
        build(parts, **{"vlm.tower_weights": str(root / "nan.pt")})
    assert "vlm.tower_weights" in one_line(e.value) and "1 tensors hold NaN or inf values" in one_line(e.value)


@pytest.mark.parametrize("image, words", [("none", "has no <image> token"),
                                          ("word", "does not encode <image> as its one token")])
def test_a_decoder_folder_without_the_image_token_is_one_line(parts, image, words, one_thread):
    _, _, root = parts
    plain = decoder_folder(root / image, image=image)
    with pytest.raises(PipelineError) as e:
        build(parts, **{"model.pretrained": str(plain)})
    assert f"{plain / 'tokenizer.json'} {words}" in one_line(e.value)


def test_your_decoder_with_the_embedded_tower_and_your_tower_with_the_embedded_decoder(parts, one_thread):
    from tiny_byo_vlm import task_texts

    from pipeline.models.tower import VisionTower
    from pipeline.vlmdata import IMAGE_ID, build_vlm_tokenizer
    vlm, _, recipe = build(parts, **{"vlm.tower_factory": "", "vlm.tower_weights": "", "vlm.tower_epochs": 1})
    assert isinstance(vlm.vision, VisionTower) and "tower_factory" not in recipe
    assert vlm.projector.in_features == 64 and vlm.projector.out_features == 128   # the folder's hidden size
    tok = build_vlm_tokenizer(task_texts())
    from pipeline.vlm import byo
    folder, weights, _ = parts
    cfg = load(overrides(folder, weights, **{"model.pretrained": "", "model.kwargs": "{hidden_size = 64, "
                                             "num_hidden_layers = 1, intermediate_size = 128, num_attention_heads = 1, "
                                             "num_key_value_heads = 1, head_dim = 64}", "vlm.text_steps": 5}))
    vlm, _, recipe = byo.build(cfg, tok, IMAGE_ID)
    assert type(vlm.vision).__name__ == "PatchTower" and recipe["tower_factory"] == "tiny_byo_vlm:tower"
    assert vlm.projector.out_features == 64 and vlm.image_token_id == IMAGE_ID


def test_images_are_read_at_the_towers_size_or_refused(parts, tmp_path, one_thread):
    from PIL import Image

    from pipeline.vlm.io import VLMRunData
    folder, weights, _ = parts
    big = overrides(folder, weights, **{"vlm.tower": "{image_size = 35}", "vlm.tower_weights": ""})
    with pytest.raises(PipelineError) as e:   # MNIST digits are 28x28: not resampled
        VLMRunData(load(big)).data
    assert "takes [35, 35] images; vila-mnist's are [28, 28]" in one_line(e.value)
    for i in range(4):
        Image.fromarray(np.full((10, 12), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    lines = [{"images": [f"{i}.png"], "prompt": "<image> what digit is this ?", "answer": "one"} for i in range(4)]
    for name, rows in (("train", lines[:3]), ("test", lines[3:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load([*big, "data.kind=vlm-jsonl", f"data.root={json.dumps(str(tmp_path))}", "vlm.test_counts={}"])
    data = VLMRunData(cfg).data
    assert data.train_images.shape == (3, 3, 35, 35) and data.test_images.shape == (1, 3, 35, 35)


@pytest.mark.e2e
def test_your_parts_go_through_every_vlm_stage(parts, tmp_path):
    folder, weights, _ = parts
    args = overrides(folder, weights, **{
        "vlm.step1_steps": 4, "vlm.step3_steps": 4, "vlm.distil_steps": 3, "finetune.batch_size": 16,
        "prune.ratio": 0.5, "decoder.int4_group": 32, "decoder.calib_prompts": 4, "profile.processes": 1,
        "profile.rounds": 3, "profile.block_ms": 5, "baseline.gate": "warn",
        **{f"{s}.gate": "warn" for s in ("prune", "finetune", "export", "quantize")}})
    result = pipeline.run("configs/vila-mnist.toml", args, runs=tmp_path / "runs", run_name="byo", log=lambda m: None)
    assert result.passed, result.message
    rec = {r.name: r for r in result.records}
    assert [s["name"] for s in rec["baseline"].metrics["steps"]] == ["1-projector", "3-instructions"]
    p = rec["prune"].metrics["pruned"]
    assert p["vision_before"] is None and p["vision_macs_after"] == p["vision_macs_before"]   # your tower: whole
    assert p["decoder_after"]["intermediate"] < p["decoder_before"]["intermediate"] and p["projector_out"] == 128
    assert rec["export_onnx"].metrics["parity"] >= 99.0
    assert rec["package"].metrics["self_test"]["exact_match"] == 100.0
    facts = json.loads((result.bundle / "vlm.json").read_text())
    assert (facts["channels"], facts["image_size"], facts["mean"], facts["std"]) == (3, [28, 28], [0.5] * 3,
                                                                                     [0.25] * 3)
