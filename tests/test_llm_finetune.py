"""The decoder's fine-tune stage (pipeline/llm/finetune.py): an interrupted distillation resumes inside the run from the
checkpoint of the same fingerprint (and only that one), and a ladder of picks from the prune stage is distilled in
turn until one passes the exact-match gate. A tiny random LLaMA folder and prompts without answers (exact-match is
then agreement with the unpruned model's own greedy answers), nothing downloaded."""
import dataclasses
import json
import shutil

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig

import pipeline
from pipeline import train_ckpt
from pipeline.api import load
from pipeline.contract import ConfigView
from pipeline.llm import finetune as llm_finetune
from pipeline.llm.lm import TextData, widths_of
from pipeline.models.decoder import save_decoder
from pipeline.runner import Context
from pipeline.stages import DECODER_STAGES
from pipeline.textdata import build_tokenizer, number_task

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["data.kind=jsonl", "task.kind=generate", "baseline.min_top1=-1", "decoder.max_new_tokens=4",
       "decoder.int4_group=16", "prune.target=ratio", "prune.ratio=0.5", "finetune.epochs=1",
       "finetune.batch_size=8", "finetune.checkpoint_every=1", *(f"{s}.gate=warn" for s in ("prune", "finetune"))]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(overrides, runs folder): a tiny random LLaMA folder and 32 train / 12 test prompts without answers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tmp = tmp_path_factory.mktemp("llm_ft")
    train, test = number_task(seed=1, n_train=32, n_test=12)
    data = tmp / "data"
    data.mkdir()
    for name, rows in (("train", train), ("test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    tok = build_tokenizer([r["prompt"] + " " + r["answer"] for r in train])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2)).eval()
    save_decoder(model, tok, tmp / "llama")
    return [*RUN, f"model.pretrained={tmp / 'llama'}", f"data.root={data}"], tmp / "runs"


class Killed(Exception):
    pass


def run(overrides, runs, name, log=None, **kw):
    return pipeline.run("configs/llm-cpu.toml", overrides, run_name=name, runs=runs, until="finetune",
                        log=(log.append if log is not None else lambda m: None), **kw)


def weights(result):
    return load_file(result.run_dir / "03_finetune" / "model" / "model.safetensors")


def test_a_killed_distillation_resumes_inside_the_run_to_the_same_weights(inputs, monkeypatch):
    overrides, runs = inputs
    whole = run(overrides, runs, "whole")
    assert "resumed_at_step" not in whole.record("finetune").metrics
    stage = next(s for s in DECODER_STAGES if s.name == "finetune")
    # declared == read, so the fingerprint (the checkpoint's key) is exact (eval_prompts: read where the test split
    # is cut, pipeline.llm.lm.TextData)
    assert whole.reads["finetune"] == set(stage.keys(whole.config)) - {"decoder.eval_prompts"}
    real_save, saves = train_ckpt.save, []

    def save_then_die(ck, state, *args):   # killed just after the checkpoint at step 2 (of 4) was written
        real_save(ck, state, *args)
        saves.append(state.step)
        if state.step == 2:
            raise Killed()
    monkeypatch.setattr(train_ckpt, "save", save_then_die)
    with pytest.raises(Killed):
        run(overrides, runs, "killed", force=["finetune"])
    left = list((runs / "killed" / ".checkpoints").iterdir())
    assert [p.name.split("-")[0] for p in left] == ["finetune"] and (left[0] / "rung0.pt").is_file()
    monkeypatch.setattr(train_ckpt, "save", real_save)
    lines = []
    resumed = run(overrides, runs, "killed", log=lines, force=["finetune"])
    assert any("resumed from the checkpoint at step 2 of 4" in m for m in lines), lines
    assert resumed.record("finetune").metrics["resumed_at_step"] == 2
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert not (runs / "killed" / ".checkpoints" / left[0].name).exists()   # gone once the stage finished


def test_a_checkpoint_of_another_config_is_never_resumed(inputs, monkeypatch):
    overrides, runs = inputs
    real_save = train_ckpt.save

    def save_then_die(ck, state, *args):
        real_save(ck, state, *args)
        raise Killed()
    monkeypatch.setattr(train_ckpt, "save", save_then_die)
    with pytest.raises(Killed):
        run(overrides, runs, "changed", force=["finetune"])
    monkeypatch.setattr(train_ckpt, "save", real_save)
    lines = []
    result = run([*overrides, "finetune.lr=2e-4"], runs, "changed", log=lines, force=["finetune"])
    assert not any("resumed" in m for m in lines)
    assert "resumed_at_step" not in result.record("finetune").metrics
    assert not any((runs / "changed" / ".checkpoints").iterdir())   # the other config's went with the stage


def _ladder_context(inputs, tmp_path, *extra):
    """The fine-tune stage's Context over a prune output with two picks: the 50 % pruned model first, then the
    unpruned model's own folder as the wider pick (built here, as the prune stage would lay it out)."""
    overrides, runs = inputs
    result = pipeline.run("configs/llm-cpu.toml", overrides, run_name="ladder", runs=runs, until="prune",
                          log=lambda m: None)
    base, prune = result.record("baseline"), result.record("prune")
    full = widths_of(AutoConfig.from_pretrained(result.run_dir / "01_baseline" / "model"))
    folder = tmp_path / "prune"
    shutil.copytree(result.run_dir / "02_prune", folder)
    shutil.copytree(result.run_dir / "01_baseline" / "model", folder / "rung1" / "model")
    ladder = [{"folder": "model", "widths": prune.metrics["widths"], "speedup": 1.9, "meets_goal": True},
              {"folder": "rung1/model", "widths": full, "speedup": 1.0, "meets_goal": False}]
    prune = dataclasses.replace(prune, metrics={**prune.metrics, "ladder": ladder})
    cfg, _ = load("configs/llm-cpu.toml", [*overrides, "prune.target=speedup", "prune.backoff=1",
                                           "finetune.lr=1e-6", *extra])
    stage = next(s for s in DECODER_STAGES if s.name == "finetune")
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    ctx = Context(stage, ConfigView(stage.name, cfg, stage.keys(cfg)), out,
                  {"baseline": (result.run_dir / "01_baseline", base), "prune": (folder, prune)}, TextData(cfg),
                  lines.append)
    return ctx, lines, base, full


def test_the_ladder_backs_off_to_the_wider_pick_that_passes(inputs, tmp_path):
    ctx, lines, _, full = _ladder_context(inputs, tmp_path, "finetune.max_drop=10")
    m = llm_finetune.finetune(ctx).metrics
    assert [t["passed"] for t in m["tried"]] == [False, True], m["tried"]
    assert m["rung"] == 1 and m["widths"] == full and m["exact_match"] == 100.0
    assert m["tried"][0]["drop"] > 10
    assert any("backing off to a wider pick" in line for line in lines)
    assert json.loads((ctx.out / "model" / "config.json").read_text())["intermediate_size"] == 128


def test_when_no_pick_passes_the_most_accurate_one_ships_and_the_gate_fails(inputs, tmp_path):
    # a larger step moves the wider pick's answers off the unpruned model's too: no pick is within 0 pt
    ctx, lines, base, _ = _ladder_context(inputs, tmp_path, "finetune.max_drop=0", "finetune.gate=fail",
                                          "finetune.lr=2e-4")
    m = llm_finetune.finetune(ctx).metrics
    tried = m["tried"]
    assert [t["passed"] for t in tried] == [False, False] and all(t["drop"] > 0 for t in tried)
    best = min(range(2), key=lambda k: tried[k]["drop"])   # (16.7 % vs 8.3 % here: the narrower pick)
    assert m["rung"] == best and m["exact_match"] == tried[best]["exact_match"]
    assert any("no wider pick left" in line for line in lines)
    gate = llm_finetune.quality_gate("finetune", "baseline")(
        m, {"baseline": base}, ConfigView("finetune", ctx.cfg._cfg, ("finetune.gate", "finetune.max_drop",
                                                                     *llm_finetune.GATE_CONFIG)))
    assert gate.stops and "exact_match" in gate.first_failure().message()


@pytest.mark.parametrize("config, change, words", [
    ("configs/cpu.toml", ["finetune.sharding=fsdp", "finetune.nproc=2"], "shards a decoder's layers"),
    ("configs/llm-cpu.toml", ["finetune.sharding=fsdp"], "set finetune.nproc >= 2"),
    ("configs/cpu.toml", ["finetune.checkpoint_every=10"], "only the decoder's fine-tune checkpoints"),
    ("configs/llm-cpu.toml", ["finetune.sharding=fsdp", "finetune.nproc=2", "finetune.checkpoint_every=10"],
     "FSDP shards the optimizer state"),
    ("configs/llm-cpu.toml", ["finetune.checkpoint_every=-2"], "-1 (auto), 0 (off)"),
    ("configs/llm-cpu.toml", ["finetune.sharding=zero"], "is not one of 'ddp', 'fsdp'"),
])
def test_sharding_and_checkpoints_are_refused_in_one_line_where_they_cannot_apply(config, change, words):
    from conftest import one_line

    from pipeline.errors import PipelineError
    with pytest.raises(PipelineError) as e:
        load(config, change)
    assert words in one_line(e.value)


def test_the_decoder_default_checkpoints_every_100_steps_and_fsdp_not_at_all():
    cfg, _ = load("configs/llm-cpu.toml")
    assert llm_finetune.checkpoint_every(cfg.finetune) == 100
    cfg, _ = load("configs/llm-cpu.toml", ["finetune.sharding=fsdp", "finetune.nproc=2"])
    assert llm_finetune.checkpoint_every(cfg.finetune) == 0
