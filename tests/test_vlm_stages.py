"""What the VLM's stages rely on, without running them: the VLM folder every stage hands on (a pruned tower's
widths and heads come back exactly), the per-question-type gate, and the [vlm] config's checks."""
import pytest
import torch
from conftest import one_line
from tiny_vlm import IMAGE_ID, vlm_tokenizer
from tiny_vlm import model as tiny_vlm

from pipeline import prune_decoder as pd
from pipeline.config import Config, DataCfg, ModelCfg, TaskCfg, VLMCfg
from pipeline.config_check import check
from pipeline.errors import PipelineError
from pipeline.prune_vlm import VLMBatch, prune_vlm
from pipeline.tasks import named
from pipeline.vlm import io, is_vlm

RECIPE = {"tower": {"image_size": 28, "patch_size": 7, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0},
          "projector": "linear"}


def tokenizer():
    return vlm_tokenizer()


def batch(images_per_row: int, rows: int = 2, seed: int = 0) -> VLMBatch:
    """<s>, 16 image tokens per image, 8 words; the last 3 are the answer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, IMAGE_ID, (rows, 1 + 16 * images_per_row + 8), generator=g)
    ids[:, 0] = 1
    ids[:, 1:1 + 16 * images_per_row] = IMAGE_ID
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    return VLMBatch(ids, labels, torch.randn(rows * images_per_row, 1, 28, 28, generator=g))


def calibration():
    return [batch(1, seed=1), batch(2, seed=2)]


@pytest.mark.parametrize("pruned", [False, True])
def test_a_vlm_folder_round_trips_a_pruned_tower(pruned, tmp_path, one_thread):
    vlm = tiny_vlm()
    if pruned:
        widths = pd.legal_widths(vlm.decoder, "ort-cpu", int4_group=32)[-1]
        vlm, _ = prune_vlm(vlm, vision_macs=0.5, decoder_widths=widths, batches=calibration(), target="ort-cpu",
                           int4_group=32)
    folder = io.save_vlm(vlm, tokenizer(), tmp_path / "model", RECIPE)
    back, _ = io.load_vlm(folder)
    assert back.vision.patch_embed.weight.shape == vlm.vision.patch_embed.weight.shape
    b = batch(2)
    with torch.no_grad():
        want, got = vlm(b.input_ids, b.pixels).logits, back(b.input_ids, b.pixels).logits
    assert torch.equal(want, got)
    assert [blk.attn.num_heads for blk in back.vision.blocks] == [blk.attn.num_heads for blk in vlm.vision.blocks]
    assert io.read_recipe(folder) == RECIPE
    assert (back.vision.patch_embed.out_channels < 32) == pruned   # the pruned widths, not the recipe's


def test_a_vlm_folder_that_does_not_fit_its_recipe_is_refused(tmp_path, one_thread):
    folder = io.save_vlm(tiny_vlm(), tokenizer(), tmp_path / "model", RECIPE)
    import json
    meta = json.loads((folder / "vlm.json").read_text())
    meta["tower"]["depth"] = 2      # a block the weights do not have
    (folder / "vlm.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError) as e:
        io.load_vlm(folder)
    assert "does not fit the recipe" in one_line(e.value)


def test_every_question_type_is_gated_not_only_the_mean():
    task = named("vlm")
    ref = {"per_kind": {"digit": 98.0, "few_shot": 92.0}}
    ok = task.per_kind_checks({"per_kind": {"digit": 99.0, "few_shot": 91.5}}, ref, 1.0)
    assert all(c.passed for c in ok)
    bad = task.per_kind_checks({"per_kind": {"digit": 100.0, "few_shot": 90.0}}, ref, 1.0)  # mean holds, one drops
    assert [c.passed for c in bad] == [True, False] and "few_shot" in bad[1].metric
    with pytest.raises(PipelineError):   # a type left out is not a pass
        task.per_kind_checks({"per_kind": {"digit": 99.0}}, ref, 1.0)


def vlm_config(**vlm) -> Config:
    return Config(task=TaskCfg("vlm"), data=DataCfg(kind="vila-mnist", root="data/mnist"),
                  model=ModelCfg(name="vlm"), vlm=VLMCfg(**vlm))


def test_vlm_configs_are_checked_in_one_line():
    check(vlm_config(), "cfg")
    assert is_vlm(vlm_config()) and is_vlm(Config(data=DataCfg(kind="vila-mnist", root="data/mnist")))
    for bad, words in ((dict(vision_macs=0.0), "vision_macs"), (dict(step2_mix={"jokes": 1.0}), "step2_mix"),
                       (dict(step1_frozen=("vision", "projector", "decoder")), "step1_frozen"),
                       (dict(test_counts={"digit": -1}), "test_counts"), (dict(min_cosine=2.0), "min_cosine")):
        with pytest.raises(PipelineError) as e:
            check(vlm_config(**bad), "cfg")
        assert words in one_line(e.value)
    jsonl = Config(task=TaskCfg("vlm"), data=DataCfg(kind="vlm-jsonl", root="data/mnist"), model=ModelCfg(name="vlm"))
    with pytest.raises(PipelineError) as e:   # no classes to pre-train the tower on: refused, not skipped
        check(jsonl, "cfg")
    assert "vlm.tower_epochs" in one_line(e.value)
    with pytest.raises(PipelineError) as e:   # VLM data with a classifier task
        check(Config(task=TaskCfg("classify"), data=DataCfg(kind="vila-mnist", root="data/mnist")), "cfg")
    assert "image-text records" in one_line(e.value)


def test_data_keys_the_tower_decides_are_reported_ignored(tmp_path):
    from pipeline.api import load
    mnist = ["vlm.tower_epochs=0"]
    jsonl = ["data.kind=vlm-jsonl", "vlm.tower_epochs=0"]
    for extra, ignored in ((mnist + ["data.size=[32, 32]", "data.mean=[0.5]"], {"data.size", "data.mean"}),
                           (jsonl + ["data.size=[32, 32]", "data.channels=1"], set()),   # read for the embedded tower
                           (jsonl + ["data.std=[0.2]"], {"data.std"})):
        _, warnings = load("configs/vila-mnist.toml", extra)
        assert {w.split()[1] for w in warnings} == ignored, warnings
    with_tower = Config(task=TaskCfg("vlm"), data=DataCfg(kind="vlm-jsonl", root="data/mnist"),
                        vlm=VLMCfg(tower_factory="tiny_byo_vlm:tower", tower_epochs=0, vision_macs=1.0))
    from pipeline.vlm import data_keys_unread
    assert {"data.size", "data.channels", "data.mean", "data.std"} == data_keys_unread(with_tower)


def test_variant_labels_name_only_the_parts_pruned():
    from pipeline.vlm.io import pruned_parts
    dec = {"intermediate": 768}
    assert pruned_parts({"vision_macs_kept": 0.74, "decoder_before": dec, "decoder_after": {"intermediate": 512}}) \
        == "tower + decoder pruned"
    assert pruned_parts({"vision_macs_kept": 1.0, "decoder_before": dec, "decoder_after": {"intermediate": 512}}) \
        == "decoder pruned, tower whole"
    assert pruned_parts({"vision_macs_kept": 0.5, "decoder_before": dec, "decoder_after": dec}) \
        == "tower pruned, decoder whole"
    assert pruned_parts({"vision_macs_kept": 1.0, "decoder_before": dec, "decoder_after": dec}) == "nothing pruned"
