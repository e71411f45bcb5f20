"""edgerun.vlm: the torch-free VLM runtime answers what torch answers, one prompt or a batch, and refuses bad
input in one line; the generate and eval verbs end to end on a tiny bundle."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tiny_vlm
from conftest import ROOT, one_line

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = {0: "the cat sat on", 1: "<image> what digit is this ?", 2: "<image> <image> what is the sum ?"}


@pytest.fixture(scope="module")
def bundle():
    return tiny_vlm.exported()


@pytest.fixture(scope="module")
def session(bundle):
    from edgerun.vlm import VLMSession
    return VLMSession(bundle[2], threads=1)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_greedy_answer_equals_torch(bundle, session, n_images):
    vlm = bundle[0]
    ims = tiny_vlm.images(n_images, seed=n_images)
    ids = session.prompt_ids(PROMPTS[n_images], n_images)
    assert len(ids) == 1 + len(PROMPTS[n_images].split()) + 15 * n_images and ids[0] == tiny_vlm.BOS
    g = session.answer(ims, PROMPTS[n_images], max_new_tokens=8)
    assert g.tokens == tiny_vlm.torch_greedy(vlm, ids, ims, 8)
    assert g.text == session.decode(g.tokens) and g.ttft_s > 0


def test_the_images_and_their_order_change_the_answer(session):
    a, b = tiny_vlm.images(2, seed=5)
    answers = {tuple(session.answer(ims, PROMPTS[len(ims)], max_new_tokens=6).tokens)
               for ims in ([a], [b], [a, b], [b, a])}
    assert len(answers) == 4


def test_greedy_batch_over_embeds_equals_one_by_one(session):
    items = [(tiny_vlm.images(n, seed=10 + i), PROMPTS[n]) for i, n in enumerate([2, 0, 1, 1, 2, 0])]
    alone = [session.answer(ims, p, max_new_tokens=6).tokens for ims, p in items]
    assert session.greedy(items, max_new_tokens=6, batch_size=4) == alone


def test_sampling_is_seeded(session):
    ims = tiny_vlm.images(1)
    a, b = (session.answer(ims, PROMPTS[1], max_new_tokens=6, temperature=1.0, top_k=5, seed=3) for _ in range(2))
    assert a.tokens == b.tokens


def test_bad_input_is_one_line(session):
    from edgerun.vlm import VLMError
    cases = [(tiny_vlm.images(1), PROMPTS[2], "2 <image> placeholder.*for 1 image"),
             (tiny_vlm.images(2), PROMPTS[1], "1 <image> placeholder.*for 2 image"),
             ([np.zeros((1, 32, 32), np.uint8)], PROMPTS[1], r"image 0: uint8 \[1, 32, 32\], expected uint8 \[1, 28"),
             ([np.zeros((3, 28, 28), np.uint8)], PROMPTS[1], "expected uint8"),
             ([np.zeros((1, 28, 28), np.float32)], PROMPTS[1], "image 0: float32"),
             ([], "  ", "empty")]
    for ims, prompt, match in cases:
        with pytest.raises(VLMError, match=match) as e:
            session.answer(ims, prompt)
        one_line(e.value)
    with pytest.raises(VLMError, match="item 1: the prompt has 1 <image> placeholder") as e:
        session.greedy([(tiny_vlm.images(1), PROMPTS[1]), ([], PROMPTS[1])])
    one_line(e.value)


def _cli(*args):
    p = subprocess.run([sys.executable, "-m", "edgerun", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout.strip()


def _with_sample(folder, session):
    """The bundle plus a sample whose answers are the model's own greedy answers to two of the records: 2 of 3
    match on the runtime's own answers, one answer is made wrong."""
    from edgerun.vlm_sample import write_sample
    ims = np.stack(tiny_vlm.images(3, seed=7))
    records = [{"images": [0], "prompt": PROMPTS[1], "kind": "digit"},
               {"images": [1, 2], "prompt": PROMPTS[2], "kind": "two_image"},
               {"images": [], "prompt": PROMPTS[0], "kind": "text"}]
    for r in records:
        r["answer"] = session.decode(session.answer([ims[i] for i in r["images"]], r["prompt"],
                                                    max_new_tokens=16).tokens)
    records[1]["answer"] += " wrong"
    write_sample(folder, records, ims)
    return records


def test_cli_generate_and_eval_end_to_end(bundle, session, tmp_path):
    import shutil
    folder = tmp_path / "bundle"
    shutil.copytree(bundle[2], folder)
    records = _with_sample(folder, session)
    from edgerun.genai import write_manifest
    write_manifest(folder, task="vlm")
    code, out = _cli("eval", "--bundle", folder, "--format", "json", "--threads", 1)
    assert code == 0, out
    r = json.loads(out)
    assert (r["n"], r["matched"]) == (3, 2) and r["kinds"]["two_image"]["matched"] == 0
    assert r["kinds"]["digit"]["exact_match"] == 100.0 and r["kinds"]["text"]["n"] == 1
    png = folder / "sample" / "0.png"
    code, out = _cli("generate", "--bundle", folder, "--image", png, "--prompt", PROMPTS[1], "--max-new-tokens", 16,
                     "--format", "json", "--threads", 1)
    assert code == 0, out
    assert json.loads(out)["text"] == records[0]["answer"]
    code, out = _cli("generate", "--bundle", folder, "--image", png, "--prompt", PROMPTS[2])
    assert code == 1 and "1 image" in out and len(out.splitlines()) == 1
    data = bytearray((folder / "vision.onnx").read_bytes())   # one byte of a part changed: refused before reading
    data[len(data) // 2] ^= 1
    (folder / "vision.onnx").write_bytes(bytes(data))
    generate = ("generate", "--bundle", folder, "--image", png, "--prompt", PROMPTS[1])
    for verb in (("eval", "--bundle", folder), generate):
        code, out = _cli(*verb)
        assert code == 1 and "vision.onnx" in out and len(out.splitlines()) == 1, out


def test_cli_refuses_an_image_for_a_text_bundle(tmp_path):
    import tiny_decoder
    png = tmp_path / "a.png"
    from PIL import Image
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    code, out = _cli("generate", "--bundle", tiny_decoder.bundle(), "--image", png, "--prompt", "the cat")
    assert code == 1 and "takes no --image" in out and len(out.splitlines()) == 1
    code, out = _cli("eval", "--bundle", tiny_decoder.bundle())
    assert code == 1 and "not a VLM bundle" in out and len(out.splitlines()) == 1


def test_int4_decoder_from_embeds_feeds_runs_in_the_runtime(bundle, session, tmp_path):
    """calib.int4 on the inputs_embeds decoder: AWQ calibrated on the runtime's own prompt embeddings (feeds
    of images and text), and without a dataset (its probe feed is then made for inputs_embeds); the VLM session
    runs the MatMulNBits file, batch equal to one-by-one."""
    import shutil

    import onnx

    from calib.int4 import compress_int4
    folder = tmp_path / "int4"
    shutil.copytree(bundle[2], folder)
    feeds = []
    for n in (1, 2):
        ids, embeds = session.prompt(tiny_vlm.images(n), PROMPTS[n])
        feeds.append({"inputs_embeds": embeds[None], "attention_mask": np.ones((1, len(ids)), np.int64),
                      "position_ids": np.arange(len(ids))[None], **session.decoder.empty_past(1)})
    info = compress_int4(bundle[1].decoder, folder / "model.onnx", form="ort", group_size=64, dataset=feeds)
    assert info["options"]["n_data"] == 2 and info["matmuls"]["int4"] > 0
    plain = compress_int4(bundle[1].decoder, tmp_path / "plain.onnx", form="ort", group_size=64, awq=False,
                          scale_estimation=False)
    assert plain["matmuls"]["int4"] == info["matmuls"]["int4"] and np.isfinite(plain["probe"]["max_abs_logits"])
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(folder / "model.onnx")).graph.node)
    from edgerun.vlm import VLMSession
    s4 = VLMSession(folder, threads=1)
    items = [(tiny_vlm.images(n, seed=20 + n), PROMPTS[n]) for n in (2, 0, 1)]
    alone = [s4.answer(ims, p, max_new_tokens=5).tokens for ims, p in items]
    assert s4.greedy(items, max_new_tokens=5, batch_size=3) == alone and all(alone)
