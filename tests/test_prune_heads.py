"""Whole attention heads as latency-search groups (pipeline.prune_heads), on the project's fused-qkv
vision tower and on torch's nn.TransformerEncoderLayer."""
import math
import tomllib

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT

from pipeline import prune_scope as scope
from pipeline.errors import PipelineError
from pipeline.models.coverage import ViTMHA
from pipeline.models.tower import VisionTower
from pipeline.prune import _apply_widths, export_for_timing, latency_groups, load_pruned, prune_model, save_pruned

pytestmark = pytest.mark.usefixtures("one_thread")
EX = torch.zeros(1, 1, 28, 28)


def tower(seed=0):
    torch.manual_seed(seed)
    return VisionTower(patch_size=7, dim=32, depth=2, heads=4, llm_hidden=16).eval()


def mha(seed=0):
    torch.manual_seed(seed)
    return ViTMHA(dim=32, depth=2, heads=4).eval()


MODELS = {"fused_qkv_tower": (tower, ("projector",)), "torch_transformer_encoder": (mha, ())}


def common(model, ignored=(), *, importance="l2", max_layer_ratio=1.0, batches=()):
    """The options prune_model hands the latency search."""
    return dict(importance=importance, global_pruning=False, round_to=1, max_layer_ratio=max_layer_ratio,
                iterative_steps=1, ignored_names=tuple(ignored), taylor_batches=list(batches), seed=0,
                layer_ratios={}, head_ratio=0.0, narrow_heads=True, unwrapped=scope.unwrapped_dims(model, None))


def head_groups(model, opts):
    groups, skipped = latency_groups(model, EX, opts)
    return {g.name: g for g in groups if g.name.endswith("#heads")}, skipped


def boost_head(model, name, head, factor):
    """Scale one head's weights of ``name`` (its q/k/v rows and the output columns reading it)."""
    a = dict(model.named_modules())[name]
    with torch.no_grad():
        if isinstance(a, nn.MultiheadAttention):
            e, d = a.embed_dim, a.embed_dim // a.num_heads
            for part in range(3):
                a.in_proj_weight[part * e + head * d:part * e + (head + 1) * d] *= factor
            a.out_proj.weight[:, head * d:(head + 1) * d] *= factor
        else:
            d, e = a.head_dim, a.num_heads * a.head_dim
            for part in range(3):
                a.qkv.weight[part * e + head * d:part * e + (head + 1) * d] *= factor
            a.proj.weight[:, head * d:(head + 1) * d] *= factor


# ------------------------------------------------------------------------------------- listing
def test_fused_qkv_tower_lists_one_head_group_per_attention_ranked_by_its_heads():
    model = tower()
    boost_head(model, "blocks.1.attn", 2, 8.0)
    groups, skipped = head_groups(model, common(model, ("projector",)))
    assert sorted(groups) == ["blocks.0.attn#heads", "blocks.1.attn#heads"]
    for g in groups.values():
        assert g.channels == 4 and g.min_width == 1 and len(g.importance) == 4
        assert list(g.importance) == sorted(g.importance) and min(g.importance) > 0
    # the boosted head dominates its attention's ranking, and the other attention is not affected
    b1, b0 = groups["blocks.1.attn#heads"].importance, groups["blocks.0.attn#heads"].importance
    assert b1[-1] > 3 * b1[-2]
    assert b0[-1] < 3 * b0[-2]
    assert not any("#heads" in s for s in skipped)
    assert {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"} <= {g.name for g in latency_groups(model, EX, common(
        model, ("projector",)))[0]}  # channel groups are still listed beside the heads


def test_torch_encoder_layers_on_one_stream_share_one_head_group():
    model = mha()
    boost_head(model, "encoder.layers.0.self_attn", 1, 8.0)
    groups, _ = head_groups(model, common(model))
    # nn.MultiheadAttention's embed_dim is the residual width: both layers lose the same heads
    assert list(groups) == ["encoder.layers.0.self_attn#heads"]
    imp = groups["encoder.layers.0.self_attn#heads"].importance
    assert len(imp) == 4 and imp[-1] > imp[-2]


def test_max_layer_ratio_bounds_heads_but_never_below_one():
    model = tower()
    for ratio, floor in ((0.6, 2), (0.5, 2), (0.3, 3), (1.0, 1)):
        groups, _ = head_groups(model, common(model, ("projector",), max_layer_ratio=ratio))
        assert {g.min_width for g in groups.values()} == {floor}, ratio


def test_taylor_importance_ranks_heads_from_gradients():
    model = tower()
    batch = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    groups, _ = head_groups(model, common(model, ("projector",), importance="taylor", batches=batch))
    assert len(groups) == 2 and all(len(g.importance) == 4 and g.importance[-1] > 0 for g in groups.values())


# ------------------------------------------------------------------------------------- applying
@pytest.mark.parametrize("name", MODELS)
def test_head_widths_keep_exactly_that_many_whole_heads_and_survive_export_and_reload(name, tmp_path):
    make, ignored = MODELS[name]
    model = make()
    group = "blocks.0.attn#heads" if name == "fused_qkv_tower" else "encoder.layers.0.self_attn#heads"
    attn_name = group.removesuffix("#heads")
    boost_head(model, attn_name, 3, 8.0)  # the head that must survive a cut to one
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        shapes = [tuple(o.shape) for o in _outputs(model(x))]
    opts = common(model, ignored)
    mlp = "blocks.1.mlp.fc1" if name == "fused_qkv_tower" else "encoder.layers.1.linear1"
    history = _apply_widths(model, EX, {group: 1, mlp: 20}, opts)
    a = dict(model.named_modules())[attn_name]
    fresh = make()
    boost_head(fresh, attn_name, 3, 8.0)
    f = dict(fresh.named_modules())[attn_name]
    if name == "fused_qkv_tower":
        assert (a.num_heads, a.head_dim, a.qkv.out_features, a.proj.in_features) == (1, 8, 24, 8)
        assert model.blocks[1].attn.num_heads == 4  # only the chosen attention lost heads
        # the head kept is the boosted one (head 3: rows 24:32 of each of q, k and v)
        assert torch.equal(a.qkv.weight, torch.cat([f.qkv.weight[p * 32 + 24:p * 32 + 32] for p in range(3)]))
    else:
        # the stream's residual channels are the heads' channels: both layers keep head 3 only
        mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        assert len(mhas) == 2 and all(m.num_heads == 1 and m.embed_dim == 8 for m in mhas)
        rows = torch.cat([torch.arange(p * 32 + 24, p * 32 + 32) for p in range(3)])
        assert torch.equal(a.in_proj_weight, f.in_proj_weight[rows][:, 24:32])
    assert dict(model.named_modules())[mlp].out_features == 20
    with torch.no_grad():
        out = _outputs(model(x))
    assert [tuple(o.shape) for o in out] == shapes
    path = export_for_timing(model, x, tmp_path / "m.onnx")
    import onnxruntime as ort
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got[-1], out[-1].numpy(), atol=1e-4)
    save_pruned(model, history, tmp_path / "pruned")
    again = load_pruned(make(seed=5), EX, tmp_path / "pruned")
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(out, _outputs(again(x)), strict=True))
    assert dict(again.named_modules())[attn_name].num_heads == 1


def _outputs(o):
    return list(o) if isinstance(o, tuple) else [o]


def test_a_cut_to_every_head_changes_nothing_and_only_heads_prunes_no_channel():
    model = tower()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert _apply_widths(model, EX, {"blocks.0.attn#heads": 4}, common(model, ("projector",))) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    history = _apply_widths(model, EX, {"blocks.1.attn#heads": 2}, common(model, ("projector",)))
    assert history and model.blocks[1].attn.num_heads == 2 and model.blocks[1].mlp.fc1.out_features == 64


@pytest.mark.parametrize("bad", [0, 5, -1, 2.5], ids=lambda b: f"heads={b}")
def test_head_width_out_of_range_is_one_line(bad):
    model = tower()
    with pytest.raises(PipelineError, match=r"blocks.0.attn#heads must keep 1 to 4 heads") as e:
        _apply_widths(model, EX, {"blocks.0.attn#heads": bad}, common(model, ("projector",)))
    assert "\n" not in str(e.value)


def test_head_group_of_an_unknown_or_ignored_attention_is_refused():
    model = tower()
    with pytest.raises(PipelineError, match=r"no attention heads to prune named 'blocks.7.attn#heads'"):
        _apply_widths(model, EX, {"blocks.7.attn#heads": 2}, common(model, ("projector",)))
    groups, _ = head_groups(model, common(model, ("projector", "blocks.0.attn")))
    assert list(groups) == ["blocks.1.attn#heads"]
    with pytest.raises(PipelineError, match=r"no attention heads to prune named 'blocks.0.attn#heads'"):
        _apply_widths(model, EX, {"blocks.0.attn#heads": 2}, common(model, ("projector", "blocks.0.attn")))


class GQA(nn.Module):
    """Grouped-query attention (LLaMA-style): 4 query heads share 2 key/value heads."""

    def __init__(self, dim=32, heads=4, kv=2):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv, dim // heads
        self.q_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_proj, self.v_proj = nn.Linear(dim, kv * self.head_dim), nn.Linear(dim, kv * self.head_dim)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        k, v = (p(x).reshape(b, n, self.num_key_value_heads, -1).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        rep = self.num_heads // self.num_key_value_heads
        a = (q @ k.repeat_interleave(rep, 1).transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.o_proj((a @ v.repeat_interleave(rep, 1)).transpose(1, 2).reshape(b, n, -1))


class GQANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn = nn.Conv2d(1, 32, 7, 7), GQA()
        self.fc1, self.fc2, self.classifier = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        return self.classifier((t + self.fc2(self.fc1(t).relu())).mean(1))


def test_grouped_query_attention_heads_are_not_candidates_and_a_head_width_is_refused():
    model = GQANet().eval()
    groups, skipped = latency_groups(model, EX, common(model))
    assert not any(g.name.endswith("#heads") for g in groups)
    assert "attn#heads (2 key/value heads for 4 query heads)" in skipped
    assert any(g.name == "fc1" for g in groups)  # its channel groups are still searched
    with pytest.raises(PipelineError, match=r"heads of attn cannot be removed \(2 key/value heads") as e:
        _apply_widths(model, EX, {"attn#heads": 2}, common(model))
    assert "\n" not in str(e.value) and model.attn.q_proj.out_features == 32


# ------------------------------------------------------------------------------------- a real search
@pytest.mark.slow   # ~2 min on the shared 2-core machine: exports and times ~200 variants
def test_real_speedup_search_on_the_vit_tower_config_removes_heads():
    # At batch 1 this tower's fixed per-run cost bounds it: every group at width 1 measured 2.11x here,
    # every channel group at 1 with all heads kept 1.54x, and 2x searches at batch 1 ended at 1.45x (load
    # 5) and 1.79x (load 3). At batch 16 compute counts; max_layer_ratio 0.75 keeps the residual stream
    # >= 16 of 64 channels (the greedy otherwise cuts it to 1), so the speed has to come from heads.
    # 1.8x, verified in this process (as the CNN's real search test): 2x at batch 16 shipped 2.10x once
    # (3 fresh processes, load 2.3), but under load 4 missed by 0.5 % when verified and once did not
    # converge in 4 rounds: the tables' noise under load, not the heads.
    cfg = tomllib.loads((ROOT / "configs" / "vit-tower.toml").read_text())
    torch.manual_seed(0)
    model = VisionTower(**cfg["model"]["kwargs"]).eval()
    model, info = prune_model(model, EX, target="speedup", speedup=1.8, latency_batch=16, max_layer_ratio=0.75,
                              importance="l2", round_to=1, ignored_layers=cfg["prune"]["ignored_layers"],
                              verify_processes=0, log=print)
    s = info["latency_search"]
    heads = {n: w for n, w in s["widths"].items() if n.endswith("#heads")}
    assert len(heads) == cfg["model"]["kwargs"]["depth"] and all(s["channels"][n] == 4 for n in heads)
    assert sum(heads.values()) < 4 * len(heads) and min(heads.values()) >= 1   # the search took heads
    assert {n: h["num_heads"] for n, h in info["heads"].items()} == {n.removesuffix("#heads"): w
                                                                       for n, w in heads.items()}
    assert min(w for n, w in s["widths"].items() if n not in heads) >= 16       # max_layer_ratio held
    assert s["measured_speedup"] >= 1.8 and math.isfinite(s["pruned_ms"])
    print(f"measured {s['measured_speedup']}x (p10-p90 {s['measured_p10_p90']}), widths {s['widths']}, "
          f"load {s['load_average']}, {s['seconds']} s")
