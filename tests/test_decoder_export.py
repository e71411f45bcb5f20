"""export.decoder: a tiny random LLaMA / Qwen2 with GQA exported in onnxruntime-genai's KV-cache layout."""
import numpy as np
import onnx
import pytest
import tiny_decoder as tiny
from conftest import one_line

torch = pytest.importorskip("torch")

from edgerun.generate import DecoderSession  # noqa: E402
from export.decoder import export_decoder  # noqa: E402
from export.errors import ExportError  # noqa: E402

# 2 shared cores: one torch thread is several times faster than two (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_the_file_has_the_genai_layout_with_dynamic_dims():
    _, info = tiny.exported("llama")
    assert (info["num_layers"], info["kv_heads"], info["head_dim"], info["vocab"], info["opset"]) == (2, 2, 8, 48, 18)
    model = onnx.load(info["path"])
    inputs = {i.name: _dims(i) for i in model.graph.input}
    outputs = {o.name: _dims(o) for o in model.graph.output}
    assert list(inputs) == info["input_names"] and list(outputs) == info["output_names"]
    assert inputs["input_ids"] == ["batch", "sequence"] and inputs["attention_mask"] == ["batch", "total_sequence"]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_sequence", 8]
    assert outputs["logits"] == ["batch", "sequence", 48]
    assert outputs["present.0.key"] == ["batch", 2, "total_sequence", 8]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_logits_match_torch_at_prefill_and_at_a_decode_step_with_past(family):
    model, info = tiny.exported(family)
    session = DecoderSession(info["path"])
    ids = np.array([[1, 5, 6, 7, 8], [1, 9, 10, 4, 12]])
    logits, past = session.step(ids, np.ones((2, 5)), np.tile(np.arange(5), (2, 1)), session.empty_past(2))
    assert np.abs(logits - _torch_logits(model, ids)).max() < 1e-4
    assert past["past_key_values.0.key"].shape == (2, 2, 5, 8)
    nxt = np.array([[13], [14]])
    step, past = session.step(nxt, np.ones((2, 6)), np.full((2, 1), 5), past)
    full = _torch_logits(model, np.concatenate([ids, nxt], axis=1))
    assert step.shape == (2, 1, 48) and past["past_key_values.1.value"].shape == (2, 2, 6, 8)
    assert np.abs(step[:, 0] - full[:, -1]).max() < 1e-4


@pytest.mark.slow
def test_inputs_embeds_variant_matches_the_token_model(tmp_path):
    model = tiny.model("llama")
    info = export_decoder(model, tmp_path / "embeds.onnx", embeds=True)
    assert info["input_names"][0] == "inputs_embeds"
    from edgerun.ort import OrtRunner
    ids = np.array([[1, 5, 6, 7]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor(ids)).numpy()
    feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, 4), np.int64),
            "position_ids": np.arange(4)[None],
            **{n: np.zeros((1, 2, 0, 8), np.float32) for n in info["input_names"][3:]}}
    with OrtRunner(info["path"]) as runner:
        logits = runner.infer(feed)["logits"]
    assert np.abs(logits - _torch_logits(model, ids)).max() < 1e-4


def test_refuses_what_is_not_a_supported_causal_lm(tmp_path):
    from transformers import LlamaConfig, LlamaModel, OPTConfig, OPTForCausalLM

    base = LlamaModel(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2))
    with pytest.raises(ExportError, match="not a transformers causal LM") as e:
        export_decoder(base, tmp_path / "m.onnx")
    one_line(e.value)
    opt = OPTForCausalLM(OPTConfig(vocab_size=16, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                   num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ExportError, match="'opt' is not supported") as e:
        export_decoder(opt, tmp_path / "m.onnx")
    one_line(e.value)
    with pytest.raises(ExportError, match="opset 17"):
        export_decoder(tiny.model(), tmp_path / "m.onnx", opset=17)
    assert not list(tmp_path.iterdir())
