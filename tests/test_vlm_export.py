"""export.vlm: the three files of a tiny random VLM, each proved, and the facts vlm.json records."""
import numpy as np
import pytest
import tiny_vlm
from conftest import one_line

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported():
    return tiny_vlm.exported()


def test_files_and_layout(exported):
    import onnx
    vlm, files, folder = exported
    assert {p.name for p in folder.iterdir()} >= {"vision.onnx", "model.onnx", "embed_tokens.npy", "vlm.json"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "a temporary file or folder was left"
    g = onnx.load(str(files.vision)).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [i.name for i in g.input] == ["pixels"] and dims(g.input[0]) == ["batch", 1, 28, 28]
    assert [o.name for o in g.output] == ["image_embeds"] and dims(g.output[0]) == ["batch", 16, 128]
    assert files.vision_max_abs < 1e-4
    assert files.decoder_info["embeds"] and files.decoder_info["input_names"][0] == "inputs_embeds"
    table = np.load(files.embed_tokens)
    assert table.dtype == np.float32 and table.shape == (tiny_vlm.VOCAB, 128)
    np.testing.assert_array_equal(table, vlm.decoder.get_input_embeddings().weight.detach().numpy())


def test_vision_file_has_a_dynamic_batch_and_matches_torch(exported):
    import torch

    from edgerun.ort import OrtRunner
    vlm, files, _ = exported
    with OrtRunner(files.vision) as r:
        for n in (1, 2, 5):
            x = np.random.default_rng(n).standard_normal((n, 1, 28, 28)).astype(np.float32)
            got = r.infer({"pixels": x})["image_embeds"]
            with torch.no_grad():
                ref = vlm.image_embeds(torch.from_numpy(x)).numpy()
            assert got.shape == (n, 16, 128)
            np.testing.assert_allclose(got, ref, atol=1e-4)


def test_facts():
    from export.vlm import vlm_facts
    vlm = tiny_vlm.model()
    f = vlm_facts(vlm)
    assert f["tokens_per_image"] == 16 and f["image_token_id"] == tiny_vlm.IMAGE_ID and f["image_token"] == "<image>"
    assert f["hidden"] == 128 and f["image_size"] == [28, 28] and f["channels"] == 1
    assert f["mean"] == [0.1307] and f["std"] == [0.3081] and f["vocab"] == tiny_vlm.VOCAB
    assert (f["bos_token_id"], f["eos_token_id"], f["pad_token_id"]) == (1, [2], 0)


def test_vlm_json_refuses_bad_facts_in_one_line(tmp_path):
    from edgerun.vlm import VLMError, read_vlm_config, write_vlm_json
    from export.vlm import vlm_facts
    facts = vlm_facts(tiny_vlm.model())
    write_vlm_json(tmp_path, facts, tiny_vlm.TEMPLATES)
    c = read_vlm_config(tmp_path)
    assert c.prompt_templates == tiny_vlm.TEMPLATES and c.image_size == (28, 28) and c.eos_token_id == (2,)
    for bad in ({"channels": 2}, {"tokens_per_image": 0}, {"std": [0.0]}, {"hidden": "128"}):
        with pytest.raises(VLMError) as e:
            write_vlm_json(tmp_path / "x", {**facts, **bad}, {})
        one_line(e.value)
    with pytest.raises(VLMError, match="image_size"):
        write_vlm_json(tmp_path / "x", {k: v for k, v in facts.items() if k != "image_size"}, {})


def test_a_vision_file_that_fails_its_proof_is_not_left(tmp_path):
    """The parity proof compares the file with VLM.image_embeds (the interface): a model whose image_embeds is
    not what its tower and projector compute fails, and nothing is left but the error."""
    from export.errors import ExportError
    from export.vlm import export_vlm
    vlm = tiny_vlm.model()
    vlm.image_embeds = lambda pixels: vlm.projector(vlm.vision.encode(pixels)) + 1.0
    with pytest.raises(ExportError, match="vision.onnx: image embeddings differ from torch's") as e:
        export_vlm(vlm, tmp_path / "a")
    one_line(e.value)
    assert list((tmp_path / "a").iterdir()) == []


def test_a_failed_vision_export_keeps_its_log_where_the_message_says(tmp_path):
    import torch

    from export.errors import ExportError
    from export.vlm import export_vlm

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x if float(x.detach().sum()) > 0 else -x
    vlm = tiny_vlm.model()
    vlm.projector = torch.nn.Sequential(vlm.projector, DataDependent())
    with pytest.raises(ExportError) as e:
        export_vlm(vlm, tmp_path / "b")
    one_line(e.value)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["vision.onnx.export.log"]
    assert str(tmp_path / "b" / "vision.onnx.export.log") in str(e.value)
