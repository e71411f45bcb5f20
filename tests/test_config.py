"""Config: typed frozen sections, one-line errors for bad values, ignored-key warnings, `config show`."""
import dataclasses
import json
from pathlib import Path

import pytest

from edgerun.errors import EdgeError
from pipeline.api import load
from pipeline.cli import SECTIONS, main
from pipeline.config import Config, load_config, parse_override, read_config
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "configs").glob("*.toml"))


def write(tmp_path, text, name="t.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def one_line_error(path, overrides=(), match=""):
    with pytest.raises(PipelineError, match=match) as e:
        load_config(path, list(overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_there_are_shipped_configs():
    assert {p.stem for p in SHIPPED} >= {"cpu", "desktop-gpu", "jetson-orin", "vit-tower"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads_with_no_ignored_keys(path):
    cfg, warnings = load(path)
    assert cfg.run.name == path.stem
    assert warnings == [], warnings   # a key a config sets but no stage reads is a config that lies


@pytest.mark.parametrize("name", ["cpu", "desktop-gpu", "jetson-orin"])
def test_target_configs_name_their_target(name):
    assert load_config(ROOT / "configs" / f"{name}.toml").run.target == name


def test_jetson_profiles_torch_with_an_explicit_thread_count():
    # Left at 0 (torch's default: every core) the torch rows oversubscribed the cores and showed a 325x "speedup".
    assert load_config(ROOT / "configs" / "jetson-orin.toml").profile.threads == 1


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "[prune]\nratio = 0.25\n"),
                      ["prune.importance=lamp", "finetune.epochs=2", "data.mean=[0.5]", "run.name=x"])
    assert cfg.prune.ratio == 0.25 and cfg.prune.importance == "lamp"
    assert cfg.finetune.epochs == 2.0 and isinstance(cfg.finetune.epochs, float)
    assert cfg.data.mean == (0.5,) and cfg.run.name == "x"
    assert cfg.baseline == Config().baseline
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.prune.ratio = 0.1


def test_new_keys_have_their_documented_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.model.weights_strict is True
    assert cfg.baseline.gate == "fail" and cfg.baseline.min_top1 == -1.0
    assert cfg.export.example_batch == 2 and cfg.quantize.tensorrt_form is True
    assert cfg.run.name == "t"   # the file's stem


def test_explicit_keys_are_what_the_file_and_overrides_set(tmp_path):
    _, explicit = read_config(write(tmp_path, "[prune]\nratio = 0.25\n[model]\nkwargs = { width = 4 }\n"),
                              ["baseline.epochs=3"])
    assert explicit == {"prune.ratio", "model.kwargs", "baseline.epochs"}


def test_unknown_key_names_nearest(tmp_path):
    one_line_error(write(tmp_path, "[prune]\nration = 0.5\n"),
                   match=r"unknown key 'prune.ration'.*did you mean 'ratio'")
    one_line_error(write(tmp_path, "[pruen]\nratio = 0.5\n"), match=r"unknown key 'pruen'.*did you mean 'prune'")


def test_wrong_type_is_one_line(tmp_path):
    msg = one_line_error(write(tmp_path, '[prune]\nratio = "half"\n'), match="prune.ratio must be a number")
    assert "'half'" in msg   # names what was found
    one_line_error(write(tmp_path, "[baseline]\nepochs = 1.5\n"), match="baseline.epochs must be an integer")
    one_line_error(write(tmp_path, "[export]\nfp16 = 1\n"), match="export.fp16 must be true/false")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_refused(tmp_path, value):
    one_line_error(write(tmp_path, f"[finetune]\nlr = {value}\n"), match="finetune.lr must be a finite number")
    one_line_error(write(tmp_path, ""), [f"quantize.max_drop={value}"], match="quantize.max_drop must be a finite")


def test_opset_below_18_is_refused(tmp_path):
    msg = one_line_error(write(tmp_path, "[export]\nopset = 17\n"), match="export.opset = 17")
    assert ">= 18" in msg
    assert load_config(write(tmp_path, "[export]\nopset = 20\n")).export.opset == 20


@pytest.mark.parametrize("batch", [1, 0, -3])
def test_example_batch_below_2_is_refused(tmp_path, batch):
    one_line_error(write(tmp_path, f"[export]\nexample_batch = {batch}\n"), match="export.example_batch must be >= 2")


def test_choices_and_cross_field_rules(tmp_path):
    one_line_error(write(tmp_path, '[run]\ntarget = "jetson"\n'), match="run.target = 'jetson' is not one of")
    one_line_error(write(tmp_path, '[baseline]\ngate = "warning"\n'), match="baseline.gate = 'warning'.*'warn'")
    one_line_error(write(tmp_path, "[prune]\nratio = 1.0\n"), match="prune.ratio must be in")
    one_line_error(write(tmp_path, '[prune]\ntarget = "macs"\n'), match="needs prune.macs > 0")
    one_line_error(write(tmp_path, "[model]\nnum_classes = 1\n"), match="model.num_classes must be >= 2")


def test_engine_batches_out_of_order_are_one_line(tmp_path):
    # EngineCfg subclasses export.trt_options.EngineOptions, whose own check raises ExportError (an EdgeError).
    with pytest.raises(EdgeError, match="min_batch.*opt_batch.*max_batch.*1, 128, 64") as e:
        load_config(write(tmp_path, "[engine]\nopt_batch = 128\n"))
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    one_line_error(tmp_path / "missing.toml", match="config file not found")
    one_line_error(write(tmp_path, "[prune\n"), match="not valid TOML")


def test_override_syntax():
    assert parse_override("prune.ratio=0.3") == (["prune", "ratio"], 0.3)
    assert parse_override("model.weights=ckpt/a.pt") == (["model", "weights"], "ckpt/a.pt")
    with pytest.raises(PipelineError, match="expected section.key=value"):
        parse_override("prune.ratio")
    with pytest.raises(PipelineError, match="must be section.key"):
        parse_override("ratio=0.3")


# ------------------------------------------------------------------ ignored keys

def test_ratio_is_ignored_when_pruning_to_a_mac_target(tmp_path):
    path = write(tmp_path, '[prune]\ntarget = "macs"\nmacs = 0.2\nratio = 0.3\n')
    _, warnings = load(path)
    assert warnings == ["config: prune.ratio is set but not read with this configuration (ignored)"]
    _, warnings = load(path, ["prune.target=ratio"])   # now ratio is read and macs is not
    assert warnings == ["config: prune.macs is set but not read with this configuration (ignored)"]


def test_baseline_training_keys_are_ignored_when_weights_are_given(tmp_path):
    path = write(tmp_path, '[model]\nweights = "ckpt.pt"\n[baseline]\nepochs = 3\nlr = 0.01\ngate = "warn"\n')
    _, warnings = load(path)
    ignored = sorted(w.split()[1] for w in warnings)
    assert ignored == ["baseline.epochs", "baseline.lr"]   # the chance gate still judges loaded weights
    _, warnings = load(path, ["model.weights="])            # training again: nothing ignored
    assert warnings == []


def test_unread_keys_are_warned_but_the_run_still_loads(tmp_path):
    cfg, warnings = load(write(tmp_path, "[quantize]\nenabled = false\ncalib_size = 32\n"))
    assert cfg.quantize.calib_size == 32
    assert warnings == ["config: quantize.calib_size is set but not read with this configuration (ignored)"]


# ------------------------------------------------------------------ edgepipe config show

def _show(capsys, *argv):
    rc = main(["config", "show", *argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, lines, err


def test_config_show_prints_every_section_as_json(capsys, tmp_path):
    rc, lines, err = _show(capsys, "--config", str(ROOT / "configs" / "cpu.toml"), "--set", "prune.speedup=3.25")
    assert rc == 0 and err == ""
    assert lines[-1].startswith("PASSED") and "0 ignored keys" in lines[-1]
    shown = json.loads("\n".join(lines[:-1]))
    assert list(shown) == list(SECTIONS)
    assert shown == json.loads(json.dumps(load_config(ROOT / "configs" / "cpu.toml", ["prune.speedup=3.25"]).to_dict()))
    assert shown["prune"]["speedup"] == 3.25 and shown["model"]["weights_strict"] is True   # defaults included


def test_config_show_warns_about_ignored_keys_on_stderr(capsys, tmp_path):
    path = write(tmp_path, '[prune]\ntarget = "macs"\nmacs = 0.2\nratio = 0.3\n')
    rc, lines, err = _show(capsys, "--config", str(path))
    assert rc == 0 and "1 ignored keys" in lines[-1]
    assert "warning: config: prune.ratio is set but not read" in err
    json.loads("\n".join(lines[:-1]))   # the warning does not break the JSON on stdout


def test_config_show_bad_config_is_one_failed_line(capsys, tmp_path):
    rc, lines, _ = _show(capsys, "--config", str(write(tmp_path, "[export]\nopset = 13\n")))
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("FAILED | error:") and "export.opset = 13" in lines[0]


def test_task_kind_is_checked_where_the_config_enters():
    cpu = ROOT / "configs/cpu.toml"
    assert load_config(cpu).task.kind == "auto"
    assert load_config(cpu, ["task.kind=encode"]).task.kind == "encode"
    msg = one_line_error(cpu, ["task.kind=detect"])
    assert msg.endswith("task.kind must be auto or one of generate, vlm, encode, classify, got 'detect'"), msg
