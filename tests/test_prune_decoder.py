"""Decoder width pruning (pipeline/prune_decoder.py) and the decoder shape pre-flight (edgerun/llm_preflight.py),
on tiny random LLaMA / Qwen2 / Mistral models built from configs (nothing downloaded)."""
import pytest
import torch

from edgerun import llm_preflight
from edgerun.errors import EdgeError
from pipeline import prune_decoder as pd
from pipeline.errors import PipelineError

# 2 shared cores: one torch thread is several times faster than two (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "mistral")
VOCAB = 96


def tiny(family: str = "llama", seed: int = 0, **over):
    """8 query heads over 2 KV heads (4 per group), head_dim 16, intermediate 128, 2 layers."""
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    config_cls, model_cls = classes[family]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
              head_dim=16, num_hidden_layers=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    kw.update(over)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kw)).eval()


def ids(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids() if x is None else x).logits


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def taylor(model, n: int = 2):
    return pd.taylor_importance(model, lm_loss, [ids(seed=10 + i) for i in range(n)])


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- pruning: the result is a valid HF model of the asked widths -------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_runs_with_fewer_parameters_and_a_config_that_matches_its_weights(family):
    model = tiny(family)
    before, now = n_params(model), pd.decoder_widths(model)
    q_bias = model.model.layers[0].self_attn.q_proj.bias is not None
    target = now.replace(intermediate=64, q_heads=4)
    pd.prune_decoder(model, target, taylor(model), target=None)
    hidden, hd = now.hidden, now.head_dim
    removed_mlp = 3 * hidden * (128 - 64)
    removed_heads = (8 - 4) * hd * (2 * hidden + (1 if q_bias else 0))
    assert before - n_params(model) == now.layers * (removed_mlp + removed_heads)
    assert pd.decoder_widths(model) == target
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 4, 2, 16)
    for layer in model.model.layers:
        assert layer.self_attn.num_key_value_groups == 2
        assert layer.self_attn.q_proj.weight.shape == (4 * 16, hidden)
        assert layer.mlp.down_proj.weight.shape == (hidden, 64)
    out = logits(model)
    assert out.shape == (2, 12, VOCAB) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_round_trips_through_save_and_from_pretrained(family, tmp_path):
    model = tiny(family)
    w = pd.decoder_widths(model).replace(intermediate=32, q_heads=2, layers=1)
    pd.prune_decoder(model, w, taylor(model), target=None)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert pd.decoder_widths(loaded) == w
    assert torch.equal(logits(loaded), logits(model))


def test_pruned_model_decodes_with_a_kv_cache_after_a_layer_is_dropped():
    model = tiny("qwen2", num_hidden_layers=3)
    pd.prune_decoder(model, pd.decoder_widths(model).replace(layers=2, q_heads=4), taylor(model),
                     target=None, drop_layers=[1])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert len(model.config.layer_types) == 2
    x = ids(batch=1)
    with torch.no_grad():
        full = model(input_ids=x).logits[:, -1]
        past = model(input_ids=x[:, :-1], use_cache=True).past_key_values
        step = model(input_ids=x[:, -1:], past_key_values=past).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-5)


def test_drop_layers_removes_the_named_layers():
    model = tiny("llama", num_hidden_layers=3)
    third = model.model.layers[2].mlp.up_proj.weight.clone()
    pd.prune_decoder(model, pd.decoder_widths(model).replace(layers=2), taylor(model), target=None, drop_layers=[1])
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, third)
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_to_the_full_width_is_the_identity(family):
    model = tiny(family)
    before = logits(model)
    pd.prune_decoder(model, pd.decoder_widths(model), taylor(model), target=None)
    assert torch.equal(logits(model), before)


# --- importance: Taylor keeps what the task uses, magnitude does not ---------------------------------------

def _dead_mlp_channels(model, dead):
    """Channels ``dead`` get large gate/up rows but a zero down column: big weights that never reach the output."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[dead] *= 20
            layer.mlp.up_proj.weight[dead] *= 20
            layer.mlp.down_proj.weight[:, dead] = 0


def test_taylor_keeps_the_mlp_channels_that_matter_where_magnitude_keeps_dead_ones():
    dead = torch.arange(0, 128, 2)          # half of the channels, spread over the whole width
    ref = tiny("llama")
    _dead_mlp_channels(ref, dead)
    expected = logits(ref)
    by_taylor, by_magnitude = tiny("llama"), tiny("llama")
    _dead_mlp_channels(by_taylor, dead)
    _dead_mlp_channels(by_magnitude, dead)
    w = pd.decoder_widths(ref).replace(intermediate=64)
    pd.prune_decoder(by_taylor, w, taylor(by_taylor), target=None)
    pd.prune_magnitude_uniform(by_magnitude, w)
    live = ref.model.layers[0].mlp.down_proj.weight[:, 1::2]
    assert torch.equal(by_taylor.model.layers[0].mlp.down_proj.weight, live)
    assert torch.allclose(logits(by_taylor), expected, atol=1e-5)     # only channels that add nothing went
    assert not torch.allclose(logits(by_magnitude), expected, atol=1e-2)


def _dead_heads(model, dead, hd=16):
    with torch.no_grad():
        for layer in model.model.layers:
            for h in dead:
                layer.self_attn.q_proj.weight[h * hd:(h + 1) * hd] *= 20
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0


def test_taylor_keeps_the_query_heads_that_matter_where_magnitude_keeps_dead_ones():
    dead = [0, 2, 5, 7]                     # two in each KV group of four
    ref, by_taylor, by_magnitude = tiny("mistral"), tiny("mistral"), tiny("mistral")
    for m in (ref, by_taylor, by_magnitude):
        _dead_heads(m, dead)
    w = pd.decoder_widths(ref).replace(q_heads=4)
    pd.prune_decoder(by_taylor, w, taylor(by_taylor), target=None)
    pd.prune_magnitude_uniform(by_magnitude, w)
    assert torch.allclose(logits(by_taylor), logits(ref), atol=1e-5)
    assert not torch.allclose(logits(by_magnitude), logits(ref), atol=1e-2)


def test_every_kv_group_keeps_the_same_number_of_query_heads():
    model = tiny("llama")
    q = model.model.layers[0].self_attn.q_proj.weight.clone()
    imp = pd.magnitude_importance(model)
    # group 0 (heads 0-3) outranks group 1 (heads 4-7) everywhere: a global top-4 would keep only group 0
    imp.heads = [torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 1.0, 3.0, 2.0]) for _ in imp.heads]
    pd.prune_decoder(model, pd.decoder_widths(model).replace(q_heads=4), imp, target=None)
    kept = [0, 1, 4, 6]                     # the top two of each group, in order
    want = torch.cat([q[h * 16:(h + 1) * 16] for h in kept])
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, want)
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    assert torch.isfinite(logits(model)).all()


def test_lowest_importance_layer_is_dropped_by_default():
    model = tiny("llama", num_hidden_layers=3)
    imp = taylor(model)
    imp.layers = torch.tensor([3.0, 1.0, 2.0])
    last = model.model.layers[2].mlp.up_proj.weight.clone()
    pd.prune_decoder(model, pd.decoder_widths(model).replace(layers=2), imp, target=None)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, last)


def test_taylor_importance_leaves_no_gradients_and_needs_a_scalar_loss():
    model = tiny("llama")
    imp = taylor(model)
    assert imp.kind == "taylor" and all(p.grad is None for p in model.parameters())
    assert all((s >= 0).all() and s.sum() > 0 for s in imp.mlp + imp.heads)
    with pytest.raises(PipelineError, match="scalar tensor"):
        pd.taylor_importance(model, lambda m, b: 1.0, [ids()])
    with pytest.raises(PipelineError, match="at least one"):
        pd.taylor_importance(model, lm_loss, [])


# --- refusals: one line ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    (dict(intermediate=256), "intermediate 256 is not between"),
    (dict(q_heads=16), "q_heads 16 is not between"),
    (dict(q_heads=5), "not a multiple of the 2 KV heads"),
    (dict(head_dim=8), "cannot change"),
    (dict(q_heads=6), "LlamaConfig refuses"),         # transformers 5: hidden_size % num_attention_heads
])
def test_widths_the_model_or_its_family_cannot_take_are_refused(change, match):
    model = tiny("llama")
    with pytest.raises(PipelineError, match=match) as e:
        pd.prune_decoder(model, pd.decoder_widths(model).replace(**change), taylor(model), target=None)
    assert "\n" not in str(e.value)
    assert pd.decoder_widths(model).intermediate == 128          # refused before anything changed


def test_qwen2_takes_a_head_count_that_does_not_divide_hidden():
    model = tiny("qwen2")
    pd.prune_decoder(model, pd.decoder_widths(model).replace(q_heads=6), taylor(model), target=None)
    assert model.config.head_dim == 16 and torch.isfinite(logits(model)).all()


def test_widths_the_target_kernels_cannot_run_are_refused():
    model = tiny("llama")                   # head_dim 16: no Edge-LLM attention kernel
    with pytest.raises(PipelineError, match="head_dim 16 has no"):
        pd.prune_decoder(model, pd.decoder_widths(model), taylor(model), target="jetson-orin")
    pd.prune_decoder(model, pd.decoder_widths(model).replace(intermediate=64), taylor(model), target="ort-cpu",
                     int4_group=64)


def test_phi3_and_non_decoders_are_refused_naming_what_is_missing():
    phi = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with pytest.raises(PipelineError, match="fused qkv_proj and gate_up_proj"):
        pd.decoder_widths(phi)
    with pytest.raises(PipelineError, match="not a Hugging Face causal LM"):
        pd.decoder_widths(torch.nn.Linear(4, 4))
    model = tiny("llama")
    model.model.layers[0].mlp.up_proj = torch.nn.Identity()
    with pytest.raises(PipelineError, match=r"lack Linear mlp\.up_proj"):
        pd.decoder_widths(model)


def test_magnitude_recipe_keeps_depth():
    model = tiny("llama")
    with pytest.raises(PipelineError, match="keeps every layer"):
        pd.prune_magnitude_uniform(model, pd.decoder_widths(model).replace(layers=1))


# --- legal widths and the pre-flight -----------------------------------------------------------------------

def edge_sized(family="llama"):
    """A model the Edge-LLM kernels can run: head_dim 64, 8/2 heads, hidden and intermediate multiples of 128."""
    return tiny(family, hidden_size=128, intermediate_size=512, head_dim=64)


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_legal_widths_all_pass_the_preflight_and_the_pruner(family):
    model = edge_sized(family)
    cands = pd.legal_widths(model, "jetson-orin", int4_group=128, mlp_steps=4)
    assert cands and cands[0] == pd.decoder_widths(model)
    assert {w.intermediate for w in cands} == {128, 256, 384, 512}
    for w in cands:
        assert w.intermediate % 128 == 0 and w.q_heads % w.kv_heads == 0
        assert llm_preflight.check_decoder_shapes(w.config_dict(), "jetson-orin", int4_group=128) == []
    # q_heads * head_dim (o_proj's in_features) must be a multiple of 128: one query head per group (2 x 64) is
    # fine, three (6 x 64 = 384) too; LLaMA's config also wants hidden % heads == 0, which rules 6 out there
    heads = {w.q_heads for w in cands}
    assert heads == ({2, 4, 8} if family == "llama" else {2, 4, 6, 8})
    small = pd.legal_widths(model, "jetson-orin", int4_group=128)[-1]
    pd.prune_decoder(model, small, taylor(model), target="jetson-orin", int4_group=128)
    assert torch.isfinite(logits(model)).all()


def test_legal_widths_is_empty_when_the_kernels_take_no_shape_of_the_model():
    assert pd.legal_widths(tiny("llama"), "jetson-orin", int4_group=128) == []
    with pytest.raises(PipelineError, match="unknown decoder target"):
        pd.legal_widths(tiny("llama"), "jetson-nano", int4_group=128)


GOOD = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "num_hidden_layers": 16}


@pytest.mark.parametrize("target", ("jetson-orin", "trt-desktop", "ort-cpu"))
def test_a_llama_3_2_1b_shaped_config_passes_every_target(target):
    assert llm_preflight.check_decoder_shapes(GOOD, target, int4_group=128) == []


def problems(target="jetson-orin", int4_group=None, **change):
    return llm_preflight.check_decoder_shapes({**GOOD, **change}, target, int4_group=int4_group)


def test_head_dim_48_is_flagged_on_the_device_but_not_on_the_cpu():
    assert len(problems(head_dim=48, num_attention_heads=32)) == 2      # no context nor decode kernel
    assert problems("ort-cpu", head_dim=48) == []


def test_head_dim_without_a_decode_kernel_is_flagged():
    got = problems(head_dim=72)             # a context kernel exists for 72, an XQA one does not
    assert len(got) == 1 and "decode (XQA)" in got[0]


def test_head_dim_without_a_context_kernel_is_flagged():
    got = problems(head_dim=32)             # XQA has 32, the context FMHA does not
    assert len(got) == 1 and "context-attention" in got[0]


def test_q_per_kv_ratio_above_8_is_flagged():
    got = problems(num_attention_heads=32, num_key_value_heads=2)
    assert len(got) == 1 and "ratio 16" in got[0]
    assert problems("ort-cpu", num_attention_heads=32, num_key_value_heads=2) == []


def test_query_heads_not_a_multiple_of_kv_heads_are_flagged_everywhere():
    for target in llm_preflight.targets():
        assert any("whole multiple" in p for p in problems(target, num_attention_heads=30))


def test_uneven_kv_heads_between_layers_are_flagged_on_the_device():
    got = problems(num_key_value_heads=[8, 8, 4, 8])
    assert len(got) == 1 and "differs between layers" in got[0]


@pytest.mark.parametrize("change, name", [
    (dict(intermediate_size=8000), "intermediate_size"),
    (dict(hidden_size=2000, head_dim=64), "hidden_size"),
])
def test_in_features_not_a_multiple_of_the_int4_group_are_flagged(change, name):
    assert problems(int4_group=None, **change) == []          # only INT4 groups along in_features
    got = problems(int4_group=128, **change)
    assert any(name in p and "multiple of the INT4 group 128" in p for p in got)


def test_o_proj_in_features_not_a_multiple_of_the_int4_group_is_flagged():
    ok = {**GOOD, "num_attention_heads": 4, "num_key_value_heads": 1}      # o_proj in_features 4 x 64 = 256
    assert llm_preflight.check_decoder_shapes(ok, "jetson-orin", int4_group=128) == []
    bad = {**ok, "num_attention_heads": 3}                                 # 3 x 64 = 192
    got = llm_preflight.check_decoder_shapes(bad, "jetson-orin", int4_group=128)
    assert len(got) == 1 and "o_proj" in got[0]


def test_int4_group_sizes_per_target():
    assert problems("ort-cpu", int4_group=32) == []
    assert any("power of two" in p for p in problems("ort-cpu", int4_group=96))
    assert any("power of two" in p for p in problems("ort-cpu", int4_group=8))
    assert any("not one jetson-orin documents" in p for p in problems("jetson-orin", int4_group=64))


def test_unknown_target_and_bad_config_are_one_line_errors():
    with pytest.raises(EdgeError, match="unknown decoder target 'orin'.*jetson-orin, ort-cpu, trt-desktop") as e:
        llm_preflight.check_decoder_shapes(GOOD, "orin")
    assert "\n" not in str(e.value)
    with pytest.raises(EdgeError, match="hidden_size must be a positive integer"):
        llm_preflight.check_decoder_shapes({**GOOD, "hidden_size": "2048"}, "ort-cpu")


def test_head_dim_defaults_to_hidden_over_heads():
    cfg = {k: v for k, v in GOOD.items() if k != "head_dim"}
    assert llm_preflight.check_decoder_shapes(cfg, "jetson-orin") == []          # 2048 / 32 = 64
    assert llm_preflight.check_decoder_shapes({**cfg, "num_attention_heads": 16}, "jetson-orin") == []   # 128
    got = llm_preflight.check_decoder_shapes({**cfg, "hidden_size": 1536}, "jetson-orin")                # 48
    assert len(got) == 2 and all("head_dim 48" in p for p in got)
