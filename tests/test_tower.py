"""The VILA-style vision tower: shapes, head-aware pruning that keeps the LLM width, two-output ONNX."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.models.tower import VisionTower

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "vit-tower.toml"
TINY = dict(dim=32, depth=2, heads=4, mlp_ratio=2.0, llm_hidden=48)


def tiny(**kw):
    torch.manual_seed(0)
    return VisionTower(**{**TINY, **kw}).eval()


def x(batch=3, channels=1, size=28):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ shapes
def test_default_shapes_and_output_names():
    m = VisionTower().eval()
    with torch.no_grad():
        tokens, logits = m(x(2))
    assert tokens.shape == (2, 49, 128) and logits.shape == (2, 10)
    assert tuple(m.output_names) == ("tokens", "logits")
    assert m.num_tokens == 49


def test_llm_hidden_4096_shape():
    m = VisionTower(dim=16, depth=1, heads=2, llm_hidden=4096, patch_size=7).eval()
    with torch.no_grad():
        tokens, logits = m(x(2))
    assert tokens.shape == (2, 16, 4096) and logits.shape == (2, 10)
    assert m.projector.out_features == 4096


def test_other_inputs_and_classes():
    m = VisionTower(num_classes=3, in_channels=3, image_size=16, patch_size=4, **TINY).eval()
    with torch.no_grad():
        tokens, logits = m(x(2, channels=3, size=16))
    assert tokens.shape == (2, 16, 48) and logits.shape == (2, 3)
    with pytest.raises(ValueError):
        VisionTower(image_size=28, patch_size=5)
    with pytest.raises(ValueError):
        VisionTower(dim=30, heads=4)


def _attention_modules(m):
    from pipeline.prune_attention import find_attention
    return [a.module for a in find_attention(m)]


def test_attention_modules_follow_the_pruner_convention():
    from pipeline.prune_attention import find_attention
    m = tiny()
    found = find_attention(m)
    assert [a.kind for a in found] == ["qkv"] * TINY["depth"]
    attns = [a.module for a in found]
    for a in attns:
        assert a.num_heads * a.head_dim * 3 == a.qkv.out_features
    # the projector is the only layer besides the classifier whose output width must survive
    assert "projector" in m.prune_ignored_layers


# ------------------------------------------------------------------------------------------ pruning
def _check_pruned(m, base_macs, llm_hidden):
    from pipeline.prune import count_macs
    for a in _attention_modules(m):
        assert a.qkv.out_features == 3 * a.num_heads * a.head_dim
        assert a.proj.in_features == a.num_heads * a.head_dim
    assert m.projector.out_features == llm_hidden
    with torch.no_grad():
        tokens, logits = m(x(3))
    assert tokens.shape == (3, m.num_tokens, llm_hidden) and logits.shape == (3, 10)
    assert torch.isfinite(tokens).all()
    macs, _ = count_macs(m, x(1))
    assert macs < base_macs
    return macs


def test_prune_macs_target_keeps_heads_consistent_and_llm_width(tmp_path):
    from pipeline.prune import count_macs, load_pruned, prune_model, save_pruned
    m = tiny()
    base, _ = count_macs(m, x(1))
    m, info = prune_model(m, torch.zeros(1, 1, 28, 28), target="macs", macs=0.5, importance="l2",
                          ignored_layers=m.prune_ignored_layers)
    macs = _check_pruned(m, base, TINY["llm_hidden"])
    assert macs <= 0.5 * base * 1.001
    assert info["channels"]["projector"] == TINY["llm_hidden"]
    assert any(info["channels"][f"blocks.{i}.mlp.fc1"] < int(TINY["dim"] * TINY["mlp_ratio"])
               for i in range(TINY["depth"]))
    # replay from the JSON history on a fresh tower gives the same function
    save_pruned(m, info["history"], tmp_path)
    again = load_pruned(tiny(), torch.zeros(1, 1, 28, 28), tmp_path).eval()
    with torch.no_grad():
        a, b = m(x(2)), again(x(2))
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)
    for mod_a, mod_b in zip(m.modules(), again.modules(), strict=True):
        if hasattr(mod_a, "qkv"):
            assert (mod_a.num_heads, mod_a.head_dim) == (mod_b.num_heads, mod_b.head_dim)


def test_whole_head_pruning_removes_heads_and_replays(tmp_path):
    """head_ratio removes whole heads (head_dim kept); the JSON history replays to the same tower."""
    from pipeline.prune import count_macs, load_pruned, prune_model, save_pruned
    m = tiny()
    base, _ = count_macs(m, x(1))
    m, info = prune_model(m, torch.zeros(1, 1, 28, 28), target="ratio", ratio=0.25, head_ratio=0.5, importance="l2")
    for a in _attention_modules(m):
        assert a.num_heads == TINY["heads"] // 2 and a.head_dim == TINY["dim"] // TINY["heads"]
    _check_pruned(m, base, TINY["llm_hidden"])
    save_pruned(m, info["history"], tmp_path)
    again = load_pruned(tiny(), torch.zeros(1, 1, 28, 28), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(m.eval()(x(2))[0], again(x(2))[0], atol=1e-6)
    assert [a.num_heads for a in _attention_modules(again)] == [TINY["heads"] // 2] * TINY["depth"]


def test_prune_ratio_global_taylor_keeps_llm_width():
    from pipeline.prune import count_macs, prune_model
    m = tiny()
    base, _ = count_macs(m, x(1))
    batches = [(x(8), torch.randint(0, 10, (8,)))]
    m, _ = prune_model(m, torch.zeros(1, 1, 28, 28), target="ratio", ratio=0.4, importance="taylor",
                       global_pruning=True, ignored_layers=("projector",), taylor_batches=batches)
    _check_pruned(m, base, TINY["llm_hidden"])


@pytest.fixture(scope="module")
def pruned():
    from pipeline.prune import prune_model
    m, _ = prune_model(tiny(), torch.zeros(1, 1, 28, 28), target="ratio", ratio=0.3,
                       ignored_layers=("projector",))
    return m.eval()


def test_pruned_tower_survives_a_train_step(pruned):
    """The -1 reshapes and fixed scale let a pruned tower train (the fine-tune stage needs it)."""
    import copy
    m = copy.deepcopy(pruned).train()
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    tokens, logits = m(x(4))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])) + tokens.pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------ export
def test_onnx_export_two_outputs_matches_torch(pruned, tmp_path):
    pytest.importorskip("onnxscript")
    from edgerun.ort import run_onnx
    from export.onnx_export import export_onnx
    from export.parity import compare_outputs

    m = pruned
    assert m.blocks[0].attn.head_dim < TINY["dim"] // TINY["heads"]  # a really pruned tower
    path = tmp_path / "tower.onnx"
    info = export_onnx(m, torch.zeros(1, 1, 28, 28), path, output_names=m.output_names)
    assert [o["name"] for o in info["outputs"]] == ["tokens", "logits"]
    inputs = x(7).numpy()
    with torch.no_grad():
        t, lg = m(torch.from_numpy(inputs))
    ort = run_onnx(path, inputs)
    assert ort["tokens"].shape == (7, 49, TINY["llm_hidden"]) and ort["logits"].shape == (7, 10)
    par = compare_outputs({"tokens": t.numpy(), "logits": lg.numpy()}, ort)
    assert par["max_abs"] < 1e-4 and par["min_mean_cosine"] > 0.9999


# ------------------------------------------------------------------------------------------ config
def test_config_loads_and_builds_the_tower():
    from pipeline.config import load_config
    from pipeline.modelio import build, output_names
    cfg = load_config(CONFIG)
    assert cfg.model.name == "vit_tower" and cfg.quantize.model_type == "transformer"
    assert cfg.prune.target == "macs" and cfg.prune.macs == 0.5
    assert "projector" in cfg.prune.ignored_layers and cfg.finetune.token_weight > 0
    m = build(cfg.model, cfg.data)
    assert isinstance(m, VisionTower) and output_names(m) == ("tokens", "logits")
    assert m.projector.out_features == cfg.model.kwargs.get("llm_hidden", 128)


@pytest.mark.slow
def test_tower_pipeline_on_a_small_subset(tmp_path):
    """The whole pipeline on 1,500 MNIST images with a shrunken tower (a few minutes on 2 busy cores)."""
    sets = ["data.train_subset=1500", "data.test_subset=300", "baseline.epochs=2",
            "model.kwargs={patch_size=7, dim=32, depth=2, heads=4, llm_hidden=64}",
            "finetune.epochs=0.5", "finetune.val_size=200", "finetune.gate=\"warn\"", "quantize.calib_size=64",
            "quantize.gate=\"warn\"", "profile.iters=3", "profile.warmup=1", "profile.batches=[1]"]
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(CONFIG), "--runs", str(tmp_path)]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "vit-tower" / "report.json").read_text())
    st = {s["name"]: s for s in report["stages"]}
    assert st["engine"]["status"] == "skipped"
    assert all(st[n]["status"] == "ran" for n in ("baseline", "prune", "finetune", "export_onnx", "quantize",
                                                  "profile", "package"))
    assert st["prune"]["metrics"]["macs"] <= 0.5 * st["baseline"]["metrics"]["macs"] * 1.001
    assert st["prune"]["metrics"]["channels"]["projector"] == 64
    assert (tmp_path / "vit-tower" / "deploy" / "model.onnx").is_file()
