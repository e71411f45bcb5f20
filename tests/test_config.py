import dataclasses

import pytest

from pipeline.config import Config, load_config, parse_override
from pipeline.errors import PipelineError


def write(tmp_path, text, name="t.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["cpu", "desktop-gpu", "jetson-orin"])
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/{name}.toml")
    assert cfg.run.name == name
    assert cfg.run.target == name


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "[prune]\nratio = 0.25\n"),
                      ["prune.importance=lamp", "finetune.epochs=2", "data.mean=[0.5]", "run.name=x"])
    assert cfg.prune.ratio == 0.25 and cfg.prune.importance == "lamp"
    assert cfg.finetune.epochs == 2.0 and isinstance(cfg.finetune.epochs, float)
    assert cfg.data.mean == (0.5,) and cfg.run.name == "x"
    assert cfg.baseline == Config().baseline
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.prune.ratio = 0.1


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(PipelineError, match=r"unknown key 'prune.ration'.*did you mean 'ratio'"):
        load_config(write(tmp_path, "[prune]\nration = 0.5\n"))
    with pytest.raises(PipelineError, match=r"unknown key 'pruen'.*did you mean 'prune'"):
        load_config(write(tmp_path, "[pruen]\nratio = 0.5\n"))


def test_wrong_type_is_one_line(tmp_path):
    with pytest.raises(PipelineError) as e:
        load_config(write(tmp_path, '[prune]\nratio = "half"\n'))
    assert "prune.ratio must be a number" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="baseline.epochs must be an integer"):
        load_config(write(tmp_path, "[baseline]\nepochs = 1.5\n"))
    with pytest.raises(PipelineError, match="export.fp16 must be true/false"):
        load_config(write(tmp_path, "[export]\nfp16 = 1\n"))


def test_choices_and_cross_field_rules(tmp_path):
    with pytest.raises(PipelineError, match="run.target = 'jetson' is not one of"):
        load_config(write(tmp_path, '[run]\ntarget = "jetson"\n'))
    with pytest.raises(PipelineError, match="prune.ratio must be in"):
        load_config(write(tmp_path, "[prune]\nratio = 1.0\n"))
    with pytest.raises(PipelineError, match="min_batch <= opt_batch <= max_batch"):
        load_config(write(tmp_path, "[engine]\nopt_batch = 128\n"))
    with pytest.raises(PipelineError, match="needs prune.macs > 0"):
        load_config(write(tmp_path, '[prune]\ntarget = "macs"\n'))


def test_bad_files(tmp_path):
    with pytest.raises(PipelineError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(PipelineError, match="not valid TOML"):
        load_config(write(tmp_path, "[prune\n"))


def test_override_syntax():
    assert parse_override("prune.ratio=0.3") == (["prune", "ratio"], 0.3)
    assert parse_override("model.weights=ckpt/a.pt") == (["model", "weights"], "ckpt/a.pt")
    with pytest.raises(PipelineError, match="expected section.key=value"):
        parse_override("prune.ratio")
    with pytest.raises(PipelineError, match="must be section.key"):
        parse_override("ratio=0.3")
