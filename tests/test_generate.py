"""edgerun.generate, edgerun.genai and the generate verb on a tiny exported LLaMA (GQA) and a word-level tokenizer."""
import json
import shutil

import numpy as np
import pytest
import tiny_decoder as tiny
from conftest import one_line

from edgerun.cli import main
from edgerun.errors import EdgeError
from edgerun.genai import GENAI_CONFIG, read_bundle
from edgerun.generate import DecoderSession, GenerateError, choose, exact_match, generate, greedy_batch

# 2 shared cores: one torch thread is several times faster than two (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 10, 11, 12, 13, 14, 4], [1, 4, 4], [1, 16, 17, 18]]


@pytest.fixture(scope="module")
def session():
    _, info = tiny.exported("llama")
    return DecoderSession(info["path"])


def test_session_reads_the_cache_layout_from_the_file(session):
    assert (session.num_layers, session.kv_heads, session.head_dim, session.dtype, session.vocab) == \
        (2, 2, 8, np.float32, 48)


def test_greedy_tokens_equal_transformers_generate(session):
    torch = pytest.importorskip("torch")
    model, _ = tiny.exported("llama")
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                      eos_token_id=tiny.EOS, pad_token_id=tiny.PAD)[0, len(prompt):].tolist()
        assert generate(session, prompt, max_new_tokens=10, eos_token_id=tiny.EOS).tokens == expected


def test_greedy_batch_equals_one_by_one(session):
    # A random model rarely says eos: a token one prompt says early stands for it, so rows finish apart.
    eos = [tiny.EOS, generate(session, PROMPTS[0], max_new_tokens=3).tokens[-1]]
    alone = [generate(session, p, max_new_tokens=10, eos_token_id=eos).tokens for p in PROMPTS]
    assert len({tuple(a) for a in alone}) == len(alone)       # the prompts do differ
    assert any(len(a) < 10 for a in alone) and any(len(a) == 10 for a in alone)  # some stop at eos, some do not
    for batch_size in (2, 16):
        assert greedy_batch(session, PROMPTS, max_new_tokens=10, eos_token_id=eos, pad_token_id=tiny.PAD,
                            batch_size=batch_size) == alone


def test_sampling_is_reproducible_and_differs_from_greedy(session):
    prompt = PROMPTS[0]
    greedy = generate(session, prompt, max_new_tokens=12).tokens
    hot = [generate(session, prompt, max_new_tokens=12, temperature=5.0, seed=s).tokens for s in (1, 1, 2)]
    assert hot[0] == hot[1] and hot[0] != hot[2] and hot[0] != greedy
    # top_k=1 and a tiny top_p leave only the most likely token: greedy at any temperature
    assert generate(session, prompt, max_new_tokens=12, temperature=5.0, top_k=1, seed=3).tokens == greedy
    assert generate(session, prompt, max_new_tokens=12, temperature=5.0, top_p=1e-6, seed=3).tokens == greedy


def test_choose_samples_only_within_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 2.9, 1.0, -2.0])
    assert {choose(logits, temperature=1.0, top_k=2, top_p=1.0, rng=rng) for _ in range(200)} == {1, 2}
    # probabilities ~ .04 .48 .44 .07 .00: top_p 0.5 needs the two most likely
    assert {choose(logits, temperature=1.0, top_k=0, top_p=0.5, rng=rng) for _ in range(200)} == {1, 2}
    assert {choose(logits, temperature=1.0, top_k=0, top_p=1.0, rng=rng) for _ in range(400)} >= {0, 1, 2, 3}


def test_eos_stops_and_streaming_sees_every_token(session):
    free = generate(session, PROMPTS[0], max_new_tokens=10)
    assert free.stop_reason == "max_new_tokens" and len(free.tokens) == 10
    eos = free.tokens[3]
    seen = []
    stopped = generate(session, PROMPTS[0], max_new_tokens=10, eos_token_id=[47, eos], on_token=seen.append)
    cut = free.tokens.index(eos) + 1
    assert stopped.tokens == free.tokens[:cut] == seen and stopped.stop_reason == "eos"
    short = generate(session, PROMPTS[0], max_new_tokens=10, context_length=8)
    assert short.tokens == free.tokens[:3] and short.stop_reason == "context_length"
    assert short.ttft_s > 0 and free.decode_tokens_per_s > 0


def test_exact_match_strips_whitespace_and_is_case_sensitive():
    assert exact_match("  Paris\n", "Paris") and not exact_match("paris", "Paris")
    assert not exact_match("Paris.", "Paris") and not exact_match("New  York", "New York")


def test_bad_generation_inputs_are_one_line(session, tmp_path):
    for kwargs in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}):
        with pytest.raises(GenerateError) as e:
            generate(session, [1, 5], **kwargs)
        one_line(e.value)
    with pytest.raises(GenerateError, match="no tokens"):
        generate(session, [])
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
              tmp_path / "plain.onnx")
    with pytest.raises(GenerateError, match="not a decoder with a KV cache") as e:
        DecoderSession(tmp_path / "plain.onnx")
    one_line(e.value)


def test_bundle_is_read_from_genai_config():
    bundle = read_bundle(tiny.bundle())
    assert (bundle.bos_token_id, bundle.eos_token_ids, bundle.pad_token_id, bundle.context_length) == \
        (tiny.BOS, [tiny.EOS], tiny.PAD, 64)
    assert bundle.onnx.name == "model.onnx" and bundle.add_bos
    assert bundle.encode(bundle.tokenizer(), "the cat sat") == [tiny.BOS, 4, 5, 7]


def _cli(capsys, *args):
    code = main(["generate", "--bundle", str(tiny.bundle()), *args])
    return code, capsys.readouterr().out


def test_cli_streams_text_and_prints_json(session, capsys):
    bundle = read_bundle(tiny.bundle())
    tok = bundle.tokenizer()
    expected = generate(session, bundle.encode(tok, "the cat sat"), max_new_tokens=8, eos_token_id=tiny.EOS,
                        tokenizer=tok)
    code, out = _cli(capsys, "--prompt", "the cat sat", "--max-new-tokens", "8")
    assert code == 0 and out == expected.text + "\n"
    code, out = _cli(capsys, "--prompt", "the cat sat", "--max-new-tokens", "8", "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["tokens"] == expected.tokens and doc["text"] == expected.text
    assert doc["stop_reason"] == expected.stop_reason and doc["ttft_s"] > 0
    code, out = _cli(capsys, "--prompt", "the cat sat", "--temperature", "5", "--seed", "4", "--format", "json")
    assert json.loads(out)["tokens"] != expected.tokens


def test_cli_eval_scores_exact_match(session, tmp_path, capsys):
    bundle = read_bundle(tiny.bundle())
    tok = bundle.tokenizer()
    prompts = ["the cat sat", "a red dog", "big blue mat and", "the dog ran to"]
    answers = [generate(session, bundle.encode(tok, p), max_new_tokens=6, eos_token_id=tiny.EOS,
                        tokenizer=tok).text for p in prompts]
    assert all(answers) and len(set(answers)) == len(answers)
    answers[1] = answers[1] + " home"                                   # one wrong answer
    answers[2] = f"  {answers[2]}\n"                                    # surrounding whitespace does not count
    jsonl = tmp_path / "eval.jsonl"
    records = [json.dumps({"prompt": p, "answer": a}) for p, a in zip(prompts, answers, strict=True)]
    jsonl.write_text("\n".join(records) + "\n")
    code, out = _cli(capsys, "--eval", str(jsonl), "--max-new-tokens", "6", "--batch-size", "3")
    assert code == 0 and json.loads(out) == {"n": 4, "exact_match": 75.0, "matched": 3}


def test_cli_bad_inputs_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the cat", "answer": "sat"}\n{"prompt": \n')
    cases = [(["--prompt", ""], "prompt is empty"), (["--prompt", "x", "--top-p", "0"], "top_p"),
             (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
             (["--eval", str(bad)], "bad.jsonl:2"), (["--eval", str(tmp_path / "none.jsonl")], "no such file")]
    for args, expected in cases:
        code, out = _cli(capsys, *args)
        assert code == 1 and out.count("\n") == 1 and out.startswith("FAILED | error:") and expected in out, out
    for folder, expected in ((tmp_path / "missing", "no such folder"), (tmp_path, "no manifest.json")):
        code = main(["generate", "--bundle", str(folder), "--prompt", "the cat"])
        out = capsys.readouterr().out
        assert code == 1 and out.count("\n") == 1 and expected in out, out
    with pytest.raises(EdgeError, match="names 'gone.onnx'"):
        (tmp_path / GENAI_CONFIG).write_text(json.dumps({"model": {"decoder": {"filename": "gone.onnx"},
                                                                   "eos_token_id": 2, "context_length": 8}}))
        read_bundle(tmp_path)


def _copy(tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(tiny.bundle(), folder)
    return folder


def _refusal(capsys, folder, expected):
    code = main(["generate", "--bundle", str(folder), "--prompt", "the cat", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert code == 1 and out.count("\n") == 1 and out.startswith("FAILED | error:") and expected in out, out
    return out


def test_generate_verifies_the_bundle_against_its_manifest(tmp_path, capsys):
    folder = _copy(tmp_path)
    code = main(["generate", "--bundle", str(folder), "--prompt", "the cat", "--max-new-tokens", "2"])
    assert code == 0 and capsys.readouterr().out.strip()                  # intact: it runs
    model = folder / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01                                          # one byte of the weights
    model.write_bytes(bytes(data))
    _refusal(capsys, folder, "model.onnx: sha256")
    model.write_bytes(bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x01]) + data[len(data) // 2 + 1:]))
    code = main(["generate", "--bundle", str(folder), "--prompt", "the cat", "--max-new-tokens", "2"])
    assert code == 0, capsys.readouterr().out                             # restored: it runs again
    capsys.readouterr()
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text().replace('"cat"', '"cot"'))
    _refusal(capsys, folder, "tokenizer.json: sha256")


def test_generate_refuses_unlisted_models_and_unknown_manifests(tmp_path, capsys):
    from edgerun.genai import write_manifest
    folder = _copy(tmp_path)
    shutil.copy(folder / "model.onnx", folder / "other.onnx")             # a model the packager did not write
    _refusal(capsys, folder, "other.onnx is in the bundle but not listed")
    write_manifest(folder)                                                # listed: still one model per bundle
    _refusal(capsys, folder, "one ONNX model")
    (folder / "other.onnx").unlink()
    write_manifest(folder)
    doc = json.loads((folder / "manifest.json").read_text())
    (folder / "tokenizer_config.json").unlink()
    _refusal(capsys, folder, "tokenizer_config.json: listed in manifest.json but missing")
    folder = _copy(tmp_path / "again")
    for change, expected in (({"format": 1}, "format must be 2"), ({"task": "classify"}, "task must be"),
                             ({"extra": 1}, "unknown field 'extra'")):
        (folder / "manifest.json").write_text(json.dumps({**doc, **change}))
        _refusal(capsys, folder, expected)
    genai = json.loads((folder / GENAI_CONFIG).read_text())
    genai["model"]["decoder"]["filename"] = "manifest.json"             # the config must name the listed model
    (folder / GENAI_CONFIG).write_text(json.dumps(genai))
    write_manifest(folder)
    _refusal(capsys, folder, "the manifest's model is model.onnx")


def test_onnxruntime_genai_generates_the_same_greedy_tokens(session):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(tiny.bundle()))
    for prompt in PROMPTS[:3]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 10, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        assert tokens == generate(session, prompt, max_new_tokens=10, eos_token_id=tiny.EOS).tokens


def test_an_inputs_embeds_decoder_runs_the_same_loop(session):
    """The same model exported with inputs_embeds, fed the rows of its embedding table, generates, samples and
    batches as the input_ids file does; without the table it says so in one line."""
    model, info = tiny.exported("llama", embeds=True)
    table = model.get_input_embeddings().weight.detach().numpy()
    embeds = DecoderSession(info["path"], embed_tokens=table)
    assert embeds.embeds and not session.embeds and embeds.first == "inputs_embeds"
    for prompt in PROMPTS[:3]:
        assert generate(embeds, prompt, max_new_tokens=8).tokens == generate(session, prompt, max_new_tokens=8).tokens
        assert generate(embeds, prompt, max_new_tokens=8, prompt_embeds=table[prompt]).tokens == \
            generate(session, prompt, max_new_tokens=8).tokens
    sampled = dict(max_new_tokens=8, temperature=0.8, top_k=10, seed=4)
    assert generate(embeds, PROMPTS[0], **sampled).tokens == generate(session, PROMPTS[0], **sampled).tokens
    batch = dict(max_new_tokens=6, eos_token_id=tiny.EOS, pad_token_id=tiny.PAD, batch_size=2)
    assert greedy_batch(embeds, PROMPTS, **batch) == greedy_batch(session, PROMPTS, **batch)
    assert greedy_batch(embeds, PROMPTS, prompts_embeds=[table[p] for p in PROMPTS], **batch) == \
        greedy_batch(session, PROMPTS, **batch)
    bare = DecoderSession(info["path"])
    for call in (lambda: generate(bare, PROMPTS[0]), lambda: generate(session, PROMPTS[0], prompt_embeds=table[:5]),
                 lambda: DecoderSession(info["path"], embed_tokens=table[:, :4]),
                 lambda: greedy_batch(embeds, PROMPTS, prompts_embeds=[table[:2]] * len(PROMPTS), **batch)):
        with pytest.raises(GenerateError) as e:
            call()
        one_line(e.value)
