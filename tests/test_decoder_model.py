"""The decoders (built, saved, loaded offline) and the generate task's losses, scores and greedy answers."""
import json
import math

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.lm_loss import (
    exact_match_percent,
    generate_answers,
    lm_kd_loss,
    lm_loss,
    next_token_agreement,
    perplexity,
)
from pipeline.models.decoder import FAMILIES, build_decoder, load_pretrained, save_decoder, weight_bytes
from pipeline.textdata import IGNORE, build_tokenizer, encode, number_task, special_ids

# 2 shared cores: one torch thread is several times faster than two (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def task():
    train, test = number_task(seed=0, n_train=2000, n_test=40)
    return train, test, build_tokenizer([r["prompt"] + " " + r["answer"] for r in train])


def test_the_default_is_a_llama_decoder_over_50_mb_in_device_shapes(task):
    tok = task[2]
    with torch.device("meta"):   # shapes only: no time spent initialising 50 MB of weights
        model = build_decoder(tok.get_vocab_size(), special=special_ids(tok))
    c = model.config
    assert c.model_type == "llama" and c.hidden_act == "silu" and c.tie_word_embeddings
    assert c.head_dim in (64, 128) and c.num_attention_heads % c.num_key_value_heads == 0
    assert 1 <= c.num_attention_heads // c.num_key_value_heads <= 8 and c.intermediate_size % 128 == 0
    assert c.vocab_size == tok.get_vocab_size() and c.pad_token_id == special_ids(tok)["pad"]
    layer = model.model.layers[0]
    assert type(layer.input_layernorm).__name__ == "LlamaRMSNorm"
    assert {"gate_proj", "up_proj", "down_proj"} <= {n for n, _ in layer.mlp.named_children()}
    assert layer.self_attn.k_proj.out_features == c.num_key_value_heads * c.head_dim   # grouped-query
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert weight_bytes(model) >= 50e6
    untied = build_decoder(tok.get_vocab_size(), tie_word_embeddings=False, **TINY)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_build_refuses_heads_that_do_not_group():
    with pytest.raises(PipelineError, match="not a multiple"):
        build_decoder(50, num_attention_heads=6, num_key_value_heads=4, hidden_size=64, head_dim=16)


def _family_config(family, vocab):
    """A tiny config of each family, as its model card would set it (sizes aside)."""
    from transformers import AutoConfig
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    if family == "phi3":
        kw.pop("head_dim")   # phi3 derives it from hidden_size / heads
    return AutoConfig.for_model(family, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_pretrained_reads_each_family_offline(tmp_path, task, family):
    from transformers import AutoModelForCausalLM
    tok = task[2]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_family_config(family, tok.get_vocab_size())).eval()
    save_decoder(model, tok, tmp_path / family)
    loaded, tok2 = load_pretrained(tmp_path / family)
    assert loaded.config.model_type == family and tok2.get_vocab() == tok.get_vocab()
    ids = encode(tok, task[1][:4])
    with torch.no_grad():
        a = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        b = loaded(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_load_pretrained_refuses_other_models_and_missing_files(tmp_path, task):
    tok = task[2]
    model = build_decoder(tok.get_vocab_size(), special=special_ids(tok), **TINY)
    d = save_decoder(model, tok, tmp_path / "m")
    save_decoder(model, tok, d)   # over an existing folder: replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(PipelineError, match="model_type 'gpt2'; supported decoders are llama") as e:
        load_pretrained(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match=r"has no \*\.safetensors") as e2:
        load_pretrained(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(PipelineError, match=r"has no tokenizer.json, \*\.safetensors"):
        load_pretrained(d)
    with pytest.raises(PipelineError, match="is not a folder"):
        load_pretrained(tmp_path / "nope")
    assert "\n" not in str(e.value) + str(e2.value)


# --------------------------------------------------------------------------------------------------- losses
def _labels(rows):
    return torch.tensor(rows)


def test_lm_loss_is_shifted_cross_entropy_on_the_answer():
    v = 5
    logits = torch.zeros(1, 4, v)
    logits[0, 1, 3] = 10.0      # position 1 predicts token 2: right and sure
    logits[0, 2, 0] = 10.0      # position 2 predicts token 3 = 4: sure of the wrong one
    logits[0, 0, 1] = -50.0     # position 0 predicts the prompt token: masked, must not count
    labels = _labels([[IGNORE, 1, 3, 4]])
    labels[0, 1] = IGNORE
    p_right = math.exp(10) / (math.exp(10) + v - 1)
    p_wrong = 1 / (math.exp(10) + v - 1)
    expected = -(math.log(p_right) + math.log(p_wrong)) / 2
    assert lm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    assert perplexity(logits, labels) == pytest.approx(math.exp(expected), rel=1e-5)
    assert perplexity(torch.zeros(1, 3, v), _labels([[IGNORE, 2, 2]])) == pytest.approx(v, rel=1e-5)


def test_kd_loss_is_zero_kl_for_the_teacher_itself_and_grows_with_the_gap():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 7)
    labels = _labels([[IGNORE, IGNORE, 3, 4, 2], [IGNORE, 1, 1, IGNORE, IGNORE]])
    assert lm_kd_loss(t, t, labels, 2.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert lm_kd_loss(t, t, labels, 2.0, 0.0).item() == pytest.approx(lm_loss(t, labels).item(), rel=1e-6)
    s = t.clone()
    s[1, 3] += 5 * torch.randn(7)   # a masked position (labels[1, 4] is IGNORE): no change
    assert lm_kd_loss(s, t, labels, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    s[0, 2] += torch.randn(7)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s[0, 2], -1), torch.log_softmax(t[0, 2], -1),
                                    log_target=True, reduction="sum")
    assert lm_kd_loss(s, t, labels, 1.0, 1.0).item() == pytest.approx(kl.item() / 5, rel=1e-5)  # 5 answer positions
    s.requires_grad_(True)
    lm_kd_loss(s, t, labels, 2.0, 0.5).backward()
    assert s.grad.abs().sum() > 0


def test_next_token_agreement_counts_answer_positions():
    t = torch.zeros(1, 5, 4)
    t[0, :, 2] = 1.0
    s = t.clone()
    s[0, 3, 0] = 5.0              # disagrees at position 3 (predicting token 4)
    s[0, 0, 1] = 5.0              # disagrees at position 0, whose target is masked
    labels = _labels([[IGNORE, IGNORE, 1, 1, 1]])
    assert next_token_agreement(s, t, labels) == pytest.approx(200 / 3)
    assert next_token_agreement(t, t, labels) == 100.0


def test_exact_match_strips_whitespace_and_keeps_case():
    assert exact_match_percent([" ten ", "Ten", "eleven"], ["ten", "ten", "twelve"]) == pytest.approx(100 / 3)
    with pytest.raises(ValueError):
        exact_match_percent(["a"], [])


def test_batched_generation_equals_one_by_one(task):
    _, test, tok = task
    model = build_decoder(tok.get_vocab_size(), special=special_ids(tok), seed=1, **TINY)
    with torch.no_grad():   # a random model rarely stops at once: make </s> unlikely so answers have tokens
        model.lm_head.weight[special_ids(tok)["eos"]] *= 0
    prompts = [r["prompt"] for r in test[:8]]
    batched = generate_answers(model, tok, prompts, max_new_tokens=5)
    assert batched == [generate_answers(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert all(batched) and len(set(map(len, (tok.encode(p).ids for p in prompts)))) > 1   # padding was used


def test_a_tiny_decoder_learns_the_task(task):
    train, _, tok = task
    torch.manual_seed(0)
    model = build_decoder(tok.get_vocab_size(), special=special_ids(tok), **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    held = encode(tok, train[-64:])

    def held_loss():
        with torch.no_grad():
            return lm_loss(model(input_ids=held["input_ids"], attention_mask=held["attention_mask"]).logits,
                           held["labels"]).item()
    before = held_loss()
    for i in range(60):
        b = encode(tok, train[i * 32:(i + 1) * 32])
        loss = lm_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_loss() < 0.6 * before
